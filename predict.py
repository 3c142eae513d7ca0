"""Top-k classes of image files with a trained or released model.

    python predict.py --cfg configs/focal_tiny_patch4_window7_224.yaml --checkpoint focal-tiny-is224-ws7.pth \
        photos/ cat.jpg [--json]

Images are preprocessed as evaluation does. Classes are named by the training folders the checkpoint stores,
else by ImageNet-1K's names for a 1000-class model, else by index.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from PIL import Image
from timm.data import ImageNetInfo

from config import DEVICES, HelpFormatter, UsageError, error_text, load_config, path_arg
from data.datasets import PIL_ERRORS, hidden, load_rgb
from data.transforms import build_transform
from engine import resolve_device
from models import build_model, head_classes, load_weights
from models.kernels import optimize_for
from utils import read_checkpoint, shape_changes

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="predict.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    # "*", not "+": images after --opts end up among its values, and argparse would only say that none were given
    parser.add_argument("images", nargs="*", help="image files, or folders searched recursively for images")
    parser.add_argument("--cfg", required=True, help="model config file")
    parser.add_argument("--opts", nargs="+", action="extend", default=[],
                        help="config overrides: KEY VALUE ... (the class count comes from the checkpoint unless "
                             "MODEL.NUM_CLASSES is given here)")
    parser.add_argument("--checkpoint", required=True, type=path_arg,
                        help="weights: ours, a released file, or a bare state dict")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="auto: CUDA when available, else CPU")
    parser.add_argument("--topk", type=int, default=5, help="classes printed per image, most probable first")
    parser.add_argument("--ema", action="store_true", help="use the checkpoint's EMA weights (from --model-ema)")
    parser.add_argument("--json", action="store_true",
                        help="one JSON object per image and line: file, classes (indices), labels (names, null where "
                             "the classes have none), scores")
    args = parser.parse_args(argv)
    if not args.images:
        parser.error("no images given (--opts takes every value up to the next flag: put the images before --opts, "
                     "or end --opts with --)")
    for flag in ("batch_size", "topk"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    return args


def find_images(paths: Sequence[str]) -> List[Path]:
    """Named files as given, folders expanded to their image files in sorted order, hidden entries left out."""
    found = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                            and not any(hidden(part) for part in p.relative_to(path).parts))
        elif path.is_file():
            found.append(path)
        else:
            raise UsageError(f"image path not found: {name}")
    if not found:
        raise UsageError(f"no images found in {', '.join(paths)} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return found


def load_model(cfg: str, opts: Sequence[str], checkpoint: str, device: torch.device,
               ema: bool = False) -> Tuple[nn.Module, Any, Optional[List[str]]]:
    """The config's model in eval mode with the checkpoint's (or its EMA) weights, the config, and the class names
    the checkpoint stores. The class count is the checkpoint's unless ``--opts`` sets ``MODEL.NUM_CLASSES``."""
    try:  # the reader main.py uses: tensors only, checksummed, our and the released formats
        state = read_checkpoint(checkpoint).state
    except UsageError as err:
        raise UsageError(f"--checkpoint {checkpoint}: {err}") from None
    stored = state if isinstance(state, dict) else {}
    if ema:
        if "model_ema" not in stored:
            raise UsageError(f"--ema: {checkpoint} holds no EMA weights (train with --model-ema to have them)")
        state = {"model": stored["model_ema"]}
    classes = head_classes(state)
    if classes is not None and "MODEL.NUM_CLASSES" not in list(opts)[::2]:
        opts = [*opts, "MODEL.NUM_CLASSES", str(classes)]
    try:
        config = load_config(cfg, opts)
        model = build_model(config)
    except (KeyError, ValueError, FileNotFoundError) as err:  # ConfigError is a ValueError
        raise UsageError(f"config (--cfg {cfg} / --opts): {error_text(err)}") from None
    if config.MODEL.NUM_CLASSES < 1:
        raise UsageError(f"config (--cfg {cfg} / --opts): MODEL.NUM_CLASSES is 0, so there are no classes to predict")
    try:
        load_weights(model, state)
    except ValueError as err:
        held = f" (the checkpoint has {classes} classes)" if classes not in (None, config.MODEL.NUM_CLASSES) else ""
        raise UsageError(f"--checkpoint {checkpoint}: cannot load into {config.MODEL.NAME}{held}: {err}"
                         f"{shape_changes(stored.get('config'), config)}") from None
    names = stored.get("class_names")
    return model.to(device).eval(), config, names if names and len(names) == config.MODEL.NUM_CLASSES else None


def read_image(path: Path) -> Image.Image:
    """RGB as main.py's loader reads it; an unreadable file, or one over Pillow's pixel limit, is named."""
    try:
        return load_rgb(path)
    except PIL_ERRORS as err:
        raise UsageError(f"cannot read image {path}: {err}") from None


@torch.no_grad()
def predict(args: argparse.Namespace) -> None:
    device = resolve_device(args.device, local_rank=0)
    paths = find_images(args.images)
    model, config, names = load_model(args.cfg, args.opts, args.checkpoint, device, args.ema)
    optimize_for(model, device)
    transform = build_transform(False, config)
    info = ImageNetInfo()
    if not names and config.MODEL.NUM_CLASSES == info.num_classes():
        names = info.label_descriptions()
    topk = min(args.topk, config.MODEL.NUM_CLASSES)
    for start in range(0, len(paths), args.batch_size):
        group = paths[start:start + args.batch_size]
        images = torch.stack([transform(read_image(p)) for p in group]).to(device)
        probs, indices = model(images).float().softmax(dim=-1).topk(topk, dim=-1)
        for path, p_row, i_row in zip(group, probs.tolist(), indices.tolist()):
            labels = [names[i] if names else None for i in i_row]
            if args.json:
                print(json.dumps({"file": str(path), "classes": i_row, "labels": labels, "scores": p_row}))
                continue
            print(path)
            for p, i, label in zip(p_row, i_row, labels):
                print(f"  {p:.4f}  {i:4d}" + (f" {label}" if label else ""))


if __name__ == "__main__":
    try:
        predict(parse_args())
    except UsageError as err:
        sys.exit(f"predict.py: error: {err}")
