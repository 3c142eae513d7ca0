"""What the detection and segmentation tests share: the backbone of the official-layout checkpoint fixture (a
Focal-T shape with embed_dim 16, so its weights load into either task's backbone), and the task entry points run
as real subprocesses, alone or under torchrun (gloo on CPU)."""
from __future__ import annotations

import argparse
import subprocess
import sys
from typing import List, Sequence

from dense.run import parse_args
from tests.conftest import MAIN_ENV, REPO

CHECKPOINT = str(REPO / "tests" / "fixtures" / "small_fc_224.pth")
# tests/fixtures/small_fc_224.json's MODEL.FOCAL keys as timm arguments of focal_tiny_patch4_window7_224 (whose
# registration already sets the fc pooling and two focal levels); window 7 as in the file, so nothing is resized.
BACKBONE_OPTS = ["MODEL.BACKBONE_ARGS.embed_dim", "16", "MODEL.BACKBONE_ARGS.depths", "[2, 2, 2, 2]",
                 "MODEL.BACKBONE_ARGS.num_heads", "[2, 2, 4, 8]", "MODEL.BACKBONE_ARGS.window_size", "7",
                 "MODEL.DROP_PATH_RATE", "0.0"]


def run_task(module: str, args: Sequence[str], nproc: int = 1, timeout: float = 240) -> subprocess.CompletedProcess:
    """``python -m MODULE ARGS`` (``--device cpu``), or the same under ``torchrun --nproc_per_node NPROC``."""
    launcher: List[str] = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    command = launcher + ["-m", module, *args, "--device", "cpu"]
    return subprocess.run(command, cwd=REPO, env=MAIN_ENV, capture_output=True, text=True, timeout=timeout)


def task_args(cfg: str, **flags) -> argparse.Namespace:
    """What ``dense.run.parse_args`` gives for ``--cfg CFG`` with ``flags`` (True: a switch such as ``--eval``)."""
    args = [f"--{k.replace('_', '-')}" + ("" if v is True else f"={v}") for k, v in flags.items()]
    return parse_args("test", ["--cfg", cfg, "--data-path", "data", *args])
