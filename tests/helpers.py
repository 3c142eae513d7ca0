"""What the tests share, in one place: repository paths, small models with training-like weights, in-process
training on fake batches, the demo run's arguments and output files, and the entry points (``main.py``, the
dense tasks) run as real subprocesses, alone or under torchrun (gloo on CPU): fresh, or forked from a process that
imported the libraries once (:class:`EntryPoints`, :func:`two_processes`).

Fixtures (the generated datasets) live in ``conftest.py``; the golden-fixture recipe in ``golden.py``.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import List, Optional, Sequence
from unittest import mock

import torch
import torch.nn as nn

from config import load_config
from models import build_model
from utils import CHECKSUM_KEY, content_digest

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
LOG = logging.getLogger("focal.test")

# ---------------------------------------------------------------- models

# A Focal-T shape at width 16 with two fc-pooled levels (the architecture of tests/fixtures/small_fc_224): the
# code paths of the released models, small.
SMALL = ["MODEL.NUM_CLASSES", 10, "MODEL.DROP_PATH_RATE", 0.0, "MODEL.FOCAL.EMBED_DIM", 16,
         "MODEL.FOCAL.DEPTHS", [2, 2, 2, 2], "MODEL.FOCAL.NUM_HEADS", [2, 2, 4, 8],
         "MODEL.FOCAL.FOCAL_POOL", "fc", "MODEL.FOCAL.FOCAL_LEVELS", [2, 2, 2, 2]]


# The golden fixtures' contract (tests/fixtures/README.md, "Deterministic weights and input"): a faithful model
# agrees with the reference's logits to about 1e-6; the tests allow 1e-4, absolute and relative.
GOLDEN = dict(atol=1e-4, rtol=1e-4)


def small_model(*opts, model_type: str = "focal") -> nn.Module:
    torch.manual_seed(0)
    return build_model(load_config(opts=SMALL + ["MODEL.TYPE", model_type] + list(opts)))


def randomise(model: nn.Module, std: float = 0.2, seed: int = 1) -> nn.Module:
    """Training-like weights: every parameter moved by seeded noise of ``std``, so that zero-initialised bias
    tables and top-k biases cannot hide a position-dependent mistake. Keeps the model's mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """RMS of the difference over RMS of the reference: one number for a whole output, steadier than its largest
    entry."""
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).norm() / want.norm())


def sum_roundoff(dtype: torch.dtype, terms: int = 1, steps: int = 1) -> float:
    """How far (as :func:`relative_error`) a result computed in ``dtype`` may lie from the exact one after ``steps``
    operations in a row: ``dtype``'s unit roundoff (half its eps) twice per step (its input and its operand are each
    rounded once), added up over the steps, times sqrt(``terms``) where a step sums that many products in ``dtype``
    (rounding errors of random sign grow as its square root). Two computations of the same thing in another order
    (another kernel, a compiled or exported graph) each lie within it, so they lie within twice it of each other."""
    return 2 * steps * torch.finfo(dtype).eps / 2 * math.sqrt(terms)


def roundoff(model: nn.Module, dtype: torch.dtype, dot: int = 1) -> float:
    """:func:`sum_roundoff` over the layers of a Focal model: the patch embeddings, the blocks and the head each
    count as one step, with ``dot`` terms in the longest sum of a step (:func:`longest_sum`). LayerNorm keeps every
    layer's input at unit scale, so no layer is taken to amplify the error it receives. This depends on the dtype
    and the model only, not on the CPU's kernels."""
    layers = len(model.layers) + sum(len(stage.blocks) for stage in model.layers) + 1
    return sum_roundoff(dtype, dot, layers)


