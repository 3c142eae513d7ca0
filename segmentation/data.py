"""Segmentation data in the ADE20K layout: ``images/<split>/*.jpg`` with ``annotations/<split>/*.png`` of the same
name, one label value per pixel: under ``DATA.REDUCE_ZERO_LABEL`` ADE20K's convention (0 ignored, value v is class
v - 1), else value v is class v; 255 is always ignored. Pairs, sizes and validation labels are checked on opening."""
from __future__ import annotations

import csv
import os
import random
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image
from torch.utils.data import default_collate
from torchvision.transforms import InterpolationMode

from config import UsageError
from data.datasets import image_files
from dense.images import image_size, one_line, read_rgb, shown

IGNORE = 255  # ignored pixels: the value 255, and 0 under REDUCE_ZERO_LABEL
SPLITS = {"train": "training", "val": "validation"}
FAR_GAP = 8  # a largest class this far above the next one (and over twice it) is taken for a stray value
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# mmsegmentation's PhotoMetricDistortion defaults (the seed's ADE20K pipeline), on 0-255 values; hue in OpenCV's
# units (half degrees: 18 is a tenth of the colour circle).
BRIGHTNESS_DELTA = 32
CONTRAST_RANGE = (0.5, 1.5)
SATURATION_RANGE = (0.5, 1.5)
HUE_DELTA = 18


def read_labels(path: str) -> np.ndarray:
    """A single-channel PNG as an array of label values; anything else is a one-line error naming the file."""
    with one_line(path, "annotation"), Image.open(path) as img:
        if img.mode not in ("1", "L", "P", "I;16", "I"):  # "1": a two-class mask, values 0 and 1
            raise UsageError(f"annotation {path} has mode {img.mode}: label PNGs must have one channel")
        labels = np.asarray(img).astype(np.int64)
    if labels.size and labels.min() < 0:
        raise UsageError(f"annotation {path} has label {labels.min()}: label values must be 0 or more")
    if labels.size and labels.max() > IGNORE:  # under REDUCE_ZERO_LABEL, 256 would become class 255: "ignore"
        raise UsageError(f"annotation {path} has label {labels.max()}: label values go up to {IGNORE} "
                         f"({IGNORE}: ignored)")
    return labels


def to_classes(labels: np.ndarray, reduce_zero_label: bool) -> np.ndarray:
    """Label values as class indices, ``IGNORE`` where a pixel is not scored."""
    if not reduce_zero_label:
        return labels
    return np.where((labels == 0) | (labels == IGNORE), IGNORE, labels - 1)


def ignored(reduce_zero_label: bool) -> str:
    """Which label values are not scored, naming the key that decides it."""
    rule = "0 and 255 are ignored" if reduce_zero_label else "255 is ignored"
    return f"DATA.REDUCE_ZERO_LABEL {reduce_zero_label}: {rule}"


def count_classes(paths: Sequence[str], reduce_zero_label: bool, where: str) -> int:
    """The class count the training annotations imply (largest class + 1), refused naming the file where that value
    looks like a stray: found in one file of several, or over twice the next one and ``FAR_GAP`` above it."""
    files_with: Dict[int, List[str]] = {}
    for path in paths:
        classes = to_classes(read_labels(path), reduce_zero_label)
        for value in np.unique(classes[classes != IGNORE]):
            files_with.setdefault(int(value), []).append(path)
    if not files_with:
        raise UsageError(f"the annotations in {where} hold no class ({ignored(reduce_zero_label)})")
    *rest, largest = sorted(files_with)
    files, shift = files_with[largest], int(reduce_zero_label)
    below = rest[-1] if rest else None
    far = below is not None and largest > 2 * below + 1 and largest - below > FAR_GAP
    if (len(files) == 1 and len(paths) > 1) or far:
        others = f"the other values stop at {below + shift}" if below is not None else "it is the only value"
        raise UsageError(f"annotation {files[0]} has label {largest + shift}, found in {len(files)} of {len(paths)} "
                         f"files ({others}): a class count of {largest + 1} from the data looks wrong; if it is right, "
                         f"set DATA.NUM_CLASSES {largest + 1}")
    return largest + 1


def names_file(root: str) -> str:
    return os.path.join(root, "objectInfo150.csv")


