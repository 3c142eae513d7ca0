"""Side-by-side speed and memory of our Focal models and timm's Swin-T, measured in one run.

Models are timed alternately (each repetition runs every model once) and medians are reported, so slow drifts of
the machine hit all models alike; ratios are against the peer (``--peer``). Models run with PyTorch's stock
kernels unless their name ends in ``+kernels`` (``models.kernels.optimize_for``) or ``+onednn`` (only the oneDNN
linear layers). BENCHMARKS.md gives the command behind each of its tables; ``--help`` lists the modes.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from config import AMP_MODES, RULES, HelpFormatter, UsageError, load_config, path_arg
from engine import build_precision, synchronize
from logger import Progress
from models import ConfigError, build_model, validate_model_config
from models.focal_layout import LAYOUTS
from models.kernels import onednn_linear, optimize_for, select_kernels
from models.window_attention import WindowedAttention, gather_windows
from tools.make_fixtures import REFERENCE, build_reference, import_package

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DEFAULT_MODELS = ("focal_tiny_patch4_window7_224", "focalv2_tiny_useconv_patch4_window7_224")
DEFAULT_PEER = "timm:swin_tiny_patch4_window7_224"
SUFFIXES = {"+kernels": None, "+onednn": ["onednn_linear"]}  # -> the kernels argument of optimize_for
CHECKOUTS = {"ref:": "reference", "base:": "baseline"}  # model prefixes built by another checkout -> its flag
BASELINE = "baseline_models"  # the module name of --baseline's models package
COMPILE_RULE = next(rule for rule in RULES if rule.key == "COMPILE")  # main.py's check of --compile
Step = Callable[[], None]


def config_for(name: str, img_size: Optional[int]):
    """The config of ``name`` built for ``img_size`` (None: the size it names)."""
    path = name if name.endswith(".yaml") else os.path.join(ROOT, "configs", name + ".yaml")
    if not os.path.isfile(path):
        raise SystemExit(f"benchmark: --models {name}: no config {path} (give a name from configs/, ref:NAME, "
                         f"base:NAME or timm:NAME)")
    return load_config(path, ["MODEL.DROP_PATH_RATE", 0.0] + ([] if img_size is None else ["DATA.IMG_SIZE", img_size]))


def split_suffix(name: str) -> Tuple[str, str]:
    """``NAME+SUFFIX`` -> (``NAME``, ``SUFFIX``); ``SUFFIX`` is empty for a plain name."""
    suffix = next((s for s in SUFFIXES if name.endswith(s)), "")
    return name[:len(name) - len(suffix)], suffix


def create(name: str, img_size, device: torch.device = torch.device("cpu")) -> nn.Module:
    """A model of ``--models`` built for ``img_size`` (a side, ``(height, width)`` for timm models, None for a
    config's own size) on ``device``, with the device kernels of its suffix."""
    base, suffix = split_suffix(name)
    if base.startswith("timm:"):
        import timm
        model = timm.create_model(base[5:], **({} if img_size is None else dict(img_size=img_size)))
    elif base.startswith("ref:"):
        model = build_reference(sys.modules[REFERENCE], config_for(base[4:], img_size))
    elif base.startswith("base:"):
        model = sys.modules[BASELINE].build_model(config_for(base[5:], img_size))
    else:
        model = build_model(config_for(base, img_size))
    model.to(device)
    if suffix:
        optimize_for(model, device, SUFFIXES[suffix])
    return model


def import_checkout(flag: str, folder: str, module: str) -> None:
    """The package in ``folder`` of another checkout, imported once as ``module`` so that it cannot shadow ours."""
    try:
        import_package(Path(folder), module)
    except OSError as error:
        raise SystemExit(f"benchmark: {flag}: cannot import {error.filename}: {error.strerror}") from None


def inference_step(model: nn.Module, x: torch.Tensor, backend: Optional[str] = None, amp: str = "none") -> Step:
    model.eval()
    forward = torch.compile(model, backend=backend) if backend else model  # compiled by the first (warm-up) call
    precision = build_precision(amp, x.device)

    def step():
        with torch.inference_mode(), precision.autocast():
            forward(x)
    return step


def training_step(model: nn.Module, x: torch.Tensor, backend: Optional[str] = None, amp: str = "none") -> Step:
    """One optimizer step, under ``main.py``'s precision for ``amp`` (fp16 with its gradient scaler)."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    precision = build_precision(amp, x.device)
    with torch.no_grad():
        num_classes = model(x[:1]).shape[-1]
    target = torch.randint(0, num_classes, (x.shape[0],), device=x.device)
    forward = torch.compile(model, backend=backend) if backend else model

    def step():
        optimizer.zero_grad(set_to_none=True)
        with precision.autocast():
            loss = nn.functional.cross_entropy(forward(x), target)
        precision.scaler.scale(loss).backward()
        precision.scaler.step(optimizer)
        precision.scaler.update()
    return step


STEPS = {"infer": inference_step, "train": training_step}


def first_call_step(model: nn.Module, x: torch.Tensor, amp: str) -> Step:
    """An inference call as on a size the model has not met: the layout cache is emptied first, so the call
    builds its layouts and, with the CPU kernels, its attention biases again (as in multi-scale training)."""
    step = inference_step(model, x, amp=amp)

    def first():
        LAYOUTS.clear()
        step()
    return first


class Calls(Progress):
    """Progress lines over the timed calls of a whole run (``logger.Progress``), each naming what it timed."""

    def __init__(self, total: int, every: Optional[int] = None):
        super().__init__(total, every or total)

    def __call__(self, what: str) -> None:
        idx = self.done
        if self.due(idx):
            print(f"{self.position(idx + 1)}  {what}", flush=True)


def timed(step: Step, calls: int, device: torch.device) -> float:
    """Seconds per call of ``calls`` back-to-back calls."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / calls


def time_alternating(steps: Dict[str, Step], args: argparse.Namespace, device: torch.device, calls: Calls,
                     what: str) -> Dict[str, float]:
    """Median seconds per call of each step, interleaving the steps within every repetition (``--reps``, after
    ``--warmup`` calls and one that sizes the repetitions). A repetition times enough back-to-back calls of a fast
    step to last ``--min-seconds``, so small inputs are not timer noise. Each step costs ``warmup + 1 + reps`` of
    ``calls``."""
    repeat: Dict[str, int] = {}
    for name, step in steps.items():
        for _ in range(args.warmup):
            step()
            calls(f"{what} {name}: warm-up")
        seconds = timed(step, 1, device)
        calls(f"{what} {name}: {seconds:.3f} s")
        repeat[name] = max(1, math.ceil(args.min_seconds / seconds))
    times: Dict[str, List[float]] = {name: [] for name in steps}
    for _ in range(args.reps):
        for name, step in steps.items():
            times[name].append(timed(step, repeat[name], device))
            calls(f"{what} {name}: {times[name][-1]:.3f} s")
    for name, t in times.items():
        warning = timing_warning(name, t)
        if warning:
            print(f"benchmark: warning: {warning}", file=sys.stderr)
    return {name: statistics.median(t) for name, t in times.items()}


def timing_warning(name: str, times: Sequence[float], min_reps: int = 5, max_spread: float = 0.1) -> Optional[str]:
    """Why ``times`` may be too few or too noisy to compare at the precision of the printed ratios, if they are."""
    if len(times) < min_reps:
        return f"{name}: only {len(times)} repetitions; medians of fewer than {min_reps} are not comparable (--reps)"
    q1, _, q3 = statistics.quantiles(times, n=4)
    spread = (q3 - q1) / statistics.median(times)
    if spread > max_spread:
        return (f"{name}: the middle half of its timings spans {100 * spread:.0f}% of the median; ratios closer than "
                f"that are noise (a busy machine? raise --reps, or --min-seconds)")
    return None


def peak_memory_mb(name: str, args: argparse.Namespace, device: torch.device) -> float:
    """Peak memory of training steps, measured in a fresh process (:func:`memory_probe`)."""
    cmd = [sys.executable, "-m", "tools.benchmark", "--memory-probe", name, "--batch-size", str(args.batch_size),
           "--img-size", str(args.img_size[0]), "--device", str(device), "--amp", args.amp]
    for flag, path in (("--reference", args.reference), ("--baseline", args.baseline)):
        cmd += [flag, path] if path else []
    out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def memory_probe(args: argparse.Namespace, device: torch.device) -> float:
    """The CUDA allocator's peak over two training steps, or on the CPU this process's peak resident size."""
    size = args.img_size[0]
    model = create(args.memory_probe, size, device)
    step = training_step(model, torch.randn(args.batch_size, 3, size, size, device=device), amp=args.amp)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(2):
        step()
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    try:
        return status_mb("VmHWM")  # not ru_maxrss: it survives exec, so it would report the parent's peak
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def status_mb(field: str) -> float:
    """A memory figure of this process from Linux's ``/proc/self/status`` (``VmRSS``, ``VmHWM``), in MB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(field + ":"))


def machine() -> str:
    """The GPU, or the CPU's model name and whether it has AVX-512 (from Linux's /proc/cpuinfo where readable)."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    try:
        info = Path("/proc/cpuinfo").read_text()
        name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                    platform.machine())
        cpu = f"{name} ({'with' if ' avx512f' in info else 'without'} AVX-512)"
    except OSError:
        cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} threads"


