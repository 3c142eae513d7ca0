"""Reading the dense tasks' image files as classification reads them (``data.datasets.load_rgb``: turned as their
EXIF orientation says, 16-bit grey scaled to 8 bits, float refused), with every failure one line naming the file.
Sizes are those shown, after the orientation: COCO boxes and segmentation labels are drawn on the picture as shown
(a label PNG carries no orientation of its own and is used as stored)."""
from __future__ import annotations

import contextlib
from typing import Iterator, Tuple

import torch
import torchvision.transforms.v2.functional as F
from PIL import Image

from data.datasets import PIL_ERRORS, UnsupportedImage, check_mode, displayed_size, load_rgb
from config import UsageError


@contextlib.contextmanager
def one_line(path: str, what: str) -> Iterator[None]:
    """Reading ``path`` fails as one line naming the ``what`` (image or annotation) and the file."""
    try:
        yield
    except UnsupportedImage as err:
        raise UsageError(f"{what} {path} {err}") from None
    except PIL_ERRORS as err:
        raise UsageError(f"cannot read {what} {path}: {err}") from None


def image_size(path: str, what: str = "image") -> Tuple[int, int]:
    """(width, height) as shown, from the file's header; a float image is refused here, before a run trains on it."""
    with one_line(path, what), Image.open(path) as img:
        if what != "image":
            return img.size
        check_mode(img)
        return displayed_size(img)


def read_rgb(path: str) -> torch.Tensor:
    """The image as a uint8 (3, H, W) tensor, as shown."""
    with one_line(path, "image"):
        return F.pil_to_tensor(load_rgb(path))


def as_shown(size: Tuple[int, int], expected: Tuple[int, int]) -> str:
    """For a size mismatch message: where the sizes are each other turned, the image's EXIF orientation turned it."""
    return " as shown (its EXIF orientation turns the stored picture)" if tuple(size) == tuple(expected)[::-1] else ""
