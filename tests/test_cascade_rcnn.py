"""detection/cascade_rcnn.py: the stage settings as configured, the boxes a stage passes on (a perfect first-stage
regression), gradients into every stage's heads, score averaging at inference, refusals of bad stage settings,
and a real run (training, evaluation, resume) through the detection task."""
from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn as nn
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.ops import box_iou

from config import UsageError, merge_opts
from detection.cascade_rcnn import CascadeMaskRCNN, CascadeRoIHeads
from detection.config import detection_defaults
from detection.model import build_detector, detector_parameters
from tests.helpers import BACKBONE_OPTS, REPO, detector_trains_and_resumes

CFG = str(REPO / "configs" / "detection" / "cascade_mask_rcnn_demo.yaml")
WIDTH = 8  # FPN width of the hand-built cascades
SIZE = 64
GT = torch.tensor([[10.0, 10.0, 30.0, 35.0]])


def features(seed: int = 0) -> dict:
    """P2-P5 maps of a 64x64 image at strides 4-32 (MultiScaleRoIAlign reads the strides from the sizes)."""
    gen = torch.Generator().manual_seed(seed)
    return {str(k): torch.randn(1, WIDTH, SIZE >> (k + 2), SIZE >> (k + 2), generator=gen) for k in range(4)}


def cascade(num_classes: int = 3, **kwargs) -> CascadeRoIHeads:
    """The RoI heads of a cascade on an 8-channel FPN (the backbone is not needed to test them)."""
    torch.manual_seed(0)
    backbone = nn.Identity()
    backbone.out_channels = WIDTH
    return CascadeMaskRCNN(backbone, num_classes, box_head_dim=16, mask_head_channels=4, **kwargs).roi_heads


def targets() -> list:
    masks = torch.zeros(1, SIZE, SIZE, dtype=torch.uint8)
    masks[0, 10:35, 10:30] = 1
    return [{"boxes": GT, "labels": torch.tensor([1]), "masks": masks}]


def test_stage_settings_are_the_recipe():
    """mmdetection's stage settings: IoU 0.5/0.6/0.7 with foreground and background at the same threshold and no
    low-quality matches, coder stds (0.1, 0.1, 0.2, 0.2) / 1, 2, 3 (weights 10, 20, 30 and 5, 10, 15), losses
    x1/0.5/0.25, 512 boxes per image at 1/4 positives, 4conv1fc box heads with batch norm, class-specific
    regression (4 deltas for each of the 3 classes including background), one mask head per stage."""
    heads = cascade()
    assert heads.loss_weights == (1.0, 0.5, 0.25)
    assert len(heads.stages) == 3
    for stage, iou, scale in zip(heads.stages, (0.5, 0.6, 0.7), (1, 2, 3)):
        matcher = stage.proposal_matcher
        assert (matcher.high_threshold, matcher.low_threshold) == (iou, iou)
        assert not matcher.allow_low_quality_matches
        assert stage.box_coder.weights == (10.0 * scale, 10.0 * scale, 5.0 * scale, 5.0 * scale)
        assert (stage.fg_bg_sampler.batch_size_per_image, stage.fg_bg_sampler.positive_fraction) == (512, 0.25)
        assert isinstance(stage.box_head, FastRCNNConvFCHead)
        assert sum(isinstance(m, nn.BatchNorm2d) for m in stage.box_head.modules()) == 4
        assert sum(isinstance(m, nn.Linear) for m in stage.box_head.modules()) == 1
        assert stage.box_predictor.bbox_pred.out_features == 3 * 4
    assert len({id(s.mask_head) for s in heads.stages}) == 3


def perfect_regression(stage):
    """A stage prediction whose deltas move every box at IoU >= 0.5 with the ground truth exactly onto it (for
    every class) and leave the others where they are."""
    def predict(features, boxes, image_sizes):
        boxes = torch.cat(boxes)
        deltas = torch.where(box_iou(boxes, GT) >= 0.5, stage.box_coder.encode_single(GT.expand_as(boxes), boxes),
                             torch.zeros_like(boxes))
        return torch.zeros(len(boxes), 3), deltas.repeat(1, 3)
    return predict