def announce() -> None:
    """The first line of a benchmark: what it runs on, and when."""
    print(f"torch {torch.__version__} on {machine()}, {time.strftime('%Y-%m-%d')}", flush=True)


def conditions(args: argparse.Namespace) -> str:
    """The precision (and compiler) every model was timed under, for the tables' titles."""
    compiled = f", torch.compile ({args.compile})" if args.compile else ""
    return ("float32" if args.amp == "none" else f"{args.amp} autocast") + compiled


def write_json(path: Optional[str], figures: Any) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(figures, f, indent=2)


def print_table(title: str, rows: List[List[str]], header: Sequence[str]) -> None:
    widths = [max(len(str(r[i])) for r in rows + [list(header)]) for i in range(len(header))]
    print(f"\n{title}")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |")


def vs_peer(value: float, peer: float, more: str = "") -> str:
    """A table cell: the figure and its ratio to the peer's (and ``more``)."""
    return f"{value:.2f} ({value / peer:.2f}x{more})"


CEILING_VARIANTS = {"as built": None, "gather free": "all", "window keys only": "window"}


def run_speed(args: argparse.Namespace, device: torch.device) -> Dict[str, Dict]:
    """images/s of every model against the peer, and (``--ceiling``, at the first size) of each model with its
    key/value gather made free and attending to ``ws*ws`` keys per window: how far better gathers or fewer keys
    could take it."""
    sizes = args.img_size[:1] if args.ceiling else args.img_size
    variants = CEILING_VARIANTS if args.ceiling else {"": None}
    rows = {f"{n}, {variant}" if variant else n: (n, keys) for n in args.models for variant, keys in variants.items()}
    rows.setdefault(args.peer, (args.peer, None))
    results: Dict[str, Dict] = {row: {} for row in rows}
    memory = args.memory and "train" in args.modes and not args.ceiling
    calls = Calls(len(sizes) * len(args.modes) * len(rows) * (args.warmup + 1 + args.reps) + memory * len(rows))
    columns = [(mode, size, mode if args.ceiling else f"{mode}_{size}") for size in sizes for mode in args.modes]
    for mode, size, key in columns:
        x = torch.randn(args.batch_size, 3, size, size, device=device)
        steps = {row: STEPS[mode](ablated(n, create(n, size, device), keys), x, args.compile, args.amp)
                 for row, (n, keys) in rows.items()}
        for row, sec in time_alternating(steps, args, device, calls, f"{mode} {size}px").items():
            results[row][key] = args.batch_size / sec
        del steps
        gc.collect()
    table = []
    for row, figures in results.items():
        base = split_suffix(row)[0]  # with a suffix: the same model plain, whose figures it also gets a ratio to
        cells = [row]
        plain = results.get(base) if base != row else None
        for _, _, key in columns:
            gain = f", {figures[key] / plain[key]:.2f}x of {base.split(':')[-1]}" if plain else ""
            cells.append(vs_peer(figures[key], results[args.peer][key], gain))
        table.append(cells)
    print_table(f"{'attention ceiling, ' if args.ceiling else ''}images/s, medians of {args.reps} alternating "
                f"repetitions on {machine()}, {conditions(args)}", table,
                ["model, variant" if args.ceiling else "model"] + [f"{m} {s} img/s (vs peer)" for m, s, _ in columns])
    if memory:
        peaks = {}
        for n in dict.fromkeys([args.peer, *args.models]):
            peaks[n] = results[n][f"train_peak_mb_{sizes[0]}"] = peak_memory_mb(n, args, device)
            calls(f"memory {n}: {peaks[n]:.0f} MB")
        kind = "CUDA allocator peak" if device.type == "cuda" else "peak process RSS"
        print_table(f"training-step memory ({kind}), batch {args.batch_size}, {sizes[0]}px",
                    [[n, f"{mb:.0f}", f"{mb / peaks[args.peer]:.2f}x"] for n, mb in peaks.items()],
                    ["model", "MB", "vs peer"])
    return results


