"""COCO-layout data: ``<root>/<split>/`` images and ``<root>/annotations/instances_<split>.json``, every annotation
checked on opening (one line naming the file, the annotation and the problem); category ids become labels 1..K."""
from __future__ import annotations

import contextlib
import io
import math
import os
import random
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pycocotools.mask as mask_utils
import torch
import torchvision.transforms.v2.functional as F
from pycocotools.coco import COCO
from torchvision.ops import box_convert, clip_boxes_to_image

from config import UsageError
from dense.images import image_size, read_rgb, shown
from detection.config import MASK_DETECTORS

# Boxes may pass the image border by this many pixels (rounding in real annotations) and are clipped to it.
BORDER_TOLERANCE = 1.0


def load_coco(path: str) -> COCO:
    """pycocotools' COCO index of a file, its progress prints kept out of our log; bad JSON is a usage error."""
    if not os.path.isfile(path):
        raise UsageError(f"annotation file not found: {path}")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(path)
    except (ValueError, KeyError, TypeError, AssertionError) as err:
        raise UsageError(f"cannot read annotation file {path}: {type(err).__name__}: {err}") from None


def rle_runs(segm: Dict[str, Any]) -> Optional[List[int]]:
    """The run lengths of an RLE mask, uncompressed (a list) or in COCO's compressed string (decoded as
    pycocotools' ``rleFrString`` does); None when ``counts`` is neither."""
    counts = segm.get("counts")
    if isinstance(counts, list):
        return counts
    if not isinstance(counts, str):
        return None
    runs, pos = [], 0
    while pos < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if pos == len(counts):
                return None
            char = ord(counts[pos]) - 48
            value |= (char & 0x1F) << (5 * shift)
            more = bool(char & 0x20)
            pos, shift = pos + 1, shift + 1
            if not more and char & 0x10:
                value |= -1 << (5 * shift)
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def check_images(coco: COCO, path: str) -> None:
    """Refuse an id listed twice (pycocotools would merge the two), a missing file name or size."""
    seen = set()
    for image in coco.dataset.get("images", []):
        image_id = image.get("id")
        if image_id in seen:
            raise UsageError(f"{path}: image id {image_id} is listed twice in 'images' (again for "
                             f"{image.get('file_name')}): image ids must be unique")
        seen.add(image_id)
        if not isinstance(image.get("file_name"), str) or not image["file_name"]:
            raise UsageError(f"{path}: image id {image_id} has file_name {image.get('file_name')!r}: expected the "
                             f"image's file in the split's folder")
        for key in ("width", "height"):
            value = image.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 1:
                raise UsageError(f"{path}: image id {image_id} ({image.get('file_name')}) has {key} {value!r}: "
                                 f"expected its size in pixels")


def complete_annotations(coco: COCO, masks: bool) -> None:
    """What COCOeval needs and converters often leave out: ``iscrowd`` (0), ``area`` (the mask's, else the box's),
    and ids unique and from 1 on (COCOeval takes id 0 for "no match"), renumbered in file order where needed."""
    annotations = coco.dataset.get("annotations", [])
    for ann in annotations:
        ann.setdefault("iscrowd", 0)
        if "area" not in ann:
            by_mask = masks and not ann["iscrowd"]
            ann["area"] = float(mask_utils.area(coco.annToRLE(ann)) if by_mask else ann["bbox"][2] * ann["bbox"][3])
    ids = [ann.get("id") for ann in annotations]
    if len(set(ids)) < len(ids) or any(not isinstance(i, int) or i < 1 for i in ids):
        for number, ann in enumerate(annotations, 1):
            ann["id"] = number
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()


