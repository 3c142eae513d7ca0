"""Check this project on a CUDA GPU, the path most users run: ``make gpu-check`` (or ``python -m tools.gpu_check``).

The golden fixtures in float32 (TF32 off); 20 training steps of the demo model under fp16 autocast (with a gradient
scaler) and bf16, with a finite loss; with two GPUs, one process's evaluation equal to ``torchrun``'s on two;
every detector's bf16 training step and inference at 512x640; the benchmark against timm's Swin-T. Each step
prints PASS or FAIL (exit status 1 if any failed); without a GPU, one line and exit status 2.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

from config import HelpFormatter

ROOT = Path(__file__).resolve().parents[1]
DEMO_CFG = ROOT / "configs" / "demo" / "focal_demo.yaml"
STEPS = 20
BATCH = 32  # 20 steps of 32 images: 64 training images per class of the 10-class demo set
LOSS = re.compile(r"\tloss \S+ \((\S+)\)")  # engine.train_one_epoch: "loss <last> (<average>)"
EVAL = re.compile(r" \* Acc@1 ([\d.]+)(?: Acc@5 ([\d.]+))? loss ([\d.]+)")


def report(name: str, ok: bool, detail: str) -> bool:
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)
    return ok


def failures(failed: List[str]) -> str:
    return f"; failed: {', '.join(failed)}" if failed else ""


def check_golden() -> bool:
    from tools.golden import CASE_FILES, build_filled, case_input, load_case
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    worst, failed = 0.0, []
    for path in CASE_FILES:
        case = load_case(path)
        with torch.no_grad():
            got = build_filled(case).cuda()(case_input(case).cuda()).cpu()
        want = torch.tensor(case["output"])
        diff = (got - want).abs().max().item()
        worst = max(worst, diff)
        if not diff <= 1e-4 + 1e-4 * want.abs().max().item():
            failed.append(path.stem)
    detail = f"{len(CASE_FILES) - len(failed)}/{len(CASE_FILES)} fixtures, largest |difference| {worst:.2e}"
    return report("golden fixtures on the GPU", not failed, detail + failures(failed))


def run_main(args: Sequence[str], nproc: int = 1) -> subprocess.CompletedProcess:
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    return subprocess.run([sys.executable, *launcher, "main.py", *args], cwd=ROOT, capture_output=True, text=True)


def check_training(data: Path, output: Path, amp: str) -> Optional[Path]:
    """20 steps under ``amp``; the checkpoint it saved, or None if the run failed or its loss is not finite."""
    out = output / amp
    proc = run_main(["--cfg", str(DEMO_CFG), "--data-path", str(data), "--output", str(out), "--amp", amp,
                     "--opts", "TRAIN.EPOCHS", "1", "TRAIN.WARMUP_EPOCHS", "0", "DATA.BATCH_SIZE", str(BATCH),
                     "PRINT_FREQ", "1", "DATA.NUM_WORKERS", "2"])
    losses = [float(v) for v in LOSS.findall(proc.stdout)]
    ok = proc.returncode == 0 and bool(losses) and all(math.isfinite(v) for v in losses)
    detail = (f"final average loss {losses[-1]:.4f}" if ok else
              f"exit {proc.returncode}: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    report(f"{STEPS} training steps, {amp} autocast", ok, detail)
    return min(out.rglob("ckpt_epoch_0.pth"), default=None) if ok else None


def check_distributed_eval(data: Path, output: Path, checkpoint: Path) -> bool:
    results = []  # the last evaluation line's figures of each run, None where it failed
    for nproc in (1, 2):
        proc = run_main(["--cfg", str(DEMO_CFG), "--data-path", str(data), "--output", str(output / f"eval{nproc}"),
                         "--eval", "--resume", str(checkpoint), "--amp", "none"], nproc)
        found = EVAL.findall(proc.stdout) if proc.returncode == 0 else []
        results.append(found[-1] if found else None)
    single, double = results
    ok = single is not None and single == double
    return report("evaluation, 1 GPU vs torchrun on 2 GPUs", ok, f"Acc@1, Acc@5, loss {single} vs {double}")


def check_detectors(device: torch.device, size: Tuple[int, int] = (512, 640), configs: Sequence[str] = ()) -> bool:
    """Each detector's Focal-T config (default: all) on ``device``: a bf16 training step with finite losses, and
    inference whose boxes stay on the device (RoIAlign, NMS and matching run where the model runs)."""
    from detection.config import MASK_DETECTORS
    from detection.model import build_detector
    from tools.bench_dense import NUM_CLASSES, default_configs, detector_config, synthetic_batch
    generator, failed, names = torch.Generator().manual_seed(0), [], []
    for path in configs or default_configs():
        config = detector_config(path, size)
        detector = config.MODEL.DETECTOR
        names.append(detector)
        model = build_detector(config, NUM_CLASSES).to(device).train()
        images, targets = synthetic_batch(size, 2, detector in MASK_DETECTORS, generator, device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = sum(model(images, targets).values())
        loss.backward()
        with torch.inference_mode():
            outputs = model.eval()(images)
        if not (torch.isfinite(loss).item() and all(o["boxes"].device.type == device.type for o in outputs)):
            failed.append(f"{detector} (loss {loss.item():.4g})")
    detail = f"{len(names) - len(failed)}/{len(names)} detectors trained a step and detected on {device.type}"
    return report("detectors", not failed, detail + failures(failed))


def check_benchmark(extra: List[str]) -> bool:
    proc = subprocess.run([sys.executable, "-m", "tools.benchmark", "--device", "cuda", *extra], cwd=ROOT,
                          capture_output=True, text=True)
    print(proc.stdout, flush=True)
    return report("benchmark against Swin-T", proc.returncode == 0,
                  "table above" if proc.returncode == 0 else proc.stderr.strip()[-500:])


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.gpu_check", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--skip-benchmark", action="store_true", help="only the correctness checks")
    parser.add_argument("--benchmark-args", nargs=argparse.REMAINDER, default=[],
                        help="passed on to tools.benchmark (e.g. --batch-size 64 --img-size 224 384)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU is visible to PyTorch (torch.cuda.is_available() is False); "
              "run it on a machine with an NVIDIA GPU and a CUDA build of PyTorch", file=sys.stderr)
        return 2
    count = torch.cuda.device_count()
    print(f"gpu-check on {count} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
    results = [check_golden()]
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        from data.demo import generate
        data = Path(generate(os.path.join(tmp, "data"), size=64, train_per_class=STEPS * BATCH // 10,
                             val_per_class=10, log=None))
        checkpoints = [check_training(data, Path(tmp), amp) for amp in ("fp16", "bf16")]
        results += [c is not None for c in checkpoints]
        if count >= 2 and checkpoints[0] is not None:
            results.append(check_distributed_eval(data, Path(tmp), checkpoints[0]))
        elif count < 2:
            print("skip  evaluation, 1 GPU vs torchrun on 2 GPUs: needs 2 GPUs", flush=True)
    results.append(check_detectors(torch.device("cuda")))
    if not args.skip_benchmark:
        results.append(check_benchmark(args.benchmark_args))
    print(f"gpu-check: {sum(results)}/{len(results)} checks passed", flush=True)
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
