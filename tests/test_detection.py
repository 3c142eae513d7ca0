"""detection/: COCO AP of hand-made prediction sets, the official-layout checkpoint in the backbone, bad
annotations as one-line errors, and a real Mask R-CNN run (training steps, checkpoint) whose evaluation is the
same under torchrun with two processes."""
from __future__ import annotations

import json
import logging
import re

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
import torch.nn as nn
from PIL import Image

from config import UsageError, get_config, merge_opts
from dense.demo import generate_detection
from dense.run import run
from detection.config import DETECTION_RULES, DETECTORS, detection_defaults
from detection.data import CocoDetection, build_data, load_coco, rle_runs
from detection.evaluate import coco_ap, evaluate
from detection.model import backbone, build_detector
from detection.train import TASK
from engine import DistEnv, build_precision
from lr_scheduler import scale_rates
from models import extract_state_dict
from tests.helpers import (BACKBONE_OPTS, CHECKPOINT, LOG, REPO, assert_intact, check, finished_dense_run, load,
                           private_copy, run_task, task_args, this_run)
from utils import CHECKSUM_KEY, content_digest, load_backbone

CFG = str(REPO / "configs" / "detection" / "demo.yaml")
TINY = ["DATA.BATCH_SIZE", "2", "DATA.NUM_WORKERS", "0", "MODEL.FPN_CHANNELS", "16", "MODEL.BOX_HEAD_DIM", "32",
        "MODEL.MASK_HEAD_CHANNELS", "8", "MODEL.DETECTOR_ARGS.min_size", "[64]", "MODEL.DETECTOR_ARGS.max_size", "64",
        "MODEL.DETECTOR_ARGS.box_score_thresh", "0.0", "TRAIN.EPOCHS", "1", "TRAIN.WARMUP_ITERS", "0",
        "PRINT_FREQ", "1", "EVAL_FREQ", "1", *BACKBONE_OPTS]
# Two rectangles in one 64x64 image, of categories 1 and 4 (ids with a gap, as COCO's).
OBJECTS = [(1, [10, 10, 20, 25]), (4, [36, 30, 20, 20])]


def write_coco(root, split="val2017", objects=OBJECTS, size=64):
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    Image.new("RGB", (size, size), (90, 90, 90)).save(root / split / "a.jpg")
    annotations = [{"id": i + 1, "image_id": 1, "category_id": cat, "bbox": box, "area": box[2] * box[3],
                    "iscrowd": 0, "segmentation": [[box[0], box[1], box[0] + box[2], box[1], box[0] + box[2],
                                                    box[1] + box[3], box[0], box[1] + box[3]]]}
                   for i, (cat, box) in enumerate(objects)]
    content = {"images": [{"id": 1, "file_name": "a.jpg", "width": size, "height": size}],
               "annotations": annotations, "categories": [{"id": 1, "name": "one"}, {"id": 4, "name": "four"}]}
    path = root / "annotations" / f"instances_{split}.json"
    path.write_text(json.dumps(content))
    return path


def rle(mask: np.ndarray) -> dict:
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    encoded["counts"] = encoded["counts"].decode("ascii")
    return encoded


