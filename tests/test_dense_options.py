"""Dense options that cannot work are refused when the run starts, in one line naming the key, before any step and
before a run folder is made: stages the detector has no anchor sizes for, detector or backbone arguments that are
misspelt or of the wrong type (a float count trained a whole epoch, then failed in evaluation), a padding multiple
of 0, and backbones that are not registered (both ended in tracebacks that left a run folder)."""
from __future__ import annotations

import pytest

from config import UsageError, get_config
from dense.run import run
from detection.config import DETECTION_RULES, detection_defaults
from detection.train import TASK as DETECTION
from segmentation.train import TASK as SEGMENTATION
from tests.helpers import REPO, task_args

DET = REPO / "configs" / "detection"
SEG = str(REPO / "configs" / "segmentation" / "demo.yaml")
LEVELS = r"MODEL.OUT_INDICES must give the detector one level per anchor size"


@pytest.mark.parametrize("task, cfg, opts, message", [
    # RetinaNet, FCOS and ATSS add P6-P7 to three stages for their five anchor sizes; the R-CNNs a pooled P6 to four
    (DETECTION, "retinanet_1x.yaml", ["MODEL.OUT_INDICES", "[0, 1, 2, 3]"], LEVELS + r".*got \[0, 1, 2, 3\]"),
    (DETECTION, "fcos_demo.yaml", ["MODEL.OUT_INDICES", "[2, 3]"], LEVELS),
    (DETECTION, "cascade_mask_rcnn_demo.yaml", ["MODEL.OUT_INDICES", "[1, 2, 3]"], LEVELS),
    (DETECTION, "atss_demo.yaml", ["MODEL.DETECTOR_ARGS.anchor_strides", "[8, 16, 32, 64]"], LEVELS + r".*got \[\]"),
    (DETECTION, "demo.yaml", ["MODEL.DETECTOR_ARGS.box_detections_per_img", "50.0"],
     r"^MODEL.DETECTOR_ARGS.box_detections_per_img must be an integer for mask_rcnn \(MODEL.DETECTOR\) \(default "
     r"100\), got 50.0$"),
    (DETECTION, "fcos_demo.yaml", ["MODEL.DETECTOR_ARGS.topk_candidates", "[500]"],
     r"^MODEL.DETECTOR_ARGS.topk_candidates must be an integer for fcos"),
    (DETECTION, "cascade_mask_rcnn_demo.yaml", ["MODEL.DETECTOR_ARGS.stage_loss_weights", "1.0"],
     r"^MODEL.DETECTOR_ARGS.stage_loss_weights must be a list for cascade_mask_rcnn"),
    (DETECTION, "retinanet_1x.yaml", ["MODEL.DETECTOR_ARGS.size_divisible", "0"],
     r"^MODEL.DETECTOR_ARGS.size_divisible must be at least 1 for retinanet \(MODEL.DETECTOR\), got 0$"),
    (DETECTION, "sparse_rcnn_demo.yaml", ["MODEL.DETECTOR_ARGS.size_divisible", "-32"],
     r"^MODEL.DETECTOR_ARGS.size_divisible must be at least 1 for sparse_rcnn"),
    (DETECTION, "atss_demo.yaml", ["MODEL.DETECTOR_ARGS.topk_candidate", "500"],
     r"^MODEL.DETECTOR_ARGS.topk_candidate is not an argument of atss \(MODEL.DETECTOR\); it accepts: "
     r".*topk_candidates"),
    (DETECTION, "demo.yaml", ["MODEL.BACKBONE_ARGS.embed_dims", "32"],
     r"^MODEL.BACKBONE_ARGS.embed_dims is not an argument of focal_tiny_patch4_window7_224 \(MODEL.BACKBONE\); it "
     r"accepts: .*embed_dim, "),
    (SEGMENTATION, SEG, ["MODEL.BACKBONE_ARGS.window", "4"], r"^MODEL.BACKBONE_ARGS.window is not an argument of"),
    (SEGMENTATION, SEG, ["MODEL.BACKBONE_ARGS.use_conv_embed", "1"],
     r"^MODEL.BACKBONE_ARGS.use_conv_embed must be True or False"),
    (SEGMENTATION, SEG, ["MODEL.BACKBONE", "focal_tiny"], r"MODEL.BACKBONE must name a timm model: the Focal "
                                                          r"Transformers of models/registry.py.*got 'focal_tiny'"),
    (DETECTION, "retinanet_1x.yaml", ["MODEL.BACKBONE", "swin_tiny_patch4_window7", "MODEL.BACKBONE_ARGS.embed_dim",
                                      "32"], r"MODEL.BACKBONE must name a timm model.*got 'swin_tiny_patch4_window7'"),
    (DETECTION, "retinanet_1x.yaml", ["MODEL.BACKBONE", "swin_tiny_patch4_window7_224",
                                      "MODEL.BACKBONE_ARGS.strict_img_sise", "False"],
     r"^MODEL.BACKBONE_ARGS do not build swin_tiny_patch4_window7_224 \(MODEL.BACKBONE\): .*'strict_img_sise'"),
], ids=["retinanet-4-stages", "fcos-2-stages", "cascade-3-stages", "atss-4-strides", "float-count",
        "list-count", "number-for-list", "size-divisible-0", "size-divisible-negative", "misspelt-detector-arg",
        "misspelt-backbone-arg", "misspelt-backbone-arg-seg", "int-for-bool", "unknown-backbone",
        "unknown-timm-name", "misspelt-timm-arg"])
