"""Train or evaluate a detector (Mask R-CNN, Cascade Mask R-CNN, RetinaNet, FCOS, ATSS, Sparse R-CNN or RepPoints v2)
with a Focal Transformer backbone.

    python -m detection.train --cfg CONFIG --data-path ROOT [--pretrained CKPT] [--eval --resume CKPT]
    torchrun --nproc_per_node N -m detection.train --cfg CONFIG --data-path ROOT ...

See get_started_for_object_detection.md.
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch
import torch.nn as nn

from dense.images import collate
from dense.run import Task, main
from engine import DatasetClasses

from . import data, evaluate, model
from .config import DETECTION_RULES, detection_defaults


def losses(net: nn.Module, batch: Tuple[List[torch.Tensor], List[Dict[str, torch.Tensor]]],
           device: torch.device) -> Dict[str, torch.Tensor]:
    """torchvision's detectors compute their own losses from the targets in training mode."""
    images, targets = batch
    return net([i.to(device, non_blocking=True) for i in images],
               [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets])


def class_record(config: Any, dataset: data.CocoDetection) -> DatasetClasses:
    """The sorted category ids (label k is the k-th) and their names."""
    return DatasetClasses(dataset.ann_file, "categories", dataset.category_names, dataset.category_ids,
                          first_output=1)


TASK = Task(name="object detection", defaults=detection_defaults(), rules=DETECTION_RULES,
            build_data=data.build_data, build_model=model.build_detector, collate=collate, losses=losses,
            evaluate=evaluate.evaluate, backbone=model.backbone, class_record=class_record, score_name="box AP")

if __name__ == "__main__":
    main(TASK, "detection.train")
