"""RepPoints v2 (Chen et al., NeurIPS 2020, "RepPoints V2: Verification Meets Regression for Object Detection") as
its authors' recipe ``reppoints_v2_r50_fpn_giou_mstrain_2x_coco`` configures it.

Each location of P3-P7 regresses a set of 9 points in two steps: an initial set from a convolution, then a refined
set (and the classification) read through a deformable convolution sampling at the initial points. A box is the
first two points taken as its top-left and bottom-right corners (the recipe's ``exact_minmax``: the corners are
then points of the set, which the verification branch below can move; see :func:`points_to_boxes`).
Verification: corner heatmaps and sub-stride offsets for the top-left and bottom-right corners from CornerNet's
corner pooling, and a per-class foreground map; their outputs feed the classification and refinement, and at
inference the corners snap the boxes of P4-P7 to the heatmap peaks of P3 / P4.

Targets: the initial set learns the box whose centre is nearest (in box units) among the points of the box's scale
level; the refined set and the classification learn ATSS's assignment (:func:`detection.atss.atss_assign`) of the
initial boxes; corners learn Gaussian bumps around each box corner (CornerNet's radius) with a 1 at the nearest
point of every level. Losses as the recipe: focal loss (classification), GIoU (initial x1, refined x2), Gaussian focal
loss on the corner heatmaps (x0.25), smooth L1 on their offsets, and an area-balanced focal loss on the foreground
map (x0.1).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import DeformConv2d, batched_nms, clip_boxes_to_image, generalized_box_iou_loss, sigmoid_focal_loss
from torchvision.ops.misc import Conv2dNormActivation

from .atss import atss_assign

# The recipe's loss weights (``loss_bbox_init``, ``loss_bbox_refine`` of its GIoU config, ``loss_heatmap``,
# ``loss_offset``, ``loss_sem``).
INIT_BOX_WEIGHT, REFINE_BOX_WEIGHT, HEATMAP_WEIGHT, OFFSET_WEIGHT, FOREGROUND_WEIGHT = 1.0, 2.0, 0.25, 1.0, 0.1
FOCAL_ALPHA, FOCAL_GAMMA = 0.25, 2.0
HEATMAP_ALPHA, HEATMAP_GAMMA = 2.0, 4.0  # CornerNet's focal loss: (1 - p)^2 on peaks, (1 - target)^4 around them
OFFSET_BETA = 1.0 / 9
# At inference the boxes of level k are snapped to the corners found on level CORNER_SOURCE[k] (P4, P5 -> P3;
# P6, P7 -> P4); those of P3 are kept.
CORNER_SOURCE = {1: 0, 2: 0, 3: 1, 4: 1}
BOX_METHODS = ("exact_minmax", "minmax")


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels)


def conv_gn_relu(in_channels: int, out_channels: int, kernel_size: int = 3) -> Conv2dNormActivation:
    return Conv2dNormActivation(in_channels, out_channels, kernel_size, norm_layer=group_norm)


def running_max(x: Tensor, dim: int, reverse: bool) -> Tensor:
    """Each position's maximum over itself and every position after it along ``dim`` (``reverse``: towards the
    end, as top and left pooling look down and right) or before it: CornerNet's corner pooling, exactly."""
    if reverse:
        return x.flip(dim).cummax(dim).values.flip(dim)
    return x.cummax(dim).values


class CornerPool(nn.Module):
    """CornerNet's corner pooling module: two branches pooled along the rows and the columns towards the corner
    (the top-left corner of an object sees its top edge below and its left edge to the right), added, merged with a
    skip connection."""

    def __init__(self, channels: int, corner_channels: int, top_left: bool, first_kernel_size: int = 3,
                 kernel_size: int = 1):
        super().__init__()
        self.vertical = conv_gn_relu(channels, corner_channels, first_kernel_size)
        self.horizontal = conv_gn_relu(channels, corner_channels, first_kernel_size)
        self.merge = Conv2dNormActivation(corner_channels, channels, 3, norm_layer=group_norm, activation_layer=None)
        self.skip = Conv2dNormActivation(channels, channels, 1, norm_layer=group_norm, activation_layer=None)
        self.out = conv_gn_relu(channels, channels, kernel_size)
        self.top_left = top_left

    def forward(self, x: Tensor) -> Tensor:
        pooled = running_max(self.vertical(x), 2, self.top_left) + running_max(self.horizontal(x), 3, self.top_left)
        return self.out(F.relu(self.merge(pooled) + self.skip(x)))


