"""Parameter counts of the dense models next to the seed's tables.

Every config under configs/detection and configs/segmentation that builds a released backbone (one without
``MODEL.BACKBONE_ARGS`` of its own: the demos have small ones) is built without data, for COCO's 80 classes or
ADE20K's 150, on PyTorch's meta device (shapes only: no memory, no initialisation), and its parameters counted as
the seed's #params columns count them: backbone, neck and heads, the training-only auxiliary head of UPerNet
included. A config of a detector or decoder added later is counted as found; its seed figure, where the seed has
one, comes from :data:`SEED_PARAMS_M`.

    python -m tools.dense_params [--json FILE]
"""
from __future__ import annotations

import argparse
import glob
import os
from typing import Any, Callable, List, NamedTuple, Optional, Sequence

import torch
import torch.nn as nn

from config import HelpFormatter, load_config, path_arg
from detection.config import detection_defaults
from detection.model import build_detector
from segmentation.config import segmentation_defaults
from segmentation.model import build_segmenter
from tools.benchmark import ROOT, print_table, write_json

T, S, B = (f"focal_{size}_patch4_window7_224" for size in ("tiny", "small", "base"))
# The seed README's #params in millions, by (MODEL.DETECTOR or MODEL.ARCH, MODEL.BACKBONE).
SEED_PARAMS_M = {
    ("mask_rcnn", T): 49, ("mask_rcnn", S): 71, ("mask_rcnn", B): 110,
    ("retinanet", T): 39, ("retinanet", S): 62, ("retinanet", B): 101,
    ("cascade_mask_rcnn", T): 87, ("atss", T): 37, ("sparse_rcnn", T): 111,
    ("upernet", T): 62, ("upernet", S): 85, ("upernet", B): 126,
}


class Task(NamedTuple):
    defaults: Callable[[], Any]
    build: Callable[[Any, int], nn.Module]
    head: Callable[[Any], str]  # the config's detector or decoder
    num_classes: int


TASKS = {
    "detection": Task(detection_defaults, build_detector, lambda c: c.MODEL.DETECTOR, 80),
    "segmentation": Task(segmentation_defaults, build_segmenter, lambda c: c.MODEL.ARCH, 150),
}


class Count(NamedTuple):
    task: str
    config: str  # the file's name without .yaml
    head: str
    backbone: str
    params_m: float
    seed_m: Optional[float]

    @property
    def ratio(self) -> Optional[float]:
        return None if self.seed_m is None else self.params_m / self.seed_m


def count(task: str, path: str) -> Count:
    spec = TASKS[task]
    config = load_config(path, None, spec.defaults())
    with torch.device("meta"):
        model = spec.build(config, spec.num_classes)
    head = spec.head(config)
    released = not config.MODEL.BACKBONE_ARGS  # a backbone of its own shape is not the seed's
    return Count(task, os.path.splitext(os.path.basename(path))[0], head, config.MODEL.BACKBONE,
                 sum(p.numel() for p in model.parameters()) / 1e6,
                 SEED_PARAMS_M.get((head, config.MODEL.BACKBONE)) if released else None)


def configs(task: str, root: str = os.path.join(ROOT, "configs")) -> List[str]:
    """The task's configs of released backbones."""
    return [path for path in sorted(glob.glob(os.path.join(root, task, "*.yaml")))
            if not load_config(path, None, TASKS[task].defaults()).MODEL.BACKBONE_ARGS]


def count_all() -> List[Count]:
    return [count(task, path) for task in TASKS for path in configs(task)]


def report(counts: Sequence[Count]) -> None:
    rows = [[c.config, c.head, c.backbone.replace("_patch4_window7_224", ""), f"{c.params_m:.2f}",
             "-" if c.seed_m is None else f"{c.seed_m:g}", "-" if c.ratio is None else f"{c.ratio:.3f}"]
            for c in counts]
    print_table("parameters (millions): COCO's 80 classes for detection, ADE20K's 150 for segmentation", rows,
                ["config", "detector / decoder", "backbone", "params M", "seed M", "ratio"])


def main(argv: Optional[Sequence[str]] = None) -> List[Count]:
    p = argparse.ArgumentParser(prog="python -m tools.dense_params", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--json", type=path_arg, help="also write the counts to this file")
    args = p.parse_args(argv)
    counts = count_all()
    report(counts)
    write_json(args.json, [dict(c._asdict(), ratio=c.ratio) for c in counts])
    return counts


if __name__ == "__main__":
    main()