def check_annotations(coco: COCO, path: str, masks: bool) -> None:
    """Refuse what would train silently wrong: unknown image or category, bad boxes, missing or bad masks."""
    for ann in coco.dataset.get("annotations", []):
        where = f"{path}: annotation {ann.get('id')}"
        image = coco.imgs.get(ann.get("image_id"))
        if image is None:
            raise UsageError(f"{where} refers to image id {ann.get('image_id')}, which is not in 'images'")
        where += f" (image {image.get('file_name')})"
        if ann.get("category_id") not in coco.cats:
            raise UsageError(f"{where} has category id {ann.get('category_id')}, which is not in 'categories' "
                             f"(ids {sorted(coco.cats)})")
        box = ann.get("bbox")
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)
                and all(math.isfinite(v) for v in box)):
            raise UsageError(f"{where} has bbox {box!r}: expected [x, y, width, height]")
        x, y, w, h = box
        if w < 0 or h < 0:
            raise UsageError(f"{where} has bbox {box}: negative width or height")
        width, height = image["width"], image["height"]
        if x < -BORDER_TOLERANCE or y < -BORDER_TOLERANCE or x + w > width + BORDER_TOLERANCE \
                or y + h > height + BORDER_TOLERANCE:
            raise UsageError(f"{where} has bbox {box} outside its {width}x{height} image")
        if masks and not ann.get("iscrowd", 0):
            segm = ann.get("segmentation")
            if isinstance(segm, list):
                if not segm or any(not isinstance(p, list) or len(p) < 6 or len(p) % 2 for p in segm):
                    raise UsageError(f"{where} has a malformed polygon: expected lists of at least 3 x, y pairs")
            elif isinstance(segm, dict):
                if list(segm.get("size", [])) != [height, width]:
                    raise UsageError(f"{where} has a mask of size {segm.get('size')}, its image is "
                                     f"{height}x{width} (height, width)")
                runs = rle_runs(segm)  # pycocotools decodes runs that miss the image into uninitialised memory
                covered = sum(runs) if runs and all(isinstance(r, int) and r >= 0 for r in runs) else None
                if covered != height * width:
                    raise UsageError(f"{where} has an RLE mask whose runs cover {covered} pixels, its "
                                     f"{height}x{width} image {height * width}: a malformed 'counts'")
            else:
                raise UsageError(f"{where} has no segmentation (polygons or RLE), which Mask R-CNN trains on")


class CocoDetection(torch.utils.data.Dataset):
    """(image in [0, 1], target) pairs for torchvision's detectors; crowd regions and boxes under a pixel wide are
    left out, and so, for training, are images without objects, as torchvision's references do."""

    def __init__(self, root: str, split: str, masks: bool, train: bool, flip_prob: float = 0.5):
        self.folder = os.path.join(root, split)
        self.ann_file = os.path.join(root, "annotations", f"instances_{split}.json")
        if not os.path.isdir(self.folder):
            raise UsageError(f"--data-path {root}: no image folder {self.folder} (expected the COCO layout "
                             f"train2017/, val2017/, annotations/instances_{{train,val}}2017.json)")
        self.coco = load_coco(self.ann_file)
        check_images(self.coco, self.ann_file)
        check_annotations(self.coco, self.ann_file, masks)
        complete_annotations(self.coco, masks)
        if not self.coco.cats:
            raise UsageError(f"{self.ann_file} has no categories")
        self.category_ids = sorted(self.coco.cats)
        self.category_names = [str(self.coco.cats[i].get("name", "")) for i in self.category_ids]
        self.label_of = {cat: i + 1 for i, cat in enumerate(self.category_ids)}
        self.ids = sorted(self.coco.imgs)
        if train:
            self.ids = [i for i in self.ids if self._objects(i)]
        if not self.ids:
            raise UsageError(f"{self.ann_file} has no {'annotated ' if train else ''}images")
        if not train and not any(not a["iscrowd"] for a in self.coco.anns.values()):
            # COCOeval's -1 for "nothing to score" would be logged as box AP 0 at every evaluation
            raise UsageError(f"{self.ann_file} has no annotations to score detections against (none, or only "
                             f"crowd regions): is it an image-info file, such as COCO's test-dev?")
        for image_id in self.ids:  # now, not when an evaluation after an epoch of training reads them
            self._check_size(image_id, image_size(os.path.join(self.folder, self.coco.imgs[image_id]["file_name"])))
        self.masks, self.train, self.flip_prob = masks, train, flip_prob

    def _check_size(self, image_id: int, size: Tuple[int, int]) -> None:
        """``size`` (width, height) of the image file must be its entry's."""
        info = self.coco.imgs[image_id]
        if size != (info["width"], info["height"]):
            raise UsageError(f"image {os.path.join(self.folder, info['file_name'])} is "
                             f"{shown(size, (info['width'], info['height']))} but {self.ann_file} says "
                             f"{info['width']}x{info['height']}")

    def _objects(self, image_id: int) -> List[Dict[str, Any]]:
        return [a for a in self.coco.imgToAnns[image_id] if not a["iscrowd"] and min(a["bbox"][2:]) >= 1]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        path = os.path.join(self.folder, info["file_name"])
        image = F.to_dtype(read_rgb(path), torch.float32, scale=True)
        height, width = image.shape[-2:]
        self._check_size(image_id, (width, height))
        objects = self._objects(image_id)
        boxes = torch.tensor([a["bbox"] for a in objects], dtype=torch.float32).reshape(-1, 4)
        boxes = clip_boxes_to_image(box_convert(boxes, "xywh", "xyxy"), (height, width))
        target = {"boxes": boxes, "image_id": torch.tensor(image_id),
                  "labels": torch.tensor([self.label_of[a["category_id"]] for a in objects], dtype=torch.int64)}
        if self.masks:
            masks = np.stack([self.coco.annToMask(a) for a in objects]) if objects else np.zeros((0, height, width))
            target["masks"] = torch.from_numpy(masks.astype(np.uint8))
        if self.train and random.random() < self.flip_prob:
            image = image.flip(-1)
            target["boxes"] = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)
            if self.masks:
                target["masks"] = target["masks"].flip(-1)
        return image, target


