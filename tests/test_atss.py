"""detection/atss.py: the adaptive training sample selection, centerness targets, the head's losses and mmdetection's
scoring on hand-made cases (arithmetic in the comments), anchors at the given strides, gradients reaching every
part, refusals of bad arguments, and a real run (training, evaluation, resume) through the detection task."""
from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn as nn
from torchvision.models.detection.image_list import ImageList

from config import UsageError, get_config, merge_opts
from detection.atss import ATSS, ATSSHead, LevelAnchorGenerator, atss_assign, centerness_targets
from detection.config import DETECTION_RULES, detection_defaults
from detection.model import build_detector
from tests.helpers import BACKBONE_OPTS, REPO, detector_trains_and_resumes, sum_roundoff, task_args

CFG = str(REPO / "configs" / "detection" / "atss_demo.yaml")
# A 64-wide FPN on 64-pixel images, every detection kept: the end-to-end runs of the one-stage detectors.
SMALL_HEAD = ["MODEL.FPN_CHANNELS", "64", "MODEL.DETECTOR_ARGS.min_size", "[64]", "MODEL.DETECTOR_ARGS.max_size", "64",
              "MODEL.DETECTOR_ARGS.score_thresh", "0.0"]
BOX = torch.tensor([[0.0, 0.0, 10.0, 10.0]])


def strips(heights):
    """Anchors spanning the box's width from its top edge, ``h`` tall: inside the 10x10 box, so IoU = h / 10, and
    centred at (5, h / 2), inside it."""
    return torch.tensor([[0.0, 0.0, 10.0, h] for h in heights])


def test_the_threshold_uses_the_unbiased_standard_deviation():
    # One level of nine anchors (all nine are candidates) with IoUs 0.1 x3, 0.2 x2, 0.9 x3, 1.0.
    # mean = 4.4 / 9 = 22/45 = 0.4889; sum of squared deviations = 3.54 - 9 (22/45)^2 = 25/18.
    # Unbiased: std = sqrt(25/18 / 8) = 5/12 = 0.4167, threshold 0.9056: only the 1.0 anchor.
    # Biased: std = sqrt(25/18 / 9) = 0.3928, threshold 0.8817: the three 0.9 anchors too.
    anchors = strips([1, 1, 1, 2, 2, 9, 9, 9, 10])
    ious = torch.tensor([0.1, 0.1, 0.1, 0.2, 0.2, 0.9, 0.9, 0.9, 1.0])
    assert ious.mean() + ious.std() == pytest.approx(163 / 180)
    assert ious.mean() + ious.std(unbiased=False) == pytest.approx(22 / 45 + 5 / (9 * math.sqrt(2)))
    assert atss_assign(anchors, BOX, [9]).tolist() == [-1] * 8 + [0]


@pytest.mark.parametrize("shift, positive", [(0.0, False), (0.02, True)])
def test_a_candidate_centred_on_the_border_is_not_inside(shift, positive):
    # The box's own shape moved down by 5 - shift: centre (5, 10 - shift), on the bottom side for shift 0.
    # IoU 50/150 = 1/3 (50.2/149.8 = 0.3351 for shift 0.02); two 1-pixel strips of IoU 0.1 complete the level.
    # mean = (1/3 + 0.2) / 3 = 0.1778, unbiased std = sqrt((0.1556^2 + 2 x 0.0778^2) / 2) = 0.1347: threshold
    # 0.3125, passed by the first anchor only. Its centre must lie more than 0.01 inside every side.
    anchors = torch.tensor([[0.0, 5 - shift, 10, 15 - shift], [0, 0, 10, 1], [0, 0, 10, 1]])
    assert atss_assign(anchors, BOX, [3]).tolist() == [0 if positive else -1, -1, -1]


