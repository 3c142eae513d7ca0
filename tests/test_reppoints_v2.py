"""detection/reppoints_v2.py: corner pooling against a loop, the conversions of points to boxes, the three assigners
(initial points, refined points, corners) and the foreground targets on hand-made cases (arithmetic in the
comments), the corner losses, the test-time corner snapping, gradients reaching every branch, refusals of bad
arguments and configs, and a real run (training, evaluation, resume) through the detection task."""
from __future__ import annotations

import math
import re

import pytest
import torch

from config import UsageError
from detection.atss import atss_assign
from detection.model import build_detector
from detection.reppoints_v2 import (balanced_focal_loss, corner_targets, foreground_targets, gaussian_focal_loss,
                                    gaussian_radius, level_points, point_assign, points_to_boxes, running_max,
                                    snap_to_corners, to_points)
from tests.helpers import REPO, detector_trains_and_resumes
from tests.test_atss import SMALL_HEAD, atss_config, check_rules

CFG = str(REPO / "configs" / "detection" / "reppoints_v2_demo.yaml")


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("reverse", [True, False])
def test_running_max_is_corner_pooling(dim, reverse):
    """Top (left) pooling: each position the maximum of itself and all below it (to its right); bottom (right)
    pooling: of itself and all above it (to its left). Against a loop over positions."""
    x = torch.randn(2, 3, 5, 6, generator=torch.Generator().manual_seed(0))
    expected = torch.empty_like(x)
    for i in range(x.shape[dim]):
        span = slice(i, None) if reverse else slice(0, i + 1)
        expected.select(dim, i).copy_(x[(slice(None),) * dim + (span,)].amax(dim))
    torch.testing.assert_close(running_max(x, dim, reverse), expected, rtol=0, atol=0)


def test_running_max_on_a_row():
    # [1, 3, 2]: towards the end (left pooling) [max(1, 3, 2), max(3, 2), 2] = [3, 3, 2]; towards the start
    # (right pooling) [1, max(1, 3), max(1, 3, 2)] = [1, 3, 3].
    row = torch.tensor([[[[1.0, 3, 2]]]])
    assert running_max(row, 3, True).flatten().tolist() == [3, 3, 2]
    assert running_max(row, 3, False).flatten().tolist() == [1, 3, 3]


def test_outputs_become_points_and_boxes():
    # One level of 1x2 locations at stride 8 (centres (0, 0) and (8, 0)), two points, channels (dy0, dx0, dy1, dx1)
    # in strides. Location 0: (1, 2, -1, 0.5) -> points (2 x 8, 1 x 8) = (16, 8) and (0.5 x 8, -8) = (4, -8).
    # Location 1: (0, 0, 1, 1) -> (8 + 0, 0) = (8, 0) and (8 + 8, 8) = (16, 8).
    points, levels = level_points([(1, 2)], [8], torch.device("cpu"))
    assert points.tolist() == [[0, 0], [8, 0]] and levels.tolist() == [3, 3]
    out = torch.tensor([[1.0, 0], [2, 0], [-1, 1], [0.5, 1]]).reshape(1, 4, 1, 2)
    xy = to_points([out], [8], points)
    assert xy.tolist() == [[[[16, 8], [4, -8]], [[8, 0], [16, 8]]]]
    # exact_minmax: the box of the first two points, their per-axis extremes: [4, -8, 16, 8] and [8, 0, 16, 8].
    assert points_to_boxes(xy).tolist() == [[[4, -8, 16, 8], [8, 0, 16, 8]]]
    # minmax over all points; a third point (30, -20) widens it only there: [0, -20, 30, 10] from (0, 10), (10, 5).
    three = torch.tensor([[0.0, 10], [10, 5], [30, -20]])
    assert points_to_boxes(three, "minmax").tolist() == [0, -20, 30, 10]
    assert points_to_boxes(three).tolist() == [0, 5, 10, 10]


# Points: three on level 3 (stride 8) and two on level 4 (stride 16).
POINTS = torch.tensor([[8.0, 8], [16, 8], [8, 16], [32, 32], [64, 64]])
LEVELS = torch.tensor([3, 3, 3, 4, 4])