def check_resizable(dataset: CocoDetection, min_size: int, max_size: int) -> None:
    """Refuse an image so elongated that torchvision's resize (short side to ``min_size`` unless the long one passes
    ``max_size``, floored) makes it 0 pixels: a RuntimeError in the middle of an epoch otherwise."""
    for image_id in dataset.ids:
        info = dataset.coco.imgs[image_id]
        short, long = sorted((info["width"], info["height"]))
        if math.floor(short * min(min_size / short, max_size / long)) < 1:
            raise UsageError(f"image {os.path.join(dataset.folder, info['file_name'])} is "
                             f"{info['width']}x{info['height']}: MODEL.DETECTOR_ARGS min_size {min_size} and "
                             f"max_size {max_size} would scale it to 0 pixels; raise max_size or leave it out")


def build_data(config: Any, env: Any, logger: Any) -> Tuple[CocoDetection, CocoDetection, int]:
    """The class count is the number of COCO categories (the training file's; validation must agree)."""
    root, masks = config.DATA.DATA_PATH, config.MODEL.DETECTOR in MASK_DETECTORS
    train = CocoDetection(root, config.DATA.TRAIN_SPLIT, masks, train=True, flip_prob=config.DATA.FLIP_PROB)
    val = CocoDetection(root, config.DATA.VAL_SPLIT, masks, train=False)
    sizes = config.MODEL.DETECTOR_ARGS
    if sizes.get("fixed_size") is None:  # training draws any of min_size, evaluation takes the last
        check_resizable(train, min(sizes.min_size), sizes.max_size)
        check_resizable(val, sizes.min_size[-1], sizes.max_size)
    if val.category_ids != train.category_ids:
        raise UsageError(f"{val.ann_file} has category ids {val.category_ids}, {train.ann_file} has "
                         f"{train.category_ids}: they must agree")
    renamed = [(i, a, b) for i, a, b in zip(train.category_ids, train.category_names, val.category_names) if a != b]
    if renamed:  # the ids agree but mean other things: the score would compare detections of one with another
        category, there, here = renamed[0]
        raise UsageError(f"category id {category} is '{there}' in {train.ann_file} and '{here}' in {val.ann_file}: "
                         f"the two files must name their categories alike")
    logger.info(f"{root}: {len(train)} training and {len(val)} validation images, {len(train.category_ids)} "
                f"categories")
    return train, val, len(train.category_ids)