def longest_sum(model: nn.Module, x: torch.Tensor) -> int:
    """The longest dot product of a plain model's forward pass on ``x``: the widest input of a linear layer or
    convolution (an MLP's hidden width), or the longest list of keys a window's queries attend, read from one
    pass that leaves the model and the random state as they were."""
    from models.window_attention import WindowedAttention
    widths = [m.in_features if isinstance(m, nn.Linear) else m.weight[0].numel()
              for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    attend = WindowedAttention.attend

    def recording(self, q, k, v, index, bias):
        widths.append(bias.shape[-1])
        return attend(self, q, k, v, index, bias)
    with mock.patch.object(WindowedAttention, "attend", recording), torch.random.fork_rng(), torch.no_grad():
        model(x)
    return max(widths)


def rms(tensors: Sequence[torch.Tensor]) -> float:
    return float(torch.cat([t.detach().double().flatten() for t in tensors]).square().mean().sqrt())


def assert_agree(got: torch.Tensor, want: torch.Tensor, bound: float, msg: Optional[str] = None,
                 scale: Optional[float] = None) -> None:
    """Entry by entry within ``bound`` (a relative rounding bound such as :func:`roundoff`) of the reference:
    ``|got - want| <= bound * (|want| + scale)``, where ``scale`` (the RMS of ``want`` unless given) is the size of
    the terms a sum adds up, so that entries it cancelled to near zero are judged against that size, not their own."""
    scale = rms([want]) if scale is None else scale
    torch.testing.assert_close(got, want, rtol=bound, atol=bound * scale,
                               msg=None if msg is None else lambda m: f"{msg}: {m}")


def assert_outputs_and_gradients_agree(got: list, want: list, model: nn.Module, x: torch.Tensor,
                                       keys: Optional[int] = None) -> None:
    """Two float32 computations of :func:`outputs_and_gradients` (other kernels, a compiled graph) agree entry by
    entry within twice ``roundoff`` (both sides rounded) for the longest sum of the forward pass; a weight's
    gradient also sums over every image and every position of the first stage (4x4 patches), so its bound grows by
    the square root of that many terms. Every parameter the reference gives a gradient must get one. ``keys``:
    :func:`longest_sum` where the caller has it."""
    assert len(got) == len(want)
    keys = longest_sum(model, x) if keys is None else keys
    assert_agree(got[0], want[0], 2 * roundoff(model, torch.float32, dot=keys), "output")
    assert_gradients_agree(got[1:], want[1:], model, x, keys)


def assert_gradients_agree(got: list, want: list, model: nn.Module, x: torch.Tensor,
                           keys: Optional[int] = None) -> None:
    """The gradients part of :func:`assert_outputs_and_gradients_agree`, None where a parameter got none."""
    keys = longest_sum(model, x) if keys is None else keys
    bound = 2 * roundoff(model, torch.float32, dot=keys * x.shape[0] * -(-x.shape[2] // 4) * -(-x.shape[3] // 4))
    # A gradient that cancels to zero (softmax over one key) still sums terms of the model's gradient size.
    scale = rms([w for w in want if w is not None])
    for i, (g, w) in enumerate(zip(got, want)):
        assert (g is None) == (w is None), f"parameter {i}"
        if w is not None:
            assert_agree(g, w, bound, f"parameter {i}", scale)


def outputs_and_gradients(model: nn.Module, x: torch.Tensor) -> List[Optional[torch.Tensor]]:
    """The output and every parameter's gradient (None where it got none) after a backward pass of a random
    projection of the output, which keeps the gradients of order 1."""
    model.zero_grad(set_to_none=True)
    out = model(x)
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
    return [out.detach()] + [None if p.grad is None else p.grad.clone() for p in model.parameters()]


# ---------------------------------------------------------------- in-process training

DEMO_CFG = str(REPO / "configs" / "demo" / "focal_demo.yaml")


def tiny_config(*opts):
    """The demo model at 32x32."""
    return load_config(DEMO_CFG, ["DATA.IMG_SIZE", 32, "PRINT_FREQ", 1, *opts])


def fake_batches(n: int, batch: int = 4, size: int = 32):
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, 3, size, size, generator=generator),
             torch.randint(0, 10, (batch,), generator=generator))
            for _ in range(n)]


def run_epoch(config, batches, precision):
    """A freshly seeded model after one epoch over ``batches``, and how many optimizer steps were taken."""
    from engine import classification_losses, train_one_epoch
    from lr_scheduler import build_scheduler
    from optimizer import build_optimizer
    torch.manual_seed(0)
    model = build_model(config)
    optimizer = build_optimizer(config, model)
    steps = []
    optimizer.register_step_post_hook(lambda *_: steps.append(1))
    updates = len(batches) // config.TRAIN.ACCUMULATION_STEPS
    scheduler = build_scheduler(config, optimizer, updates)
    train_one_epoch(config, model, classification_losses(nn.CrossEntropyLoss()), batches, updates, optimizer,
                    scheduler, precision, 0, CPU)
    return model, optimizer, len(steps)


# ---------------------------------------------------------------- the demo run and its outputs