def test_a_perfect_first_stage_gives_the_second_stage_positives_at_iou_1(monkeypatch):
    """Proposals at IoU 0.8, 0.65 and 0.55 with the ground truth [10, 10, 30, 35] (20x25 = 500 px) and one far
    away; with 4 boxes per image plus the ground truth, the sampler keeps all five. The first stage's regression
    moves the three overlapping ones onto the ground truth; the far one stays. The second stage thus receives
    exactly those four (not the ground truth the first stage sampled: it adds it again itself), and every
    positive it samples is at IoU 1."""
    heads = cascade()
    heads.train()
    proposals = torch.tensor([
        [10.0, 10.0, 30.0, 30.0],  # 20x20 inside: IoU 400/500 = 0.8
        [10.0, 10.0, 30.0, 26.25],  # 20x16.25 inside: IoU 325/500 = 0.65
        [10.0, 10.0, 30.0, 23.75],  # 20x13.75 inside: IoU 275/500 = 0.55
        [50.0, 50.0, 60.0, 60.0],  # no overlap
    ])
    torch.testing.assert_close(box_iou(proposals, GT)[:, 0], torch.tensor([0.8, 0.65, 0.55, 0.0]))
    first, second = heads.stages[0], heads.stages[1]
    monkeypatch.setattr(first, "predict", perfect_regression(first))
    received = []
    sample = second.sample

    def record(boxes, targets):
        received.append(torch.cat(boxes))
        drawn = sample(boxes, targets)
        received.append(drawn)
        return drawn
    monkeypatch.setattr(second, "sample", record)
    heads(features(), [proposals], [(SIZE, SIZE)], targets())
    boxes, drawn = received
    expected = torch.cat([GT.expand(3, 4), proposals[3:]])
    order = boxes[:, 0].argsort()  # the sampler shuffles: compare sorted by x1 (10, 10, 10, 50)
    torch.testing.assert_close(boxes[order], expected)
    positives = torch.cat(drawn.boxes)[torch.cat(drawn.labels) > 0]
    assert len(positives) == 4  # three refined boxes and the ground truth added again
    torch.testing.assert_close(box_iou(positives, GT)[:, 0], torch.ones(4))


def test_stage_losses_are_weighted_and_every_head_gets_gradients():
    """One training step of a whole detector: the nine stage losses and the RPN's; the second and third stages'
    losses are 0.5 and 0.25 of what they are at weight 1 (same seed: the same samples); every parameter of every
    stage's box head, box predictor, mask head and mask predictor gets a non-zero gradient."""
    config = detection_defaults()
    merge_opts(config, BACKBONE_OPTS + ["MODEL.DETECTOR", "cascade_mask_rcnn", "MODEL.FPN_CHANNELS", 16,
                                            "MODEL.BOX_HEAD_DIM", 32, "MODEL.MASK_HEAD_CHANNELS", 8,
                                            "MODEL.DETECTOR_ARGS.min_size", "[64]",
                                            "MODEL.DETECTOR_ARGS.max_size", 64])
    torch.manual_seed(0)
    model = build_detector(config, num_classes=2).train()
    images = [torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))]
    batch = targets()

    def step(weights):
        model.roi_heads.loss_weights = weights
        torch.manual_seed(2)
        return model(images, batch)
    unit = {k: v.detach() for k, v in step((1.0, 1.0, 1.0)).items()}
    model.zero_grad()
    losses = step((1.0, 0.5, 0.25))
    assert sorted(losses) == sorted(["loss_objectness", "loss_rpn_box_reg"] + [
        f"{name}_s{k}" for name in ("loss_classifier", "loss_box_giou", "loss_mask") for k in range(3)])
    for name, value in losses.items():
        weight = {"_s1": 0.5, "_s2": 0.25}.get(name[-3:], 1.0)
        torch.testing.assert_close(value.detach(), weight * unit[name])
    sum(losses.values()).backward()
    for k, stage in enumerate(model.roi_heads.stages):
        for part in ("box_head", "box_predictor", "mask_head", "mask_predictor"):
            for name, p in getattr(stage, part).named_parameters():
                assert p.grad is not None and p.grad.abs().sum() > 0, f"stage {k} {part}.{name}"


def test_a_batch_without_objects_trains_on_background_only():
    """No ground truth: every sampled box is background, so the box and mask losses are exactly 0 (no positives)
    and the classification losses are finite; the boxes still pass from stage to stage."""
    heads = cascade().train()
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
              "masks": torch.zeros(0, SIZE, SIZE, dtype=torch.uint8)}]
    proposals = torch.tensor([[8.0, 8.0, 40.0, 40.0], [20.0, 30.0, 50.0, 60.0]])
    _, losses = heads(features(), [proposals], [(SIZE, SIZE)], empty)
    for k in range(3):
        assert losses[f"loss_box_giou_s{k}"] == 0 and losses[f"loss_mask_s{k}"] == 0
        assert torch.isfinite(losses[f"loss_classifier_s{k}"])


def constant(logits, deltas):
    """A stage prediction of fixed logits and deltas for the single box."""
    return lambda features, boxes, image_sizes: (torch.tensor([logits]), torch.tensor([deltas]))


