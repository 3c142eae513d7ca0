"""Speed and memory of the detectors at COCO's image size, each with its Focal backbone and with timm's Swin-T in
its place, measured in one run: images/s of a training step and of inference, the memory a step adds at its
peak, and the Focal/Swin ratio of each.

Every detector of ``detection.config.DETECTORS`` is timed through the first config under configs/detection that
builds it on Focal-T (``--cfg`` times given configs instead); the peer is the same config with ``MODEL.BACKBONE``
the ``--peer`` timm model. Calls alternate between ``--size`` HxW and 9/10 of its width, as COCO's images vary,
and the backbones' calls are interleaved so that slow drifts of a shared machine hit both alike. Memory is the
peak over what the process held before the call: CUDA's allocator peak, or on the CPU the peak resident size
(VmHWM, reset through ``/proc/self/clear_refs`` after ``malloc_trim``); without /proc the CPU column is empty.

    python -m tools.bench_dense --mode infer --size 640x1066 --reps 4 --json dense.json
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import glob
import os
import statistics
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from config import check_values, load_config, merge_opts
from detection.config import DETECTION_RULES, DETECTORS, MASK_DETECTORS, detection_defaults
from detection.model import build_detector
from tools.benchmark import (Calls, announce, machine, parse_size, parse_timing, print_table, ROOT, status_mb, timed,
                             timing_parser, write_json)

FOCAL_T = "focal_tiny_patch4_window7_224"
DEFAULT_PEER = "swin_tiny_patch4_window7_224"
NUM_CLASSES = 80  # COCO's
BOXES = 3  # synthetic objects per image
CLEAR_REFS = "/proc/self/clear_refs"
LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if ctypes.util.find_library("c") else None
Batch = Tuple[List[torch.Tensor], List[Dict[str, torch.Tensor]]]


def default_configs(folder: str = os.path.join(ROOT, "configs", "detection")) -> List[str]:
    """For each detector, the first config that builds it on Focal-T with its own weights' shape: by name, those
    named after the backbone (``<detector>_focal_tiny_...``) before the recipes they build on."""
    chosen = {}
    stem = FOCAL_T.rsplit("_", 1)[0]
    for path in sorted(glob.glob(os.path.join(folder, "*.yaml")), key=lambda p: (stem not in p, p)):
        model = load_config(path, None, detection_defaults()).MODEL
        if model.BACKBONE == FOCAL_T and not model.BACKBONE_ARGS:
            chosen.setdefault(model.DETECTOR, path)
    for detector in DETECTORS:
        if detector not in chosen:
            print(f"bench_dense: no config in {folder} builds {detector} on {FOCAL_T}: left out", flush=True)
    return [chosen[d] for d in DETECTORS if d in chosen]


def detector_config(path: str, size: Tuple[int, int], backbone: Optional[str] = None) -> Any:
    """The config of ``path`` resizing to fit ``size`` (no multi-scale), with ``backbone`` (a timm model, built
    for any input size) in place of its own if given; checked by the task's rules."""
    config = load_config(path, None, detection_defaults())
    config.defrost()
    opts = ["MODEL.DETECTOR_ARGS.min_size", [size[0]], "MODEL.DETECTOR_ARGS.max_size", size[1]]
    if backbone:
        opts += ["MODEL.BACKBONE", backbone, "MODEL.BACKBONE_ARGS.strict_img_size", False]
    merge_opts(config, opts)
    config.freeze()
    check_values(config, DETECTION_RULES, {})
    return config


def synthetic_batch(size: Tuple[int, int], batch: int, masks: bool, generator: torch.Generator,
                    device: torch.device) -> Batch:
    """``batch`` random images of ``size`` with ``BOXES`` random boxes each (at least 32 px a side), COCO labels
    1-80, and for mask detectors each box filled as its mask."""
    h, w = size
    images, targets = [], []
    for _ in range(batch):
        images.append(torch.rand(3, h, w, generator=generator).to(device))
        corner = torch.rand(BOXES, 2, generator=generator) * torch.tensor([w - 32, h - 32])
        extent = 32 + torch.rand(BOXES, 2, generator=generator) * (torch.tensor([w, h]) - 32 - corner)
        boxes = torch.cat([corner, corner + extent], 1).floor()
        target = {"boxes": boxes.to(device),
                  "labels": torch.randint(1, NUM_CLASSES + 1, (BOXES,), generator=generator).to(device)}
        if masks:
            ys, xs = torch.arange(h)[:, None], torch.arange(w)
            x1, y1, x2, y2 = (side[:, None, None] for side in boxes.long().unbind(1))
            target["masks"] = ((xs >= x1) & (xs < x2) & (ys >= y1) & (ys < y2)).to(torch.uint8).to(device)
        targets.append(target)
    return images, targets


def training_step(model: nn.Module) -> Callable[[Batch], None]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(batch: Batch) -> None:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        sum(model(*batch).values()).backward()
        optimizer.step()
    return step


def inference_step(model: nn.Module) -> Callable[[Batch], None]:
    def step(batch: Batch) -> None:
        model.eval()
        with torch.inference_mode():
            model(batch[0])
    return step


STEPS = {"train": training_step, "infer": inference_step}