@pytest.mark.parametrize("boxes, pos_num, expected", [
    # A = [0, 0, 16, 16]: level trunc((log2(16 / 4) + log2(16 / 4)) / 2) = 2, clamped to 3. Centre (8, 8), in box
    # units: point 0 at 0, points 1 and 2 at 8 / 16 = 0.5: point 0.
    ([[0.0, 0, 16, 16]], 1, [0, -1, -1, -1, -1]),
    # B = [0, 0, 64, 128]: (log2 16 + log2 32) / 2 = 4.5 -> level 4. Centre (32, 64): point 3 at |(0, -32 / 128)|
    # = 0.25, point 4 at |(32 / 64, 0)| = 0.5: point 3; both with two positives each.
    ([[0.0, 0, 64, 128]], 1, [-1, -1, -1, 0, -1]),
    ([[0.0, 0, 64, 128]], 2, [-1, -1, -1, 0, 0]),
    # A and C = [6, 2, 14, 18] (8x16: (1 + 2) / 2 -> 1, clamped to 3; centre (10, 10)): C's nearest is point 0 too,
    # at |(-2 / 8, -2 / 16)| = 0.2795, but A's distance 0 is smaller: point 0 learns A and C has no point.
    ([[0.0, 0, 16, 16], [6, 2, 14, 18]], 1, [0, -1, -1, -1, -1]),
    ([], 1, [-1] * 5),
])
def test_point_assigner(boxes, pos_num, expected):
    boxes = torch.tensor(boxes).reshape(-1, 4)
    assert point_assign(POINTS, LEVELS, boxes, scale=4, pos_num=pos_num).tolist() == expected


def test_refined_points_are_assigned_by_atss_on_the_initial_boxes():
    # The refined set's targets come from the initial boxes (detection.atss.atss_assign), not from the locations.
    # Three locations on one level whose initial points (exact_minmax) span [10, 10, 30, 30], [0, 0, 12, 12] and
    # [50, 50, 60, 60]; the box [10, 10, 30, 30]. IoUs 1, 4 / 540 = 0.0074, 0: mean 0.3358, unbiased std
    # sqrt((0.6642^2 + 0.3284^2 + 0.3358^2) / 2) = 0.5752, threshold 0.9110: the first, whose centre (20, 20) lies
    # inside. Its location (0, 0) is outside the box: a location-based rule would not pick it.
    initial = torch.tensor([[[10.0, 10], [30, 30]], [[0, 0], [12, 12]], [[50, 50], [60, 60]]])
    boxes = points_to_boxes(initial)
    assert atss_assign(boxes, torch.tensor([[10.0, 10, 30, 30]]), [3], topk=3).tolist() == [0, -1, -1]


def test_gaussian_radius():
    # CornerNet's three cases for a 16x16 box at IoU 0.7 (total 32, area 256):
    # both corners inward/outward: (32 - sqrt(32^2 - 4 x 256 x 0.3 / 1.7)) / 2 = 1.4802;
    # one corner: (64 - sqrt(64^2 - 16 x 0.3 x 256)) / 8 = (64 - sqrt(2867.2)) / 8 = 1.3067;
    # grown box: (-44.8 + sqrt(4 x 0.49 x 1024 + 16 x 0.7 x 0.3 x 256)) / 5.6 = (-44.8 + sqrt(2867.2)) / 5.6 = 1.5618.
    # The smallest, 1.3067; the radius grows with the box's side (160x160: 13.067).
    r = gaussian_radius(torch.tensor([16.0, 160]), torch.tensor([16.0, 160]), 0.7)
    expected = (64 - math.sqrt(2867.2)) / 8
    torch.testing.assert_close(r, torch.tensor([expected, 10 * expected]))