def test_an_anchor_claimed_by_two_boxes_learns_the_one_it_overlaps_most():
    # Boxes: 0 = [0, 0, 10, 20], 1 = [0, 0, 10, 10]. Anchors: X = [0, 0, 10, 10], Y = [0, 10, 10, 20], six far away.
    # Box 0: IoUs X 0.5, Y 0.5, 0 x6: mean 1/8, unbiased std sqrt((2 x (3/8)^2 + 6 x (1/8)^2) / 7) = 0.2315,
    #   threshold 0.3565: X and Y (centres (5, 5) and (5, 15) inside).
    # Box 1: IoUs X 1, Y 0 (they touch), 0 x6: mean 1/8, std sqrt(((7/8)^2 + 7 x (1/8)^2) / 7) = 0.3536,
    #   threshold 0.4786: X.
    # X is claimed by both and goes to box 1 (IoU 1 > 0.5), the later box: not simply the first claim.
    boxes = torch.tensor([[0.0, 0, 10, 20], [0, 0, 10, 10]])
    far = [[30.0 + 10 * k, 30, 40 + 10 * k, 40] for k in range(6)]
    anchors = torch.tensor([[0.0, 0, 10, 10], [0, 10, 10, 20], *far])
    assert atss_assign(anchors, boxes, [8]).tolist() == [1, 0] + [-1] * 6


def test_candidates_are_the_nearest_topk_of_each_level():
    # Box [0, 0, 10, 10], centre (5, 5); topk 2.
    # Level 0: a0 = [4, 4, 6, 6] (distance 0, IoU 0.04), a1 = [0, 0.5, 10, 10.5] (0.5, 95/105 = 0.9048),
    #   a2 = [0, 1, 10, 11] (1, 90/110 = 0.8182): a2 is the farthest, not a candidate.
    # Level 1: b0 = [-5, -5, 15, 15] (0, 100/400 = 0.25), b1 far away (IoU 0): both candidates.
    # Candidates' IoUs 0.04, 0.9048, 0.25, 0: mean 0.2987, unbiased std 0.4187, threshold 0.7174: a1 only.
    # a2 passes that threshold with its centre inside, but was never a candidate.
    anchors = torch.tensor([[4.0, 4, 6, 6], [0, 0.5, 10, 10.5], [0, 1, 10, 11], [-5, -5, 15, 15],
                            [50, 50, 70, 70]])
    assert atss_assign(anchors, BOX, [3, 2], topk=2).tolist() == [-1, 0, -1, -1, -1]


def test_no_boxes_means_every_anchor_is_background():
    assert atss_assign(strips([1, 2]), torch.zeros(0, 4), [2]).tolist() == [-1, -1]


def test_centerness_targets():
    # Anchor centre (4, 3) in [0, 0, 10, 12]: l 4, r 6, t 3, b 9: sqrt(4/6 x 3/9) = sqrt(2/9) = 0.4714.
    # Anchor centre (5, 6), the box's centre: 1.
    anchors = torch.tensor([[2.0, 1, 6, 5], [3, 4, 7, 8]])
    boxes = torch.tensor([[0.0, 0, 10, 12]] * 2)
    torch.testing.assert_close(centerness_targets(anchors, boxes), torch.tensor([math.sqrt(2 / 9), 1.0]))