def ablated(name: str, model: nn.Module, keys: Optional[str]) -> nn.Module:
    """The model ``name`` with every attention layer's gather ablated (:func:`ablate_gather`) when ``keys`` is given."""
    if keys is None:
        return model
    attns = [m for m in model.modules() if isinstance(m, WindowedAttention)]
    if not attns:
        raise SystemExit(f"benchmark: --ceiling needs Focal models, got {name}")
    for attn in attns:
        ablate_gather(attn, keys)
    return model


def ablate_gather(attn: WindowedAttention, keys: str) -> None:
    """For ``--ceiling`` only: ``attn`` gathers its keys and values on its first call for each shape and reuses
    them afterwards, so a step costs everything but the gather; with ``keys="window"`` each window attends to only
    its first ``ws*ws`` keys (Swin's amount). Later calls attend to stale keys: right costs, wrong outputs."""
    stored: Dict[tuple, tuple] = {}
    plain = attn.attend

    def attend(q, k, v, index, bias):
        n_keys = q.shape[-2] if keys == "window" else bias.shape[-1]
        shape = (q.shape, bias.shape)
        if shape not in stored:
            with torch.no_grad():
                stored[shape] = tuple(gather_windows(t, index, bias.shape[-1])[..., :n_keys, :].contiguous()
                                      for t in (k, v))
        k, v = (t.detach().requires_grad_(q.requires_grad) for t in stored[shape])
        return plain(q, k, v, None, bias[..., :n_keys])
    attn.attend = attend