def test_ap_of_known_prediction_sets(tmp_path):
    coco = load_coco(str(write_coco(tmp_path)))
    gt_masks = [coco.annToMask(coco.anns[i]) for i in (1, 2)]
    rows = np.flatnonzero(gt_masks[0].any(1))
    assert len(rows) == 25  # the first object's mask is 25 pixels high, as its box

    def result(cat, box, mask, score):
        return {"image_id": 1, "category_id": cat, "bbox": box, "score": score, "segmentation": rle(mask)}

    perfect = [result(cat, box, m, 0.9) for (cat, box), m in zip(OBJECTS, gt_masks)]
    assert coco_ap(coco, perfect, ("bbox", "segm"), LOG) == pytest.approx({"bbox": 100.0, "segm": 100.0})
    # The first object cut to its top 18 of 25 rows: IoU 18/25 = 0.72 for box and mask, a match at the five IoU
    # thresholds 0.50-0.70 and a miss at 0.75-0.95: AP 50 for category 1, 100 for category 4, 75 in the mean.
    cut = gt_masks[0].copy()
    cut[rows[18]:] = 0
    partial = [result(1, [10, 10, 20, 18], cut, 0.9), perfect[1]]
    ap = coco_ap(coco, partial, ("bbox", "segm"), LOG)
    assert ap["bbox"] == pytest.approx(75.0) and ap["segm"] == pytest.approx(75.0)
    # The second object found with the wrong category, scored below the true first one: category 1 keeps AP 100
    # (its false positive ranks after its only true one), category 4 finds nothing: 50 in the mean.
    wrong = [perfect[0], result(1, *OBJECTS[1][1:], gt_masks[1], 0.8)]
    ap = coco_ap(coco, wrong, ("bbox", "segm"), LOG)
    assert ap["bbox"] == pytest.approx(50.0) and ap["segm"] == pytest.approx(50.0)
    assert coco_ap(coco, [], ("bbox",), LOG) == {"bbox": 0.0}


class Oracle(nn.Module):
    """Returns the two ground-truth objects (labels 1 and 2 for category ids 1 and 4) as Mask R-CNN would."""

    def forward(self, images):
        masks = torch.zeros(2, 1, 64, 64)
        masks[0, 0, 10:35, 10:30] = 1
        masks[1, 0, 30:50, 36:56] = 1
        return [{"boxes": torch.tensor([[10.0, 10, 30, 35], [36, 30, 56, 50]]), "labels": torch.tensor([1, 2]),
                 "scores": torch.tensor([0.9, 0.8]), "masks": masks} for _ in images]


def test_evaluate_logs_box_and_mask_ap(tmp_path, caplog):
    write_coco(tmp_path)
    config = detection_defaults()
    merge_opts(config, ["DATA.NUM_WORKERS", 0])
    dataset = CocoDetection(str(tmp_path), "val2017", masks=True, train=False)
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    with caplog.at_level(logging.INFO, logger=LOG.name):
        score = evaluate(config, Oracle(), dataset, env, build_precision("none", env.device), LOG)
        assert score == pytest.approx(100.0)
    assert "box AP 100.0 mask AP 100.0 (1 images, 2 detections)" in caplog.text


@pytest.mark.parametrize("change, message", [
    (dict(category_id=3), "has category id 3, which is not in 'categories'"),
    (dict(bbox=[50, 50, 20, 20]), r"has bbox \[50, 50, 20, 20\] outside its 64x64 image"),
    (dict(image_id=7), "refers to image id 7"),
    (dict(segmentation={"size": [32, 32], "counts": "abc"}), "has a mask of size"),
    (dict(segmentation=[[1, 2, 3]]), "malformed polygon"),
    # Runs that do not cover the image: pycocotools decodes them into uninitialised memory (random masks).
    (dict(segmentation={"size": [64, 64], "counts": [10, 20]}), r"has an RLE mask whose runs cover 30 pixels"),
    (dict(segmentation={"size": [64, 64], "counts": "zzzzzzzzzz"}), r"has an RLE mask whose runs cover"),
])
def test_bad_annotations_are_one_line_errors(tmp_path, change, message):
    """Each problem stops the set with one line naming the file and the annotation. An RLE mask whose runs do not
    add up to its image was decoded into uninitialised memory: a random mask trained on, silently."""
    path = write_coco(tmp_path)
    content = json.loads(path.read_text())
    content["annotations"][0].update(change)
    path.write_text(json.dumps(content))
    with pytest.raises(UsageError, match=f"instances_val2017.json: annotation 1 .*{message}"):
        CocoDetection(str(tmp_path), "val2017", masks=True, train=False)


