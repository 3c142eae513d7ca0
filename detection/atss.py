"""ATSS (Zhang et al., CVPR 2020, adaptive training sample selection) as mmdetection's ``atss_r50_fpn_1x_coco``.

torchvision's FCOS is the same kind of detector (P3-P7, one anchor per location, GroupNorm head with centerness,
GIoU loss), so :class:`ATSS` keeps its forward and transform and replaces the targets, the box deltas (coded against
the anchors, a learnable scale per level) and the scoring at inference.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection import FCOS
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOSClassificationHead, FCOSRegressionHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import permute_and_flatten
from torchvision.ops import batched_nms, box_iou, clip_boxes_to_image, generalized_box_iou_loss, sigmoid_focal_loss

from engine import all_reduce_sum

# mmdetection's DeltaXYWHBBoxCoder with target stds (0.1, 0.1, 0.2, 0.2): torchvision's weights are their inverses.
BOX_CODER_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
# A candidate's centre must lie this far (pixels) inside every side of its box, as mmdetection's ATSSAssigner:
# a centre exactly on the border is outside.
INSIDE_MARGIN = 0.01


def atss_assign(anchors: Tensor, boxes: Tensor, num_anchors_per_level: Sequence[int], topk: int = 9) -> Tensor:
    """The index of the box each anchor learns (-1: background). Per box, the ``topk`` anchors of each level nearest
    its centre are candidates; those whose IoU reaches the candidates' mean plus (unbiased) standard deviation and
    whose centre lies inside the box are positive. An anchor positive for several boxes learns the one it overlaps
    most."""
    matched = torch.full((len(anchors),), -1, dtype=torch.int64, device=anchors.device)
    if len(boxes) == 0:
        return matched
    ious = box_iou(anchors, boxes)  # (A, G)
    anchor_centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    box_centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    # Squared distances rank as the distances do; computed exactly (cdist's matrix product may reorder near ties).
    distances = (anchor_centres[:, None] - box_centres[None]).pow(2).sum(-1)
    candidates, start = [], 0
    for level in distances.split(list(num_anchors_per_level)):
        candidates.append(level.topk(min(topk, len(level)), dim=0, largest=False).indices + start)
        start += len(level)
    candidates = torch.cat(candidates)  # (C, G): C = topk per level, or all of a smaller level
    candidate_ious = ious.gather(0, candidates)
    threshold = candidate_ious.mean(0) + candidate_ious.std(0)
    centres = anchor_centres[candidates]  # (C, G, 2)
    margins = torch.cat([centres - boxes[:, :2], boxes[:, 2:] - centres], dim=-1).amin(-1)
    positive = (candidate_ious >= threshold) & (margins > INSIDE_MARGIN)
    box_index = torch.arange(len(boxes), device=boxes.device).expand_as(candidates)
    claims = torch.full_like(ious, -math.inf)
    rows, cols = candidates[positive], box_index[positive]
    claims[rows, cols] = ious[rows, cols]
    best, index = claims.max(1)
    return torch.where(best > -math.inf, index, matched)


def centerness_targets(anchors: Tensor, boxes: Tensor) -> Tensor:
    """FCOS's centerness of each anchor centre in its box: sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b))."""
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    near, far = centres - boxes[:, :2], boxes[:, 2:] - centres  # (l, t), (r, b)
    ratios = torch.minimum(near, far) / torch.maximum(near, far)
    return ratios.prod(-1).sqrt()


def mean_over_processes(value: Tensor) -> Tensor:
    """``value`` averaged over processes (mmdetection's ``reduce_mean``): every process divides by the same count."""
    if dist.is_available() and dist.is_initialized():
        return all_reduce_sum(value.clone()) / dist.get_world_size()
    return value


class LevelAnchorGenerator(AnchorGenerator):
    """torchvision's anchor generator with each level's stride given, as mmdetection's: torchvision's image size //
    map size is wrong where the image does not divide by it (1344 pixels: P7 stride 122 instead of 128)."""

    def __init__(self, strides: Sequence[int], octave_scale: float = 8.0):
        super().__init__(tuple((octave_scale * s,) for s in strides), ((1.0,),) * len(strides))
        self.strides = tuple(strides)

    def forward(self, image_list: ImageList, feature_maps: List[Tensor]) -> List[Tensor]:
        device = feature_maps[0].device
        self.set_cell_anchors(feature_maps[0].dtype, device)
        strides = [[torch.tensor(s, device=device)] * 2 for s in self.strides]
        anchors = torch.cat(self.grid_anchors([f.shape[-2:] for f in feature_maps], strides))
        return [anchors] * len(image_list.image_sizes)


