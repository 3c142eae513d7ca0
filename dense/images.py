"""Reading the dense tasks' image files as classification reads them (``data.datasets.to_rgb``: 16-bit grey scaled
to 8 bits), with every failure one line naming the file; a float image, whose scale is unknown, is refused before a
run trains on it."""
from __future__ import annotations

from typing import Tuple

import torch
import torchvision.transforms.v2.functional as F
from PIL import Image

from data.datasets import PIL_ERRORS, to_rgb
from errors import UsageError

# PIL's float mode: values in 0..1 or in 0..255 alike, which RGB conversion would clip or make black.
FLOAT_MODE = "F"


def image_size(path: str, what: str = "image") -> Tuple[int, int]:
    """(width, height) from the file's header, or a one-line error naming the ``what`` (image or annotation); so
    is a float image."""
    try:
        with Image.open(path) as img:
            if what == "image" and img.mode == FLOAT_MODE:
                raise UsageError(f"image {path} holds floating-point values (mode F), whose range is unknown; save "
                                 f"it as 8- or 16-bit")
            return img.size
    except PIL_ERRORS as err:
        raise UsageError(f"cannot read {what} {path}: {err}") from None


def read_rgb(path: str) -> torch.Tensor:
    """The image as a uint8 (3, H, W) tensor."""
    try:
        with Image.open(path) as img:
            return F.pil_to_tensor(to_rgb(img))
    except PIL_ERRORS as err:
        raise UsageError(f"cannot read image {path}: {err}") from None
