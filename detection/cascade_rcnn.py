"""Cascade Mask R-CNN (Cai and Vasconcelos, 2018) from torchvision's Mask R-CNN parts, with the stage settings of
the Swin/Focal mmdetection recipe (``cascade_mask_rcnn_swin_tiny_..._giou_4conv1f_adamw_3x_coco``).

Three stages read the same RoI features; each matches its input boxes at a higher IoU threshold with finer coder
weights, so it trains on the better boxes of the stage before. A stage is a torchvision ``RoIHeads``; this module
adds only what the cascade does between and across stages.
"""
from __future__ import annotations

from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, _default_anchorgen
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_inference, maskrcnn_loss
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign, boxes as box_ops, generalized_box_iou_loss

from config import UsageError

# mmdetection's per-stage settings: its coder stds (0.1, 0.1, 0.2, 0.2), halved, then thirded, are these weights.
STAGE_IOU_THRESHOLDS = (0.5, 0.6, 0.7)
STAGE_BOX_WEIGHTS = ((10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0), (30.0, 30.0, 15.0, 15.0))
STAGE_LOSS_WEIGHTS = (1.0, 0.5, 0.25)
GIOU_LOSS_WEIGHT = 10.0
BOX_HEAD_CONVS = 4  # "4conv1fc": four 3x3 convolutions with batch norm at the FPN width, then one linear layer


class Sample(NamedTuple):
    """A stage's training boxes per image, their matched ground truth, labels (0: background), and which are the
    ground-truth boxes added to the proposals."""
    boxes: List[Tensor]
    matched: List[Tensor]
    labels: List[Tensor]
    is_gt: List[Tensor]


class CascadeStage(RoIHeads):
    """One stage with its own heads, matcher (foreground and background thresholds equal), sampler and coder.
    Regression is class-specific with the GIoU loss of the decoded boxes, as the 4conv1f GIoU config sets it
    (``reg_class_agnostic=False, reg_decoded_bbox=True``). :class:`CascadeRoIHeads` drives the methods below."""

    def sample(self, proposals: List[Tensor], targets: List[Dict[str, Tensor]]) -> Sample:
        """RoIHeads' own steps (ground truth added, matched, sampled), noting which sampled boxes are the added
        ground truth: the next stage adds those again, so they are not passed on."""
        gt_boxes = [t["boxes"].to(proposals[0].dtype) for t in targets]
        counts = [len(p) for p in proposals]
        proposals = self.add_gt_proposals(proposals, gt_boxes)
        matched, labels = self.assign_targets_to_proposals(proposals, gt_boxes, [t["labels"] for t in targets])
        kept = self.subsample(labels)
        return Sample([p[k] for p, k in zip(proposals, kept)], [m[k] for m, k in zip(matched, kept)],
                      [lab[k] for lab, k in zip(labels, kept)], [k >= n for k, n in zip(kept, counts)])

    def predict(self, features: Dict[str, Tensor], boxes: List[Tensor],
                image_sizes: List[Tuple[int, int]]) -> Tuple[Tensor, Tensor]:
        """Class logits (N, classes) and box deltas (N, classes * 4), in float32: the coder decodes in the deltas'
        type (bfloat16 would round 1000-pixel boxes to 8)."""
        logits, deltas = self.box_predictor(self.box_head(self.box_roi_pool(features, boxes, image_sizes)))
        return logits.float(), deltas.float()

    def predict_masks(self, features: Dict[str, Tensor], boxes: List[Tensor],
                      image_sizes: List[Tuple[int, int]]) -> Tensor:
        return self.mask_predictor(self.mask_head(self.mask_roi_pool(features, boxes, image_sizes)))

    def decode(self, deltas: Tensor, labels: Tensor, boxes: List[Tensor]) -> List[Tensor]:
        """Each box moved by the deltas of its label's class."""
        chosen = deltas.unflatten(1, (-1, 4))[torch.arange(len(labels), device=labels.device), labels]
        return list(self.box_coder.decode_single(chosen, torch.cat(boxes)).split([len(b) for b in boxes]))

    def refine(self, logits: Tensor, deltas: Tensor, boxes: List[Tensor], image_sizes: List[Tuple[int, int]],
               labels: Optional[Tensor] = None) -> List[Tensor]:
        """The next stage's proposals: every box moved by its regression and clipped, detached. Boxes without a
        label (inference, background) use their most likely object class, as mmdetection does."""
        likely = logits[:, 1:].argmax(1) + 1
        labels = likely if labels is None else torch.where(labels > 0, labels, likely)
        moved = self.decode(deltas.detach(), labels, boxes)
        return [box_ops.clip_boxes_to_image(b, size) for b, size in zip(moved, image_sizes)]

    def losses(self, features: Dict[str, Tensor], image_sizes: List[Tuple[int, int]], sample: Sample,
               logits: Tensor, deltas: Tensor, targets: List[Dict[str, Tensor]]) -> Dict[str, Tensor]:
        """Cross-entropy over the sampled boxes; the positives' GIoU summed and divided by the number of sampled
        boxes (mmdetection's average); the positives' mask loss with this stage's mask head."""
        labels = torch.cat(sample.labels)
        positive = [lab > 0 for lab in sample.labels]
        pos_boxes = [b[p] for b, p in zip(sample.boxes, positive)]
        pos_matched = [m[p] for m, p in zip(sample.matched, positive)]
        pos_labels = labels[labels > 0]
        predicted = torch.cat(self.decode(deltas[labels > 0], pos_labels, pos_boxes))
        truth = torch.cat([t["boxes"][m] for t, m in zip(targets, pos_matched)]).to(predicted.dtype)
        giou = generalized_box_iou_loss(predicted, truth, reduction="sum") / max(len(labels), 1)
        masks = maskrcnn_loss(self.predict_masks(features, pos_boxes, image_sizes), pos_boxes,
                              [t["masks"] for t in targets], [t["labels"] for t in targets], pos_matched)
        return {"loss_classifier": F.cross_entropy(logits, labels), "loss_box_giou": GIOU_LOSS_WEIGHT * giou,
                "loss_mask": masks}


