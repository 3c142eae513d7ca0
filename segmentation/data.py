"""ADE20K-layout data: ``images/<split>/*.jpg`` with ``annotations/<split>/*.png`` of the same name, one label value
per pixel, 0 meaning "ignore" (unlabelled) and value v meaning class v - 1. Pairs and sizes are checked when the
set is opened; label values as each image is read."""
from __future__ import annotations

import csv
import os
import random
from typing import Any, List, Sequence, Tuple

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode

from errors import UsageError

IGNORE = 255  # label 0 after the shift to classes 0..K-1
SPLITS = {"train": "training", "val": "validation"}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# What PIL raises for unreadable, truncated, corrupt (e.g. "broken PNG file") and oversized files.
PIL_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def read_labels(path: str) -> np.ndarray:
    """A single-channel PNG as an array of label values; anything else is a one-line error naming the file."""
    try:
        with Image.open(path) as img:
            if img.mode not in ("L", "P", "I;16", "I"):
                raise UsageError(f"annotation {path} has mode {img.mode}: label PNGs must have one channel")
            return np.asarray(img).astype(np.int64)
    except PIL_ERRORS as err:
        raise UsageError(f"cannot read annotation {path}: {err}") from None


def read_image(path: str) -> torch.Tensor:
    try:
        with Image.open(path) as img:
            return F.pil_to_tensor(img.convert("RGB"))
    except PIL_ERRORS as err:
        raise UsageError(f"cannot read image {path}: {err}") from None


def image_size(path: str, what: str) -> Tuple[int, int]:
    """(width, height) from the file's header, or a one-line error naming the ``what`` (image or annotation)."""
    try:
        with Image.open(path) as img:
            return img.size
    except PIL_ERRORS as err:
        raise UsageError(f"cannot read {what} {path}: {err}") from None


def class_names(root: str, num_classes: int) -> List[str]:
    """ADE20K's ``objectInfo150.csv`` names when present (first name of each row), else the label values."""
    path = os.path.join(root, "objectInfo150.csv")
    if os.path.isfile(path):
        with open(path, newline="") as f:
            names = [row["Name"].split(";")[0] for row in csv.DictReader(f)]
        if len(names) == num_classes:
            return names
    return [f"label {value}" for value in range(1, num_classes + 1)]


class SegmentationFolder(torch.utils.data.Dataset):
    """(image, labels) pairs of one split; ``train`` applies the seed's augmentation (random rescale, crop,
    flip), otherwise images are resized to fit ``DATA.SCALE`` and labels stay at full size for scoring."""

    def __init__(self, root: str, split: str, config: Any, train: bool, num_classes: int = 0):
        folder = SPLITS[split]
        image_dir, label_dir = os.path.join(root, "images", folder), os.path.join(root, "annotations", folder)
        for path in (image_dir, label_dir):
            if not os.path.isdir(path):
                raise UsageError(f"--data-path {root}: no folder {path} (expected the ADE20K layout "
                                 f"images/{{training,validation}}/, annotations/{{training,validation}}/)")
        images = {os.path.splitext(n)[0]: n for n in os.listdir(image_dir) if n.lower().endswith(IMAGE_EXTENSIONS)}
        if not images:
            raise UsageError(f"--data-path {root}: no images in {image_dir}")
        self.samples: List[Tuple[str, str]] = []
        for stem in sorted(images):
            image, label = os.path.join(image_dir, images[stem]), os.path.join(label_dir, stem + ".png")
            if not os.path.isfile(label):
                raise UsageError(f"image {image} has no annotation {label}")
            image_wh, label_wh = image_size(image, "image"), image_size(label, "annotation")
            if image_wh != label_wh:
                raise UsageError(f"annotation {label} is {label_wh[0]}x{label_wh[1]} but its image is "
                                 f"{image_wh[0]}x{image_wh[1]}")
            self.samples.append((image, label))
        self.num_classes = num_classes or max(int(read_labels(label).max()) for _, label in self.samples)
        if self.num_classes < 1:
            raise UsageError(f"the annotations in {label_dir} hold no label above 0 (0 is 'ignore'): no classes")
        self.config, self.train = config, train

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        image_path, label_path = self.samples[index]
        labels = read_labels(label_path)
        if labels.max() > self.num_classes:
            raise UsageError(f"annotation {label_path} has label {labels.max()}, above the {self.num_classes} "
                             f"classes (DATA.NUM_CLASSES or the training annotations)")
        target = torch.from_numpy(labels - 1)
        target[target < 0] = IGNORE
        image = read_image(image_path)
        if self.train:
            image, target = self.augment(image, target[None])
            target = target[0]
        else:
            image = F.resize(image, fit_size(image.shape[-2:], self.config.DATA.SCALE), antialias=True)
        return F.normalize(F.to_dtype(image, torch.float32, scale=True), MEAN, STD), target

    def augment(self, image: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """mmsegmentation's ADE20K pipeline without photometric distortion: random rescale, random crop padded
        with "ignore" (the image with 0), horizontal flip."""
        data = self.config.DATA
        ratio = random.uniform(*data.RATIO_RANGE)
        size = fit_size(image.shape[-2:], [s * ratio for s in data.SCALE])
        image = F.resize(image, size, antialias=True)
        target = F.resize(target, size, interpolation=InterpolationMode.NEAREST)
        crop = data.CROP_SIZE
        pad_h, pad_w = max(crop - size[0], 0), max(crop - size[1], 0)
        if pad_h or pad_w:
            image = F.pad(image, [0, 0, pad_w, pad_h], fill=0)
            target = F.pad(target, [0, 0, pad_w, pad_h], fill=IGNORE)
        top = random.randint(0, image.shape[-2] - crop)
        left = random.randint(0, image.shape[-1] - crop)
        image, target = F.crop(image, top, left, crop, crop), F.crop(target, top, left, crop, crop)
        if random.random() < 0.5:
            image, target = F.horizontal_flip(image), F.horizontal_flip(target)
        return image, target


def fit_size(size: Sequence[int], scale: Sequence[float]) -> List[int]:
    """(h, w) resized, aspect kept, to fit (long, short) = ``scale`` (mmcv's ``rescale`` with keep_ratio)."""
    h, w = size
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return [max(int(h * factor + 0.5), 1), max(int(w * factor + 0.5), 1)]


def collate(batch: List[Tuple[torch.Tensor, torch.Tensor]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Training crops, all of ``DATA.CROP_SIZE``, as two tensors."""
    images, targets = zip(*batch)
    return torch.stack(images), torch.stack(targets)


def build_data(config: Any, env: Any, logger: Any) -> Tuple[SegmentationFolder, SegmentationFolder, int]:
    root = config.DATA.DATA_PATH
    train = SegmentationFolder(root, "train", config, train=True, num_classes=config.DATA.NUM_CLASSES)
    val = SegmentationFolder(root, "val", config, train=False, num_classes=train.num_classes)
    source = "DATA.NUM_CLASSES" if config.DATA.NUM_CLASSES else "the training annotations"
    logger.info(f"{root}: {len(train)} training and {len(val)} validation images, {train.num_classes} classes "
                f"(from {source})")
    return train, val, train.num_classes