# The demo model at 32x32 on 40 training / 20 validation images: one epoch takes a second or two.
TINY_OPTS = ["DATA.IMG_SIZE", "32", "DATA.BATCH_SIZE", "8", "DATA.NUM_WORKERS", "0", "TRAIN.EPOCHS", "1",
             "TRAIN.WARMUP_EPOCHS", "0", "PRINT_FREQ", "1"]
MODEL_NAME = "focal_demo_patch4_window4_32"  # the demo config at TINY_OPTS' 32x32 (config.name_for_geometry)


def demo_args(data: Path, output: Path, *flags: str, opts=()) -> list:
    return ["--cfg", DEMO_CFG, "--data-path", str(data), "--output", str(output), *flags,
            "--opts", *TINY_OPTS, *opts]


def run_dir(output: Path, name: str = MODEL_NAME) -> Path:
    return output / name / "default"


def read_log(output: Path, rank: int = 0, name: str = MODEL_NAME) -> str:
    return (run_dir(output, name) / f"log_rank{rank}.txt").read_text()


def this_run(log: str) -> str:
    """The part of an appended log written by the latest run."""
    return log.split("rank 0 of ")[-1]


def eval_summary(log: str) -> dict:
    """The last evaluation in a log: the exact printed Acc@1/Acc@5, the loss and the image counts."""
    acc = re.findall(r" \* Acc@1 ([\d.]+)(?: Acc@5 ([\d.]+))? loss ([\d.]+) \((\d+) images\)", log)
    total = re.findall(r"Accuracy of the network on the (\d+) test images: ([\d.]+)%", log)
    assert acc and total, f"no evaluation result in the log:\n{log[-3000:]}"
    acc1, acc5, loss, counted = acc[-1]
    return dict(acc1=acc1, acc5=acc5, loss=float(loss), counted=int(counted), images=int(total[-1][0]))


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def first_image(root: Path, split: str = "train") -> Path:
    return sorted((root / split / "circle").iterdir())[0]


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_intact(folder: Path, before: dict, may_change: tuple = ()) -> None:
    """Nothing removed, added or rewritten; logs only appended to."""
    after = snapshot(folder)
    assert set(after) == set(before)
    for name, data in before.items():
        if "log_rank" in name:
            assert after[name].startswith(data), name
        elif not name.endswith(may_change):
            assert after[name] == data, name


def private_copy(finished: Path, target: Path) -> tuple:
    """A copy of a finished run's root (``data`` and ``out``) a test may change: its data root, its output root and
    a snapshot of the latter."""
    import shutil
    shutil.copytree(finished, target, dirs_exist_ok=True)
    return target / "data", target / "out", snapshot(target / "out")


# ---------------------------------------------------------------- real subprocesses

# One CPU thread per process and no GPU: results are deterministic and the same on every machine. A FutureWarning
# (a deprecated call, e.g. DDP's broadcast_buffers) fails the run, as it does in-process tests (pytest.ini).
MAIN_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1",
            "PYTHONWARNINGS": "error::FutureWarning"}


def launcher(nproc: int = 1) -> List[str]:
    """``python``, or ``python -m torch.distributed.run --standalone --nproc_per_node NPROC`` (torchrun)."""
    command: List[str] = [sys.executable]
    if nproc > 1:
        command += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return command


def main_command(args: Sequence[str], nproc: int = 1) -> List[str]:
    return launcher(nproc) + ["main.py", *args]


def task_command(module: str, args: Sequence[str], nproc: int = 1) -> List[str]:
    """``python -m MODULE ARGS --device cpu``, alone or under torchrun."""
    return launcher(nproc) + ["-m", module, *args, "--device", "cpu"]


