"""Sparse R-CNN (Sun et al., CVPR 2021) on the P2-P5 FPN of detection/model.py, as mmdetection's SparseRCNN
configures it: a learned set of proposal boxes and proposal features refined by six stages of RoIAlign ->
self-attention over the proposals -> dynamic instance interaction -> feed-forward -> class and box fcs; every stage
is matched one-to-one to the ground truth (Hungarian) and trained with focal, L1 and GIoU losses, and the last
stage's scores are the detections, without NMS.

It keeps torchvision's detector contract (``GeneralizedRCNNTransform`` for resizing, losses in training mode,
``[{"boxes", "labels", "scores"}]`` in the original image's pixels in eval mode), so the detection task's data,
evaluation, checkpoints and ``MODEL.DETECTOR_ARGS`` work for it as for Mask R-CNN.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign, box_convert, generalized_box_iou, generalized_box_iou_loss
from torchvision.ops import sigmoid_focal_loss

from config import UsageError
from engine import all_reduce_sum

# mmdetection's DeltaXYWH target stds (0.5, 0.5, 1, 1) for Sparse R-CNN, as the weights torchvision's BoxCoder
# divides the deltas by (the reference implementation's bbox_weights (2, 2, 1, 1)).
DELTA_WEIGHTS = (2.0, 2.0, 1.0, 1.0)
PRIOR_PROB = 0.01  # the initial foreground probability of every class (focal loss's bias initialisation)
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


class DynamicConv(nn.Module):
    """Dynamic instance interaction: each proposal's feature generates the weights of two 1x1 convolutions
    (``channels -> dynamic_channels -> channels``), each followed by LayerNorm and ReLU, applied to that proposal's
    own RoI features; a linear layer then reads the whole RoI into one vector. The proposal feature thereby chooses
    what in its box matters."""

    def __init__(self, channels: int, dynamic_channels: int, pooled_size: int):
        super().__init__()
        self.channels, self.dynamic_channels = channels, dynamic_channels
        self.generate = nn.Linear(channels, 2 * channels * dynamic_channels)
        self.norm_in = nn.LayerNorm(dynamic_channels)
        self.norm_mid = nn.LayerNorm(channels)
        self.out = nn.Linear(channels * pooled_size ** 2, channels)
        self.norm_out = nn.LayerNorm(channels)

    def forward(self, proposals: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        """``proposals`` (M, C), ``rois`` (M, C, S, S) -> (M, C)."""
        weights = self.generate(proposals)
        split = self.channels * self.dynamic_channels
        first = weights[:, :split].view(-1, self.channels, self.dynamic_channels)
        second = weights[:, split:].view(-1, self.dynamic_channels, self.channels)
        x = rois.flatten(2).transpose(1, 2)  # (M, S*S, C): one row per RoI position
        x = F.relu(self.norm_in(torch.bmm(x, first)))
        x = F.relu(self.norm_mid(torch.bmm(x, second)))
        return F.relu(self.norm_out(self.out(x.flatten(1))))


def fc_stack(channels: int, depth: int) -> nn.Sequential:
    """``depth`` x (linear without bias, LayerNorm, ReLU): the class and box branches before their last fc."""
    layers: List[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(channels, channels, bias=False), nn.LayerNorm(channels), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class SparseStage(nn.Module):
    """One iterative stage (mmdetection's DIIHead): the proposal features attend to each other, interact with their
    RoI features, pass a feed-forward layer (each step residual, then LayerNorm), and predict class logits (one per
    class, no background) and box deltas for the stage's boxes."""

    def __init__(self, num_classes: int, channels: int, num_heads: int, dynamic_channels: int,
                 feedforward_channels: int, pooled_size: int, num_cls_fcs: int, num_reg_fcs: int, dropout: float):
        super().__init__()
        self.attention = nn.MultiheadAttention(channels, num_heads, dropout=dropout, batch_first=True)
        self.attention_norm = nn.LayerNorm(channels)
        self.interaction = DynamicConv(channels, dynamic_channels, pooled_size)
        self.interaction_norm = nn.LayerNorm(channels)
        self.ffn = nn.Sequential(nn.Linear(channels, feedforward_channels), nn.ReLU(inplace=True),
                                 nn.Dropout(dropout), nn.Linear(feedforward_channels, channels))
        self.ffn_norm = nn.LayerNorm(channels)
        self.dropout = nn.Dropout(dropout)
        self.cls_fcs = fc_stack(channels, num_cls_fcs)
        self.cls = nn.Linear(channels, num_classes)
        self.reg_fcs = fc_stack(channels, num_reg_fcs)
        self.reg = nn.Linear(channels, 4)

    def forward(self, features: torch.Tensor, rois: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """``features`` (B, N, C) and their ``rois`` (B*N, C, S, S) -> logits (B, N, K), deltas (B, N, 4) and the
        next stage's features (B, N, C)."""
        b, n, c = features.shape
        attended = self.attention(features, features, features, need_weights=False)[0]
        x = self.attention_norm(features + self.dropout(attended)).reshape(b * n, c)
        x = self.interaction_norm(x + self.dropout(self.interaction(x, rois)))
        x = self.ffn_norm(x + self.dropout(self.ffn(x)))
        return self.cls(self.cls_fcs(x)).view(b, n, -1), self.reg(self.reg_fcs(x)).view(b, n, 4), x.view(b, n, c)


def hungarian_match(cost: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The (query, ground truth) pairs of least total ``cost`` (queries x ground truths), one query per object."""
    queries, objects = linear_sum_assignment(cost.detach().cpu().numpy())
    return torch.as_tensor(queries, dtype=torch.long), torch.as_tensor(objects, dtype=torch.long)


@dataclass(frozen=True)
class SetCriterion:
    """The matching costs and the losses, with the same weights for both (the paper's 2 / 5 / 2): a focal
    classification term, L1 between boxes divided by their image's width and height, and GIoU."""
    class_weight: float = 2.0
    l1_weight: float = 5.0
    giou_weight: float = 2.0
    alpha: float = 0.25
    gamma: float = 2.0
    eps: float = 1e-12

    def costs(self, logits: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, gt_boxes: torch.Tensor,
              whwh: torch.Tensor) -> torch.Tensor:
        """(queries x objects): for each object's class (0-based ``labels``), the focal loss of calling the query
        that class minus that of not calling it; the L1 distance of the normalised boxes; minus their GIoU."""
        p = logits.sigmoid()[:, labels]
        positive = -self.alpha * (1 - p) ** self.gamma * (p + self.eps).log()
        negative = -(1 - self.alpha) * p ** self.gamma * (1 - p + self.eps).log()
        l1 = torch.cdist(boxes / whwh, gt_boxes / whwh, p=1)
        return (self.class_weight * (positive - negative) + self.l1_weight * l1
                - self.giou_weight * generalized_box_iou(boxes, gt_boxes))

    def __call__(self, logits: torch.Tensor, boxes: torch.Tensor, targets: Sequence[Dict[str, torch.Tensor]],
                 whwh: torch.Tensor, num_objects: torch.Tensor) -> Dict[str, torch.Tensor]:
        """One stage's losses over the batch (``logits`` (B, N, K), ``boxes`` (B, N, 4), ``whwh`` (B, 4)), each
        summed and divided by ``num_objects``."""
        logits, boxes = logits.float(), boxes.float()
        onehot = torch.zeros_like(logits)
        matched, truth, scale = [], [], []
        for i, target in enumerate(targets):
            labels = target["labels"] - 1  # torchvision's label 0 is the background, which has no logit here
            with torch.no_grad():
                cost = self.costs(logits[i], boxes[i], labels, target["boxes"], whwh[i])
            queries, objects = (index.to(logits.device) for index in hungarian_match(cost))
            onehot[i, queries, labels[objects]] = 1
            matched.append(boxes[i, queries])
            truth.append(target["boxes"][objects])
            scale.append(whwh[i].expand(len(queries), 4))
        matched, truth, scale = torch.cat(matched), torch.cat(truth), torch.cat(scale)
        focal = sigmoid_focal_loss(logits, onehot, self.alpha, self.gamma, reduction="sum")
        return {"loss_cls": self.class_weight * focal / num_objects,
                "loss_bbox": self.l1_weight * F.l1_loss(matched / scale, truth / scale, reduction="sum") / num_objects,
                "loss_giou": self.giou_weight * generalized_box_iou_loss(matched, truth, reduction="sum") / num_objects}


def objects_per_process(targets: Sequence[Dict[str, torch.Tensor]], device: torch.device) -> torch.Tensor:
    """The mean number of ground-truth boxes per process, at least 1: the losses' divisor, so that the gradient
    DDP averages is that of the whole batch's sum over its objects."""
    count = torch.tensor(float(sum(len(t["boxes"]) for t in targets)), device=device)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    return (all_reduce_sum(count) / world).clamp(min=1.0)


def check_count(name: str, value: int, low: int) -> None:
    if not isinstance(value, int) or value < low:
        raise UsageError(f"MODEL.DETECTOR_ARGS.{name} must be an integer of at least {low} for sparse_rcnn, "
                         f"got {value!r}")


class SparseRCNN(nn.Module):
    """Sparse R-CNN on ``backbone`` (a module with ``out_channels`` whose output is the FPN's levels; ``fpn`` its
    torchvision FeaturePyramidNetwork, whose levels feed the RoIAlign). ``num_classes`` counts the background, as
    for torchvision's detectors, though Sparse R-CNN has no logit for it: labels stay 1..num_classes-1.

    The keyword arguments are ``MODEL.DETECTOR_ARGS``: the image transform's (``min_size``, ``max_size``,
    ``image_mean``, ``image_std``, ``size_divisible``, ...), the head's (mmdetection's DIIHead defaults) and the
    matching's and losses' weights. ``detections_per_img``: the top-scoring (proposal, class) pairs kept.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, min_size: Any = 800, max_size: int = 1333,
                 image_mean: Optional[List[float]] = None, image_std: Optional[List[float]] = None,
                 num_proposals: int = 100, num_stages: int = 6, num_heads: int = 8, dynamic_channels: int = 64,
                 feedforward_channels: int = 2048, num_cls_fcs: int = 1, num_reg_fcs: int = 3, pooled_size: int = 7,
                 sampling_ratio: int = 2, dropout: float = 0.0, class_weight: float = 2.0, l1_weight: float = 5.0,
                 giou_weight: float = 2.0, focal_alpha: float = 0.25, focal_gamma: float = 2.0,
                 detections_per_img: int = 100, **kwargs: Any):
        super().__init__()
        for name, value, low in [("num_proposals", num_proposals, 1), ("num_stages", num_stages, 1),
                                 ("num_heads", num_heads, 1), ("dynamic_channels", dynamic_channels, 1),
                                 ("feedforward_channels", feedforward_channels, 1), ("num_cls_fcs", num_cls_fcs, 0),
                                 ("num_reg_fcs", num_reg_fcs, 0), ("pooled_size", pooled_size, 1),
                                 ("sampling_ratio", sampling_ratio, 0), ("detections_per_img", detections_per_img, 1)]:
            check_count(name, value, low)
        channels = backbone.out_channels
        if channels % num_heads:
            raise UsageError(f"MODEL.DETECTOR_ARGS.num_heads must divide MODEL.FPN_CHANNELS ({channels}) for "
                             f"sparse_rcnn's attention, got {num_heads}")
        self.transform = GeneralizedRCNNTransform(min_size, max_size, image_mean or IMAGENET_MEAN,
                                                  image_std or IMAGENET_STD, **kwargs)
        self.backbone = backbone
        levels = [str(i) for i in range(len(backbone.fpn.inner_blocks))]
        self.roi_align = MultiScaleRoIAlign(levels, pooled_size, sampling_ratio)
        # Proposals as (cx, cy, w, h) fractions of the image, all starting as the whole image (the paper's choice).
        self.proposal_boxes = nn.Embedding(num_proposals, 4)
        self.proposal_features = nn.Embedding(num_proposals, channels)
        self.stages = nn.ModuleList(
            SparseStage(num_classes - 1, channels, num_heads, dynamic_channels, feedforward_channels, pooled_size,
                        num_cls_fcs, num_reg_fcs, dropout) for _ in range(num_stages))
        self.box_coder = BoxCoder(DELTA_WEIGHTS)
        self.criterion = SetCriterion(class_weight, l1_weight, giou_weight, focal_alpha, focal_gamma)
        self.detections_per_img = detections_per_img
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """As mmdetection's DIIHead: Xavier-uniform matrices, LayerNorm and bias defaults, class biases at the
        prior probability; the proposals as the whole image."""
        for param in self.stages.parameters():
            if param.dim() > 1:
                nn.init.xavier_uniform_(param)
        for stage in self.stages:
            nn.init.constant_(stage.cls.bias, -math.log((1 - PRIOR_PROB) / PRIOR_PROB))
        with torch.no_grad():
            self.proposal_boxes.weight[:, :2] = 0.5
            self.proposal_boxes.weight[:, 2:] = 1.0

    def refine(self, features: Dict[str, torch.Tensor], image_sizes: List[Tuple[int, int]],
               whwh: torch.Tensor) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Every stage's (logits (B, N, K), boxes (B, N, 4) in the resized image's pixels). A stage's boxes
        reach the next one detached, so each stage learns its own correction."""
        b = len(image_sizes)
        boxes = box_convert(self.proposal_boxes.weight, "cxcywh", "xyxy")[None] * whwh[:, None]
        state = self.proposal_features.weight[None].expand(b, -1, -1)
        n = boxes.shape[1]
        outputs = []
        for stage in self.stages:
            rois = self.roi_align(features, list(boxes.detach()), image_sizes)
            logits, deltas, state = stage(state, rois)
            # in float32 whatever the autocast: half precision steps a whole pixel between 1024 and 2048
            boxes = self.box_coder.decode_single(deltas.float().reshape(-1, 4), boxes.reshape(-1, 4)).view(b, n, 4)
            outputs.append((logits, boxes))
            boxes = boxes.detach()
        return outputs

    def detect(self, logits: torch.Tensor, boxes: torch.Tensor) -> List[Dict[str, torch.Tensor]]:
        """The ``detections_per_img`` best (proposal, class) pairs of each image by sigmoid score; no NMS: a
        proposal may appear with several classes, and overlapping proposals all stay."""
        num_classes = logits.shape[-1]
        scores = logits.sigmoid().flatten(1)
        top, index = scores.topk(min(self.detections_per_img, scores.shape[1]), dim=1)
        return [{"boxes": boxes[i, index[i] // num_classes], "labels": index[i] % num_classes + 1, "scores": top[i]}
                for i in range(len(logits))]

    def forward(self, images: List[torch.Tensor], targets: Optional[List[Dict[str, torch.Tensor]]] = None) -> Any:
        """Training mode: the named losses of every stage (``loss_cls_0``, ..., ``loss_giou_5``); eval mode: the
        detections of each image in its original pixels."""
        if self.training and targets is None:
            raise ValueError("SparseRCNN needs targets in training mode")
        original_sizes = [tuple(image.shape[-2:]) for image in images]
        images, targets = self.transform(images, targets)
        features = self.backbone(images.tensors)
        # Each image's own resized size, not the padded batch's: the boxes' normalisation and initial proposals.
        whwh = torch.tensor([[w, h, w, h] for h, w in images.image_sizes], dtype=torch.float32,
                            device=images.tensors.device)
        outputs = self.refine(features, images.image_sizes, whwh)
        if self.training:
            num_objects = objects_per_process(targets, whwh.device)
            return {f"{name}_{k}": value for k, (logits, boxes) in enumerate(outputs)
                    for name, value in self.criterion(logits, boxes, targets, whwh, num_objects).items()}
        return self.transform.postprocess(self.detect(*outputs[-1]), images.image_sizes, original_sizes)