def parse_size(text: str) -> tuple:
    """``"448"`` -> (448, 448); ``"800x1216"`` -> (800, 1216)."""
    try:
        sides = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        sides = ()
    if len(sides) not in (1, 2) or min(sides) < 32:
        raise argparse.ArgumentTypeError(f"--sizes: expected SIDE or HEIGHTxWIDTH of at least 32 px, got {text!r}")
    return sides * 2 if len(sides) == 1 else sides


def run_sizes(args: argparse.Namespace, device: torch.device) -> Dict[str, Dict]:
    """Inference per input size: images/s of each model against the peer built for that size, and each model's
    call on a new size over a cached call (both timed alternately with the rest). Our models are built at their
    configured size (they take any input); timm models are built for each size, as Swin-T must be."""
    names = list(dict.fromkeys([*args.models, args.peer]))
    per_size = {n for n in names if split_suffix(n)[0].startswith("timm:")}  # built for one input size
    results: Dict[str, Dict] = {n: {} for n in names}
    rows = []
    calls = Calls(len(args.sizes) * (2 * len(names) - len(per_size)) * (args.warmup + 1 + args.reps))
    for height, width in args.sizes:
        label = f"{height}x{width}"
        x = torch.randn(args.batch_size, 3, height, width, device=device)
        steps = {}
        for n in names:
            model = create(n, (height, width) if n in per_size else None, device)
            steps[n] = inference_step(model, x, amp=args.amp)
            if n not in per_size:  # right after its cached call, which the first-call step then leaves cached
                steps[f"{n} (first call)"] = first_call_step(model, x, args.amp)
        medians = time_alternating(steps, args, device, calls, f"infer {label}")
        for n in names:
            sec, first = medians[n], medians.get(f"{n} (first call)")
            results[n].update({f"infer_{label}": args.batch_size / sec, f"cached_call_s_{label}": sec})
            if first is not None:
                results[n][f"first_call_s_{label}"] = first
            rows.append([label, n, f"{args.batch_size / sec:.2f}", f"{medians[args.peer] / sec:.2f}x", f"{sec:.3f}",
                         "-" if first is None else f"{first:.3f}", "-" if first is None else f"{first / sec:.2f}x"])
        del steps
        gc.collect()
    print_table(f"inference per input size, batch {args.batch_size}, medians of {args.reps} alternating repetitions "
                f"on {machine()}, {conditions(args)}", rows,
                ["size", "model", "images/s", "vs peer", "cached call s", "first call s", "first / cached"])
    return results