@pytest.mark.parametrize("empty_image", [False, True])
def test_head_losses_on_a_trivial_case(empty_image):
    # Two anchors, two classes, every output 0. Anchor 0 = [0, 0, 10, 10] learns box [0, 0, 10, 12] of label 2
    # (output 1); anchor 1 is background.
    # Classification: p = 0.5 everywhere. The positive (anchor 0, output 1): 0.25 x 0.5^2 x ln 2; the three
    #   negatives: 0.75 x 0.5^2 x ln 2 each: (0.0625 + 0.5625) ln 2 = 0.625 ln 2, over 1 positive.
    # Box: zero deltas decode to the anchor: IoU 100/120 = 5/6, the enclosing box is the target's own, so GIoU
    #   5/6 and its loss 1/6; weighted by the centerness target c = sqrt(5/5 x 5/7) = 0.8452 and divided by the
    #   weights' sum clamped at 1 (c < 1): 2 x c / 6 = 0.2817.
    # Centerness: BCE of logit 0 against any target is ln 2, over 1 positive.
    # A second image without objects adds four negatives (4 x 0.1875 ln 2) and counts as one positive, as in
    # mmdetection (each image's count is at least 1): classification 1.375 ln 2 / 2, centerness ln 2 / 2, box alike.
    images = 2 if empty_image else 1
    head = ATSSHead(in_channels=32, num_classes=2, num_levels=1)
    outputs = {"cls_logits": torch.zeros(images, 2, 2), "bbox_regression": torch.zeros(images, 2, 4),
               "bbox_ctrness": torch.zeros(images, 2, 1)}
    targets = [{"boxes": torch.tensor([[0.0, 0, 10, 12]]), "labels": torch.tensor([2])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}][:images]
    anchors = [torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]])] * images
    losses = head.compute_loss(targets, outputs, anchors, [torch.tensor([0, -1]), torch.tensor([-1, -1])][:images])
    c = math.sqrt(5 / 7)
    classification, centerness = (1.375 / 2, 1 / 2) if empty_image else (0.625, 1)
    # each loss rounds in float32 about four times (the loss of an output, its weight, the sum, the division):
    # measured at most 1.5 eps
    rel = sum_roundoff(torch.float32, steps=4)
    assert losses["classification"].item() == pytest.approx(classification * math.log(2), rel=rel)
    assert losses["bbox_regression"].item() == pytest.approx(2 * c / 6, rel=rel)
    assert losses["bbox_ctrness"].item() == pytest.approx(centerness * math.log(2), rel=rel)


class Features(nn.Module):
    """A stand-in backbone for the inference test: the detector only reads its width."""
    out_channels = 32


def test_scores_are_classification_times_centerness_above_a_classification_threshold():
    # One level, three anchors of stride 8 (64 wide), one class, zero deltas (boxes = anchors, clipped).
    # Anchor 0: p 0.9, centerness 0.5: score 0.45. Anchor 1: p 0.06 (> 0.05), centerness 0.1: score 0.006, kept
    # although below 0.05 (the threshold reads the classification alone). Anchor 2: p 0.04: dropped although its
    # centerness is 0.99 (sqrt(p x c) = 0.199 would pass).
    model = ATSS(Features(), num_classes=2, anchor_strides=(8,))
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    outputs = {"cls_logits": [torch.tensor([[[logit(0.9)], [logit(0.06)], [logit(0.04)]]])],
               "bbox_regression": [torch.zeros(1, 3, 4)],
               "bbox_ctrness": [torch.tensor([[[0.0], [logit(0.1)], [logit(0.99)]]])]}
    anchors = [[torch.tensor([[-32.0, -32, 32, 32], [8, 8, 72, 72], [16, 16, 80, 80]])]]
    detections = model.postprocess_detections(outputs, anchors, [(64, 64)])[0]
    torch.testing.assert_close(detections["scores"], torch.tensor([0.45, 0.006]))
    torch.testing.assert_close(detections["boxes"], torch.tensor([[0.0, 0, 32, 32], [8, 8, 64, 64]]))
    assert detections["labels"].tolist() == [1, 1]


def test_anchors_sit_at_the_given_strides():
    # A 64x1344 padded batch: P7 has ceil(1344 / 128) = 11 columns. torchvision derives its stride as
    # 1344 // 11 = 122; mmdetection, and this generator, place them 128 apart: the last centre at 10 x 128 = 1280,
    # an anchor 8 x 128 = 1024 wide: [768, -512, 1792, 512].
    generator = LevelAnchorGenerator((128,))
    images = ImageList(torch.zeros(1, 3, 64, 1344), [(64, 1344)])
    anchors = generator(images, [torch.zeros(1, 4, 1, 11)])[0]
    assert anchors.shape == (11, 4) and anchors[-1].tolist() == [768.0, -512.0, 1792.0, 512.0]