def named_classes(root: str, num_classes: int) -> Optional[List[str]]:
    """ADE20K's ``objectInfo150.csv`` names (the first of each row) when it has one row per class, else None."""
    path = names_file(root)
    if not os.path.isfile(path):
        return None
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if "Name" not in (reader.fieldnames or []):
            raise UsageError(f"{path} has no 'Name' column (columns {', '.join(reader.fieldnames or [])}): "
                             f"class names are read in ADE20K's layout (Idx,Ratio,Train,Val,Name); fix or "
                             f"remove it")
        names = [(row["Name"] or "").split(";")[0] for row in reader]
    return names if len(names) == num_classes else None


def class_names(root: str, num_classes: int, reduce_zero_label: bool = True) -> List[str]:
    """:func:`named_classes`, else the label values."""
    first = int(reduce_zero_label)
    return named_classes(root, num_classes) or [f"label {value}" for value in range(first, num_classes + first)]


class SegmentationFolder(torch.utils.data.Dataset):
    """(image, labels) pairs: augmented and normalised for training, else as read (evaluation resizes them)."""

    def __init__(self, root: str, split: str, config: Any, train: bool, num_classes: int = 0):
        folder = SPLITS[split]
        image_dir, label_dir = os.path.join(root, "images", folder), os.path.join(root, "annotations", folder)
        for path in (image_dir, label_dir):
            if not os.path.isdir(path):
                raise UsageError(f"--data-path {root}: no folder {path} (expected the ADE20K layout "
                                 f"images/{{training,validation}}/, annotations/{{training,validation}}/)")
        images: Dict[str, str] = {}
        for name in image_files(os.listdir(image_dir)):
            stem = os.path.splitext(name)[0]
            if stem in images:  # both would claim the one annotation <stem>.png
                raise UsageError(f"images {images[stem]} and {name} in {image_dir} share the name {stem}, so "
                                 f"annotation {stem}.png cannot tell which it labels: remove or rename one")
            images[stem] = name
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
                                 f"{shown(image_wh, label_wh)}")
            self.samples.append((image, label))
        self.reduce_zero_label = config.DATA.REDUCE_ZERO_LABEL
        self.num_classes = num_classes or count_classes([label for _, label in self.samples],
                                                        self.reduce_zero_label, label_dir)
        self.config, self.train = config, train
        # The validation labels now, not at the first evaluation; with nothing to score, each would log "mIoU nan%".
        if not train and not any([(self.classes(label) != IGNORE).any() for _, label in self.samples]):
            raise UsageError(f"the annotations in {label_dir} hold no class ({ignored(self.reduce_zero_label)})")

    def __len__(self) -> int:
        return len(self.samples)

    def classes(self, label_path: str) -> np.ndarray:
        """The class of each pixel of an annotation; a value above the class count is a one-line error."""
        classes = to_classes(read_labels(label_path), self.reduce_zero_label)
        scored = classes[classes != IGNORE]
        if scored.size and scored.max() >= self.num_classes:
            value = scored.max() + int(self.reduce_zero_label)
            raise UsageError(f"annotation {label_path} has label {value}, above the {self.num_classes} classes "
                             f"(DATA.NUM_CLASSES or the training annotations; DATA.REDUCE_ZERO_LABEL "
                             f"{self.reduce_zero_label})")
        return classes

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        image_path, label_path = self.samples[index]
        target = torch.from_numpy(self.classes(label_path))
        image = read_rgb(image_path)
        if not self.train:
            return image, target
        image, target = self.augment(image, target[None])
        return normalize(image), target[0]

    def augment(self, image: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """mmsegmentation's ADE20K pipeline: rescale, crop, photometric distortion, pad with "ignore", flip."""
        data = self.config.DATA
        ratio = random.uniform(*data.RATIO_RANGE)
        size = fit_size(image.shape[-2:], [s * ratio for s in data.SCALE])
        image = F.resize(image, size, antialias=True)
        target = F.resize(target, size, interpolation=InterpolationMode.NEAREST)
        crop = data.CROP_SIZE
        top, left = random.randint(0, max(size[0] - crop, 0)), random.randint(0, max(size[1] - crop, 0))
        height, width = min(crop, size[0]), min(crop, size[1])
        image, target = F.crop(image, top, left, height, width), F.crop(target, top, left, height, width)
        if data.PHOTOMETRIC_DISTORTION:
            image = photometric_distortion(image)
        if height < crop or width < crop:
            image = F.pad(image, [0, 0, crop - width, crop - height], fill=0)
            target = F.pad(target, [0, 0, crop - width, crop - height], fill=IGNORE)
        if random.random() < data.FLIP_PROB:
            image, target = F.horizontal_flip(image), F.horizontal_flip(target)
        return image, target


def scale_saturation(image: torch.Tensor, factor: float) -> torch.Tensor:
    """HSV saturation x ``factor`` (at most 1) with hue and value kept, as OpenCV's HSV round trip in mmsegmentation
    (torchvision's blend with grey moves the value): with V the largest channel, c becomes V - (S' / S)(V - c)."""
    value = image.amax(0, keepdim=True)
    spread = value - image.amin(0, keepdim=True)  # V * S
    scale = torch.minimum(torch.full_like(value, factor), value / spread.clamp(min=1e-12))  # S' / S
    return value - scale * (value - image)


def photometric_distortion(image: torch.Tensor) -> torch.Tensor:
    """mmsegmentation's PhotoMetricDistortion of a uint8 RGB image, as floats in [0, 1]: each step with probability
    1/2, brightness added, then contrast (first or last), saturation and hue. Its "contrast" scales the values, which
    is torchvision's ``adjust_brightness``. Values are clipped after each step, as there, but not rounded."""
    image = F.to_dtype(image, torch.float32, scale=True)
    if random.random() < 0.5:
        image = (image + random.uniform(-BRIGHTNESS_DELTA, BRIGHTNESS_DELTA) / 255).clamp(0, 1)
    steps = [lambda x: F.adjust_brightness(x, random.uniform(*CONTRAST_RANGE)),
             lambda x: scale_saturation(x, random.uniform(*SATURATION_RANGE)),
             lambda x: F.adjust_hue(x, random.uniform(-HUE_DELTA, HUE_DELTA) / 180)]
    if random.random() < 0.5:  # the contrast step last
        steps.append(steps.pop(0))
    for step in steps:
        if random.random() < 0.5:
            image = step(image)
    return image


def normalize(image: torch.Tensor) -> torch.Tensor:
    """uint8 RGB (or float RGB in [0, 1]) to the network's input: [0, 1], then ImageNet's mean and deviation."""
    return F.normalize(F.to_dtype(image, torch.float32, scale=True), MEAN, STD)


def fit_size(size: Sequence[int], scale: Sequence[float]) -> List[int]:
    """(h, w) resized, aspect kept, to fit (long, short) = ``scale`` (mmcv's ``rescale`` with keep_ratio)."""
    h, w = size
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return [max(int(h * factor + 0.5), 1), max(int(w * factor + 0.5), 1)]


collate = default_collate  # training crops all have DATA.CROP_SIZE: two stacked tensors


def build_data(config: Any, env: Any, logger: Any) -> Tuple[SegmentationFolder, SegmentationFolder, int]:
    root = config.DATA.DATA_PATH
    train = SegmentationFolder(root, "train", config, train=True, num_classes=config.DATA.NUM_CLASSES)
    val = SegmentationFolder(root, "val", config, train=False, num_classes=train.num_classes)
    class_names(root, train.num_classes, config.DATA.REDUCE_ZERO_LABEL)  # now, not after an epoch of training
    source = "DATA.NUM_CLASSES" if config.DATA.NUM_CLASSES else "the training annotations"
    convention = ("label 0 ignored, value v is class v-1 (DATA.REDUCE_ZERO_LABEL True, ADE20K's convention)"
                  if config.DATA.REDUCE_ZERO_LABEL else "value v is class v, 0 included (DATA.REDUCE_ZERO_LABEL "
                  "False)")
    augmentation = "" if config.EVAL_MODE else (f"; flip probability {config.DATA.FLIP_PROB}; photometric distortion "
                                                 f"{'on' if config.DATA.PHOTOMETRIC_DISTORTION else 'off'}")
    logger.info(f"{root}: {len(train)} training and {len(val)} validation images, {train.num_classes} classes "
                f"(from {source}); {convention}; 255 ignored{augmentation}")
    return train, val, train.num_classes
