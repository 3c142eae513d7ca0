"""detection/sparse_rcnn.py: the Hungarian matching and its costs, the set losses, detection without NMS, gradients
reaching every stage, refused arguments, the Focal-T parameter count, and a real run through the detection task."""
from __future__ import annotations

import math
import re

import pytest
import torch

from config import UsageError, get_config, merge_opts
from detection.config import DETECTION_RULES, detection_defaults
from detection.model import build_detector
from detection.sparse_rcnn import SetCriterion, hungarian_match, objects_per_process
from tests.helpers import BACKBONE_OPTS, REPO, detector_trains_and_resumes, task_args

# A small Sparse R-CNN: the test backbone, 16-wide FPN and stages, 64-pixel images.
SMALL = ["MODEL.DETECTOR", "sparse_rcnn", "MODEL.FPN_CHANNELS", 16, "MODEL.DETECTOR_ARGS.min_size", "[64]",
         "MODEL.DETECTOR_ARGS.max_size", 64, "MODEL.DETECTOR_ARGS.num_stages", 2,
         "MODEL.DETECTOR_ARGS.num_heads", 2, "MODEL.DETECTOR_ARGS.dynamic_channels", 4,
         "MODEL.DETECTOR_ARGS.feedforward_channels", 32]


def small_sparse_rcnn(*opts, num_classes: int = 2) -> torch.nn.Module:
    config = detection_defaults()
    merge_opts(config, [*BACKBONE_OPTS, *SMALL, *opts])
    torch.manual_seed(0)
    return build_detector(config, num_classes)


# 3 queries x 2 objects. The assignments and their totals: q0-o1 + q1-o0 = 1 + 2 = 3; q0-o1 + q2-o0 = 1 + 3 = 4;
# q2-o1 + q1-o0 = 3 + 2 = 5; q0-o0 + q2-o1 = 4 + 3 = 7; q1-o1 + q2-o0 = 8 + 3 = 11; q0-o0 + q1-o1 = 4 + 8 = 12.
# The least, 3, is unique: query 0 takes object 1, query 1 object 0, query 2 none.
COST = torch.tensor([[4.0, 1.0], [2.0, 8.0], [3.0, 3.0]])


@pytest.mark.parametrize("order", [[0, 1, 2], [2, 0, 1], [1, 2, 0]])
def test_hungarian_matching_follows_the_queries_order(order):
    """Permuting the queries permutes the matched queries with them: row i of the permuted matrix is query
    order[i], so the pairs, mapped back through ``order``, are the same two."""
    queries, objects = hungarian_match(COST[order])
    assert sorted((order[q], o) for q, o in zip(queries.tolist(), objects.tolist())) == [(0, 1), (1, 0)]


def test_matching_costs_of_a_hand_made_case():
    """One query (logits 0 and ln 3 for the two classes: p = 1/2 and 3/4; box (10, 10, 30, 30)) against two
    objects in a 100x50 image, with the weights 2 / 5 / 2 and focal alpha 1/4, gamma 2.
    Class term, 2 x (alpha (1-p)^2 (-ln p) - (1-alpha) p^2 (-ln(1-p))):
      object 0 (class 0, p = 1/2): 2 x (1/4 x 1/4 x ln 2 - 3/4 x 1/4 x ln 2) = -ln(2) / 4;
      object 1 (class 1, p = 3/4): 2 x (1/4 x 1/16 x ln(4/3) - 3/4 x 9/16 x ln 4) = ln(4/3) / 32 - 27 ln(4) / 32.
    Object 0 is (20, 10, 40, 30): L1 of the normalised boxes 10/100 + 0 + 10/100 + 0 = 0.2, x 5 = 1; intersection
    10 x 20 = 200, union 400 + 400 - 200 = 600, IoU 1/3, the enclosing box 30 x 20 = 600 = the union: GIoU 1/3,
    x -2 = -2/3. Object 1 is the query's own box: L1 0, GIoU 1, x -2 = -2."""
    logits = torch.tensor([[0.0, math.log(3)]])
    boxes = torch.tensor([[10.0, 10, 30, 30]])
    gt = torch.tensor([[20.0, 10, 40, 30], [10, 10, 30, 30]])
    cost = SetCriterion().costs(logits, boxes, torch.tensor([0, 1]), gt, torch.tensor([100.0, 50, 100, 50]))
    expected = [-math.log(2) / 4 + 1 - 2 / 3, math.log(4 / 3) / 32 - 27 * math.log(4) / 32 - 2]
    torch.testing.assert_close(cost, torch.tensor([expected]))


