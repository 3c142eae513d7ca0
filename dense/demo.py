"""Generate the demo datasets of the dense tasks: coloured shapes (circle, square, triangle) on noisy gradient
backgrounds, in the COCO layout for detection and the ADE20K layout for segmentation.

    python -m dense.demo --task detection --out demo_detection [--size 128] [--train 300] [--val 60]
    python -m dense.demo --task segmentation --out demo_segmentation

Every image is drawn from its own seed. COCO category ids are 1, 2 and 4 (a gap, as COCO's have); ADE20K label
values are 1 (background), 2-4 (the shapes) and 0 ("ignore") on a two-pixel frame.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from config import HelpFormatter, UsageError, path_arg
from data.demo import claim_folder, mark_generated

CATEGORY_IDS = {"circle": 1, "square": 2, "triangle": 4}
SHAPES = tuple(CATEGORY_IDS)
LABEL_VALUES = {"background": 1, "circle": 2, "square": 3, "triangle": 4}
FRAME = 2  # pixels of label 0 around segmentation images


def _background(rng: np.random.RandomState, size: int) -> np.ndarray:
    """A gradient between two random colours with pixel noise."""
    a, b = rng.randint(0, 256, 3), rng.randint(0, 256, 3)
    t = np.linspace(0, 1, size)[None, :, None] if rng.rand() < 0.5 else np.linspace(0, 1, size)[:, None, None]
    img = a * (1 - t) + b * t + rng.normal(0, 12, (size, size, 3))
    return np.clip(np.broadcast_to(img, (size, size, 3)), 0, 255).astype(np.uint8)


def _polygon(shape: str, box: Tuple[float, float, float, float]) -> List[Tuple[float, float]]:
    x0, y0, x1, y1 = box
    if shape == "square":
        return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    if shape == "triangle":
        return [((x0 + x1) / 2, y0), (x1, y1), (x0, y1)]
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    return [(cx + r * math.cos(2 * math.pi * k / 32), cy + r * math.sin(2 * math.pi * k / 32)) for k in range(32)]


def draw_scene(seed: int, size: int) -> Tuple[Image.Image, List[Tuple[str, List[Tuple[float, float]]]]]:
    """One image with 1-3 non-overlapping shapes of 20-45% of its side, each in a colour far from the background."""
    rng = np.random.RandomState(seed)
    img = Image.fromarray(_background(rng, size))
    draw = ImageDraw.Draw(img)
    shapes: List[Tuple[str, List[Tuple[float, float]]]] = []
    boxes: List[Tuple[float, float, float, float]] = []
    for _ in range(rng.randint(1, 4)):
        for _attempt in range(20):
            side = rng.uniform(0.2, 0.45) * size
            x0, y0 = rng.uniform(FRAME + 1, size - side - FRAME - 1, 2)
            box = (x0, y0, x0 + side, y0 + side)
            if all(box[2] < b[0] or b[2] < box[0] or box[3] < b[1] or b[3] < box[1] for b in boxes):
                break
        else:
            continue
        boxes.append(box)
        shape = SHAPES[rng.randint(len(SHAPES))]
        mean = np.asarray(img).mean()
        color = tuple(int(c) for c in (rng.randint(0, 90, 3) if mean > 127 else rng.randint(165, 256, 3)))
        polygon = _polygon(shape, box)
        draw.polygon(polygon, fill=color)
        shapes.append((shape, polygon))
    return img, shapes


def generate_detection(out: str, size: int = 128, train: int = 300, val: int = 60) -> str:
    """``train2017/``, ``val2017/`` and ``annotations/instances_{train,val}2017.json``."""
    claim_folder(out, ("train2017", "val2017", "annotations"), "dense.demo")
    os.makedirs(os.path.join(out, "annotations"), exist_ok=True)
    categories = [{"id": i, "name": name, "supercategory": "shape"} for name, i in CATEGORY_IDS.items()]
    for split, count, offset in (("train2017", train, 0), ("val2017", val, 10 ** 6)):
        os.makedirs(os.path.join(out, split), exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            img, shapes = draw_scene(offset + i, size)
            name = f"{i:06d}.jpg"
            img.save(os.path.join(out, split, name), quality=95)
            images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
            for shape, polygon in shapes:
                xs, ys = [p[0] for p in polygon], [p[1] for p in polygon]
                mask = Image.new("L", (size, size))
                ImageDraw.Draw(mask).polygon(polygon, fill=1)
                annotations.append({
                    "id": len(annotations) + 1, "image_id": i + 1, "category_id": CATEGORY_IDS[shape],
                    "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)],
                    "segmentation": [[round(c, 2) for p in polygon for c in p]],
                    "area": float(np.asarray(mask).sum()), "iscrowd": 0})
        with open(os.path.join(out, "annotations", f"instances_{split}.json"), "w") as f:
            json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    mark_generated(out, task="detection", size=size)
    return out


def generate_segmentation(out: str, size: int = 128, train: int = 300, val: int = 60) -> str:
    """``images/<split>/*.jpg``, ``annotations/<split>/*.png`` and ``objectInfo150.csv``, as in ADE20K."""
    claim_folder(out, ("images", "annotations", "objectInfo150.csv"), "dense.demo")
    for split, count, offset in (("training", train, 0), ("validation", val, 10 ** 6)):
        for folder in ("images", "annotations"):
            os.makedirs(os.path.join(out, folder, split), exist_ok=True)
        for i in range(count):
            img, shapes = draw_scene(offset + i, size)
            labels = Image.new("L", (size, size), LABEL_VALUES["background"])
            draw = ImageDraw.Draw(labels)
            for shape, polygon in shapes:
                draw.polygon(polygon, fill=LABEL_VALUES[shape])
            draw.rectangle((0, 0, size - 1, size - 1), outline=0, width=FRAME)
            img.save(os.path.join(out, "images", split, f"{i:06d}.jpg"), quality=95)
            labels.save(os.path.join(out, "annotations", split, f"{i:06d}.png"))
    with open(os.path.join(out, "objectInfo150.csv"), "w", newline="") as f:  # class names as ADE20K states them
        csv.writer(f).writerows([("Idx", "Name"), *sorted((value, name) for name, value in LABEL_VALUES.items())])
    mark_generated(out, task="segmentation", size=size)
    return out


GENERATORS: Dict[str, object] = {"detection": generate_detection, "segmentation": generate_segmentation}


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dense.demo", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--task", choices=sorted(GENERATORS), required=True, help="which dataset to draw")
    parser.add_argument("--out", required=True, type=path_arg, help="output folder")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--train", type=int, default=300, help="training images")
    parser.add_argument("--val", type=int, default=60, help="validation images")
    args = parser.parse_args(argv)
    if args.size < 32 or args.train < 1 or args.val < 1:
        parser.error("--size must be at least 32, --train and --val at least 1")
    try:
        GENERATORS[args.task](args.out, args.size, args.train, args.val)
    except (FileExistsError, UsageError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    print(f"wrote the {args.task} demo dataset ({args.train} training, {args.val} validation images of "
          f"{args.size}x{args.size}) to {args.out}")


if __name__ == "__main__":
    main()