def points_to_boxes(points: Tensor, method: str = "exact_minmax") -> Tensor:
    """(..., P, 2) xy points -> (..., 4) xyxy boxes. ``exact_minmax`` (the recipe's): the box spanned by the first
    two points, which learn to be its top-left and bottom-right corners; ``minmax``: the extremes of all P points
    (RepPoints v1). The recipe reads the two points as (top-left, bottom-right) as they come; taking their per-axis
    extremes is the same box once they are in that order, and keeps it a valid box before: torchvision's GIoU
    loss, unlike mmdetection's, does not clamp the union of an inverted box, which a run then drives negative."""
    corners = points[..., :2, :] if method == "exact_minmax" else points
    return torch.cat([corners.amin(-2), corners.amax(-2)], -1)


def point_assign(points: Tensor, levels: Tensor, boxes: Tensor, scale: float = 4.0, pos_num: int = 1) -> Tensor:
    """The box each point learns with its initial set (-1: none), as the recipe's ``PointAssignerV2``: a box belongs
    to level trunc((log2(w / scale) + log2(h / scale)) / 2), clamped to the levels present; there its ``pos_num``
    points nearest its centre, in units of its width and height, learn it; a point picked by several boxes learns
    the nearest. ``levels``: each point's log2 stride."""
    matched = torch.full((len(points),), -1, dtype=torch.int64, device=points.device)
    if len(boxes) == 0:
        return matched
    wh = (boxes[:, 2:] - boxes[:, :2]).clamp(min=1e-6)
    box_levels = (torch.log2(wh / scale).sum(1) / 2).to(torch.int64).clamp(int(levels.min()), int(levels.max()))
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    distances = ((points[:, None] - centres[None]) / wh[None]).norm(dim=-1)  # (A, G)
    distances = distances.masked_fill(levels[:, None] != box_levels[None], math.inf)
    nearest = distances.topk(min(pos_num, len(points)), dim=0, largest=False)
    claims = torch.full_like(distances, math.inf)
    claims.scatter_(0, nearest.indices, nearest.values)
    best, index = claims.min(1)
    return torch.where(best < math.inf, index, matched)


def gaussian_radius(heights: Tensor, widths: Tensor, min_overlap: float = 0.7) -> Tensor:
    """CornerNet's radius: the largest shift of a corner pair (both corners moved by r, either corner alone, or the
    box grown) keeping the IoU with the box at ``min_overlap``: the smallest root of the three quadratics."""
    total, area = heights + widths, heights * widths
    ratio = (1 - min_overlap) / (1 + min_overlap)
    r1 = (total - torch.sqrt(total ** 2 - 4 * area * ratio)) / 2
    r2 = (2 * total - torch.sqrt(4 * total ** 2 - 16 * (1 - min_overlap) * area)) / 8
    r3 = (-2 * min_overlap * total + torch.sqrt(4 * min_overlap ** 2 * total ** 2
                                                + 16 * min_overlap * (1 - min_overlap) * area)) / (8 * min_overlap)
    return torch.minimum(torch.minimum(r1, r2), r3)


