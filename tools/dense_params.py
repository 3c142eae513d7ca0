"""Parameter counts of the dense models next to the seed's tables.

Every config under configs/detection and configs/segmentation of a released backbone (one without
``MODEL.BACKBONE_ARGS`` of its own: the demos have small ones) is built for COCO's 80 classes or ADE20K's 150 on
PyTorch's meta device (shapes only), and counted as the seed's #params columns count them: backbone, neck and
heads, UPerNet's training-only auxiliary head included. A detector or decoder added later is counted as found;
its seed figure, where the seed has one, comes from :data:`SEED_PARAMS_M`.

    python -m tools.dense_params [--json FILE]
"""
from __future__ import annotations

import argparse
import glob
import os
from typing import List, NamedTuple, Optional, Sequence

import torch

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
# task -> its config defaults, its model builder, the number of classes of its dataset
TASKS = {"detection": (detection_defaults, build_detector, 80),
         "segmentation": (segmentation_defaults, build_segmenter, 150)}


class Count(NamedTuple):
    task: str
    config: str  # the file's name without .yaml
    head: str  # MODEL.DETECTOR or MODEL.ARCH
    backbone: str
    params_m: float
    seed_m: Optional[float]

    @property
    def ratio(self) -> Optional[float]:
        return None if self.seed_m is None else self.params_m / self.seed_m


def count(task: str, path: str) -> Count:
    defaults, build, num_classes = TASKS[task]
    config = load_config(path, None, defaults())
    with torch.device("meta"):
        model = build(config, num_classes)
    head = config.MODEL.DETECTOR if task == "detection" else config.MODEL.ARCH
    released = not config.MODEL.BACKBONE_ARGS  # a backbone of its own shape is not the seed's
    return Count(task, os.path.splitext(os.path.basename(path))[0], head, config.MODEL.BACKBONE,
                 sum(p.numel() for p in model.parameters()) / 1e6,
                 SEED_PARAMS_M.get((head, config.MODEL.BACKBONE)) if released else None)


def count_all() -> List[Count]:
    """Every config of a released backbone."""
    paths = [(task, path) for task in TASKS
             for path in sorted(glob.glob(os.path.join(ROOT, "configs", task, "*.yaml")))]
    return [count(task, path) for task, path in paths
            if not load_config(path, None, TASKS[task][0]()).MODEL.BACKBONE_ARGS]


def main(argv: Optional[Sequence[str]] = None) -> List[Count]:
    p = argparse.ArgumentParser(prog="python -m tools.dense_params", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--json", type=path_arg, help="also write the counts to this file")
    args = p.parse_args(argv)
    counts = count_all()
    rows = [[c.config, c.head, c.backbone.replace("_patch4_window7_224", ""), f"{c.params_m:.2f}",
             "-" if c.seed_m is None else f"{c.seed_m:g}", "-" if c.ratio is None else f"{c.ratio:.3f}"]
            for c in counts]
    print_table("parameters (millions): COCO's 80 classes for detection, ADE20K's 150 for segmentation", rows,
                ["config", "detector / decoder", "backbone", "params M", "seed M", "ratio"])
    write_json(args.json, [dict(c._asdict(), ratio=c.ratio) for c in counts])
    return counts


if __name__ == "__main__":
    main()
