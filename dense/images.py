"""Reading the dense tasks' image files: every failure is one line naming the file, and an image whose values
RGB conversion would clip is refused before a run trains on it."""
from __future__ import annotations

from typing import Tuple

import torch
import torchvision.transforms.v2.functional as F
from PIL import Image

from errors import UsageError

# What PIL raises for unreadable, truncated, corrupt (e.g. "broken PNG file") and oversized (its decompression-bomb
# guard) files.
PIL_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
# PIL modes of more than 8 bits a channel (I;16*, I: integers, F: floats), which convert("RGB") clips at 255.
WIDE_MODES = ("I", "F")


def image_size(path: str, what: str = "image") -> Tuple[int, int]:
    """(width, height) from the file's header, or a one-line error naming the ``what`` (image or annotation); so
    is an image of more than 8 bits a channel (annotations may have them: their values are labels)."""
    try:
        with Image.open(path) as img:
            if what == "image" and img.mode.startswith(WIDE_MODES):
                raise UsageError(f"image {path} has mode {img.mode}: more than 8 bits a channel, which would be "
                                 f"clipped at 255; convert it to 8-bit")
            return img.size
    except PIL_ERRORS as err:
        raise UsageError(f"cannot read {what} {path}: {err}") from None


def read_rgb(path: str) -> torch.Tensor:
    """The image as a uint8 (3, H, W) tensor."""
    try:
        with Image.open(path) as img:
            return F.pil_to_tensor(img.convert("RGB"))
    except PIL_ERRORS as err:
        raise UsageError(f"cannot read image {path}: {err}") from None