def test_inference_averages_the_stages_logits_and_decodes_with_the_last_stage(monkeypatch):
    """One proposal [8, 8, 40, 40] (32x32) and 2 classes. Stage logits (background, class 1, class 2):
    (0, 2, 0), (0, 0, 2), (0, 0, 5); their mean (0, 2/3, 7/3), whose softmax gives class 2
    e^(7/3) / (1 + e^(2/3) + e^(7/3)) = 10.312 / 13.260 = 0.7777 and class 1 1.948 / 13.260 = 0.1469 (averaging
    the stages' probabilities would give class 1 (0.787 + 0.107 + 0.007) / 3 = 0.300). Stage 1 is most sure of
    class 1 and moves the box by its class-1 deltas: dy 2.5 / weight 10 = 0.25 of 32 px down to [8, 16, 40, 48]
    (its class-2 deltas, -5, are not used); stage 2 leaves it; stage 3's class-2 deltas dx 3 / weight 30 = 0.1 of
    32 px move that class's box right 3.2 px: [11.2, 16, 43.2, 48], class 1's stays [8, 16, 40, 48]."""
    heads = cascade().eval()
    zeros = [0.0] * 12
    predictions = [constant([0.0, 2.0, 0.0], [0.0] * 4 + [0.0, 2.5, 0.0, 0.0] + [0.0, -5.0, 0.0, 0.0]),
                   constant([0.0, 0.0, 2.0], zeros), constant([0.0, 0.0, 5.0], [0.0] * 8 + [3.0, 0.0, 0.0, 0.0])]
    for stage, predict in zip(heads.stages, predictions):
        monkeypatch.setattr(stage, "predict", predict)
    with torch.no_grad():
        (detections,), losses = heads(features(), [torch.tensor([[8.0, 8.0, 40.0, 40.0]])], [(SIZE, SIZE)])
    assert losses == {}
    total = 1 + math.exp(2 / 3) + math.exp(7 / 3)
    assert detections["labels"].tolist() == [2, 1]
    torch.testing.assert_close(detections["scores"], torch.tensor([math.exp(7 / 3), math.exp(2 / 3)]) / total)
    torch.testing.assert_close(detections["boxes"], torch.tensor([[11.2, 16.0, 43.2, 48.0], [8.0, 16.0, 40.0, 48.0]]))
    assert detections["masks"].shape == (2, 1, 28, 28)


@pytest.mark.parametrize("key, value, message", [
    ("stage_iou_thresholds", "[0.5, 0.6]", r"stage_box_weights has 3 entries but stage_iou_thresholds has 2: "
                                            r"it needs one per stage"),
    ("stage_loss_weights", "[1.0, 0.5]", r"stage_loss_weights has 2 entries but stage_iou_thresholds has 3"),
    ("stage_iou_thresholds", "[0.5, 0.6, 1.5]", r"stage_iou_thresholds must be one IoU in \(0, 1\] per stage"),
    ("stage_box_weights", "[[10, 10, 5], [20, 20, 10, 10], [30, 30, 15, 15]]",
     r"stage_box_weights must be four positive weights \(x, y, w, h\) per stage"),
    ("stage_loss_weights", "[1.0, -0.5, 0.25]", r"stage_loss_weights must be 0 or more"),
    ("stage_iou_threshold", "[0.5]", r"stage_iou_threshold is not an argument of cascade_mask_rcnn"),
    ("box_head_dim", "64", r"box_head_dim is not an argument of cascade_mask_rcnn"),
])
def test_bad_stage_settings_are_one_line_naming_the_key(key, value, message):
    config = detection_defaults()
    merge_opts(config, BACKBONE_OPTS + ["MODEL.DETECTOR", "cascade_mask_rcnn", "MODEL.FPN_CHANNELS", 16,
                                            f"MODEL.DETECTOR_ARGS.{key}", value])
    with pytest.raises(UsageError, match=f"^MODEL.DETECTOR_ARGS.{message}") as error:
        build_detector(config, num_classes=2)
    assert "\n" not in str(error.value)


def test_the_detector_args_are_the_cascades():
    """Faster R-CNN's single-stage settings (box_fg_iou_thresh, bbox_reg_weights) have no meaning here and are
    refused; the stage lists, the RPN's and the transform's are accepted."""
    accepted = set(detector_parameters(CascadeMaskRCNN))
    assert {"stage_iou_thresholds", "stage_box_weights", "stage_loss_weights", "rpn_nms_thresh",
            "box_batch_size_per_image", "min_size", "size_divisible"} <= accepted
    assert not {"box_fg_iou_thresh", "bbox_reg_weights", "box_head_dim", "mask_head_channels"} & accepted


@pytest.mark.slow
def test_focal_tiny_cascade_has_the_seeds_parameter_count():
    """The seed's README: 87M parameters for Focal-T Cascade Mask R-CNN with COCO's 80 classes (within 3%)."""
    config = detection_defaults()
    merge_opts(config, ["MODEL.DETECTOR", "cascade_mask_rcnn"])
    count = sum(p.numel() for p in build_detector(config, num_classes=80).parameters())
    assert abs(count / 87e6 - 1) < 0.03, count


@pytest.mark.slow
def test_cascade_trains_evaluates_and_resumes(tmp_path):
    """One epoch through the detection task's run (box and mask AP scored), then the same command at two epochs
    resumes after the first."""
    opts = ["MODEL.FPN_CHANNELS", "16", "MODEL.BOX_HEAD_DIM", "32", "MODEL.MASK_HEAD_CHANNELS", "8",
            "MODEL.DETECTOR_ARGS.min_size", "[64]", "MODEL.DETECTOR_ARGS.max_size", "64",
            "MODEL.DETECTOR_ARGS.box_score_thresh", "0.0"]
    trained, _ = detector_trains_and_resumes(tmp_path, CFG, opts)
    assert "loss_box_giou_s2" in trained.stdout
    assert re.search(r"box AP [\d.]+ mask AP [\d.]+ \(2 images, [1-9]\d* detections\)", trained.stdout)