def run_command(command: Sequence[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, env=MAIN_ENV, capture_output=True, text=True, timeout=timeout)


def start_command(command: Sequence[str]) -> subprocess.Popen:
    """Started in the background, its stdout (rank 0's log, unbuffered) readable line by line."""
    return subprocess.Popen(command, cwd=REPO, env=MAIN_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def run_main(args: Sequence[str], nproc: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
    return run_command(main_command(args, nproc), timeout)


def start_main(args: Sequence[str], nproc: int = 1) -> subprocess.Popen:
    return start_command(main_command(args, nproc))


def wait_for_line(proc: subprocess.Popen, needle: str) -> str:
    """Read ``proc``'s stdout up to the first line containing ``needle``; fails if the process ends first."""
    for line in proc.stdout:
        if needle in line:
            return line
    proc.wait()
    raise AssertionError(f"the process ended (exit {proc.returncode}) before logging {needle!r}:\n"
                         f"{proc.stderr.read()[-3000:]}")


class EntryPoints:
    """``python main.py ARGS`` and ``python -m MODULE ARGS`` as forked children of ``tests/entry_server.py``, which
    imported torch, torchvision and timm once: real processes (exit status, one line on stderr, DataLoader workers,
    our modules imported afresh) for the price of a fork, in :data:`MAIN_ENV`. For runs that go to their end; a run
    a test stops with a signal starts fresh (:func:`start_main`), and torchrun's ranks are fresh processes. One per
    pytest worker (conftest.py's ``entry_points``)."""

    def __init__(self) -> None:
        self._log = tempfile.TemporaryFile()
        self._server = subprocess.Popen([sys.executable, str(REPO / "tests" / "entry_server.py")], cwd=REPO,
                                        env=MAIN_ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self._log)
        self._pending = b""

    def _reply(self, timeout: Optional[float]) -> dict:
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self._server.stdout], [], [], left)[0]:
                raise subprocess.TimeoutExpired("entry server", timeout)
            chunk = os.read(self._server.stdout.fileno(), 4096)
            if not chunk:
                self._log.seek(0)
                raise RuntimeError(f"tests/entry_server.py ended:\n{self._log.read().decode()[-3000:]}")
            self._pending += chunk
        line, self._pending = self._pending.split(b"\n", 1)
        return json.loads(line)

    def run(self, argv: Sequence[str], timeout: float = 300) -> subprocess.CompletedProcess:
        """``argv`` as after ``python``: ``["main.py", ...]`` or ``["-m", "tools.export", ...]``."""
        with tempfile.TemporaryDirectory() as folder:
            out, err = Path(folder, "stdout"), Path(folder, "stderr")
            request = dict(argv=[str(a) for a in argv], stdout=str(out), stderr=str(err))
            self._server.stdin.write((json.dumps(request) + "\n").encode())
            self._server.stdin.flush()
            pid = self._reply(60)["pid"]
            try:
                returncode = self._reply(timeout)["returncode"]
            except subprocess.TimeoutExpired:
                os.kill(pid, signal.SIGKILL)
                self._reply(60)
                raise
            return subprocess.CompletedProcess([sys.executable, *argv], returncode,
                                               out.read_text(errors="backslashreplace"),
                                               err.read_text(errors="backslashreplace"))

    def main(self, args: Sequence[str], nproc: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
        """``main.py ARGS``, or torchrun's ``--nproc_per_node NPROC main.py ARGS``: torchrun forked, its ranks
        fresh processes."""
        return self.run(launcher(nproc)[1:] + ["main.py", *args], timeout)

    def close(self) -> None:
        self._server.kill()  # it holds nothing to clean up; its interpreter's exit alone takes seconds
        self._server.wait(timeout=60)
        self._server.stdin.close()
        self._server.stdout.close()
        self._log.close()


def two_processes(function, *args) -> None:
    """``function(rank, *args)`` in two processes, as ``torch.multiprocessing.spawn`` runs it, forked from
    multiprocessing's fork server, which imported the entry server's libraries once for the session: a fraction of a
    second a process instead of a fresh interpreter each (2-4 s, ~20 s loaded). The function's module is imported
    afresh in each process. The server runs in :data:`MAIN_ENV`: one thread a process (two processes of two
    threads each on two cores spent most of an epoch spinning while the other waited for its collective)."""
    import multiprocessing.forkserver

    import torch.multiprocessing as mp

    from tests.entry_server import PRELOAD
    mp.get_context("forkserver").set_forkserver_preload([*PRELOAD, "pytest"])  # pytest: a test module's import
    with mock.patch.dict(os.environ, MAIN_ENV):
        multiprocessing.forkserver.ensure_running()
    mp.start_processes(function, args=args, nprocs=2, start_method="forkserver")


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\n"
                                  f"stderr:\n{proc.stderr[-4000:]}")
    return proc


# ---------------------------------------------------------------- dense tasks (detection/, segmentation/)

# The official-layout checkpoint fixture: a Focal-T shape with embed_dim 16, so its weights load into either task's
# backbone.
CHECKPOINT = str(REPO / "tests" / "fixtures" / "small_fc_224.pth")
# tests/fixtures/small_fc_224.json's MODEL.FOCAL keys as timm arguments of focal_tiny_patch4_window7_224 (whose
# registration already sets the fc pooling and two focal levels); window 7 as in the file, so nothing is resized.
BACKBONE_OPTS = ["MODEL.BACKBONE_ARGS.embed_dim", "16", "MODEL.BACKBONE_ARGS.depths", "[2, 2, 2, 2]",
                 "MODEL.BACKBONE_ARGS.num_heads", "[2, 2, 4, 8]", "MODEL.BACKBONE_ARGS.window_size", "7",
                 "MODEL.DROP_PATH_RATE", "0.0"]


def run_task(module: str, args: Sequence[str], nproc: int = 1, timeout: float = 240) -> subprocess.CompletedProcess:
    return run_command(task_command(module, args, nproc), timeout)


def start_task(module: str, args: Sequence[str]) -> subprocess.Popen:
    return start_command(task_command(module, args))


def detector_trains_and_resumes(tmp_path: Path, cfg: str, opts: Sequence[str]):
    """A detector's config through the detection task's run on 4 generated 64-pixel images (2 per step): one epoch,
    then the same command at two epochs, which must resume after the first without training epoch 0 again.
    Returns both runs for the detector's own checks of its losses and detections."""
    from dense.demo import generate_detection
    data = generate_detection(str(tmp_path / "data"), size=64, train=4, val=2)
    args = ["--cfg", cfg, "--data-path", data, "--output", str(tmp_path / "out"), "--opts", "DATA.BATCH_SIZE", "2",
            "DATA.NUM_WORKERS", "0", "TRAIN.WARMUP_ITERS", "0", "PRINT_FREQ", "1", "EVAL_FREQ", "1", *BACKBONE_OPTS,
            *map(str, opts)]
    trained = check(run_task("detection.train", [*args, "TRAIN.EPOCHS", "1"]))
    assert "Train: [0/1][1/2]" in trained.stdout
    resumed = check(run_task("detection.train", [*args, "TRAIN.EPOCHS", "2"]))
    assert "auto-resuming from" in resumed.stdout and "Train: [1/2][1/2]" in resumed.stdout
    assert "Train: [0/2]" not in resumed.stdout
    return trained, resumed


def finished_dense_run(root: Path, task, cfg: str, generate, opts: Sequence[str]) -> Path:
    """``root`` after a one-epoch run of a dense ``task`` (in process) on demo data that ``generate`` draws in
    ``root/data``, into ``root/out``."""
    from dense.run import run
    data = generate(str(root / "data"), size=64, train=4, val=2)
    run(task, ["--cfg", cfg, "--data-path", data, "--output", str(root / "out"), "--device", "cpu", "--opts", *opts])
    return root


def task_args(cfg: str, **flags) -> argparse.Namespace:
    """What ``dense.run.parse_args`` gives for ``--cfg CFG`` with ``flags`` (True: a switch such as ``--eval``)."""
    from dense.run import parse_args
    args = [f"--{k.replace('_', '-')}" + ("" if v is True else f"={v}") for k, v in flags.items()]
    return parse_args("test", ["--cfg", cfg, "--data-path", "data", *args])


# ---------------------------------------------------------------- damaged checkpoints

def poisoned_copy(source: Path, target: Path, name: str = "layers.1.blocks.0.attn.qkv.weight") -> Path:
    """``source`` with one NaN in tensor ``name`` of its weights, re-checksummed as our saver would have written it
    (weights that went bad before a save pass the checksum)."""
    state = load(source)
    state.pop(CHECKSUM_KEY)
    state["model"][name].view(-1)[3] = float("nan")
    state[CHECKSUM_KEY] = content_digest(state)
    torch.save(state, target)
    return target


def flip_bytes_inside_largest_tensor(path: Path) -> None:
    """Damage the stored bytes of the largest tensor, leaving the zip structure and the pickle intact."""
    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_length, extra_length = int.from_bytes(data[info.header_offset + 26:info.header_offset + 28], "little"), \
        int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], "little")
    middle = info.header_offset + 30 + name_length + extra_length + info.file_size // 2
    data[middle:middle + 4] = bytes(b ^ 0xFF for b in data[middle:middle + 4])
    path.write_bytes(bytes(data))