def test_corner_targets():
    # Level 3: a 4x4 grid of points 8 apart from (0, 0); level 4: (0, 0) and (16, 0). The box [2, 3, 162, 163]:
    # radius 13.067 (test above), sigma (2 r + 1) / 6 = 4.5223.
    # Top-left corner (2, 3): nearest on level 3 is (0, 0) (distance sqrt 13 = 3.606): heat 1, offset (2, 3) / 8.
    # Within the radius: (8, 0) at sqrt(45), (0, 8) at sqrt(29), (8, 8) at sqrt(61): exp(-d^2 / (2 sigma^2));
    # (16, 0) at sqrt(205) = 14.32 and (0, 16) at sqrt(173) = 13.15 lie outside: 0.
    # On level 4 (0, 0) is nearest too: heat 1, offset (2, 3) / 16.
    # Bottom-right corner (162, 163): nearest on level 3 is (24, 24), far outside: heat 1 anyway, offset
    # (138, 139) / 8 = (17.25, 17.375); on level 4, (16, 0): offset (146, 163) / 16.
    grid = torch.stack(torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1).flip(-1)
    points = torch.cat([grid.reshape(-1, 2) * 8, torch.tensor([[0.0, 0], [16, 0]])])
    levels = torch.tensor([3] * 16 + [4] * 2)
    heat, offsets = corner_targets(points, levels, torch.tensor([[2.0, 3, 162, 163]]), 0.7)
    sigma = (2 * 10 * (64 - math.sqrt(2867.2)) / 8 + 1) / 6
    bump = lambda d2: math.exp(-d2 / (2 * sigma ** 2))  # noqa: E731
    expected_tl = torch.zeros(18)
    expected_tl[[0, 16]] = 1
    expected_tl[1], expected_tl[4], expected_tl[5] = bump(45), bump(29), bump(61)
    torch.testing.assert_close(heat[:, 0], expected_tl)
    expected_br = torch.zeros(18)
    expected_br[[15, 17]] = 1
    torch.testing.assert_close(heat[:, 1], expected_br)
    torch.testing.assert_close(offsets[0, :2], torch.tensor([2 / 8, 3 / 8]))
    torch.testing.assert_close(offsets[16, :2], torch.tensor([2 / 16, 3 / 16]))
    torch.testing.assert_close(offsets[15, 2:], torch.tensor([17.25, 17.375]))
    torch.testing.assert_close(offsets[17, 2:], torch.tensor([146 / 16, 163 / 16]))
    assert offsets.count_nonzero() == 8  # only the four peaks carry offsets


def test_foreground_targets():
    # A 4x4 map of stride 8, two classes. Box 0 [0, 0, 20, 12] (class 0, area 240): cells x 0..20 // 8 = 2, y 0..1.
    # Box 1 [8, 8, 15, 15] (class 0, area 49): cell (1, 1), written after the larger box: weight 1 / 49 there.
    # Box 2 [16, 16, 31, 31] (class 1, area 225): cells x, y 2..3 of channel 1.
    boxes = torch.tensor([[0.0, 0, 20, 12], [8, 8, 15, 15], [16, 16, 31, 31]])
    target, weight = foreground_targets(boxes, torch.tensor([0, 0, 1]), (4, 4), 8, 2)
    expected = torch.zeros(2, 4, 4)
    expected[0, :2, :3] = 1
    expected[1, 2:, 2:] = 1
    assert torch.equal(target, expected)
    expected_weight = expected.clone()
    expected_weight[0] /= 240
    expected_weight[0, 1, 1] = 1 / 49
    expected_weight[1] /= 225
    torch.testing.assert_close(weight, expected_weight)


def test_corner_and_foreground_losses():
    # Every logit 0 (p = 0.5). Heatmap targets 1, 0.5, 0: -(1 - p)^2 ln p = 0.25 ln 2; (1 - 0.5)^4 p^2 ln 2 =
    # ln 2 / 64; p^2 ln 2 = 0.25 ln 2: 0.515625 ln 2 in all.
    assert gaussian_focal_loss(torch.zeros(3), torch.tensor([1.0, 0.5, 0])).item() == pytest.approx(
        0.515625 * math.log(2))
    # Foreground: positives of weights 1/4 and 1/12, each 0.25 x 0.25 ln 2 (alpha (1 - p)^2 ln 2), averaged with
    # their weights: 0.0625 ln 2; the negative 0.75 x 0.25 ln 2 over 2 positives: 0.09375 ln 2.
    loss = balanced_focal_loss(torch.zeros(3), torch.tensor([1.0, 1, 0]), torch.tensor([1 / 4, 1 / 12, 0]))
    assert loss.item() == pytest.approx(0.15625 * math.log(2))


def test_boxes_snap_to_the_corner_peaks():
    # One 3x3 level of stride 8 (pooled 2x2 windows: 2x2 cells). Top-left heat peaks at (row 1, col 1) with offset
    # (0.5, -0.25); bottom-right at (2, 2) with offset (0.25, 1).
    # Box [9, 10, 17, 20]: top-left (9, 10) / 8 = (1.125, 1.25), cell (1, 1): its window rows/cols 1-2 peaks at
    # (1, 1): x1 = (1 + 0.5) x 8 = 12, y1 = (1 - 0.25) x 8 = 6. Bottom-right (17, 20) / 8 = (2.125, 2.5), clamped
    # to the last window (1, 1): peak (2, 2): x2 = (2 + 0.25) x 8 = 18, y2 = (2 + 1) x 8 = 24, clamped to the
    # image's height 20.
    corners = torch.zeros(6, 3, 3)
    corners[[0, 3]] = -5.0
    corners[0, 1, 1], corners[1, 1, 1], corners[2, 1, 1] = 5.0, 0.5, -0.25
    corners[3, 2, 2], corners[4, 2, 2], corners[5, 2, 2] = 5.0, 0.25, 1.0
    snapped = snap_to_corners(torch.tensor([[9.0, 10, 17, 20]]), corners, 8, (20, 30))
    assert snapped.tolist() == [[12.0, 6.0, 18.0, 20.0]]