def test_options_that_cannot_work_are_refused_before_the_run_folder(task, cfg, opts, message, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UsageError, match=message) as refused:
        run(task, ["--cfg", str(DET / cfg), "--data-path", str(tmp_path / "data"), "--output", str(out),
                   "--device", "cpu", "--opts", *opts])
    assert "\n" not in str(refused.value)
    assert not out.exists()


@pytest.mark.parametrize("value, kind", [("high", "a number"), ("[0.3]", "a number"), ("yes", "a number")])
def test_a_config_file_s_detector_argument_of_the_wrong_type_is_refused_before_the_run_folder(value, kind, tmp_path):
    """A config file gives any YAML type (yacs reads "0.3" as a number; YAML reads yes as True); --opts values are
    typed by yacs against the file's."""
    cfg = tmp_path / "retinanet.yaml"
    cfg.write_text(f'BASE: ["{DET / "retinanet_1x.yaml"}"]\nMODEL:\n  DETECTOR_ARGS:\n    score_thresh: {value}\n')
    with pytest.raises(UsageError, match=rf"^MODEL.DETECTOR_ARGS.score_thresh must be {kind} for retinanet "
                                         rf"\(MODEL.DETECTOR\) \(default 0.05\), got "):
        run(DETECTION, ["--cfg", str(cfg), "--data-path", str(tmp_path), "--output", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("cfg, opts", [
    ("atss_demo.yaml", ["MODEL.DETECTOR_ARGS.anchor_strides", "[16, 32, 64, 128]", "MODEL.OUT_INDICES", "[2, 3]"]),
    ("sparse_rcnn_demo.yaml", ["MODEL.OUT_INDICES", "[1, 2, 3]"]),  # no anchors: any stages
    ("demo.yaml", ["MODEL.DETECTOR_ARGS.box_score_thresh", "1", "MODEL.DETECTOR_ARGS.image_mean", "[0.5, 0.5, 0.5]",
                   "MODEL.BACKBONE_ARGS.img_size", "[256, 256]", "MODEL.DETECTOR_ARGS.size_divisible", "1"]),
    ("retinanet_1x.yaml", ["MODEL.BACKBONE", "swin_tiny_patch4_window7_224", "MODEL.BACKBONE_ARGS.strict_img_size",
                           "False"]),  # timm's own model, as get_started_for_object_detection.md shows
], ids=["atss-matching-strides", "sparse-3-stages", "int-for-float-list-for-union", "timm-swin"])
def test_options_that_work_are_accepted(cfg, opts):
    args = task_args(str(DET / cfg))
    args.opts = opts
    get_config(args, detection_defaults(), DETECTION_RULES)


def test_backbone_arguments_that_do_not_go_together_are_one_line_leaving_nothing(tmp_path):
    """Right kinds, wrong together (two depths, four head counts): the model's IndexError/AssertionError traceback
    is one line naming the key, and the refused start leaves no run folder."""
    from dense.demo import generate_segmentation
    data = generate_segmentation(str(tmp_path / "data"), size=64, train=4, val=1)
    out = tmp_path / "out"
    with pytest.raises(UsageError, match=r"^the model cannot be built from MODEL.BACKBONE focal_tiny_patch4_window7_"
                                         r"224 with MODEL.BACKBONE_ARGS \{.*'depths': \[1, 1\].*\} and "
                                         r"MODEL.OUT_INDICES \[\]: "):
        run(SEGMENTATION, ["--cfg", SEG, "--data-path", data, "--output", str(out), "--device", "cpu", "--opts",
                           "MODEL.BACKBONE_ARGS.depths", "[1, 1]", "DATA.NUM_WORKERS", "0", "DATA.NUM_CLASSES", "4"])
    assert not out.exists()
