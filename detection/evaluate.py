"""COCO evaluation: every process detects on its shard of the images, rank 0 gathers and runs pycocotools."""
from __future__ import annotations

import contextlib
import io
import logging
from typing import Any, Dict, List, Sequence

import numpy as np
import pycocotools.mask as mask_utils
import torch
import torch.distributed as dist
import torch.nn as nn
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.ops import box_convert

from dense.images import evaluation_batches
from engine import DistEnv, Precision, all_reduce_sum

from .config import MASK_DETECTORS

MASK_THRESHOLD = 0.5  # Mask R-CNN's mask probabilities become binary masks here, as torchvision's references do


def to_coco(output: Dict[str, torch.Tensor], image_id: int, category_ids: Sequence[int]) -> List[Dict[str, Any]]:
    """One image's detections as COCO result entries (boxes x, y, w, h; masks as RLE)."""
    boxes = box_convert(output["boxes"].float().cpu(), "xyxy", "xywh").tolist()
    results = [{"image_id": image_id, "category_id": category_ids[label - 1], "bbox": box, "score": score}
               for box, label, score in zip(boxes, output["labels"].tolist(), output["scores"].tolist())]
    if results and "masks" in output:  # encoded together: pycocotools takes (H, W, N) in Fortran order
        masks = (output["masks"][:, 0] > MASK_THRESHOLD).cpu().numpy().astype(np.uint8)
        for entry, rle in zip(results, mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0)))):
            entry["segmentation"] = {**rle, "counts": rle["counts"].decode("ascii")}
    return results


def coco_ap(coco: COCO, results: List[Dict[str, Any]], iou_types: Sequence[str],
            logger: logging.Logger) -> Dict[str, float]:
    """AP@[.5:.95] in percent per IoU type, logging pycocotools' summary; 0 without detections."""
    scores = {}
    for iou_type in iou_types:
        if not results:
            logger.info(f"no detections: {iou_type} AP 0")
            scores[iou_type] = 0.0
            continue
        text = io.StringIO()
        with contextlib.redirect_stdout(text):
            evaluator = COCOeval(coco, coco.loadRes(results), iou_type)
            evaluator.params.imgIds = sorted(coco.getImgIds())
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        logger.info(f"COCO {iou_type} evaluation:\n" + "\n".join(
            line for line in text.getvalue().splitlines() if line.lstrip().startswith("Average")))
        scores[iou_type] = max(float(evaluator.stats[0]), 0.0) * 100
    return scores


@torch.no_grad()
def evaluate(config: Any, model: nn.Module, dataset: Any, env: DistEnv, precision: Precision,
             logger: logging.Logger) -> float:
    """Log the COCO summaries and ``box AP X mask AP Y``; return the box AP (the same on every process)."""
    model.eval()
    results: List[Dict[str, Any]] = []
    for images, targets in evaluation_batches(dataset, config, env, logger):
        with precision.autocast():
            outputs = model([image.to(env.device) for image in images])
        for output, target in zip(outputs, targets):
            results += to_coco(output, int(target["image_id"]), dataset.category_ids)
    if env.distributed:
        gathered: List[Any] = [None] * env.world_size
        dist.all_gather_object(gathered, results)
        results = [entry for part in gathered for entry in part]
    masks = config.MODEL.DETECTOR in MASK_DETECTORS
    score = torch.zeros(2, dtype=torch.float64)
    if env.is_main:
        results.sort(key=lambda r: (r["image_id"], -r["score"]))
        ap = coco_ap(dataset.coco, results, ("bbox", "segm") if masks else ("bbox",), logger)
        score[0], score[1] = ap["bbox"], ap.get("segm", 0.0)
        logger.info(f"box AP {ap['bbox']:.1f}" + (f" mask AP {ap['segm']:.1f}" if masks else "")
                    + f" ({len(dataset)} images, {len(results)} detections)")
    return float(all_reduce_sum(score.to(env.device if env.device.type == "cuda" else "cpu"))[0])