class ATSSRegressionHead(FCOSRegressionHead):
    """FCOS's regression tower: signed box deltas (no ReLU) times a learnable scale per level, and centerness."""

    def __init__(self, in_channels: int, num_levels: int, num_convs: int = 4):
        super().__init__(in_channels, num_anchors=1, num_convs=num_convs)
        self.scales = nn.Parameter(torch.ones(num_levels))

    def forward(self, x: List[Tensor]) -> Tuple[Tensor, Tensor]:
        deltas, centerness = [], []
        for level, features in enumerate(x):
            tower = self.conv(features)
            n, _, h, w = tower.shape
            deltas.append(permute_and_flatten(self.bbox_reg(tower) * self.scales[level], n, 1, 4, h, w))
            centerness.append(permute_and_flatten(self.bbox_ctrness(tower), n, 1, 1, h, w))
        return torch.cat(deltas, 1), torch.cat(centerness, 1)


class ATSSHead(nn.Module):
    """FCOS's towers and the ATSS losses: sigmoid focal loss, GIoU of the decoded positives weighted by their
    centerness targets, and the centerness BCE, the first and last averaged over positives."""

    def __init__(self, in_channels: int, num_classes: int, num_levels: int, num_convs: int = 4,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0, box_loss_weight: float = 2.0):
        super().__init__()
        self.classification_head = FCOSClassificationHead(in_channels, 1, num_classes, num_convs)
        self.regression_head = ATSSRegressionHead(in_channels, num_levels, num_convs)
        self.box_coder = BoxCoder(BOX_CODER_WEIGHTS)
        self.focal_alpha, self.focal_gamma, self.box_loss_weight = focal_alpha, focal_gamma, box_loss_weight

    def forward(self, x: List[Tensor]) -> Dict[str, Tensor]:
        deltas, centerness = self.regression_head(x)
        return {"cls_logits": self.classification_head(x), "bbox_regression": deltas, "bbox_ctrness": centerness}

    def compute_loss(self, targets: List[Dict[str, Tensor]], head_outputs: Dict[str, Tensor], anchors: List[Tensor],
                     matched_idxs: List[Tensor]) -> Dict[str, Tensor]:
        # in float32 under mixed precision, as mmdetection's force_fp32
        logits, deltas, centerness_logits = (head_outputs[k].float() for k in
                                             ("cls_logits", "bbox_regression", "bbox_ctrness"))
        class_targets = torch.zeros_like(logits)
        pred, gt, pos_anchors, pos_centerness = [], [], [], []
        for i, (target, matched) in enumerate(zip(targets, matched_idxs)):
            positive = matched >= 0
            class_targets[i, positive, target["labels"][matched[positive]] - 1] = 1.0
            pred.append(deltas[i, positive])
            gt.append(target["boxes"][matched[positive]])
            pos_anchors.append(anchors[i][positive])
            pos_centerness.append(centerness_logits[i, positive, 0])
        pred, gt, pos_anchors, pos_centerness = (torch.cat(t) for t in (pred, gt, pos_anchors, pos_centerness))
        # mmdetection's count: each image's positives, at least 1, summed, then averaged over processes
        num_positive = mean_over_processes(torch.stack([(m >= 0).sum().clamp(min=1) for m in matched_idxs])
                                           .sum().float())
        loss_cls = sigmoid_focal_loss(logits, class_targets, self.focal_alpha, self.focal_gamma, reduction="sum")
        centerness = centerness_targets(pos_anchors, gt)
        boxes = self.box_coder.decode_single(pred, pos_anchors)
        giou = generalized_box_iou_loss(boxes, gt, reduction="none")
        # mmdetection divides the weighted GIoU by the sum of the weights, clamped at 1 as the positive count
        box_weight = mean_over_processes(centerness.sum().detach()).clamp(min=1)
        loss_ctr = F.binary_cross_entropy_with_logits(pos_centerness, centerness, reduction="sum")
        return {"classification": loss_cls / num_positive,
                "bbox_regression": self.box_loss_weight * (giou * centerness).sum() / box_weight,
                "bbox_ctrness": loss_ctr / num_positive}


