"""mIoU as mmsegmentation computes it: one confusion matrix over every labelled pixel of the validation set
(torchmetrics, summed over processes), IoU per class = TP / (TP + FP + FN), the mean over classes that occur in
the labels or the predictions."""
from __future__ import annotations

import logging
from typing import Any, List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics.classification import MulticlassConfusionMatrix

from dense.run import loader
from distributed import DistEnv
from engine import Precision
from progress import Progress

from .data import IGNORE, class_names

SIZE_DIVISOR = 32  # smp's encoders need sides divisible by their output stride


def iou_per_class(confmat: torch.Tensor) -> torch.Tensor:
    """IoU of each class from a (target, prediction) confusion matrix; NaN for a class absent from both."""
    confmat = confmat.double()
    tp = confmat.diag()
    union = confmat.sum(0) + confmat.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))


def mean_iou(confmat: torch.Tensor) -> Tuple[float, torch.Tensor]:
    """(mIoU in percent, per-class IoU in percent)."""
    ious = iou_per_class(confmat) * 100
    return ious.nanmean().item(), ious


@torch.no_grad()
def predict(model: nn.Module, image: torch.Tensor, out_size: Sequence[int]) -> torch.Tensor:
    """Whole-image inference: pad to a multiple of 32, predict, crop, resize the logits to the label's size."""
    h, w = image.shape[-2:]
    pad_h, pad_w = -h % SIZE_DIVISOR, -w % SIZE_DIVISOR
    logits = model(F.pad(image[None], (0, pad_w, 0, pad_h)))[..., :h, :w]
    logits = F.interpolate(logits.float(), size=tuple(out_size), mode="bilinear", align_corners=False)
    return logits.argmax(1)[0]


@torch.no_grad()
def evaluate(config: Any, model: nn.Module, dataset: Any, env: DistEnv, precision: Precision,
             logger: logging.Logger) -> float:
    """Log ``mIoU X%`` and the IoU of every class; return the mIoU. Every process scores its shard of images."""
    model.eval()
    metric = MulticlassConfusionMatrix(dataset.num_classes, ignore_index=IGNORE).to(env.device)
    batches = loader(dataset, config, env, collate_list, train=False)
    progress = Progress(len(batches), config.PRINT_FREQ)
    for idx, (images, targets) in enumerate(batches):
        for image, target in zip(images, targets):
            with precision.autocast():
                pred = predict(model, image.to(env.device), target.shape)
            metric.update(pred.flatten(), target.to(env.device).flatten())
        if progress.due(idx):
            logger.info(f"Test: {progress.position(idx)}")
    miou, ious = mean_iou(metric.compute().cpu())  # torchmetrics sums the matrices of all processes
    names = class_names(config.DATA.DATA_PATH, dataset.num_classes)
    for name, iou in zip(names, ious.tolist()):
        logger.info(f"  IoU {name}: {iou:.2f}")
    logger.info(f"mIoU {miou:.2f}% over {dataset.num_classes} classes ({len(dataset)} images)")
    return miou


def collate_list(batch: List[Tuple[torch.Tensor, torch.Tensor]]) -> Tuple[list, list]:
    images, targets = zip(*batch)
    return list(images), list(targets)