def run_kernels(args: argparse.Namespace, device: torch.device) -> Dict[str, Dict[str, float]]:
    """GFLOP/s of PyTorch's ``F.linear`` and of the oneDNN path on every linear-layer shape of the Tiny models
    (Swin-T's and ours are the same): the measurement behind ``models/kernels/onednn_linear.py``."""
    if device.type != "cpu" or not onednn_linear.onednn_available():
        raise SystemExit("--kernels compares CPU kernels and needs a PyTorch build with oneDNN")
    size, rows, figures = args.img_size[0], [], {}
    calls = Calls(4 * 4 * 2 * (args.warmup + 1 + args.reps))  # 4 layers of 4 stages, 2 kernels
    for stage, dim in enumerate((96, 192, 384, 768)):
        tokens = args.batch_size * math.ceil(size / 4 / 2 ** stage) ** 2
        for layer, (fan_in, fan_out) in {"qkv": (dim, 3 * dim), "proj": (dim, dim), "fc1": (dim, 4 * dim),
                                         "fc2": (4 * dim, dim)}.items():
            x, w, b = torch.randn(tokens, fan_in), torch.randn(fan_out, fan_in), torch.randn(fan_out)
            medians = time_alternating({"stock": lambda: nn.functional.linear(x, w, b),
                                        "onednn": lambda: onednn_linear.onednn_matmul(x, w, b)},
                                       args, device, calls, f"stage {stage + 1} {layer}")
            gflops = {k: 2 * tokens * fan_in * fan_out / s / 1e9 for k, s in medians.items()}
            figures[f"stage {stage + 1} {layer}"] = gflops
            rows.append([f"stage {stage + 1} {layer}", f"{tokens}x{fan_in} -> {fan_out}", f"{gflops['stock']:.0f}",
                         f"{gflops['onednn']:.0f}", f"{gflops['onednn'] / gflops['stock']:.2f}x"])
    print_table(f"linear layers at {size}px, batch {args.batch_size}, {machine()} (GFLOP/s)", rows,
                ["layer", "shape", "F.linear", "oneDNN", "speed-up"])
    return figures


def plot(results: Dict[str, Dict], sizes: Sequence[int], path: str) -> None:
    """A small line chart (log scale) of inference images/s against image size, drawn with Pillow."""
    from PIL import Image, ImageDraw
    width, height, margin = 720, 480, 70
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    values = [v for r in results.values() for k, v in r.items() if k.startswith("infer_")]
    lo, hi = math.log10(min(values)) - 0.1, math.log10(max(values)) + 0.1
    sx = lambda i: margin + i * (width - 2 * margin) / max(1, len(sizes) - 1)
    sy = lambda v: height - margin - (math.log10(v) - lo) / (hi - lo) * (height - 2 * margin)
    draw.rectangle([margin, margin, width - margin, height - margin], outline="black")
    for i, s in enumerate(sizes):
        draw.text((sx(i) - 12, height - margin + 8), f"{s}px", fill="black")
    for v in (m * 10 ** e for e in range(math.floor(lo), math.ceil(hi) + 1) for m in (1, 2, 5)):
        if lo <= math.log10(v) <= hi:
            draw.text((8, sy(v) - 6), f"{v:g}", fill="black")
            draw.line([margin, sy(v), width - margin, sy(v)], fill=(225, 225, 225))
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]
    for j, (name, r) in enumerate(results.items()):
        colour = colours[j % len(colours)]
        pts = [(sx(i), sy(r[f"infer_{s}"])) for i, s in enumerate(sizes) if f"infer_{s}" in r]
        draw.line(pts, fill=colour, width=3)
        for x, y in pts:
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour)
        legend_y = height - margin - 16 * (len(results) - j) - 6  # bottom left: lines fall from top left
        draw.text((margin + 10, legend_y), name.replace("timm:", ""), fill=colour)
    draw.text((margin, 20), "inference images/s vs image size (log scale)", fill="black")
    img.save(path)
    print(f"plot written to {path}")


