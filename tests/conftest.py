"""Shared fixtures for the training, data and entry-point tests: tiny generated datasets, made once per session,
and a helper that runs ``main.py`` as a real subprocess, alone or under torchrun."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import List, Sequence

import pytest

from data.demo import generate

REPO = Path(__file__).resolve().parents[1]
DEMO_CFG = str(REPO / "configs" / "demo" / "focal_demo.yaml")
# The demo model at 32x32 on 40 training / 20 validation images: one epoch takes a second or two.
TINY_OPTS = ["DATA.IMG_SIZE", "32", "DATA.BATCH_SIZE", "8", "DATA.NUM_WORKERS", "0", "TRAIN.EPOCHS", "1",
             "TRAIN.WARMUP_EPOCHS", "0", "PRINT_FREQ", "1"]


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """10 classes, 4 train and 2 val images each, at 32x32, in both the folder and the zip layout."""
    return Path(generate(str(tmp_path_factory.mktemp("demo") / "data"), size=32, train_per_class=4,
                         val_per_class=2, log=None))


@pytest.fixture(scope="session")
def demo_data_224(tmp_path_factory) -> Path:
    """10 classes at 224x224, one val image each: the input of the official-layout 224 checkpoint fixture."""
    return Path(generate(str(tmp_path_factory.mktemp("demo224") / "data"), size=224, train_per_class=1,
                         val_per_class=1, zip_layout=False, log=None))


# One CPU thread per process and no GPU: results are deterministic and the same on every machine.
MAIN_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}


def main_command(args: Sequence[str], nproc: int = 1) -> List[str]:
    """``python main.py ARGS``, or ``torchrun --standalone --nproc_per_node NPROC main.py ARGS`` (gloo on CPU)."""
    launcher: List[str] = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return launcher + ["main.py", *args]


def run_main(args: Sequence[str], nproc: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(main_command(args, nproc), cwd=REPO, env=MAIN_ENV, capture_output=True, text=True,
                          timeout=timeout)


def start_main(args: Sequence[str], nproc: int = 1) -> subprocess.Popen:
    """``main.py`` started in the background, its stdout (rank 0's log, unbuffered) readable line by line."""
    return subprocess.Popen(main_command(args, nproc), cwd=REPO, env=MAIN_ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_line(proc: subprocess.Popen, needle: str) -> str:
    """Read ``proc``'s stdout up to the first line containing ``needle``; fails if the process ends first."""
    for line in proc.stdout:
        if needle in line:
            return line
    proc.wait()
    raise AssertionError(f"the process ended (exit {proc.returncode}) before logging {needle!r}:\n"
                         f"{proc.stderr.read()[-3000:]}")


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    return proc


def eval_summary(log: str) -> dict:
    """The last evaluation in a log: the exact printed Acc@1/Acc@5, the loss and the image counts."""
    acc = re.findall(r" \* Acc@1 ([\d.]+) Acc@5 ([\d.]+) loss ([\d.]+) \((\d+) images\)", log)
    total = re.findall(r"Accuracy of the network on the (\d+) test images: ([\d.]+)%", log)
    assert acc and total, f"no evaluation result in the log:\n{log[-3000:]}"
    acc1, acc5, loss, counted = acc[-1]
    return dict(acc1=acc1, acc5=acc5, loss=float(loss), counted=int(counted), images=int(total[-1][0]))
