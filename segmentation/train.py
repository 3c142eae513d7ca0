"""Train or evaluate a semantic segmentation model with a Focal Transformer encoder.

    python -m segmentation.train --cfg CONFIG --data-path ROOT [--pretrained CKPT] [--eval --resume CKPT]
    torchrun --nproc_per_node N -m segmentation.train --cfg CONFIG --data-path ROOT ...

See get_started_for_semantic_segmentation.md.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from dense.run import Task, main
from engine import DatasetClasses

from . import data, evaluate, model
from .config import SEGMENTATION_RULES, segmentation_defaults


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Pixel-wise cross-entropy over labelled pixels, the logits brought to the labels' size first (bilinearly, as
    mmsegmentation resizes its heads' outputs)."""
    if logits.shape[-2:] != targets.shape[-2:]:
        logits = F.interpolate(logits.float(), size=targets.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(logits.float(), targets, ignore_index=data.IGNORE)


def losses(net: nn.Module, batch: Tuple[torch.Tensor, torch.Tensor], device: torch.device) -> Dict[str, torch.Tensor]:
    """The decoder's cross-entropy and, with the auxiliary head (``MODEL.AUX_HEAD``), that head's times its weight."""
    images, targets = batch
    targets = targets.to(device, non_blocking=True)
    outputs = net(images.to(device, non_blocking=True))
    if not isinstance(outputs, tuple):
        return {"loss_ce": cross_entropy(outputs, targets)}
    logits, aux_logits = outputs
    weight = getattr(net, "module", net).aux_head.loss_weight  # the model inside DDP
    return {"loss_ce": cross_entropy(logits, targets), "loss_aux": weight * cross_entropy(aux_logits, targets)}


def class_record(config: Any, dataset: data.SegmentationFolder) -> Optional[DatasetClasses]:
    """The class names of ``objectInfo150.csv``; without it a run knows only the class count."""
    names = data.named_classes(config.DATA.DATA_PATH, dataset.num_classes)
    return DatasetClasses(data.names_file(config.DATA.DATA_PATH), "class names", names) if names else None


TASK = Task(name="semantic segmentation", defaults=segmentation_defaults(), rules=SEGMENTATION_RULES,
            build_data=data.build_data, build_model=model.build_segmenter, collate=data.collate, losses=losses,
            evaluate=evaluate.evaluate, backbone=model.backbone, class_record=class_record, score_name="mIoU")


if __name__ == "__main__":
    main(TASK, "segmentation.train")