def test_compressed_rle_runs_are_read_as_pycocotools_writes_them():
    """The run lengths the RLE check adds up, from COCO's compressed string, are the ones pycocotools encoded."""
    rng = np.random.RandomState(0)
    for _ in range(20):
        mask = (rng.rand(37, 23) < rng.rand()).astype(np.uint8)
        flat, runs, value, run = mask.flatten(order="F"), [], 0, 0
        for pixel in flat:
            if pixel != value:
                runs.append(run)
                value, run = pixel, 0
            run += 1
        runs.append(run)
        assert rle_runs(rle(mask)) == runs


def evaluate_oracle(root) -> float:
    """The box AP of :class:`Oracle` (the two objects exactly) on ``root``'s validation file, as a run scores it."""
    config = detection_defaults()
    merge_opts(config, ["DATA.NUM_WORKERS", 0])
    dataset = CocoDetection(str(root), "val2017", masks=True, train=False)
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    return evaluate(config, Oracle(), dataset, env, build_precision("none", env.device), LOG)


@pytest.mark.parametrize("ids", [[0, 1], [7, 7]])
def test_annotation_ids_from_zero_or_repeated_do_not_change_the_score(tmp_path, ids):
    """COCOeval takes a matched ground-truth id of 0 for "no match" and looks annotations up by id, so a file
    numbered from 0 (as several exporters write) or with an id used twice scored exact detections at AP 50,
    silently. Any ids must give the exact detections AP 100."""
    path = write_coco(tmp_path)
    content = json.loads(path.read_text())
    for ann, ann_id in zip(content["annotations"], ids):
        ann["id"] = ann_id
    path.write_text(json.dumps(content))
    assert evaluate_oracle(tmp_path) == pytest.approx(100.0)


def test_annotations_without_iscrowd_and_area_are_scored(tmp_path):
    """Files written by converters often leave out ``iscrowd`` and ``area``, which training does without but
    COCOeval indexes: the run trained a whole epoch, then stopped with a KeyError traceback in the evaluation.
    They default to COCO's meaning: not a crowd, the area of the mask."""
    path = write_coco(tmp_path)
    content = json.loads(path.read_text())
    for ann in content["annotations"]:
        del ann["iscrowd"], ann["area"]
    path.write_text(json.dumps(content))
    assert evaluate_oracle(tmp_path) == pytest.approx(100.0)
    dataset = CocoDetection(str(tmp_path), "val2017", masks=True, train=False)
    assert [a["area"] for a in dataset.coco.dataset["annotations"]] == [20 * 25, 20 * 20]


@pytest.mark.parametrize("problem, message", [
    ("missing", r"cannot read image .*a.jpg"),
    ("size", r"image .*a.jpg is 64x64 but .*instances_val2017.json says 80x64"),
    ("duplicate", r"instances_val2017.json: image id 1 is listed twice"),
    ("no size", r"instances_val2017.json: image id 1 \(a.jpg\) has width None"),
    ("no file name", r"instances_val2017.json: image id 1 has file_name None"),
])
def test_image_problems_stop_the_run_before_training(tmp_path, problem, message):
    """A validation image missing on disk, or of another size than its entry, was found only when the first
    evaluation read it: after a whole epoch of training, and before that epoch's checkpoint was saved. A repeated
    image id gave one image the other's boxes, silently; an entry without its size or file name was a KeyError
    traceback.
    All are found when the set is opened."""
    path = write_coco(tmp_path)
    content = json.loads(path.read_text())
    if problem == "missing":
        (tmp_path / "val2017" / "a.jpg").unlink()
    elif problem == "size":
        content["images"][0]["width"] = 80
    elif problem == "duplicate":
        content["images"].append(dict(content["images"][0], file_name="b.jpg"))
    elif problem == "no size":
        del content["images"][0]["width"]
    else:
        del content["images"][0]["file_name"]
    path.write_text(json.dumps(content))
    with pytest.raises(UsageError, match=message):
        CocoDetection(str(tmp_path), "val2017", masks=True, train=False)