def timing_parser(prog: str, doc: str, peer: str, peer_help: str, batch_size: Optional[int],
                  reps: int) -> argparse.ArgumentParser:
    """The flags of both benchmarks; :func:`parse_timing` checks them."""
    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--peer", default=peer, help=peer_help)
    p.add_argument("--batch-size", type=int, default=batch_size,
                   help="images per step" + ("" if batch_size else " (default 8, or 1 with --sizes)"))
    p.add_argument("--reps", type=int, default=reps, help="timed repetitions, alternating the models; the tables "
                                                          "give their medians")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls of each step first")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--json", type=path_arg, help="write the figures to this file")
    return p


def parse_timing(p: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> argparse.Namespace:
    args = p.parse_args(argv)
    if (args.batch_size or 1) < 1 or args.reps < 1 or args.warmup < 0:
        p.error("--batch-size and --reps must be >= 1, --warmup >= 0")
    args.device = pick_device(args.device)
    check_writable("--json", args.json)
    return args


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = timing_parser("python -m tools.benchmark", __doc__, DEFAULT_PEER, "the model ratios are taken against", None, 5)
    p.add_argument("--models", nargs="+", help="config names, ref:NAME, base:NAME or timm:NAME, optionally ending in "
                   "+kernels or +onednn (default: the Tiny models, plain and +kernels, and the peer +kernels where "
                   "that adds oneDNN linears)")
    p.add_argument("--reference", help="classification/ folder of a microsoft/Focal-Transformer checkout, for "
                   "ref:NAME models")
    p.add_argument("--baseline", help="another checkout of this project, for base:NAME models (before/after)")
    p.add_argument("--mode", choices=["infer", "train", "both"], default="both",
                   help="time inference (forward passes), training steps, or both")
    p.add_argument("--img-size", type=int, nargs="+", default=[224], help="square input sizes, one table row each")
    p.add_argument("--min-seconds", type=float, default=0.5,
                   help="each repetition repeats a fast step until it lasts this long")
    p.add_argument("--amp", choices=AMP_MODES, default="none",
                   help="autocast precision of every model (none: float32; fp16 with main.py's gradient scaler)")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the training-memory probes")
    p.add_argument("--compile", nargs="?", const="inductor", metavar="BACKEND",
                   help="time every model under torch.compile (default backend inductor; memory probes stay eager)")
    p.add_argument("--kernels", action="store_true",
                   help="compare F.linear with the oneDNN linear on the Tiny models' layer shapes instead")
    p.add_argument("--ceiling", action="store_true",
                   help="time each model also with its key/value gather made free and with ws*ws keys per window")
    p.add_argument("--sizes", nargs="+", type=parse_size, metavar="SIZE",
                   help="inference per input size (SIDE or HEIGHTxWIDTH, e.g. 800x1216) instead, with the first call "
                   "on a new size")
    p.add_argument("--plot", type=path_arg, help="write a PNG of inference images/s against image size")
    p.add_argument("--memory-probe", help=argparse.SUPPRESS)
    args = parse_timing(p, argv)
    args.batch_size = args.batch_size or (1 if args.sizes else 8)
    args.modes = ["infer", "train"] if args.mode == "both" else [args.mode]
    if args.compile and not COMPILE_RULE.valid(args.compile, None):
        p.error(f"--compile {COMPILE_RULE.requirement}, got {args.compile!r}")
    if min(args.img_size) < 1:
        p.error(f"--img-size takes positive sizes, got {min(args.img_size)}")
    if args.sizes and (args.ceiling or args.kernels):
        p.error("--sizes cannot be combined with --ceiling or --kernels, which time one square size: use --img-size")
    if args.plot and (args.sizes or args.ceiling or args.kernels):
        p.error("--plot draws the default speed tables over --img-size; it cannot be combined with --sizes, "
                "--ceiling or --kernels")
    if args.plot and args.mode == "train":
        p.error("--plot draws inference images/s: it needs --mode infer or both, not train")
    return args


def pick_device(name: str) -> torch.device:
    """``--device``, refused in one line when it is malformed or names a GPU this machine lacks."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"benchmark: --device {name!r} is not a device (auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"benchmark: --device {name}: no CUDA device is available here; use --device cpu")
    return device


def check_writable(flag: str, path: Optional[str]) -> None:
    """That the file ``path`` (if given) can be written, checked before the timing without creating it."""
    folder = os.path.dirname(os.path.abspath(path or "."))
    writable = os.access(path, os.W_OK) if path and os.path.exists(path) else os.access(folder, os.W_OK)
    if path and (not os.path.isdir(folder) or os.path.isdir(path) or not writable):
        raise SystemExit(f"benchmark: {flag} {path}: cannot write there (missing folder, a folder in the way, or no "
                         f"permission)")


def check_names_and_paths(args: argparse.Namespace) -> None:
    """What would otherwise fail only after minutes of timing: unknown models, sizes a model cannot be built for,
    output files that cannot be written, and a --plot type Pillow cannot write."""
    for name in args.models + [args.peer]:
        base, suffix = split_suffix(name)
        if args.ceiling and suffix and name != args.peer:
            raise SystemExit(f"benchmark: --ceiling times plain models (stock kernels), got {name}")
        checkout = next((flag for prefix, flag in CHECKOUTS.items() if base.startswith(prefix)), None)
        if checkout and not getattr(args, checkout):
            raise SystemExit(f"benchmark: {name}: pass --{checkout} (see --help)")
        if base.startswith("timm:"):
            import timm
            if not timm.is_model(base[5:]):
                raise SystemExit(f"benchmark: --models/--peer {name}: timm has no model {base[5:]!r}")
        elif not checkout:
            for size in args.img_size:
                try:
                    validate_model_config(config_for(base, size))
                except ConfigError as error:
                    raise SystemExit(f"benchmark: --img-size {size}: {name}: {error}") from None
    check_writable("--plot", args.plot)
    if args.plot:
        from PIL import Image
        if Image.registered_extensions().get(os.path.splitext(args.plot)[1].lower()) not in Image.SAVE:
            raise SystemExit(f"benchmark: --plot {args.plot}: Pillow cannot write this file type; name a .png")


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    device = args.device
    if args.models is None and args.ceiling:
        args.models = list(DEFAULT_MODELS)
    elif args.models is None:
        peer_kernels = [args.peer + "+kernels"] if "onednn_linear" in select_kernels(device) else []
        args.models = [*DEFAULT_MODELS, *(m + "+kernels" for m in DEFAULT_MODELS), *peer_kernels]
    check_names_and_paths(args)
    try:
        build_precision(args.amp, device)
    except UsageError as error:
        raise SystemExit(f"benchmark: {error}")
    if args.reference:
        import_checkout("--reference", args.reference, REFERENCE)
    if args.baseline:
        import_checkout("--baseline", os.path.join(args.baseline, "models"), BASELINE)
    torch.manual_seed(0)
    if args.memory_probe:
        print(memory_probe(args, device))
        return
    announce()
    run = run_kernels if args.kernels else run_sizes if args.sizes else run_speed
    results = run(args, device)
    if not args.kernels and any(split_suffix(n)[1] for n in [*args.models, args.peer]):
        print(f"kernels on {device.type}: {', '.join(select_kernels(device)) or 'none'}")
    if args.plot:
        plot(results, args.img_size, args.plot)
    write_json(args.json, results)


if __name__ == "__main__":
    main()