def reppoints_config(*opts):
    return atss_config("MODEL.DETECTOR", "reppoints_v2", *opts)


def test_every_branch_gets_gradients():
    """One training step at 128x128: every parameter (classification, initial and refined points, corner pools
    and their heat/offset outputs, foreground map and embedding, FPN, backbone) gets a non-zero gradient."""
    torch.manual_seed(0)
    model = build_detector(reppoints_config(), num_classes=3).train()
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 128, 128, generator=generator) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[10.0, 12, 60, 50], [70, 64, 120, 126]]), "labels": torch.tensor([1, 3])},
               {"boxes": torch.tensor([[30.0, 30, 90, 100]]), "labels": torch.tensor([2])}]
    losses = model(images, targets)
    assert set(losses) == {"classification", "points_init", "points_refine", "corner_heatmap", "corner_offset",
                           "foreground"}
    sum(losses.values()).backward()
    branches = {"cls_tower", "points_tower", "shared_tower", "foreground", "foreground_embedding", "corner_pools",
                "corner_outputs", "points_init", "cls_deform", "cls_logits", "refine_deform", "points_refine"}
    assert {name.split(".")[0] for name, _ in model.head.named_parameters()} == branches
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


@pytest.mark.parametrize("opts, message", [
    (["MODEL.DETECTOR_ARGS.anchor_strides", [8, 16, 32, 64, 128]],
     r"MODEL.DETECTOR_ARGS.anchor_strides is not an argument of reppoints_v2 \(MODEL.DETECTOR\); it accepts: .*"
     r"point_strides"),
    (["MODEL.DETECTOR_ARGS.num_points", 8], r"MODEL.DETECTOR_ARGS of reppoints_v2: num_points must be the square of "
                                            r"an odd number, got 8"),
    (["MODEL.DETECTOR_ARGS.box_method", "moment"], r"MODEL.DETECTOR_ARGS of reppoints_v2: box_method must be one of"),
    (["MODEL.DETECTOR_ARGS.point_strides", [8, 16, 24, 64, 128]], r"point_strides must be powers of 2"),
    (["MODEL.DETECTOR_ARGS.gaussian_iou", 1.0], r"gaussian_iou must be in \(0, 1\), got 1.0"),
])
def test_bad_detector_args_are_one_line_naming_the_key(opts, message):
    with pytest.raises(UsageError, match=message):
        build_detector(reppoints_config(*opts), num_classes=3)


@pytest.mark.slow
def test_reppoints_v2_trains_evaluates_and_resumes(tmp_path):
    trained, _ = detector_trains_and_resumes(tmp_path, CFG, SMALL_HEAD)
    assert all(name in trained.stdout for name in ("points_init", "points_refine", "corner_heatmap", "foreground"))
    assert re.search(r"box AP [\d.]+ \(2 images, [1-9]\d* detections\)", trained.stdout)


@pytest.mark.parametrize("opts, message", [
    (["MODEL.FPN_CHANNELS", "48"], r"MODEL.FPN_CHANNELS must be a multiple of 32 for .*reppoints_v2"),
    # 32 channels in 32 groups: P7 of a 128-pixel image is 1x1, one value per group, which GroupNorm refuses in
    # the first step; at 160 pixels P7 is 2x2.
    (["MODEL.FPN_CHANNELS", "32"], r"MODEL.FPN_CHANNELS must be at least 64 for atss .*\(reppoints_v2 likewise\)"),
    (["MODEL.FPN_CHANNELS", "32", "MODEL.DETECTOR_ARGS.min_size", "[160]", "MODEL.DETECTOR_ARGS.max_size", "160"],
     None),
    (["MODEL.OUT_INDICES", "[2, 3]"], r"MODEL.OUT_INDICES must give the detector one level per anchor size"),
    (["MODEL.OUT_INDICES", "[2, 3]", "MODEL.DETECTOR_ARGS.point_strides", "[16, 32, 64, 128]"], None),
])
def test_config_rules(opts, message):
    check_rules(CFG, opts, message)