def test_a_validation_file_without_objects_is_refused(tmp_path):
    """A validation file without annotations (an image-info file such as COCO's test-dev, or only crowd regions)
    gives COCOeval nothing to score, which it reports as -1: the run logged "box AP 0.0" at every evaluation and
    kept training, silently. It is refused when the set is opened."""
    path = write_coco(tmp_path)
    content = json.loads(path.read_text())
    content["annotations"] = [dict(ann, iscrowd=1) for ann in content["annotations"][:1]]
    path.write_text(json.dumps(content))
    with pytest.raises(UsageError, match=r"instances_val2017.json has no annotations to score detections against"):
        CocoDetection(str(tmp_path), "val2017", masks=False, train=False)

@pytest.mark.parametrize("kind", ["16-bit", "float"])
def test_wide_images_are_read_as_classification_reads_them_or_refused(tmp_path, kind):
    """RGB conversion clips every value above 255: a 16-bit grey PNG trained as an almost white picture,
    silently. It is scaled to 8 bits as the classification loader does; a float image, whose range is unknown, is
    refused, naming the file, when the set is opened."""
    path = write_coco(tmp_path)
    name = {"16-bit": "a.png", "float": "a.tif"}[kind]
    values = np.full((64, 64), 4000, dtype=np.uint16) if kind == "16-bit" else np.full((64, 64), 0.5, np.float32)
    Image.fromarray(values).save(tmp_path / "val2017" / name)
    content = json.loads(path.read_text())
    content["images"][0]["file_name"] = name
    path.write_text(json.dumps(content))
    if kind == "float":
        with pytest.raises(UsageError, match=r"image .*a.tif holds floating-point values \(mode F\)"):
            CocoDetection(str(tmp_path), "val2017", masks=True, train=False)
        return
    image, _ = CocoDetection(str(tmp_path), "val2017", masks=True, train=False)[0]
    torch.testing.assert_close(image, torch.full((3, 64, 64), round(4000 / 257) / 255))