class CascadeRoIHeads(nn.Module):
    """The stages in sequence, with RoIHeads' contract: ``(detections, losses)``."""

    def __init__(self, stages: Sequence[CascadeStage], loss_weights: Sequence[float]):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.loss_weights = tuple(loss_weights)

    def forward(self, features: Dict[str, Tensor], proposals: List[Tensor], image_sizes: List[Tuple[int, int]],
                targets: Optional[List[Dict[str, Tensor]]] = None
                ) -> Tuple[List[Dict[str, Tensor]], Dict[str, Tensor]]:
        if self.training:
            return [], self.losses(features, proposals, image_sizes, targets)
        return self.detect(features, proposals, image_sizes), {}

    def losses(self, features: Dict[str, Tensor], proposals: List[Tensor], image_sizes: List[Tuple[int, int]],
               targets: List[Dict[str, Tensor]]) -> Dict[str, Tensor]:
        """Each stage samples from the boxes the one before refined; its losses are scaled by its weight."""
        named = {}
        for index, (stage, weight) in enumerate(zip(self.stages, self.loss_weights)):
            sample = stage.sample(proposals, targets)
            logits, deltas = stage.predict(features, sample.boxes, image_sizes)
            for name, value in stage.losses(features, image_sizes, sample, logits, deltas, targets).items():
                named[f"{name}_s{index}"] = weight * value
            if index + 1 < len(self.stages):
                moved = stage.refine(logits, deltas, sample.boxes, image_sizes, torch.cat(sample.labels))
                proposals = [boxes[~is_gt] for boxes, is_gt in zip(moved, sample.is_gt)]
        return named

    def detect(self, features: Dict[str, Tensor], proposals: List[Tensor],
               image_sizes: List[Tuple[int, int]]) -> List[Dict[str, Tensor]]:
        """Boxes pass through every stage; the stages' class logits are averaged (as mmdetection does) and decoded
        with the last stage's regression by torchvision's post-processing; the last mask head predicts the masks
        (mmdetection averages the three heads' probabilities there)."""
        all_logits = []
        for index, stage in enumerate(self.stages):
            logits, deltas = stage.predict(features, proposals, image_sizes)
            all_logits.append(logits)
            if index + 1 < len(self.stages):
                proposals = stage.refine(logits, deltas, proposals, image_sizes)
        last = self.stages[-1]
        boxes, scores, labels = last.postprocess_detections(torch.stack(all_logits).mean(0), deltas, proposals,
                                                            image_sizes)
        masks = maskrcnn_inference(last.predict_masks(features, boxes, image_sizes), labels)
        return [{"boxes": b, "scores": s, "labels": lab, "masks": m}
                for b, s, lab, m in zip(boxes, scores, labels, masks)]


