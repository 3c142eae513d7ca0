"""The detection config tree: :func:`dense.config.dense_defaults` plus this task's keys, defaulting to the seed's
Mask R-CNN 1x recipe on COCO (see configs/detection/)."""
from __future__ import annotations

from typing import Any

from yacs.config import CfgNode as CN

from config import Rule, at_least, one_of
from dense.config import DENSE_RULES, dense_defaults

DETECTORS = ("mask_rcnn", "retinanet", "fcos", "atss", "cascade_mask_rcnn", "sparse_rcnn", "reppoints_v2")
# The detectors whose heads (and RepPoints v2's FPN) have group norms of 32 groups.
GROUP_NORM_DETECTORS = ("fcos", "atss", "reppoints_v2")
# The detectors that predict instance masks: their data carries mask annotations and they are scored by mask AP too.
MASK_DETECTORS = ("mask_rcnn", "cascade_mask_rcnn")
FCOS_MIN_SIZE = 256
# The levels each detector adds to its backbone stages' (a max-pooled P6; P6 and P7), which together must match its
# anchor sizes, one per level: five (torchvision's defaults, which its default stages meet), or ATSS's
# anchor_strides (RepPoints v2's point_strides). Sparse R-CNN has no anchors.
EXTRA_LEVELS = {"mask_rcnn": 1, "cascade_mask_rcnn": 1, "retinanet": 2, "fcos": 2, "atss": 2, "reppoints_v2": 2}
ANCHOR_LEVELS = 5


def levels_fit(out_indices: Any, config: CN) -> bool:
    """Too few levels fail at the first step (torchvision's anchor generator), too many too, or in the RoI pools."""
    extra = EXTRA_LEVELS.get(config.MODEL.DETECTOR)
    if extra is None:
        return True
    args = config.MODEL.DETECTOR_ARGS
    anchors = len(args.get("anchor_strides", args.get("point_strides", ()))) or ANCHOR_LEVELS
    return (len(out_indices) or ANCHOR_LEVELS - extra) + extra == anchors


def detector_args_fit(_: Any, config: CN) -> bool:
    """True, or the error of :func:`detection.model.detector_args`, which names the key itself."""
    from .model import detector_args  # not at the top: the config tree imports nothing it configures
    return bool(detector_args(config))


def detection_defaults() -> CN:
    c = dense_defaults()
    c.DATA.TRAIN_SPLIT = "train2017"  # <root>/<split>/ and <root>/annotations/instances_<split>.json
    c.DATA.VAL_SPLIT = "val2017"
    c.MODEL.DETECTOR = "mask_rcnn"
    c.MODEL.FPN_CHANNELS = 256
    c.MODEL.BOX_HEAD_DIM = 1024  # Mask R-CNN's two-layer box head; the linear layer of each Cascade box head
    c.MODEL.MASK_HEAD_CHANNELS = 256  # Mask R-CNN's four mask-head convolutions (Cascade: in each stage's)
    # Keyword arguments of the detector's class: torchvision's MaskRCNN / RetinaNet / FCOS, or detection.atss.ATSS,
    # detection.cascade_rcnn.CascadeMaskRCNN (also the stage_* lists), detection.reppoints_v2.RepPointsV2: min_size
    # (a list: one drawn per training batch, the last one for evaluation), max_size, box_batch_size_per_image,
    # box_detections_per_img, topk, ...
    # Others are refused, naming the accepted ones.
    c.MODEL.DETECTOR_ARGS = CN(new_allowed=True)
    c.MODEL.DETECTOR_ARGS.min_size = [800]
    c.MODEL.DETECTOR_ARGS.max_size = 1333
    return c


DETECTION_RULES = DENSE_RULES + (
    Rule("MODEL.DETECTOR", one_of(DETECTORS), f"must be one of {DETECTORS}"),
    Rule("MODEL.FPN_CHANNELS", at_least(1), "must be at least 1"),
    Rule("MODEL.FPN_CHANNELS", lambda value, c: c.MODEL.DETECTOR not in GROUP_NORM_DETECTORS or value % 32 == 0,
         f"must be a multiple of 32 for {' and '.join(GROUP_NORM_DETECTORS)} (their heads' group norms have 32 "
         "groups)"),
    Rule("MODEL.FPN_CHANNELS", lambda value, c: c.MODEL.DETECTOR not in ("atss", "reppoints_v2") or value >= 64
         or min(c.MODEL.DETECTOR_ARGS.min_size) > 128,
         "must be at least 64 for atss with a min_size of 128 or less (reppoints_v2 likewise): P7 (stride 128) can "
         "then be 1x1, one value per group of its head's group norms, which they refuse"),
    Rule("MODEL.BOX_HEAD_DIM", at_least(1), "must be at least 1"),
    Rule("MODEL.MASK_HEAD_CHANNELS", at_least(1), "must be at least 1"),
    Rule("MODEL.DETECTOR_ARGS.min_size", lambda value, _: len(value) >= 1 and min(value) >= 32,
         "must be a list of sizes of at least 32"),
    Rule("MODEL.DETECTOR_ARGS.max_size", at_least(32), "must be at least 32"),
    Rule("MODEL.DETECTOR_ARGS.min_size", lambda value, c: c.MODEL.DETECTOR != "fcos" or min(value) >= FCOS_MIN_SIZE,
         f"must be at least {FCOS_MIN_SIZE} for FCOS: its head's group norms need P7 (stride 128) above 1x1"),
    Rule("MODEL.DETECTOR_ARGS", detector_args_fit, "must be arguments of MODEL.DETECTOR"),
    Rule("MODEL.OUT_INDICES", levels_fit, "must give the detector one level per anchor size: 4 stages for mask_rcnn "
         "and cascade_mask_rcnn (P2-P5, and a pooled P6), 3 for retinanet, fcos, atss and reppoints_v2 (P3-P5, "
         "and P6-P7; for atss and reppoints_v2, two fewer than its anchor_strides / point_strides); [] takes those"),
)