def test_an_image_over_pils_size_limit_is_a_one_line_error(tmp_path, monkeypatch):
    """PIL refuses an image of more than twice ``Image.MAX_IMAGE_PIXELS`` (a decompression-bomb guard) with an
    error that is not an OSError: the run stopped with its traceback. It is one line naming the file, as in
    segmentation."""
    write_coco(tmp_path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 // 3)
    with pytest.raises(UsageError, match=r"cannot read image .*a.jpg: Image size \(4096 pixels\) exceeds limit"):
        CocoDetection(str(tmp_path), "val2017", masks=True, train=False)


def test_an_image_too_elongated_for_the_resize_is_refused(tmp_path):
    """torchvision scales each image to MODEL.DETECTOR_ARGS.min_size unless its long side would pass max_size;
    an image more elongated than that (1000x5 at min_size 64, max_size 64: 0.32 pixels tall) became 0 pixels
    and the run stopped in the middle of an epoch or an evaluation with a RuntimeError traceback. It is refused
    with one line when the run starts."""
    for split in ("train2017", "val2017"):
        path = write_coco(tmp_path, split)
    Image.new("RGB", (1000, 5)).save(tmp_path / "val2017" / "b.jpg")
    content = json.loads(path.read_text())
    content["images"].append({"id": 2, "file_name": "b.jpg", "width": 1000, "height": 5})
    path.write_text(json.dumps(content))
    config = detection_defaults()
    merge_opts(config, ["DATA.DATA_PATH", str(tmp_path), "MODEL.DETECTOR_ARGS.min_size", [64],
                             "MODEL.DETECTOR_ARGS.max_size", 64])
    with pytest.raises(UsageError, match=r"image .*b.jpg is 1000x5: MODEL.DETECTOR_ARGS min_size 64 and max_size "
                                         r"64 would scale it to 0 pixels"):
        build_data(config, None, LOG)
    merge_opts(config, ["MODEL.DETECTOR_ARGS.max_size", 256])
    build_data(config, None, LOG)


@pytest.mark.parametrize("change, message", [
    ("renamed", r"category id 4 is 'four' in .*instances_train2017.json and 'other' in .*instances_val2017.json"),
    ("re-id'ed", r"instances_val2017.json has category ids \[1, 3\], .*instances_train2017.json has \[1, 4\]")])
def test_validation_categories_other_than_the_training_ones_are_refused(tmp_path, change, message):
    """Labels are positions in the sorted category ids, and the score matches them to the validation file's: a
    validation file whose ids agree but whose names differ scored one category's detections against another's,
    silently."""
    write_coco(tmp_path, "train2017")
    path = write_coco(tmp_path, "val2017")
    content = json.loads(path.read_text())
    if change == "renamed":
        content["categories"][1]["name"] = "other"
    else:
        content["categories"][1]["id"] = 3
        for ann in content["annotations"]:
            ann["category_id"] = 3 if ann["category_id"] == 4 else ann["category_id"]
    path.write_text(json.dumps(content))
    config = detection_defaults()
    merge_opts(config, ["DATA.DATA_PATH", str(tmp_path)])
    with pytest.raises(UsageError, match=message):
        build_data(config, None, LOG)


@pytest.mark.parametrize("detector", DETECTORS)
def test_official_checkpoint_loads_into_the_backbone(detector):
    config = detection_defaults()
    merge_opts(config, BACKBONE_OPTS + ["MODEL.DETECTOR", detector, "MODEL.FPN_CHANNELS", 32])
    model = build_detector(config, num_classes=3)
    load_backbone(CHECKPOINT, backbone(model), LOG)
    weights = extract_state_dict(torch.load(CHECKPOINT, map_location="cpu", weights_only=True))
    for name, value in backbone(model).network.state_dict().items():
        torch.testing.assert_close(value, weights[name], rtol=0, atol=0)


def summary(log: str) -> list:
    return re.findall(r"Average (?:Precision|Recall).*|box AP [\d.]+ mask AP [\d.]+ \(\d+ images, \d+ detections\)",
                      log)


@pytest.mark.slow
def test_training_and_one_vs_two_process_evaluation(tmp_path):
    data = generate_detection(str(tmp_path / "data"), size=64, train=4, val=3)
    common = ["--cfg", CFG, "--data-path", data, "--output", str(tmp_path / "out")]
    trained = check(run_task("detection.train", [*common, "--pretrained", CHECKPOINT, "--opts", *TINY]))
    assert "pretrained backbone from" in trained.stdout
    assert "Train: [0/1][1/2]" in trained.stdout and "loss_mask" in trained.stdout
    checkpoint = tmp_path / "out" / "mask_rcnn_focal_demo" / "default" / "ckpt_epoch_0.pth"
    two = check(run_task("detection.train", [*common, "--eval", "--resume", str(checkpoint), "--tag", "two",
                                             "--opts", *TINY], nproc=2))
    assert summary(two.stdout) == summary(trained.stdout) and len(summary(two.stdout)) == 25
    assert not re.search(r"\(3 images, 0 detections\)", two.stdout)
    # the progress names both counts where the result counts every process's images; --eval logs no training facts
    tests = [line for line in two.stdout.splitlines() if "Test: [" in line]
    assert tests[-1].endswith("; 2 of this process's 2 images, 3 on all 2 processes"), tests
    assert "learning rate" not in two.stdout


@pytest.mark.slow
def test_an_unreadable_validation_image_keeps_the_epoch_it_follows(tmp_path):
    """A validation image whose header reads but whose pixels do not (a truncated file) is found only by the
    evaluation after an epoch of training; the dense run stopped there, before that epoch's checkpoint, so the
    epoch was lost (and, in a fresh run, its log removed with it). As main.py does, the epoch is saved first and
    the same command resumes after it once the image is fixed."""
    data = generate_detection(str(tmp_path / "data"), size=64, train=4, val=2)
    bad = tmp_path / "data" / "val2017" / json.loads(
        (tmp_path / "data" / "annotations" / "instances_val2017.json").read_text())["images"][0]["file_name"]
    good = bad.read_bytes()
    bad.write_bytes(good[: len(good) // 2])
    args = ["--cfg", CFG, "--data-path", data, "--output", str(tmp_path / "out"), "--opts", *TINY, "TRAIN.EPOCHS", "2"]
    refused = run_task("detection.train", args)
    saved = tmp_path / "out" / "mask_rcnn_focal_demo" / "default" / "ckpt_epoch_0.pth"
    assert refused.returncode == 1 and re.search(rf"cannot read image {bad}: .*Epoch 0's training is saved in "
                                                 rf"{saved}: once the image is fixed", refused.stderr)
    assert "Traceback" not in refused.stderr and saved.is_file()
    bad.write_bytes(good)
    resumed = check(run_task("detection.train", args))
    assert "auto-resuming from" in resumed.stdout and "Train: [1/2][0/" in resumed.stdout
    assert "Train: [0/2]" not in resumed.stdout

@pytest.mark.parametrize("cfg", sorted(str(p) for p in (REPO / "configs" / "detection").glob("*.yaml")))
def test_every_config_loads_and_passes_the_value_rules(cfg):
    config = get_config(task_args(cfg), detection_defaults(), DETECTION_RULES)
    assert config.MODEL.BACKBONE.startswith("focal_")


def test_bad_values_are_refused_naming_the_key():
    with pytest.raises(UsageError, match=r"--batch-size \(DATA.BATCH_SIZE\) must be at least 1, got 0"):
        get_config(task_args(CFG, batch_size=0), detection_defaults(), DETECTION_RULES)


def test_unknown_detector_args_are_refused_naming_the_accepted_ones():
    config = detection_defaults()
    merge_opts(config, BACKBONE_OPTS + ["MODEL.DETECTOR_ARGS.min_sise", "[800]"])
    with pytest.raises(UsageError, match=r"MODEL.DETECTOR_ARGS.min_sise is not an argument of mask_rcnn "
                                         r"\(MODEL.DETECTOR\); it accepts: .*box_batch_size_per_image.*min_size"):
        build_detector(config, num_classes=3)
    retina = detection_defaults()
    merge_opts(retina, BACKBONE_OPTS + ["MODEL.DETECTOR", "retinanet",
                                            "MODEL.DETECTOR_ARGS.box_batch_size_per_image", 64])
    with pytest.raises(UsageError, match=r"box_batch_size_per_image is not an argument of retinanet"):
        build_detector(retina, num_classes=3)


@pytest.mark.slow
def test_fcos_trains_and_evaluates(tmp_path):
    data = generate_detection(str(tmp_path / "data"), size=64, train=4, val=2)
    opts = ["DATA.BATCH_SIZE", "2", "DATA.NUM_WORKERS", "0", "MODEL.FPN_CHANNELS", "32", "TRAIN.EPOCHS", "1",
            "TRAIN.WARMUP_ITERS", "0", "PRINT_FREQ", "1", "EVAL_FREQ", "1", "MODEL.DETECTOR_ARGS.min_size", "[256]",
            "MODEL.DETECTOR_ARGS.max_size", "256", "MODEL.DETECTOR_ARGS.score_thresh", "0.0", *BACKBONE_OPTS]
    cfg = str(REPO / "configs" / "detection" / "fcos_demo.yaml")
    trained = check(run_task("detection.train", ["--cfg", cfg, "--data-path", data, "--output", str(tmp_path / "out"),
                                                 "--opts", *opts]))
    assert "Train: [0/1][1/2]" in trained.stdout
    assert all(name in trained.stdout for name in ("classification", "bbox_regression", "bbox_ctrness"))
    assert re.search(r"box AP [\d.]+ \(2 images, [1-9]\d* detections\)", trained.stdout)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished one-epoch Mask R-CNN run on demo data."""
    return finished_dense_run(tmp_path_factory.mktemp("detection_run"), TASK, CFG, generate_detection, TINY)


@pytest.fixture
def copied_run(finished_run, tmp_path):
    return private_copy(finished_run, tmp_path)


def change_categories(data, change: str) -> None:
    """The demo's categories (circle 1, square 2, triangle 4) in both files with circle and square's names
    swapped, or with triangle's id 3 instead of 4."""
    for split in ("train2017", "val2017"):
        path = data / "annotations" / f"instances_{split}.json"
        content = json.loads(path.read_text())
        for cat in content["categories"]:
            if change == "renamed" and cat["id"] in (1, 2):
                cat["name"] = {"circle": "square", "square": "circle"}[cat["name"]]
            elif change == "re-id'ed" and cat["id"] == 4:
                cat["id"] = 3
        for ann in content["annotations"]:
            if change == "re-id'ed" and ann["category_id"] == 4:
                ann["category_id"] = 3
        path.write_text(json.dumps(content))


DETECTION_RUN = "mask_rcnn_focal_demo/default"
# The first difference each change of change_categories makes, as the refusal names it.
DIFFERENCES = {"renamed": r"output 1 is 'circle' \(category id 1\) there and 'square' \(category id 1\) here",
               "re-id'ed": r"output 3 is 'triangle' \(category id 4\) there and 'triangle' \(category id 3\) here"}


@pytest.mark.slow
@pytest.mark.parametrize("change, mode", [("renamed", "auto"), ("renamed", "--resume"), ("renamed", "--eval"),
                                          ("re-id'ed", "auto")])
def test_resuming_or_evaluating_on_other_categories_is_refused(copied_run, change, mode):
    """Labels are positions in the sorted category ids, and a checkpoint stored neither ids nor names: resuming
    (or auto-resuming in an output folder of another dataset) or evaluating on categories of the same count but
    other names or ids went on silently, each output now meaning another category. Refused before anything is
    written, naming the checkpoint, the annotation file and the first difference."""
    data, out, before = copied_run
    change_categories(data, change)
    checkpoint = out / DETECTION_RUN / "ckpt_epoch_0.pth"
    flags = {"auto": [], "--resume": ["--resume", str(checkpoint)], "--eval": ["--eval"]}[mode]
    split = "val2017" if mode == "--eval" else "train2017"
    source = rf"--resume {checkpoint}" if mode == "--resume" else rf"auto-resume from {checkpoint}"
    with pytest.raises(UsageError, match=rf"^{source}.*: it was trained on other categories than "
                                         rf"{data}/annotations/instances_{split}.json holds: {DIFFERENCES[change]}"):
        run(TASK, ["--cfg", CFG, "--data-path", str(data), "--output", str(out), "--device", "cpu", *flags,
                   "--opts", *TINY, "TRAIN.EPOCHS", "2"])
    assert_intact(out, before)


@pytest.mark.slow
def test_resuming_on_the_same_categories_goes_on_and_records_them(copied_run):
    """The class identity a checkpoint records is the sorted category ids and their names; a resume on the
    same categories is not disturbed by the check."""
    data, out, _ = copied_run
    first = load(out / DETECTION_RUN / "ckpt_epoch_0.pth")
    assert (first["category_ids"], first["class_names"]) == ([1, 2, 4], ["circle", "square", "triangle"])
    run(TASK, ["--cfg", CFG, "--data-path", str(data), "--output", str(out), "--device", "cpu", "--opts", *TINY,
               "TRAIN.EPOCHS", "2"])
    second = load(out / DETECTION_RUN / "ckpt_epoch_1.pth")
    assert second["epoch"] == 1 and second["category_ids"] == [1, 2, 4]


@pytest.mark.slow
def test_a_checkpoint_without_the_class_record_still_loads(copied_run):
    """Checkpoints written before the class record (or by other tools) hold no ids or names to compare: they load
    as before, whatever the categories."""
    data, out, _ = copied_run
    checkpoint = out / DETECTION_RUN / "ckpt_epoch_0.pth"
    old = {k: v for k, v in load(checkpoint).items() if k not in ("category_ids", "class_names", CHECKSUM_KEY)}
    torch.save(old, checkpoint)
    change_categories(data, "renamed")
    run(TASK, ["--cfg", CFG, "--data-path", str(data), "--output", str(out), "--device", "cpu", "--eval",
               "--resume", str(checkpoint), "--opts", *TINY])
    log = this_run((out / DETECTION_RUN / "log_rank0.txt").read_text())
    assert f"resumed weights from {checkpoint}" in log and "box AP" in log


@pytest.mark.slow
def test_a_saved_config_reruns_at_the_rate_it_trained_with(finished_run):
    """config.yaml holds the scaled rate and TRAIN.LR_BATCH, the total batch it is for: re-run at that batch it
    keeps the rate, at twice the batch it doubles it. Without the record the saved rate was scaled again on
    every re-run (ADE20K's 6e-5 became 7.5e-6 at batch 2, then 9.4e-7)."""
    saved = str(finished_run / "out" / DETECTION_RUN / "config.yaml")
    trained = get_config(task_args(saved), detection_defaults(), DETECTION_RULES)
    assert trained.OUTPUT == str(finished_run / "out" / DETECTION_RUN)  # its own folder again, not one inside it
    assert trained.TRAIN.LR_BATCH == trained.DATA.BATCH_SIZE == 2  # one process: TINY's batch of 2
    assert trained.TRAIN.BASE_LR == pytest.approx(2e-3 * 2 / 16)  # demo.yaml's rate for 16 images, at 2
    for processes in (1, 2):
        again = get_config(task_args(saved), detection_defaults(), DETECTION_RULES)
        scale_rates(again, again.DATA.BATCH_SIZE * processes)
        assert again.TRAIN.BASE_LR == pytest.approx(processes * trained.TRAIN.BASE_LR)


@pytest.mark.parametrize("detector", ["retinanet", "fcos"])
def test_p6_reads_the_last_stage_for_retinanet_and_p5_for_fcos(detector):
    """The seed's RetinaNet (mmdetection's add_extra_convs='on_input') computes P6 from the last backbone map C5,
    FCOS from the FPN's P5, also when C5 is as wide as the FPN (128 channels here: the tiny backbone's stage 3),
    where torchvision's P6P7 would pick P5 for both by comparing widths."""
    config = detection_defaults()
    merge_opts(config, BACKBONE_OPTS + ["MODEL.DETECTOR", detector, "MODEL.FPN_CHANNELS", 128])
    neck = build_detector(config, num_classes=3).eval().backbone
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        levels, c5 = neck(x), neck.body(x)[-1]
        source = c5 if detector == "retinanet" else levels["2"]
        expected = neck.fpn.extra_blocks.p6(source)
    assert c5.shape[1] == 128
    torch.testing.assert_close(levels["p6"], expected)


@pytest.mark.slow
def test_eval_scores_the_stored_ema_weights_and_says_when_there_are_none(copied_run):
    """--eval scores a checkpoint's EMA weights after the model's, as main.py --eval does (they were ignored);
    --model-ema on a checkpoint without them says so instead of passing in silence."""
    data, out, _ = copied_run
    checkpoint = out / DETECTION_RUN / "ckpt_epoch_0.pth"
    args = ["--cfg", CFG, "--data-path", str(data), "--output", str(out), "--device", "cpu", "--eval", "--resume",
            str(checkpoint), "--opts", *TINY]
    run(TASK, args + ["--model-ema"])
    log = this_run((out / DETECTION_RUN / "log_rank0.txt").read_text())
    assert "--model-ema (MODEL_EMA): --resume" in log and "holds no EMA weights; only the model is evaluated" in log
    assert len(re.findall(r"box AP [\d.]+ mask AP", log)) == 1
    state = {k: v for k, v in load(checkpoint).items() if k != CHECKSUM_KEY}
    state["model_ema"] = state["model"]
    torch.save({**state, CHECKSUM_KEY: content_digest(state)}, checkpoint)
    run(TASK, args)
    log = this_run((out / DETECTION_RUN / "log_rank0.txt").read_text())
    assert "EMA model:" in log and len(set(re.findall(r"box AP ([\d.]+) mask AP", log))) == 1  # the same weights
    assert len(re.findall(r"box AP [\d.]+ mask AP", log)) == 2