def test_set_losses_of_a_hand_made_case():
    """Two images of two queries, one class, all logits 0 (p = 1/2). The first image has one object (label 1),
    equal to query 0's box; query 1's box is elsewhere, so the matching takes query 0: L1 and GIoU losses 0. The
    second image has no object. The focal loss sums alpha (1-p)^2 (-ln p) = 1/4 x 1/4 x ln 2 for the matched
    query and (1-alpha) p^2 (-ln(1-p)) = 3/4 x 1/4 x ln 2 for each of the three others: 10/16 ln 2, x 2 = 5/4 ln 2,
    divided by the number of objects (1, then 2)."""
    logits = torch.zeros(2, 2, 1, requires_grad=True)
    boxes = torch.tensor([[[0.0, 0, 20, 20], [40, 40, 60, 60]], [[0, 0, 10, 10], [5, 5, 30, 30]]], requires_grad=True)
    targets = [{"boxes": torch.tensor([[0.0, 0, 20, 20]]), "labels": torch.tensor([1])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    whwh = torch.tensor([[64.0, 64, 64, 64], [64, 48, 64, 48]])
    for count in (1.0, 2.0):
        losses = SetCriterion()(logits, boxes, targets, whwh, torch.tensor(count))
        torch.testing.assert_close(losses["loss_cls"], torch.tensor(5 / 4 * math.log(2) / count))
        assert losses["loss_bbox"].item() == 0 and abs(losses["loss_giou"].item()) < 1e-6
    sum(losses.values()).backward()
    assert logits.grad.abs().sum() > 0 and boxes.grad is not None


def test_the_loss_divisor_counts_objects_and_is_at_least_one():
    """In a world of one process, the divisor is the batch's object count (2 + 3), and 1 without objects."""
    targets = [{"boxes": torch.zeros(n, 4)} for n in (2, 3)]
    assert objects_per_process(targets, torch.device("cpu")).item() == 5
    assert objects_per_process([{"boxes": torch.zeros(0, 4)}], torch.device("cpu")).item() == 1


def test_detection_keeps_the_top_100_without_nms():
    """All stages' box fcs zeroed: every proposal keeps its initial box, the whole image; class fcs zeroed with
    biases 1 and 1/2: every proposal scores sigmoid(1) for class 1 and sigmoid(1/2) for class 2. 60 proposals x 2
    classes = 120 pairs, of which the top 100 stay: the 60 of class 1, then 40 of class 2, all on the same box
    (NMS would keep one per class). The boxes are each image's own extent in its original pixels (64x48 and 48x64
    images share one padded 64x64 batch)."""
    model = small_sparse_rcnn("MODEL.DETECTOR_ARGS.num_proposals", 60).eval()
    with torch.no_grad():
        for stage in model.stages:
            stage.reg.weight.zero_(), stage.reg.bias.zero_(), stage.cls.weight.zero_()
            stage.cls.bias.copy_(torch.tensor([1.0, 0.5]))
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 48, 64, generator=generator), torch.rand(3, 64, 48, generator=generator)]
    with torch.no_grad():
        detections = model(images)
    for image, found in zip(images, detections):
        assert len(found["boxes"]) == 100
        height, width = image.shape[-2:]
        torch.testing.assert_close(found["boxes"], torch.tensor([[0.0, 0, width, height]]).expand(100, 4))
        assert found["labels"].tolist() == [1] * 60 + [2] * 40
        torch.testing.assert_close(found["scores"], torch.sigmoid(torch.tensor([1.0] * 60 + [0.5] * 40)))


def test_every_stage_and_the_proposals_get_gradients():
    """One training step's summed losses reach every parameter of every stage and the learned proposal boxes and
    features; each stage has its three losses."""
    model = small_sparse_rcnn().train()
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 64, generator=generator) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[4.0, 6, 30, 40]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[10.0, 10, 50, 30], [30, 30, 60, 60]]), "labels": torch.tensor([2, 1])}]
    losses = model(images, targets)
    assert sorted(losses) == sorted(f"{name}_{k}" for k in range(2) for name in ("loss_cls", "loss_bbox", "loss_giou"))
    sum(losses.values()).backward()
    for name, param in [*model.stages.named_parameters(), *model.proposal_boxes.named_parameters(prefix="boxes"),
                        *model.proposal_features.named_parameters(prefix="features")]:
        assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("key, value, message", [
    ("num_proposals", 0, r"MODEL.DETECTOR_ARGS.num_proposals must be an integer of at least 1 for sparse_rcnn, "
                         r"got 0"),
    ("num_heads", 3, r"MODEL.DETECTOR_ARGS.num_heads must divide MODEL.FPN_CHANNELS \(16\) for sparse_rcnn's "
                     r"attention, got 3"),
    ("box_batch_size_per_image", 64, r"MODEL.DETECTOR_ARGS.box_batch_size_per_image is not an argument of "
                                     r"sparse_rcnn \(MODEL.DETECTOR\); it accepts: .*min_size.*num_proposals.*"),
])
def test_bad_arguments_are_refused_in_one_line_naming_the_key(key, value, message):
    with pytest.raises(UsageError, match=f"^{message}$"):
        small_sparse_rcnn(f"MODEL.DETECTOR_ARGS.{key}", value)


@pytest.mark.slow
def test_focal_tiny_parameter_count_is_the_seeds():
    """The seed reports 111M parameters for Focal-T Sparse R-CNN 3x (300 proposals, 80 COCO classes)."""
    config = get_config(task_args(str(REPO / "configs/detection/sparse_rcnn_focal_tiny_patch4_window7_3x.yaml")),
                             detection_defaults(), DETECTION_RULES)
    model = build_detector(config, 80)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(111e6, rel=0.03)


@pytest.mark.slow
def test_sparse_rcnn_trains_evaluates_and_resumes(tmp_path):
    trained, _ = detector_trains_and_resumes(tmp_path, str(REPO / "configs" / "detection" / "sparse_rcnn_demo.yaml"),
                                             ["MODEL.DETECTOR_ARGS.num_proposals", "50", *SMALL])
    assert "loss_giou_1" in trained.stdout
    # 50 proposals x 3 classes: the top 100 of each of the 2 images
    assert re.search(r"box AP [\d.]+ \(2 images, 200 detections\)", trained.stdout)