def measured(step: Callable[[Batch], None], batch: Batch, device: torch.device) -> Tuple[float, Optional[float]]:
    """Seconds of one call and the memory it added at its peak (MB; None where it cannot be read)."""
    cuda, cpu = device.type == "cuda", device.type != "cuda" and os.path.exists(CLEAR_REFS)
    if cuda:
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    elif cpu:
        if LIBC is not None and hasattr(LIBC, "malloc_trim"):
            LIBC.malloc_trim(0)
        with open(CLEAR_REFS, "w") as f:
            f.write("5")  # resets VmHWM to the current resident size
        before = status_mb("VmRSS")
    seconds = timed(lambda: step(batch), 1, device)
    if cuda:
        return seconds, (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20
    return seconds, status_mb("VmHWM") - before if cpu else None


def bench_config(path: str, args: argparse.Namespace, calls: Calls) -> Dict[str, Any]:
    """Both backbones' figures for one config."""
    configs = {"focal": detector_config(path, args.size), "peer": detector_config(path, args.size, args.peer)}
    detector = configs["focal"].MODEL.DETECTOR
    models = {k: build_detector(c, NUM_CLASSES).to(args.device) for k, c in configs.items()}
    steps = {(k, mode): STEPS[mode](m) for k, m in models.items() for mode in args.mode}
    generator = torch.Generator().manual_seed(0)
    batches = [synthetic_batch(size, args.batch_size, detector in MASK_DETECTORS, generator, args.device)
               for size in (args.size, (args.size[0], round(args.size[1] * 0.9)))]
    times: Dict[Tuple[str, str], List[float]] = {key: [] for key in steps}
    peaks: Dict[Tuple[str, str], List[float]] = {key: [] for key in steps}
    name = os.path.splitext(os.path.basename(path))[0]
    for call in range(args.warmup + args.reps):
        batch = batches[call % 2]
        size = "x".join(str(s) for s in batch[0][0].shape[-2:])
        for (kind, mode), step in steps.items():
            seconds, peak = measured(step, batch, args.device)
            if call >= args.warmup:
                times[(kind, mode)].append(seconds)
                if peak is not None:
                    peaks[(kind, mode)].append(peak)
            calls(f"{name} {configs[kind].MODEL.BACKBONE} {mode} {size}: {seconds:.2f} s"
                  f"{' (warm-up)' if call < args.warmup else ''}")
    figures: Dict[str, Any] = {"detector": detector, "backbones": {}}
    for kind, model in models.items():
        row = figures["backbones"][kind] = {"backbone": configs[kind].MODEL.BACKBONE,
                                            "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
        for mode in args.mode:
            row[f"{mode}_images_per_s"] = args.batch_size / statistics.median(times[(kind, mode)])
            row[f"{mode}_peak_mb"] = max(peaks[(kind, mode)], default=None)
    focal, peer = figures["backbones"]["focal"], figures["backbones"]["peer"]
    figures["ratios"] = {key: focal[key] / peer[key] for key in focal
                         if key != "backbone" and focal[key] is not None and peer[key]}
    return figures


def report(results: Dict[str, Dict[str, Any]], args: argparse.Namespace) -> None:
    """One table: a row per config and backbone, then the Focal/Swin ratios of each config."""
    keys = [f"{mode}_{what}" for mode in args.mode for what in ("images_per_s", "peak_mb")]
    rows = []
    for name, figures in results.items():
        for row in figures["backbones"].values():
            cells = ["-" if row[k] is None else f"{row[k]:.2f}" if k.endswith("per_s") else f"{row[k]:.0f}"
                     for k in keys]
            rows.append([name, row["backbone"], f"{row['params_m']:.1f}", *cells])
        ratios = figures["ratios"]
        rows.append([name, "Focal / peer", f"{ratios['params_m']:.2f}x",
                     *(f"{ratios[k]:.2f}x" if k in ratios else "-" for k in keys)])
    h, w = args.size
    print_table(f"detectors at {h}x{w} and {h}x{round(w * 0.9)} alternately, batch {args.batch_size}, medians of "
                f"{args.reps} calls on {machine()}, float32; MB: memory added at the step's peak", rows,
                ["config", "backbone", "params M"] + [k.replace("_images_per_s", " img/s").replace("_peak_mb", " MB")
                                                      for k in keys])


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = timing_parser("python -m tools.bench_dense", __doc__, DEFAULT_PEER,
                      "timm model (Swin family) timed in the Focal backbone's place", 2, 2)
    p.add_argument("--cfg", nargs="+", metavar="FILE",
                   help="detection configs to time (default: a Focal-T config per MODEL.DETECTOR value)")
    p.add_argument("--size", type=parse_size, default=(800, 1333), metavar="HxW",
                   help="the largest input (the detector's min_size and max_size); calls alternate with Hx(0.9 W)")
    p.add_argument("--mode", nargs="+", choices=STEPS, default=list(STEPS),
                   help="time training steps, inference, or both")
    args = parse_timing(p, argv)
    for path in args.cfg or []:
        if not os.path.isfile(path):
            p.error(f"--cfg {path}: no such file")
    args.mode = list(dict.fromkeys(args.mode))
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, Any]]:
    args = parse_args(argv)
    paths = args.cfg or default_configs()
    for path in paths:  # before minutes of timing: every config builds its two detectors' configs
        for backbone in (None, args.peer):
            try:
                detector_config(path, args.size, backbone)
            except (KeyError, ValueError) as err:
                raise SystemExit(f"bench_dense: --cfg {path}: {err}") from None
    torch.manual_seed(0)
    announce()
    calls = Calls(len(paths) * 2 * len(args.mode) * (args.warmup + args.reps), every=1)  # 2 backbones
    results = {os.path.splitext(os.path.basename(path))[0]: bench_config(path, args, calls) for path in paths}
    report(results, args)
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