class ATSS(FCOS):
    """torchvision's FCOS with the ATSS head, targets and scoring. ``num_classes`` includes the background (label k
    is sigmoid output k - 1). Inference as mmdetection's: per level, the ``topk_candidates`` (anchor, class) pairs
    above ``score_thresh``, scored by class times centerness probability, then class-wise NMS. ``anchor_strides``:
    P3-P7's strides, each anchor ``octave_scale`` strides wide.
    """

    # FCOS's own target rule, which ATSS replaces: refused as a MODEL.DETECTOR_ARGS key (detection/model.py).
    UNUSED_ARGS = frozenset({"center_sampling_radius"})

    def __init__(self, backbone: nn.Module, num_classes: int, min_size: int = 800, max_size: int = 1333,
                 image_mean: Optional[List[float]] = None, image_std: Optional[List[float]] = None,
                 anchor_strides: Sequence[int] = (8, 16, 32, 64, 128), octave_scale: float = 8.0, topk: int = 9,
                 score_thresh: float = 0.05, nms_thresh: float = 0.6, detections_per_img: int = 100,
                 topk_candidates: int = 1000, **kwargs):
        for name, value in (("topk", topk), ("topk_candidates", topk_candidates),
                            ("detections_per_img", detections_per_img)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        for name, value in (("score_thresh", score_thresh), ("nms_thresh", nms_thresh)):
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        generator = LevelAnchorGenerator(anchor_strides, octave_scale)
        head = ATSSHead(backbone.out_channels, num_classes - 1, len(anchor_strides))
        super().__init__(backbone, num_classes, min_size, max_size, image_mean, image_std, generator, head,
                         score_thresh=score_thresh, nms_thresh=nms_thresh, detections_per_img=detections_per_img,
                         topk_candidates=topk_candidates, **kwargs)
        self.box_coder = head.box_coder
        self.topk = topk

    def compute_loss(self, targets: List[Dict[str, Tensor]], head_outputs: Dict[str, Tensor], anchors: List[Tensor],
                     num_anchors_per_level: List[int]) -> Dict[str, Tensor]:
        matched = [atss_assign(a, t["boxes"], num_anchors_per_level, self.topk) for a, t in zip(anchors, targets)]
        return self.head.compute_loss(targets, head_outputs, anchors, matched)

    def postprocess_detections(self, head_outputs: Dict[str, List[Tensor]], anchors: List[List[Tensor]],
                               image_shapes: List[Tuple[int, int]]) -> List[Dict[str, Tensor]]:
        detections = []
        for i, (image_anchors, shape) in enumerate(zip(anchors, image_shapes)):
            boxes, scores, labels = [], [], []
            for logits, deltas, centerness, level_anchors in zip(
                    head_outputs["cls_logits"], head_outputs["bbox_regression"], head_outputs["bbox_ctrness"],
                    image_anchors):
                probs = logits[i].sigmoid().flatten()
                kept = torch.where(probs > self.score_thresh)[0]
                top, order = probs[kept].topk(min(self.topk_candidates, len(kept)))
                pairs, num_classes = kept[order], logits.shape[-1]
                anchor_idx, label = pairs.div(num_classes, rounding_mode="floor"), pairs % num_classes
                boxes.append(clip_boxes_to_image(
                    self.box_coder.decode_single(deltas[i, anchor_idx], level_anchors[anchor_idx]), shape))
                scores.append(top * centerness[i, anchor_idx, 0].sigmoid())
                labels.append(label + 1)
            boxes, scores, labels = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
            sized = ((boxes[:, 2:] - boxes[:, :2]) > 0).all(1)  # mmdetection drops boxes clipped to nothing
            boxes, scores, labels = boxes[sized], scores[sized], labels[sized]
            keep = batched_nms(boxes, scores, labels, self.nms_thresh)[:self.detections_per_img]
            detections.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
        return detections
