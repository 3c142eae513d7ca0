"""Generate the embedded demo dataset: ten classes of procedurally drawn shapes and textures.

    python -m data.demo --out demo_data [--size 64] [--train-per-class 40] [--val-per-class 10]

Both ImageNet layouts side by side, with the same JPEG bytes and sample order: ``<split>/<class>/*.JPEG`` and
``<split>.zip`` + ``<split>_map.txt``. Every image is drawn from its own seed: the output is the same on every run.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from config import HelpFormatter, UsageError, path_arg
from utils import ensure_writable_folder

MARKER = ".focal_demo.json"
SUPERSAMPLE = 2  # draw at twice the size and downsample, for anti-aliased edges


def _colors(rng: np.random.RandomState) -> tuple:
    """A background and a foreground colour far enough apart in brightness to be seen after augmentation."""
    bg = rng.randint(0, 256, 3)
    fg = rng.randint(0, 256, 3)
    while abs(int(fg.mean()) - int(bg.mean())) < 70:
        fg = rng.randint(0, 256, 3)
    return tuple(int(c) for c in bg), tuple(int(c) for c in fg)


def _center_box(rng: np.random.RandomState, s: int) -> tuple:
    """A square box of 40-70% of the canvas, its centre jittered around the middle."""
    half = rng.uniform(0.2, 0.35) * s
    cx, cy = rng.uniform(0.4, 0.6, 2) * s
    return cx - half, cy - half, cx + half, cy + half


def _triangle(draw, rng, s, fg):
    x0, y0, x1, y1 = _center_box(rng, s)
    draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fg)


def _cross(draw, rng, s, fg):
    x0, y0, x1, y1 = _center_box(rng, s)
    bar = (x1 - x0) * rng.uniform(0.25, 0.35)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    draw.rectangle((x0, cy - bar / 2, x1, cy + bar / 2), fill=fg)
    draw.rectangle((cx - bar / 2, y0, cx + bar / 2, y1), fill=fg)


def _ring(draw, rng, s, fg):
    box = _center_box(rng, s)
    draw.ellipse(box, outline=fg, width=max(int((box[2] - box[0]) * rng.uniform(0.1, 0.16)), 1))


def _stripes(angle: str) -> Callable:
    def draw_stripes(draw, rng, s, fg):
        period = rng.uniform(0.12, 0.2) * s
        width = period * rng.uniform(0.4, 0.6)
        offset = rng.uniform(0, period)
        for k in range(-2 * int(s / period) - 2, 2 * int(s / period) + 3):
            a = offset + k * period
            if angle == "horizontal":
                draw.rectangle((0, a, s, a + width), fill=fg)
            elif angle == "vertical":
                draw.rectangle((a, 0, a + width, s), fill=fg)
            else:
                draw.polygon([(a, 0), (a + width, 0), (a + width - s, s), (a - s, s)], fill=fg)
    return draw_stripes


def _checker(draw, rng, s, fg):
    cell = rng.uniform(0.12, 0.2) * s
    dx, dy = rng.uniform(0, cell, 2)
    n = int(s / cell) + 2
    for i in range(-1, n):
        for j in range(-1, n):
            if (i + j) % 2 == 0:
                draw.rectangle((dx + i * cell, dy + j * cell, dx + (i + 1) * cell, dy + (j + 1) * cell), fill=fg)


def _dots(draw, rng, s, fg):
    step = rng.uniform(0.15, 0.22) * s
    radius = step * rng.uniform(0.2, 0.3)
    dx, dy = rng.uniform(0, step, 2)
    n = int(s / step) + 2
    for i in range(-1, n):
        for j in range(-1, n):
            cx, cy = dx + i * step, dy + j * step
            draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fg)


CLASSES: Dict[str, Callable] = {
    "circle": lambda draw, rng, s, fg: draw.ellipse(_center_box(rng, s), fill=fg),
    "square": lambda draw, rng, s, fg: draw.rectangle(_center_box(rng, s), fill=fg),
    "triangle": _triangle, "cross": _cross, "ring": _ring, "horizontal_stripes": _stripes("horizontal"),
    "vertical_stripes": _stripes("vertical"), "diagonal_stripes": _stripes("diagonal"), "checkerboard": _checker,
    "dots": _dots,
}


def draw_image(class_name: str, seed: int, size: int) -> Image.Image:
    """One image of ``class_name``, fully determined by ``seed``: a shape or texture over a noisy background."""
    rng = np.random.RandomState(seed)
    bg, fg = _colors(rng)
    s = size * SUPERSAMPLE
    image = Image.new("RGB", (s, s), bg)
    CLASSES[class_name](ImageDraw.Draw(image), rng, s, fg)
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.5))).resize((size, size), Image.LANCZOS)
    noise = rng.normal(0, rng.uniform(4, 16), (size, size, 3))
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.float64) + noise, 0, 255).astype(np.uint8))


def claim_folder(out: str, names: Sequence[str], tool: str) -> None:
    """Make ``out`` ready for a generator writing ``names`` there: refuse a folder holding any of them without
    :data:`MARKER` (a user's own data), clear those of a previous run; :func:`mark_generated` once done."""
    ensure_writable_folder(out, "--out")
    owned = os.path.isfile(os.path.join(out, MARKER))
    present = [name for name in names if os.path.exists(os.path.join(out, name))]
    if present and not owned:
        raise FileExistsError(f"{out} already holds {', '.join(present)} and was not made by {tool}; "
                              f"choose another --out")
    for name in present:
        path = os.path.join(out, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def mark_generated(out: str, **info: Any) -> None:
    """The marker that lets a later run regenerate ``out`` (see :func:`claim_folder`)."""
    with open(os.path.join(out, MARKER), "w") as f:
        json.dump(info, f, indent=1)


def generate(out: str, size: int = 64, train_per_class: int = 40, val_per_class: int = 10,
             num_classes: int = len(CLASSES), seed: int = 0, zip_layout: bool = True,
             log: Optional[Callable[[str], None]] = print) -> str:
    """Write the dataset under ``out`` and return ``out``."""
    if not 1 <= num_classes <= len(CLASSES):
        raise ValueError(f"--classes must be between 1 and {len(CLASSES)}, got {num_classes}")
    if size < 8 or train_per_class < 1 or val_per_class < 1:
        raise ValueError("--size must be >= 8 and --train-per-class / --val-per-class >= 1")
    claim_folder(out, ("train", "val", "train.zip", "val.zip", "train_map.txt", "val_map.txt"), "data.demo")
    # Labels follow the sorted folder names, as torchvision's ImageFolder numbers them.
    names = sorted(list(CLASSES)[:num_classes])
    for split_index, (split, per_class) in enumerate((("train", train_per_class), ("val", val_per_class))):
        entries: List[tuple] = []
        for label, name in enumerate(names):
            os.makedirs(os.path.join(out, split, name))
            for i in range(per_class):
                image_seed = (seed * 1_000_003 + split_index * 100_003 + label * 10_007 + i) % 2 ** 32
                buffer = io.BytesIO()
                draw_image(name, image_seed, size).save(buffer, format="JPEG", quality=92)
                relative = f"{name}/{split}_{name}_{i:05d}.JPEG"
                Path(out, split, relative).write_bytes(buffer.getvalue())
                entries.append((relative, label, buffer.getvalue()))
            if log:
                log(f"{split}: class {label + 1}/{num_classes} ({name}): {per_class} images")
        if zip_layout:  # the JPEG bytes stored as they are, listed in folder order
            with zipfile.ZipFile(os.path.join(out, f"{split}.zip"), "w", zipfile.ZIP_STORED) as archive:
                for relative, _, data in entries:
                    archive.writestr(zipfile.ZipInfo(relative, date_time=(2021, 1, 1, 0, 0, 0)), data)
            Path(out, f"{split}_map.txt").write_text("".join(f"{path}\t{label}\n" for path, label, _ in entries))
    mark_generated(out, size=size, train_per_class=train_per_class, val_per_class=val_per_class, classes=names,
                   seed=seed, zip_layout=zip_layout)
    if log:
        log(f"demo dataset ready in {out}: {num_classes} classes, {num_classes * train_per_class} train and "
            f"{num_classes * val_per_class} val images of {size}x{size}")
    return out


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m data.demo", formatter_class=HelpFormatter,
                                     description="Generate the Focal Transformer demo dataset (ImageNet layouts).")
    parser.add_argument("--out", required=True, type=path_arg,
                        help="output folder (created; regenerated if made by this tool)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--train-per-class", type=int, default=40, help="training images per class")
    parser.add_argument("--val-per-class", type=int, default=10, help="validation images per class")
    parser.add_argument("--classes", type=int, default=len(CLASSES), help=f"number of classes, at most {len(CLASSES)}")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the drawings")
    parser.add_argument("--no-zip", action="store_true", help="write only the folder layout")
    args = parser.parse_args(argv)
    try:
        generate(args.out, args.size, args.train_per_class, args.val_per_class, args.classes, args.seed,
                 zip_layout=not args.no_zip)
    except (ValueError, FileExistsError, UsageError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
