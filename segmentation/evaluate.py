"""mIoU as mmsegmentation computes it: one confusion matrix over every labelled pixel (summed over processes), IoU
per class = TP / (TP + FP + FN), averaged over the classes in the labels or the predictions; one view of each image
or several (``TEST.SCALES``, ``TEST.FLIP``), each predicted whole or in sliding windows (``TEST.MODE``)."""
from __future__ import annotations

import logging
from typing import Any, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torchmetrics.classification import MulticlassConfusionMatrix

from dense.images import evaluation_batches
from engine import DistEnv, Precision

from .data import IGNORE, class_names, fit_size, normalize

SIZE_DIVISOR = 32  # smp's encoders need sides divisible by their output stride


def mean_iou(confmat: torch.Tensor) -> Tuple[float, torch.Tensor]:
    """(mIoU, IoU per class) in percent from a confusion matrix; a class absent from both sides is NaN, unscored."""
    confmat = confmat.double()
    tp = confmat.diag()
    union = confmat.sum(0) + confmat.sum(1) - tp
    ious = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan"))) * 100
    return ious.nanmean().item(), ious


def whole(model: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """Logits of (n, 3, h, w) images in one pass: padded to a multiple of 32, predicted, cropped back."""
    h, w = image.shape[-2:]
    pad_h, pad_w = -h % SIZE_DIVISOR, -w % SIZE_DIVISOR
    return model(F.pad(image, (0, pad_w, 0, pad_h)))[..., :h, :w].float()


def slide(model: nn.Module, image: torch.Tensor, crop: int, stride: int) -> torch.Tensor:
    """Logits of (n, 3, h, w) images from ``crop``-sized windows every ``stride`` pixels (the last one in each
    direction moved back to end at the border), averaged where windows overlap: mmsegmentation's slide mode."""
    h, w = image.shape[-2:]
    rows, cols = (max(size - crop + stride - 1, 0) // stride + 1 for size in (h, w))
    total, count = None, image.new_zeros(1, 1, h, w)
    for row in range(rows):
        for col in range(cols):
            y2, x2 = min(row * stride + crop, h), min(col * stride + crop, w)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            logits = whole(model, image[..., y1:y2, x1:x2])
            if total is None:
                total = logits.new_zeros(len(image), logits.shape[1], h, w)
            total[..., y1:y2, x1:x2] += logits
            count[..., y1:y2, x1:x2] += 1
    return total / count


@torch.no_grad()
def predict(model: nn.Module, image: torch.Tensor, out_size: Sequence[int], config: Any) -> torch.Tensor:
    """Class probabilities (K, H, W) of a uint8 image at the label's size: the mean over the views (each scale,
    flipped too with ``TEST.FLIP``, in one batch) brought to that size before the softmax, as mmsegmentation's
    aug_test averages them."""
    test = config.TEST
    total = None
    for ratio in test.SCALES:
        size = fit_size(image.shape[-2:], [s * ratio for s in config.DATA.SCALE])
        view = normalize(TF.resize(image, size, antialias=True))[None]
        views = torch.cat([view, view.flip(-1)]) if test.FLIP else view
        logits = slide(model, views, test.CROP, test.STRIDE) if test.MODE == "slide" else whole(model, views)
        if test.FLIP:
            logits = torch.stack([logits[0], logits[1].flip(-1)])
        probs = F.interpolate(logits, size=tuple(out_size), mode="bilinear", align_corners=False).softmax(1).sum(0)
        total = probs if total is None else total + probs
    return total / (len(test.SCALES) * len(views))


def describe(test: Any) -> str:
    """The views of the evaluation in a few words, e.g. ``scales 0.5-1.75, flip``."""
    low, high = min(test.SCALES), max(test.SCALES)
    scale = f"scales {low:g}-{high:g}" if len(test.SCALES) > 1 else "single scale" if low == 1 else f"scale {low:g}"
    parts = [scale, "flip" if test.FLIP else "", f"slide {test.CROP}/{test.STRIDE}" if test.MODE == "slide" else ""]
    return ", ".join(part for part in parts if part)


@torch.no_grad()
def evaluate(config: Any, model: nn.Module, dataset: Any, env: DistEnv, precision: Precision,
             logger: logging.Logger) -> float:
    """Log the IoU of every class and ``mIoU X% (views) over K classes (N images)``; return the mIoU."""
    model.eval()
    metric = MulticlassConfusionMatrix(dataset.num_classes, ignore_index=IGNORE).to(env.device)
    for images, targets in evaluation_batches(dataset, config, env, logger):
        for image, target in zip(images, targets):
            with precision.autocast():
                pred = predict(model, image.to(env.device), target.shape, config).argmax(0)
            metric.update(pred.flatten(), target.to(env.device).flatten())
    miou, ious = mean_iou(metric.compute().cpu())  # torchmetrics sums the matrices of all processes
    names = class_names(config.DATA.DATA_PATH, dataset.num_classes, dataset.reduce_zero_label)
    for name, iou in zip(names, ious.tolist()):
        logger.info(f"  IoU {name}: {iou:.2f}")
    logger.info(f"mIoU {miou:.2f}% ({describe(config.TEST)}) over {dataset.num_classes} classes "
                f"({len(dataset)} images)")
    return miou