def corner_targets(points: Tensor, levels: Tensor, boxes: Tensor, min_overlap: float = 0.7) -> Tuple[Tensor, Tensor]:
    """Heatmap and offset targets of the two corners, as the recipe's ``PointHMAssigner`` with Gaussian bumps:
    (A, 2) heat (top-left, bottom-right) and (A, 4) offsets (top-left x, y, bottom-right x, y, in strides). On each
    level the point nearest a box corner gets heat 1 and the corner's offset from it; the others within the
    radius (pixels, :func:`gaussian_radius`) of a corner get exp(-d^2 / (2 sigma^2)), sigma = (2r + 1) / 6, the
    largest over boxes."""
    heat = points.new_zeros(len(points), 2)
    offsets = points.new_zeros(len(points), 4)
    if len(boxes) == 0:
        return heat, offsets
    radius = gaussian_radius(boxes[:, 3] - boxes[:, 1], boxes[:, 2] - boxes[:, 0], min_overlap)
    sigma = (2 * radius + 1) / 6
    for corner in range(2):
        xy = boxes[:, 2 * corner:2 * corner + 2]
        distances = (points[:, None] - xy[None]).norm(dim=-1)  # (A, G)
        bumps = torch.exp(-distances ** 2 / (2 * sigma ** 2)).masked_fill(distances >= radius, 0)
        heat[:, corner] = bumps.amax(1)
        for level in levels.unique():
            on_level = torch.where(levels == level)[0]
            nearest = on_level[distances[on_level].argmin(0)]  # (G,)
            offsets[nearest, 2 * corner:2 * corner + 2] = (xy - points[nearest]) / 2.0 ** level
            heat[nearest, corner] = 1.0
    return heat, offsets