def check_stages(iou_thresholds: Sequence[float], box_weights: Sequence[Sequence[float]],
                 loss_weights: Sequence[float]) -> None:
    """One line naming the ``MODEL.DETECTOR_ARGS`` key whose stage settings cannot be used."""
    key = "MODEL.DETECTOR_ARGS."
    if not iou_thresholds or not all(0 < t <= 1 for t in iou_thresholds):
        raise UsageError(f"{key}stage_iou_thresholds must be one IoU in (0, 1] per stage, got {list(iou_thresholds)}")
    for name, values in (("stage_box_weights", box_weights), ("stage_loss_weights", loss_weights)):
        if len(values) != len(iou_thresholds):
            raise UsageError(f"{key}{name} has {len(values)} entries but stage_iou_thresholds has "
                             f"{len(iou_thresholds)}: it needs one per stage")
    if not all(len(w) == 4 and min(w) > 0 for w in box_weights):
        raise UsageError(f"{key}stage_box_weights must be four positive weights (x, y, w, h) per stage, "
                         f"got {[list(w) for w in box_weights]}")
    if min(loss_weights) < 0:
        raise UsageError(f"{key}stage_loss_weights must be 0 or more, got {list(loss_weights)}")


class CascadeMaskRCNN(GeneralizedRCNN):
    """torchvision's GeneralizedRCNN with Mask R-CNN's transform and RPN (Faster R-CNN's arguments and defaults)
    and :class:`CascadeRoIHeads`; ``num_classes`` includes the background, the stage lists set the stages."""

    def __init__(self, backbone: nn.Module, num_classes: int, box_head_dim: int = 1024, mask_head_channels: int = 256,
                 min_size: Any = 800, max_size: int = 1333, image_mean: Optional[List[float]] = None,
                 image_std: Optional[List[float]] = None, rpn_pre_nms_top_n_train: int = 2000,
                 rpn_pre_nms_top_n_test: int = 1000, rpn_post_nms_top_n_train: int = 2000,
                 rpn_post_nms_top_n_test: int = 1000, rpn_nms_thresh: float = 0.7, rpn_fg_iou_thresh: float = 0.7,
                 rpn_bg_iou_thresh: float = 0.3, rpn_batch_size_per_image: int = 256,
                 rpn_positive_fraction: float = 0.5, rpn_score_thresh: float = 0.0, box_score_thresh: float = 0.05,
                 box_nms_thresh: float = 0.5, box_detections_per_img: int = 100, box_batch_size_per_image: int = 512,
                 box_positive_fraction: float = 0.25,
                 stage_iou_thresholds: Sequence[float] = STAGE_IOU_THRESHOLDS,
                 stage_box_weights: Sequence[Sequence[float]] = STAGE_BOX_WEIGHTS,
                 stage_loss_weights: Sequence[float] = STAGE_LOSS_WEIGHTS, **kwargs: Any):
        check_stages(stage_iou_thresholds, stage_box_weights, stage_loss_weights)
        width = backbone.out_channels
        anchors = _default_anchorgen()
        rpn = RegionProposalNetwork(
            anchors, RPNHead(width, anchors.num_anchors_per_location()[0]), rpn_fg_iou_thresh, rpn_bg_iou_thresh,
            rpn_batch_size_per_image, rpn_positive_fraction,
            dict(training=rpn_pre_nms_top_n_train, testing=rpn_pre_nms_top_n_test),
            dict(training=rpn_post_nms_top_n_train, testing=rpn_post_nms_top_n_test), rpn_nms_thresh,
            score_thresh=rpn_score_thresh)
        levels = ["0", "1", "2", "3"]
        box_pool = MultiScaleRoIAlign(levels, output_size=7, sampling_ratio=2)
        mask_pool = MultiScaleRoIAlign(levels, output_size=14, sampling_ratio=2)
        stages = [CascadeStage(
            box_pool, FastRCNNConvFCHead((width, 7, 7), [width] * BOX_HEAD_CONVS, [box_head_dim], nn.BatchNorm2d),
            FastRCNNPredictor(box_head_dim, num_classes), threshold, threshold, box_batch_size_per_image,
            box_positive_fraction, tuple(weights), box_score_thresh, box_nms_thresh, box_detections_per_img,
            mask_roi_pool=mask_pool, mask_head=MaskRCNNHeads(width, [mask_head_channels] * 4, dilation=1),
            mask_predictor=MaskRCNNPredictor(mask_head_channels, mask_head_channels, num_classes))
            for threshold, weights in zip(stage_iou_thresholds, stage_box_weights)]
        transform = GeneralizedRCNNTransform(min_size, max_size, image_mean or [0.485, 0.456, 0.406],
                                             image_std or [0.229, 0.224, 0.225], **kwargs)
        super().__init__(backbone, rpn, CascadeRoIHeads(stages, stage_loss_weights), transform)