def atss_config(*opts):
    config = detection_defaults()
    merge_opts(config, BACKBONE_OPTS + ["MODEL.DETECTOR", "atss", "MODEL.FPN_CHANNELS", 64,
                                             "MODEL.DETECTOR_ARGS.min_size", [128], "MODEL.DETECTOR_ARGS.max_size", 128,
                                             *opts])
    return config


def test_every_part_gets_gradients():
    """One training step at 128x128 (P7 1x1): each parameter of the head (towers, classifier, deltas,
    centerness, the scale of each level that holds positives), the FPN and the backbone gets a non-zero
    gradient."""
    torch.manual_seed(0)
    model = build_detector(atss_config(), num_classes=3).train()
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 128, 128, generator=generator) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[10.0, 12, 60, 50], [70, 64, 120, 126]]), "labels": torch.tensor([1, 3])},
               {"boxes": torch.tensor([[30.0, 30, 90, 100]]), "labels": torch.tensor([2])}]
    sum(model(images, targets).values()).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


@pytest.mark.parametrize("opts, message", [
    (["MODEL.DETECTOR_ARGS.center_sampling_radius", 1.5], r"MODEL.DETECTOR_ARGS.center_sampling_radius is not an "
                                                          r"argument of atss \(MODEL.DETECTOR\); it accepts: .*topk"),
    (["MODEL.DETECTOR_ARGS.top_k", 9], r"MODEL.DETECTOR_ARGS.top_k is not an argument of atss"),
    (["MODEL.DETECTOR_ARGS.topk", 0], r"MODEL.DETECTOR_ARGS of atss: topk must be at least 1, got 0"),
    (["MODEL.DETECTOR_ARGS.nms_thresh", 1.5], r"MODEL.DETECTOR_ARGS of atss: nms_thresh must be in \[0, 1\], got 1.5"),
])
def test_bad_detector_args_are_one_line_naming_the_key(opts, message):
    with pytest.raises(UsageError, match=message):
        build_detector(atss_config(*opts), num_classes=3)


@pytest.mark.parametrize("opts, message", [
    (["MODEL.FPN_CHANNELS", "48"], r"MODEL.FPN_CHANNELS must be a multiple of 32 for fcos and atss"),
    # 32 channels in 32 groups: a 1x1 P7 (images of 128 pixels) is one value per group, which GroupNorm refuses
    # with a traceback; at 160 pixels P7 is 2x2 (padded to 160, ceil(160 / 128) = 2).
    (["MODEL.FPN_CHANNELS", "32"], r"MODEL.FPN_CHANNELS must be at least 64 for atss with a min_size of 128 or less"),
    (["MODEL.FPN_CHANNELS", "32", "MODEL.DETECTOR_ARGS.min_size", "[160]", "MODEL.DETECTOR_ARGS.max_size", "160"],
     None),
])
def test_fpn_width_must_suit_the_group_norms(opts, message):
    check_rules(CFG, opts, message)


def check_rules(cfg: str, opts, message) -> None:
    """The detection config rules on ``cfg`` with ``opts``: refused with ``message``, or (None) accepted."""
    args = task_args(cfg)
    args.opts = opts
    if message is None:
        get_config(args, detection_defaults(), DETECTION_RULES)
        return
    with pytest.raises(UsageError, match=message):
        get_config(args, detection_defaults(), DETECTION_RULES)


@pytest.mark.slow
def test_atss_trains_evaluates_and_resumes(tmp_path):
    trained, _ = detector_trains_and_resumes(tmp_path, CFG, SMALL_HEAD)
    assert all(name in trained.stdout for name in ("classification", "bbox_regression", "bbox_ctrness"))
    assert re.search(r"box AP [\d.]+ \(2 images, [1-9]\d* detections\)", trained.stdout)