def foreground_targets(boxes: Tensor, labels: Tensor, shape: Tuple[int, int], stride: int,
                       num_classes: int) -> Tuple[Tensor, Tensor]:
    """The recipe's foreground map at one level: (C, H, W) 1 on the cells a box covers (from the cell of its
    top-left to that of its bottom-right corner, both included) in its class's channel, and weights 1 / area, the
    smaller box's where boxes overlap."""
    target = boxes.new_zeros(num_classes, *shape)
    weight = boxes.new_zeros(num_classes, *shape)
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    for i in areas.argsort(descending=True).tolist():
        x1, y1, x2, y2 = (int(v) // stride for v in boxes[i].tolist())
        target[labels[i], y1:y2 + 1, x1:x2 + 1] = 1.0
        weight[labels[i], y1:y2 + 1, x1:x2 + 1] = 1 / areas[i]
    return target, weight


def gaussian_focal_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """CornerNet's focal loss on heatmaps, summed: -(1 - p)^2 log p at targets of 1, -(1 - t)^4 p^2 log(1 - p)
    elsewhere."""
    p = logits.sigmoid()
    peak = targets.eq(1)
    positive = F.softplus(-logits) * (1 - p) ** HEATMAP_ALPHA
    negative = F.softplus(logits) * p ** HEATMAP_ALPHA * (1 - targets) ** HEATMAP_GAMMA
    return torch.where(peak, positive, negative).sum()


def balanced_focal_loss(logits: Tensor, targets: Tensor, weights: Tensor) -> Tensor:
    """The recipe's ``SEPFocalLoss`` of the foreground map: the focal loss of the positives averaged with their
    weights (each box's cells weigh 1 / area: every object counts alike), plus the negatives' summed over the
    positive count."""
    p = logits.sigmoid()
    positive = targets.eq(1)
    pos_loss = FOCAL_ALPHA * F.softplus(-logits) * (1 - p) ** FOCAL_GAMMA * weights
    neg_loss = (1 - FOCAL_ALPHA) * F.softplus(logits) * p ** FOCAL_GAMMA
    loss = neg_loss[~positive].sum() / positive.sum().clamp(min=1)
    if positive.any():
        loss = loss + pos_loss[positive].sum() / weights[positive].sum()
    return loss


def snap_to_corners(boxes: Tensor, corners: Tensor, stride: int, shape: Tuple[int, int]) -> Tensor:
    """The recipe's test-time verification: each box corner moves to the strongest heatmap location of the 2x2
    cells from the corner's own (floored) cell, plus that location's predicted offset. ``corners``: one level's
    (6, H, W) heat logits and offsets of the two corners."""
    heat = corners[[0, 3]].sigmoid()
    width = heat.shape[-1]
    _, peaks = F.max_pool2d_with_indices(heat, kernel_size=2, stride=1)  # (2, H - 1, W - 1), flat indices
    snapped = []
    for c in range(2):
        xy = boxes[:, 2 * c:2 * c + 2] / stride
        col = xy[:, 0].clamp(0, peaks.shape[-1] - 1).floor().long()
        row = xy[:, 1].clamp(0, peaks.shape[-2] - 1).floor().long()
        peak = peaks[c, row, col]
        y, x = peak // width, peak % width
        offset = corners[3 * c + 1:3 * c + 3, y, x].T  # (K, 2): x, y
        snapped.append((torch.stack([x, y], 1).to(boxes.dtype) + offset) * stride)
    return clip_boxes_to_image(torch.cat(snapped, 1), shape)


def deform(conv: DeformConv2d, x: Tensor, offsets: Tensor) -> Tensor:
    """``conv`` in float32 under mixed precision too: torchvision's CPU kernel has no bfloat16 or half (on CUDA its
    autocast rule casts to float32 likewise)."""
    with torch.autocast(x.device.type, enabled=False):
        return conv(x.float(), offsets.float())


class RepPointsV2Head(nn.Module):
    """The shared head of every level: classification and point towers (``stacked_convs`` GroupNorm convolutions
    each), a shared tower feeding the foreground map and the corner branches, and the deformable convolutions that
    read the features at the initial points. Outputs per level, in strides from the location: the initial and
    refined points (y, x pairs, deform_conv2d's offset layout), and per corner its heat logit and x, y offset."""

    def __init__(self, channels: int, num_classes: int, num_points: int = 9, stacked_convs: int = 3,
                 shared_convs: int = 1, corner_channels: int = 64, gradient_mul: float = 0.1,
                 prior_prob: float = 0.01):
        super().__init__()
        kernel = math.isqrt(num_points)
        if kernel * kernel != num_points or kernel % 2 == 0:
            raise ValueError(f"num_points must be the square of an odd number, got {num_points}")
        self.cls_tower = nn.Sequential(*(conv_gn_relu(channels, channels) for _ in range(stacked_convs)))
        self.points_tower = nn.Sequential(*(conv_gn_relu(channels, channels) for _ in range(stacked_convs)))
        self.shared_tower = nn.Sequential(*(conv_gn_relu(channels, channels) for _ in range(shared_convs)))
        self.foreground = nn.Conv2d(channels, num_classes, 1)
        self.foreground_embedding = conv_gn_relu(channels, channels, 1)
        self.corner_pools = nn.ModuleList([CornerPool(channels, corner_channels, top_left)
                                           for top_left in (True, False)])
        self.corner_outputs = nn.ModuleList([nn.Conv2d(channels, 3, 3, padding=1) for _ in range(2)])
        self.points_init = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True),
                                         nn.Conv2d(channels, 2 * num_points, 1))
        self.cls_deform = DeformConv2d(channels + 6, channels, kernel, padding=kernel // 2, bias=False)
        self.cls_logits = nn.Conv2d(channels, num_classes, 1)
        self.refine_deform = DeformConv2d(channels + 6, channels, kernel, padding=kernel // 2, bias=False)
        self.points_refine = nn.Conv2d(channels, 2 * num_points, 1)
        # the kernel's own sampling grid (y, x per position, row by row): offsets are the points less these
        grid = torch.arange(kernel, dtype=torch.float32) - kernel // 2
        base = torch.stack(torch.meshgrid(grid, grid, indexing="ij"), -1).reshape(1, -1, 1, 1)
        self.register_buffer("kernel_grid", base, persistent=False)
        self.gradient_mul = gradient_mul
        self.num_points = num_points
        self._init_weights(prior_prob)

    def _init_weights(self, prior_prob: float) -> None:
        """As the recipe: its own convolutions from N(0, 0.01), the logits biased to ``prior_prob``."""
        for module in (self.cls_tower, self.points_tower, self.shared_tower, self.points_init, self.cls_deform,
                       self.refine_deform, self.cls_logits, self.points_refine, self.foreground, self.corner_outputs):
            for m in module.modules():
                if isinstance(m, (nn.Conv2d, DeformConv2d)):
                    nn.init.normal_(m.weight, std=0.01)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
        prior = -math.log((1 - prior_prob) / prior_prob)
        for bias in (self.cls_logits.bias, self.foreground.bias, *(c.bias[:1] for c in self.corner_outputs)):
            with torch.no_grad():
                bias.fill_(prior)

    def forward(self, features: List[Tensor]) -> Dict[str, List[Tensor]]:
        outputs: Dict[str, List[Tensor]] = {k: [] for k in ("cls_logits", "points_init", "points_refine", "corners",
                                                             "foreground")}
        for x in features:
            for name, value in zip(outputs, self.forward_level(x)):
                outputs[name].append(value)
        return outputs

    def forward_level(self, x: Tensor) -> Tuple[Tensor, ...]:
        cls_feat, points_feat = self.cls_tower(x), self.points_tower(x)
        shared = self.shared_tower(points_feat)
        foreground = self.foreground(shared)
        embedding = self.foreground_embedding(shared)
        cls_feat, points_feat, shared = cls_feat + embedding, points_feat + embedding, shared + embedding
        corners = torch.cat([out(pool(shared)) for pool, out in zip(self.corner_pools, self.corner_outputs)], 1)
        points_init = self.points_init(points_feat)
        # the refinement and classification pass a tenth of their gradient on to the initial points
        scaled = self.gradient_mul * points_init + (1 - self.gradient_mul) * points_init.detach()
        offsets = scaled - self.kernel_grid.to(scaled.dtype)
        cls_in, points_in = torch.cat([cls_feat, corners], 1), torch.cat([points_feat, corners], 1)
        cls_logits = self.cls_logits(F.relu(deform(self.cls_deform, cls_in, offsets)))
        points_refine = (self.points_refine(F.relu(deform(self.refine_deform, points_in, offsets)))
                         + points_init.detach())
        return cls_logits, points_init, points_refine, corners, foreground


def level_points(shapes: Sequence[Tuple[int, int]], strides: Sequence[int], device: torch.device
                 ) -> Tuple[Tensor, Tensor]:
    """The locations of every level, row by row, as the recipe places them (column j, row i at (j s, i s)): (A, 2)
    xy and (A,) log2 strides."""
    points, levels = [], []
    for (h, w), stride in zip(shapes, strides):
        ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
        points.append(torch.stack([xs, ys], -1).reshape(-1, 2).float() * stride)
        levels.append(torch.full((h * w,), int(math.log2(stride)), device=device))
    return torch.cat(points), torch.cat(levels)


def to_points(maps: List[Tensor], strides: Sequence[int], points: Tensor) -> Tensor:
    """Per-level (N, 2P, H, W) outputs in strides, y first -> (N, A, P, 2) xy points in pixels."""
    flat = []
    for m, stride in zip(maps, strides):
        n, c, h, w = m.shape
        flat.append(m.reshape(n, c // 2, 2, h * w).permute(0, 3, 1, 2).flip(-1) * stride)
    return torch.cat(flat, 1) + points[None, :, None]


def flatten(maps: List[Tensor]) -> Tensor:
    """Per-level (N, C, H, W) -> (N, A, C)."""
    return torch.cat([m.flatten(2) for m in maps], 2).transpose(1, 2)


class RepPointsV2(nn.Module):
    """The detector: torchvision's transform, the backbone (an FPN of P3-P7), :class:`RepPointsV2Head`, the
    recipe's targets and losses, and its inference: per level the ``topk_candidates`` locations of highest class
    probability, boxes from the refined points (P4-P7's snapped to the corner heatmaps, ``CORNER_SOURCE``), then
    the (location, class) pairs above ``score_thresh``, class-wise NMS. ``num_classes`` includes the background
    (label k is sigmoid output k - 1). ``point_base_scale``: the box size (in strides) that belongs to a level in the
    initial assignment; ``topk``: ATSS's candidates per level for the refined set; ``gaussian_iou``: the IoU a
    corner's Gaussian radius keeps."""

    def __init__(self, backbone: nn.Module, num_classes: int, min_size: int = 800, max_size: int = 1333,
                 image_mean: Optional[List[float]] = None, image_std: Optional[List[float]] = None,
                 point_strides: Sequence[int] = (8, 16, 32, 64, 128), num_points: int = 9,
                 point_base_scale: float = 4.0, init_pos_num: int = 1, topk: int = 9, gaussian_iou: float = 0.7,
                 box_method: str = "exact_minmax", gradient_mul: float = 0.1, stacked_convs: int = 3,
                 shared_convs: int = 1, corner_channels: int = 64, score_thresh: float = 0.05,
                 nms_thresh: float = 0.6, detections_per_img: int = 100, topk_candidates: int = 1000, **kwargs: Any):
        super().__init__()
        for name, value in (("init_pos_num", init_pos_num), ("topk", topk), ("topk_candidates", topk_candidates),
                            ("detections_per_img", detections_per_img), ("stacked_convs", stacked_convs),
                            ("corner_channels", corner_channels)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        for name, value in (("score_thresh", score_thresh), ("nms_thresh", nms_thresh),
                            ("gradient_mul", gradient_mul)):
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if not 0 < gaussian_iou < 1:
            raise ValueError(f"gaussian_iou must be in (0, 1), got {gaussian_iou}")
        if box_method not in BOX_METHODS:
            raise ValueError(f"box_method must be one of {BOX_METHODS}, got {box_method!r}")
        if any(s < 1 or s & (s - 1) for s in point_strides):
            raise ValueError(f"point_strides must be powers of 2 (the assigners read levels as log2 strides), got "
                             f"{list(point_strides)}")
        if corner_channels % 32:
            raise ValueError(f"corner_channels must be a multiple of 32 (group norms of 32 groups), got "
                             f"{corner_channels}")
        self.transform = GeneralizedRCNNTransform(min_size, max_size, image_mean or [0.485, 0.456, 0.406],
                                                  image_std or [0.229, 0.224, 0.225], **kwargs)
        self.backbone = backbone
        self.head = RepPointsV2Head(backbone.out_channels, num_classes - 1, num_points, stacked_convs, shared_convs,
                                    corner_channels, gradient_mul)
        self.strides = tuple(point_strides)
        self.point_base_scale, self.init_pos_num, self.topk = point_base_scale, init_pos_num, topk
        self.gaussian_iou, self.box_method = gaussian_iou, box_method
        self.score_thresh, self.nms_thresh = score_thresh, nms_thresh
        self.detections_per_img, self.topk_candidates = detections_per_img, topk_candidates

    def forward(self, images: List[Tensor], targets: Optional[List[Dict[str, Tensor]]] = None) -> Any:
        if self.training and targets is None:
            raise ValueError("targets are required in training mode")
        original_sizes = [tuple(img.shape[-2:]) for img in images]
        images, targets = self.transform(images, targets)
        features = list(self.backbone(images.tensors).values())
        outputs = self.head(features)
        if self.training:
            return self.compute_loss(outputs, targets)
        detections = self.postprocess_detections(outputs, images.image_sizes)
        return self.transform.postprocess(detections, images.image_sizes, original_sizes)

    def compute_loss(self, outputs: Dict[str, List[Tensor]], targets: List[Dict[str, Tensor]]) -> Dict[str, Tensor]:
        outputs = {k: [m.float() for m in v] for k, v in outputs.items()}  # in float32 under mixed precision
        shapes = [tuple(m.shape[-2:]) for m in outputs["cls_logits"]]
        points, levels = level_points(shapes, self.strides, outputs["cls_logits"][0].device)
        boxes_init = points_to_boxes(to_points(outputs["points_init"], self.strides, points), self.box_method)
        boxes_refine = points_to_boxes(to_points(outputs["points_refine"], self.strides, points), self.box_method)
        logits, corners = flatten(outputs["cls_logits"]), flatten(outputs["corners"])
        counts = [h * w for h, w in shapes]
        class_targets = torch.zeros_like(logits)
        init_pred, init_gt, refine_pred, refine_gt, heats, offsets = [], [], [], [], [], []
        fg_logits, fg_targets, fg_weights = [], [], []
        num_init = num_refine = 0
        num_corners = [0, 0]
        for i, target in enumerate(targets):
            gt, labels = target["boxes"], target["labels"]
            matched = point_assign(points, levels, gt, self.point_base_scale, self.init_pos_num)
            init_pred.append(boxes_init[i, matched >= 0])
            init_gt.append(gt[matched[matched >= 0]])
            num_init += max(int((matched >= 0).sum()), 1)
            matched = atss_assign(boxes_init[i].detach(), gt, counts, self.topk)
            positive = matched >= 0
            class_targets[i, positive, labels[matched[positive]] - 1] = 1.0
            refine_pred.append(boxes_refine[i, positive])
            refine_gt.append(gt[matched[positive]])
            num_refine += max(int(positive.sum()), 1)
            heat, offset = corner_targets(points, levels, gt, self.gaussian_iou)
            heats.append(heat)
            offsets.append(offset)
            num_corners = [n + max(int(heat[:, c].eq(1).sum()), 1) for c, n in enumerate(num_corners)]
            target_map, weight_map = foreground_targets(gt, labels - 1, shapes[0], self.strides[0],
                                                        logits.shape[-1])
            for level_logits in outputs["foreground"]:
                size = level_logits.shape[-2:]
                fg_logits.append(level_logits[i].flatten())
                fg_targets.append(F.interpolate(target_map[None], size=size)[0].flatten())
                fg_weights.append(F.interpolate(weight_map[None], size=size)[0].flatten())
        heats, offsets = torch.stack(heats), torch.stack(offsets)
        loss_heat = loss_offset = logits.new_zeros(())
        for c in range(2):
            peaks = heats[..., c].eq(1)
            loss_heat = loss_heat + gaussian_focal_loss(corners[..., 3 * c], heats[..., c]) / num_corners[c]
            loss_offset = loss_offset + F.smooth_l1_loss(corners[..., 3 * c + 1:3 * c + 3][peaks],
                                                         offsets[..., 2 * c:2 * c + 2][peaks], beta=OFFSET_BETA,
                                                         reduction="sum") / num_corners[c]
        giou = lambda pred, gt: generalized_box_iou_loss(torch.cat(pred), torch.cat(gt), reduction="sum")  # noqa
        return {"classification": sigmoid_focal_loss(logits, class_targets, FOCAL_ALPHA, FOCAL_GAMMA,
                                                     reduction="sum") / num_refine,
                "points_init": INIT_BOX_WEIGHT * giou(init_pred, init_gt) / num_init,
                "points_refine": REFINE_BOX_WEIGHT * giou(refine_pred, refine_gt) / num_refine,
                "corner_heatmap": HEATMAP_WEIGHT * loss_heat / 2,
                "corner_offset": OFFSET_WEIGHT * loss_offset / 2,
                "foreground": FOREGROUND_WEIGHT * balanced_focal_loss(torch.cat(fg_logits), torch.cat(fg_targets),
                                                                      torch.cat(fg_weights))}

    def postprocess_detections(self, outputs: Dict[str, List[Tensor]], image_shapes: List[Tuple[int, int]]
                               ) -> List[Dict[str, Tensor]]:
        shapes = [tuple(m.shape[-2:]) for m in outputs["cls_logits"]]
        points, _ = level_points(shapes, self.strides, outputs["cls_logits"][0].device)
        boxes_all = points_to_boxes(to_points(outputs["points_refine"], self.strides, points), self.box_method)
        probs_all = flatten(outputs["cls_logits"]).sigmoid()
        counts = [h * w for h, w in shapes]
        detections = []
        for i, shape in enumerate(image_shapes):
            boxes, probs = [], []
            for level, (level_boxes, level_probs) in enumerate(zip(boxes_all[i].split(counts),
                                                                   probs_all[i].split(counts))):
                if len(level_probs) > self.topk_candidates:
                    keep = level_probs.amax(1).topk(self.topk_candidates).indices
                    level_boxes, level_probs = level_boxes[keep], level_probs[keep]
                level_boxes = clip_boxes_to_image(level_boxes, shape)
                if level in CORNER_SOURCE:
                    source = CORNER_SOURCE[level]
                    level_boxes = snap_to_corners(level_boxes, outputs["corners"][source][i],
                                                  self.strides[source], shape)
                boxes.append(level_boxes)
                probs.append(level_probs)
            boxes, probs = torch.cat(boxes), torch.cat(probs)
            location, label = torch.where(probs > self.score_thresh)
            boxes, scores = boxes[location], probs[location, label]
            keep = batched_nms(boxes, scores, label, self.nms_thresh)[:self.detections_per_img]
            detections.append({"boxes": boxes[keep], "scores": scores[keep], "labels": label[keep] + 1})
        return detections
