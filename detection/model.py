"""The detectors on a Focal Transformer: torchvision's Mask R-CNN, RetinaNet and FCOS, and those composed from its
parts (ATSS, Cascade Mask R-CNN, Sparse R-CNN, RepPoints v2), behind torchvision's FPN with each recipe's extra
levels."""
from __future__ import annotations

import inspect
from collections import OrderedDict
from typing import Any, Dict

import torch
import torch.nn as nn
from torchvision.models.detection import FCOS, MaskRCNN, RetinaNet
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool, LastLevelP6P7

from config import UsageError
from dense.backbone import DenseBackbone, build_backbone
from dense.config import check_arguments

from .atss import ATSS
from .cascade_rcnn import CascadeMaskRCNN
from .reppoints_v2 import RepPointsV2, group_norm
from .sparse_rcnn import SparseRCNN

DETECTOR_CLASSES = {"mask_rcnn": MaskRCNN, "retinanet": RetinaNet, "fcos": FCOS, "atss": ATSS,
                    "cascade_mask_rcnn": CascadeMaskRCNN, "sparse_rcnn": SparseRCNN,
                    "reppoints_v2": RepPointsV2}
# The detectors on P2-P6 (a max-pooled P6) with RoI heads on P2-P5; Sparse R-CNN reads P2-P5; the others P3-P7.
RCNN_DETECTORS = ("mask_rcnn", "cascade_mask_rcnn")
# The detectors whose P6 comes from the last backbone stage (mmdetection's add_extra_convs='on_input'), not from P5.
ON_INPUT_DETECTORS = ("retinanet", "reppoints_v2")
# Arguments this module builds itself, or that take modules rather than values a config can hold.
BUILT_HERE = frozenset({
    "self", "backbone", "num_classes", "box_head", "box_predictor", "mask_head", "mask_predictor", "rpn", "roi_heads",
    "transform", "rpn_anchor_generator", "rpn_head", "box_roi_pool", "mask_roi_pool", "anchor_generator", "head",
    "proposal_matcher", "box_head_dim", "mask_head_channels"})


def detector_parameters(detector: type) -> Dict[str, inspect.Parameter]:
    """The keyword arguments ``MODEL.DETECTOR_ARGS`` may set, with their defaults: the detector's constructors'
    (through the MRO, the nearest class's first, and the image transform's), less those a subclass does not use
    (its ``UNUSED_ARGS``)."""
    params: Dict[str, inspect.Parameter] = {}
    for cls in (*detector.__mro__, GeneralizedRCNNTransform):
        if "__init__" not in vars(cls) or cls in (nn.Module, object):
            continue
        for name, p in inspect.signature(cls.__init__).parameters.items():
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                params.setdefault(name, p)
    left_out = BUILT_HERE | getattr(detector, "UNUSED_ARGS", frozenset())
    return {name: p for name, p in params.items() if name not in left_out}


def detector_args(config: Any) -> Dict[str, Any]:
    """``MODEL.DETECTOR_ARGS`` as keyword arguments, checked by :func:`dense.config.check_arguments`: torchvision
    would swallow a misspelt key (``min_sise``) and train with its default, and a value of the wrong type (a float
    ``box_detections_per_img``) would fail only in the first evaluation, after an epoch of training."""
    args = dict(config.MODEL.DETECTOR_ARGS)
    check_arguments("MODEL.DETECTOR_ARGS", args, detector_parameters(DETECTOR_CLASSES[config.MODEL.DETECTOR]),
                    f"{config.MODEL.DETECTOR} (MODEL.DETECTOR)", own_rules=("min_size",), positive=("size_divisible",))
    args["min_size"] = tuple(args["min_size"])
    return args


class FocalFPN(nn.Module):
    """Stage maps -> FPN levels "0", "1", ... plus mmdetection's extra levels: a max-pooled P6 for the R-CNNs; none
    for Sparse R-CNN; P6/P7 from the last stage for RetinaNet and RepPoints v2 (``add_extra_convs='on_input'``) and
    from P5 for FCOS and ATSS. RepPoints v2's recipe puts group norms in the FPN's convolutions."""

    def __init__(self, body: nn.Module, out_channels: int, detector: str):
        super().__init__()
        self.body = body
        channels = body.feature_info.channels()
        if detector in RCNN_DETECTORS:
            extra = LastLevelMaxPool()
        elif detector == "sparse_rcnn":
            extra = None
        else:
            on_input = detector in ON_INPUT_DETECTORS
            extra = LastLevelP6P7(channels[-1] if on_input else out_channels, out_channels)
            # torchvision guesses the source from the widths (P5 when they are equal); a backbone whose last stage
            # is as wide as the FPN would otherwise switch RetinaNet to P5.
            extra.use_P5 = not on_input
        self.fpn = FeaturePyramidNetwork(channels, out_channels, extra_blocks=extra,
                                         norm_layer=group_norm if detector == "reppoints_v2" else None)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(self.body(x))))


def build_detector(config: Any, num_classes: int) -> nn.Module:
    """``num_classes`` object classes plus background; no weights downloaded (``--pretrained`` is local)."""
    detector = config.MODEL.DETECTOR
    body = build_backbone(config, (0, 1, 2, 3) if detector in (*RCNN_DETECTORS, "sparse_rcnn") else (1, 2, 3))
    backbone = FocalFPN(body, config.MODEL.FPN_CHANNELS, detector)
    args = detector_args(config)
    if detector == "cascade_mask_rcnn":
        return CascadeMaskRCNN(backbone, num_classes + 1, box_head_dim=config.MODEL.BOX_HEAD_DIM,
                               mask_head_channels=config.MODEL.MASK_HEAD_CHANNELS, **args)
    if detector != "mask_rcnn":
        try:
            return DETECTOR_CLASSES[detector](backbone, num_classes=num_classes + 1, **args)
        except ValueError as err:  # a value the constructor refuses (ATSS checks its own)
            raise UsageError(f"MODEL.DETECTOR_ARGS of {detector}: {err}") from None
    # torchvision's heads at the configured widths (its defaults: 1024 and 256)
    box_dim, mask_dim, fpn_dim = config.MODEL.BOX_HEAD_DIM, config.MODEL.MASK_HEAD_CHANNELS, backbone.out_channels
    return MaskRCNN(backbone, box_head=TwoMLPHead(fpn_dim * 7 * 7, box_dim),
                    box_predictor=FastRCNNPredictor(box_dim, num_classes + 1),
                    mask_head=MaskRCNNHeads(fpn_dim, [mask_dim] * 4, dilation=1),
                    mask_predictor=MaskRCNNPredictor(mask_dim, mask_dim, num_classes + 1), **args)


def backbone(model: nn.Module) -> DenseBackbone:
    return model.backbone.body
