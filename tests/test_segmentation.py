"""segmentation/: mIoU on a hand-made prediction set, the official-layout checkpoint in the encoder, bad data as
one-line errors, and a real run (training steps, checkpoint, auto-resume refusal) whose evaluation is the same
under torchrun with two processes."""
from __future__ import annotations

import colorsys
import logging
import math
import os
import random
import re
import signal

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from config import UsageError, get_config, merge_opts
from dense.demo import generate_segmentation
from dense.run import parse_args, run
from engine import DistEnv, build_precision
from models import extract_state_dict
from segmentation.config import SEGMENTATION_RULES, segmentation_defaults
from segmentation.data import (SegmentationFolder, build_data, class_names, normalize, photometric_distortion,
                               scale_saturation)
from segmentation.evaluate import evaluate, predict, slide
from segmentation.model import backbone, build_segmenter
from segmentation.train import TASK
from tests.helpers import (BACKBONE_OPTS, CHECKPOINT, LOG, REPO, assert_intact, check, finished_dense_run, load,
                           private_copy, run_task, snapshot, start_task, sum_roundoff, task_args, this_run,
                           wait_for_line)
from utils import CHECKSUM_KEY, content_digest, load_backbone

CFG = str(REPO / "configs" / "segmentation" / "demo.yaml")
TINY = ["DATA.SCALE", "[64, 64]", "DATA.CROP_SIZE", "64", "DATA.BATCH_SIZE", "4", "DATA.NUM_WORKERS", "0",
        "MODEL.DECODER_CHANNELS", "16", "TRAIN.EPOCHS", "1", "TRAIN.WARMUP_ITERS", "0", "PRINT_FREQ", "1",
        "EVAL_FREQ", "1", *BACKBONE_OPTS]


def config_with(opts):
    config = segmentation_defaults()
    merge_opts(config, opts)
    return config


def write_pair(root, split, name, labels: np.ndarray, image_size=None):
    for folder in ("images", "annotations"):
        (root / folder / split).mkdir(parents=True, exist_ok=True)
    h, w = image_size or labels.shape
    Image.new("RGB", (w, h), (128, 64, 32)).save(root / "images" / split / f"{name}.jpg")
    Image.fromarray(labels.astype(np.uint8)).save(root / "annotations" / split / f"{name}.png")


class LeftRight(nn.Module):
    """Predicts class 0 in the left three quarters of the image and class 1 in the rest."""

    def forward(self, x):
        logits = torch.zeros(x.shape[0], 3, *x.shape[-2:])
        cut = x.shape[-1] * 3 // 4
        logits[:, 0, :, :cut] = 1
        logits[:, 1, :, cut:] = 1
        return logits


def test_miou_of_a_known_prediction(tmp_path):
    # 32x32 labels: row 0 unlabelled (0), columns 0-15 label 1 (class 0), 16-31 label 2 (class 1). The model says
    # class 0 for columns 0-23. Class 0: TP 31*16, FP 31*8, FN 0 -> IoU 2/3. Class 1: TP 31*8, FN 31*8 -> 1/2.
    # Class 2 (NUM_CLASSES 3) is in neither labels nor predictions: left out of the mean. mIoU = 58.33%.
    labels = np.ones((32, 32))
    labels[:, 16:] = 2
    labels[0] = 0
    for split in ("training", "validation"):
        write_pair(tmp_path, split, "a", labels)
    config = config_with(["DATA.DATA_PATH", str(tmp_path), "DATA.SCALE", "[32, 32]", "DATA.NUM_CLASSES", 3,
                          "DATA.NUM_WORKERS", 0])
    dataset = SegmentationFolder(str(tmp_path), "val", config, train=False, num_classes=3)
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    miou = evaluate(config, LeftRight(), dataset, env, build_precision("none", env.device), LOG)
    assert miou == pytest.approx((200 / 3 + 50) / 2)


@pytest.mark.parametrize("problem, message", [
    ("size", "annotation .*a.png is 16x16 but its image is 16x20"),
    ("missing", "has no annotation"),
    ("label", "has label 5, above the 3 classes"),
])
def test_bad_annotations_are_one_line_errors(tmp_path, problem, message):
    labels = np.ones((16, 16))
    if problem == "label":
        labels[3, 3] = 5
    write_pair(tmp_path, "training", "a", labels, image_size=(20, 16) if problem == "size" else None)
    if problem == "missing":
        (tmp_path / "annotations" / "training" / "a.png").unlink()
    config = config_with(["DATA.SCALE", "[16, 16]", "DATA.CROP_SIZE", "32"])
    with pytest.raises(UsageError, match=message):
        SegmentationFolder(str(tmp_path), "train", config, train=True, num_classes=3)[0]


def test_validation_label_values_are_checked_before_training(tmp_path):
    """A validation annotation with a value above the class count was found only when the first evaluation read
    it: after a whole epoch of training (the ADE20K configs evaluate every 13), none of it saved, and the run's
    log removed with it as a refused start. The validation set checks its values when it is opened."""
    labels = np.ones((16, 16))
    labels[:, 8:] = 2
    write_pair(tmp_path, "validation", "a", labels)
    labels[3, 3] = 5
    write_pair(tmp_path, "validation", "b", labels)
    config = config_with(["DATA.SCALE", "[16, 16]"])
    with pytest.raises(UsageError, match=r"b.png has label 5, above the 3 classes"):
        SegmentationFolder(str(tmp_path), "val", config, train=False, num_classes=3)

def test_label_png_modes_one_bit_and_sixteen_bit(tmp_path):
    """A two-class mask saved as a 1-bit PNG (mode "1", one channel) was refused as "label PNGs must have one
    channel"; it is read as values 0 and 1. In a 16-bit PNG, value 256 under DATA.REDUCE_ZERO_LABEL became class
    255, the ignore value, and its pixels were left out silently; any value above 255 is refused."""
    labels = np.zeros((16, 16), dtype=bool)
    labels[:, 8:] = True
    write_pair(tmp_path, "training", "a", labels)
    Image.fromarray(labels).save(tmp_path / "annotations" / "training" / "a.png")
    config = config_with(["DATA.SCALE", "[16, 16]", "DATA.REDUCE_ZERO_LABEL", False])
    dataset = SegmentationFolder(str(tmp_path), "train", config, train=False, num_classes=2)
    np.testing.assert_array_equal(dataset[0][1].numpy(), labels.astype(np.int64))
    wide = np.ones((16, 16), dtype=np.uint16)
    wide[3, 3] = 256
    Image.fromarray(wide).save(tmp_path / "annotations" / "training" / "a.png")
    config = config_with(["DATA.SCALE", "[16, 16]"])
    with pytest.raises(UsageError, match=r"a.png has label 256: label values go up to 255"):
        SegmentationFolder(str(tmp_path), "train", config, train=False, num_classes=3)[0]

def test_a_validation_set_without_labelled_pixels_is_refused(tmp_path):
    """Validation annotations that are all "ignore" (0 under DATA.REDUCE_ZERO_LABEL, or 255) leave nothing to
    score: every evaluation logged "mIoU nan%" and the run went on. They are refused when the set is opened."""
    write_pair(tmp_path, "validation", "a", np.zeros((16, 16)))
    config = config_with(["DATA.SCALE", "[16, 16]"])
    with pytest.raises(UsageError, match=r"the annotations in .*validation hold no class \(DATA.REDUCE_ZERO_LABEL "
                                         r"True: 0 and 255 are ignored\)"):
        SegmentationFolder(str(tmp_path), "val", config, train=False, num_classes=3)

@pytest.mark.parametrize("kind", ["16-bit", "float"])
def test_wide_images_are_read_as_classification_reads_them_or_refused(tmp_path, kind):
    """RGB conversion clips every value above 255: a 16-bit grey PNG trained as an almost white picture,
    silently. It is scaled to 8 bits as the classification loader does; a float image, whose range is unknown, is
    refused, naming the file, when the set is opened (16-bit annotations are read as they are: their values are
    labels)."""
    write_pair(tmp_path, "validation", "a", np.ones((16, 16)))
    (tmp_path / "images" / "validation" / "a.jpg").unlink()
    name = {"16-bit": "a.png", "float": "a.tif"}[kind]
    values = np.full((16, 16), 4000, dtype=np.uint16) if kind == "16-bit" else np.full((16, 16), 0.5, np.float32)
    Image.fromarray(values).save(tmp_path / "images" / "validation" / name)
    config = config_with(["DATA.SCALE", "[16, 16]"])
    if kind == "float":
        with pytest.raises(UsageError, match=r"image .*a.tif holds floating-point values \(mode F\)"):
            SegmentationFolder(str(tmp_path), "val", config, train=False, num_classes=3)
        return
    image, _ = SegmentationFolder(str(tmp_path), "val", config, train=False, num_classes=3)[0]
    assert image.dtype == torch.uint8 and image.eq(round(4000 / 257)).all()


def test_two_images_of_one_name_are_refused(tmp_path):
    """``a.jpg`` and ``a.png`` side by side both claim ``a.png``'s labels; one of them was kept, whichever the
    directory listing gave last (so it could change between file systems), and the other dropped, silently."""
    write_pair(tmp_path, "training", "a", np.ones((16, 16)))
    Image.new("RGB", (16, 16)).save(tmp_path / "images" / "training" / "a.png")
    config = config_with(["DATA.SCALE", "[16, 16]"])
    with pytest.raises(UsageError, match=r"images a.jpg and a.png in .*training share the name a"):
        SegmentationFolder(str(tmp_path), "train", config, train=True, num_classes=3)


def test_images_are_found_as_classification_finds_them(tmp_path):
    """Only .jpg, .jpeg and .png images were read, so a .bmp or .webp image was left out silently; and a macOS
    ``._a.jpg`` AppleDouble file beside ``a.jpg`` stopped the set as an image without annotation. Image types
    and hidden files now follow the classification folders (torchvision's image extensions, dot-files left out)."""
    write_pair(tmp_path, "training", "a", np.ones((16, 16)))
    write_pair(tmp_path, "training", "b", np.ones((16, 16)))
    (tmp_path / "images" / "training" / "b.jpg").unlink()
    Image.new("RGB", (16, 16)).save(tmp_path / "images" / "training" / "b.webp")
    (tmp_path / "images" / "training" / "._a.jpg").write_bytes(b"\x00\x05\x16\x07")
    config = config_with(["DATA.SCALE", "[16, 16]"])
    dataset = SegmentationFolder(str(tmp_path), "train", config, train=True, num_classes=3)
    assert [os.path.basename(image) for image, _ in dataset.samples] == ["a.jpg", "b.webp"]


def test_a_class_names_file_without_its_name_column_is_refused_before_training(tmp_path):
    """``objectInfo150.csv`` is read for the per-class table only when the first evaluation logs it: a file of
    that name without a ``Name`` column stopped the run with a KeyError traceback after a whole epoch of
    training, none of it saved. It is checked when the data is opened, as one line naming the file."""
    labels = np.ones((16, 16))
    labels[:, 8:] = 2
    for split in ("training", "validation"):
        write_pair(tmp_path, split, "a", labels)
        write_pair(tmp_path, split, "b", labels)
    (tmp_path / "objectInfo150.csv").write_text("Idx,Label\n1,wall\n2,floor\n")
    config = config_with(["DATA.DATA_PATH", str(tmp_path), "DATA.SCALE", "[16, 16]"])
    with pytest.raises(UsageError, match=r"objectInfo150.csv has no 'Name' column \(columns Idx, Label\)"):
        build_data(config, None, LOG)
    (tmp_path / "objectInfo150.csv").write_text("Idx,Name\n1,wall;brick\n2,floor\n")
    build_data(config, None, LOG)
    assert class_names(str(tmp_path), 2) == ["wall", "floor"]

def test_official_checkpoint_loads_into_the_encoder():
    config = config_with(BACKBONE_OPTS + ["MODEL.DECODER_CHANNELS", 16])
    model = build_segmenter(config, num_classes=4)
    load_backbone(CHECKPOINT, backbone(model), LOG)
    weights = extract_state_dict(torch.load(CHECKPOINT, map_location="cpu", weights_only=True))
    loaded = backbone(model).network.state_dict()
    assert set(loaded) < set(weights)
    for name, value in loaded.items():
        torch.testing.assert_close(value, weights[name], rtol=0, atol=0)
    smaller = build_segmenter(config_with(BACKBONE_OPTS[:-4] + ["MODEL.BACKBONE_ARGS.window_size", 7,
                                                                "MODEL.BACKBONE_ARGS.embed_dim", 8]), 4)
    with pytest.raises(UsageError, match="does not fit the backbone"):
        load_backbone(CHECKPOINT, backbone(smaller), LOG)


def scores(log: str) -> list:
    return re.findall(r"IoU [^:\n]+: [\d.na]+|mIoU [\d.]+% \([^)]*\) over \d+ classes \(\d+ images\)", log)


@pytest.mark.slow
def test_training_and_one_vs_two_process_evaluation(tmp_path):
    data = generate_segmentation(str(tmp_path / "data"), size=64, train=8, val=4)
    common = ["--cfg", CFG, "--data-path", data, "--output", str(tmp_path / "out")]
    trained = check(run_task("segmentation.train", [*common, "--pretrained", CHECKPOINT, "--opts", *TINY]))
    assert "pretrained backbone from" in trained.stdout
    assert "Train: [0/1][1/2]" in trained.stdout  # two updates of 4 images
    assert re.search(r"mIoU [\d.]+% \([^)]*\) over 4 classes \(4 images\)", trained.stdout)
    assert [line.split(":")[0] for line in scores(trained.stdout)[:4]] == \
        ["IoU background", "IoU circle", "IoU square", "IoU triangle"]  # the demo data names its classes
    checkpoint = tmp_path / "out" / "upernet_focal_demo" / "default" / "ckpt_epoch_0.pth"
    assert checkpoint.is_file()
    with pytest.raises(UsageError, match="has already trained 1 of TRAIN.EPOCHS 1 epochs"):  # auto-resumed
        run(TASK, [*common, "--device", "cpu", "--opts", *TINY])
    two = check(run_task("segmentation.train", [*common, "--eval", "--resume", str(checkpoint), "--tag", "two",
                                                 "--opts", *TINY], nproc=2))
    assert scores(two.stdout) == scores(trained.stdout) and len(scores(two.stdout)) == 5
    # the progress names both counts where the result counts every process's images; --eval logs no training facts
    tests = [line for line in two.stdout.splitlines() if "Test: [" in line]
    assert tests[-1].endswith("; 2 of this process's 2 images, 4 on all 2 processes"), tests
    assert "learning rate" not in two.stdout and "flip probability" not in two.stdout
    assert "learning rate" in trained.stdout and "flip probability" in trained.stdout


@pytest.mark.slow
def test_run_killed_in_epoch_three_resumes_to_the_same_weights(tmp_path):
    """The dense tasks share dense/run.py's resume path: 3 epochs straight == 2 epochs, SIGKILL during the third,
    and the same command again, bit for bit."""
    data = generate_segmentation(str(tmp_path / "data"), size=64, train=12, val=2)
    opts = [*TINY, "TRAIN.EPOCHS", "3", "DATA.BATCH_SIZE", "2"]
    straight, killed = (["--cfg", CFG, "--data-path", data, "--output", str(tmp_path / d), "--opts", *opts]
                        for d in ("straight", "killed"))
    check(run_task("segmentation.train", straight))
    proc = start_task("segmentation.train", killed)
    wait_for_line(proc, "Train: [2/3][1/6]")  # a step of the third epoch is done
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    proc.stdout.close(), proc.stderr.close()
    run_dir = tmp_path / "killed" / "upernet_focal_demo" / "default"
    assert (run_dir / "ckpt_epoch_1.pth").is_file() and not (run_dir / "ckpt_epoch_2.pth").exists()

    resumed_run = check(run_task("segmentation.train", killed))
    assert "ckpt_epoch_1.pth" in resumed_run.stdout and "Train: [1/3]" not in resumed_run.stdout
    expected, resumed = (load(tmp_path / d / "upernet_focal_demo" / "default" / "ckpt_epoch_2.pth")
                         for d in ("straight", "killed"))
    for key in ("model", "optimizer"):
        torch.testing.assert_close(resumed[key], expected[key], rtol=0, atol=0, msg=key)
    for key in ("lr_scheduler", "max_accuracy", "epoch", "step"):
        assert resumed[key] == expected[key], key


@pytest.mark.parametrize("cfg", sorted(str(p) for p in (REPO / "configs" / "segmentation").glob("*.yaml")))
def test_every_config_loads_and_passes_the_value_rules(cfg):
    config = get_config(task_args(cfg), segmentation_defaults(), SEGMENTATION_RULES)
    assert config.MODEL.BACKBONE.startswith("focal_")


def test_bad_values_are_refused_naming_the_key():
    with pytest.raises(UsageError, match=r"--batch-size \(DATA.BATCH_SIZE\) must be at least 1, got 0"):
        get_config(task_args(CFG, batch_size=0), segmentation_defaults(), SEGMENTATION_RULES)
    with pytest.raises(UsageError, match=r"--batch-size \(DATA.BATCH_SIZE\) must be at least 2 to train UPerNet"):
        get_config(task_args(CFG, batch_size=1), segmentation_defaults(), SEGMENTATION_RULES)
    get_config(task_args(CFG, batch_size=1, eval=True), segmentation_defaults(), SEGMENTATION_RULES)


def test_reduce_zero_label_chooses_whether_0_is_a_class(tmp_path):
    # A 0/1/2 annotation: under ADE20K's convention 0 is ignored and 1, 2 are classes 0, 1; without it, 0 is the
    # background class and the set has three classes.
    labels = np.zeros((16, 16))
    labels[:, 8:] = 1
    labels[8:, 8:] = 2
    write_pair(tmp_path, "training", "a", labels)
    write_pair(tmp_path, "training", "b", labels)
    for reduce, count, expected in ((True, 2, labels - 1), (False, 3, labels)):
        config = config_with(["DATA.SCALE", "[16, 16]", "DATA.REDUCE_ZERO_LABEL", reduce])
        dataset = SegmentationFolder(str(tmp_path), "train", config, train=False)
        assert dataset.num_classes == count
        target = dataset[0][1].numpy()
        np.testing.assert_array_equal(target, np.where(expected < 0, 255, expected))


@pytest.mark.parametrize("stray, where", [
    ({"b": 200}, "b.png has label 200, found in 1 of 3 files"),  # far above the others, one file
    ({"a": 3, "b": 3, "c": 3}, None),  # in every file, next to the others: a class
    ({"a": 40, "b": 40}, "a.png has label 40, found in 2 of 3 files"),  # far above the others
])
def test_class_count_from_the_data_refuses_a_stray_value(tmp_path, stray, where):
    for name in "abc":
        labels = np.ones((16, 16))
        labels[:, 8:] = 2
        labels[0, 0] = stray.get(name, 1)
        write_pair(tmp_path, "training", name, labels)
    config = config_with(["DATA.SCALE", "[16, 16]"])
    if where is None:
        assert SegmentationFolder(str(tmp_path), "train", config, train=True).num_classes == 3
        return
    with pytest.raises(UsageError, match=where + r".*set DATA.NUM_CLASSES"):
        SegmentationFolder(str(tmp_path), "train", config, train=True)
    value = max(stray.values())
    assert SegmentationFolder(str(tmp_path), "train", config, train=False, num_classes=value)[1][1].max() == value - 1


@pytest.mark.parametrize("flip_prob, flipped", [(0.0, 0), (1.0, 20)])
def test_flip_prob_decides_the_flips(tmp_path, flip_prob, flipped):
    labels = np.ones((16, 16))
    labels[:, :4] = 2  # class 1 on the left quarter only
    write_pair(tmp_path, "training", "a", labels)
    config = config_with(["DATA.SCALE", "[16, 16]", "DATA.RATIO_RANGE", "[1.0, 1.0]", "DATA.CROP_SIZE", "32",
                          "DATA.FLIP_PROB", flip_prob, "DATA.NUM_CLASSES", 2])
    dataset = SegmentationFolder(str(tmp_path), "train", config, train=True)
    assert sum(int(dataset[0][1][5, 31] == 1) for _ in range(20)) == flipped  # padded to 32, then flipped


class WidthVote(nn.Module):
    """Class 0 (logit 2 against 0) for inputs narrower than 48 pixels, class 1 (logit 1 against 0) otherwise."""

    def forward(self, x):
        logits = torch.zeros(x.shape[0], 2, *x.shape[-2:])
        if x.shape[-1] < 48:
            logits[:, 0] = 2
        else:
            logits[:, 1] = 1
        return logits


class ColumnRamp(nn.Module):
    """Class 0's logit is the column index within the input, class 1's is 0: the output depends on where the input
    window starts and on flips. Records the batch size of each pass."""

    def __init__(self):
        super().__init__()
        self.passes = []

    def forward(self, x):
        self.passes.append(len(x))
        logits = torch.zeros(x.shape[0], 2, *x.shape[-2:])
        logits[:, 0] = torch.arange(x.shape[-1], dtype=torch.float32)
        return logits


def test_scales_average_class_probabilities():
    # A 32x64 image at DATA.SCALE (64, 32) is seen 64 wide at ratio 1 (class 1: softmax [e^0, e^1] / (1 + e)) and 32
    # wide at ratio 0.5 (class 0: [e^2, 1] / (e^2 + 1)); the two views averaged: class 0 at 0.575, class 1 0.425.
    image = torch.full((3, 32, 64), 128, dtype=torch.uint8)
    config = config_with(["DATA.SCALE", "[64, 32]"])
    one = predict(WidthVote(), image, (32, 64), config)
    torch.testing.assert_close(one[:, 0, 0], torch.tensor([1, math.e]) / (1 + math.e))
    config = config_with(["DATA.SCALE", "[64, 32]", "TEST.SCALES", "[0.5, 1.0]"])
    both = predict(WidthVote(), image, (32, 64), config)
    expected = (torch.tensor([math.e ** 2, 1]) / (math.e ** 2 + 1) + torch.tensor([1, math.e]) / (1 + math.e)) / 2
    torch.testing.assert_close(both, expected[:, None, None].expand(2, 32, 64))
    assert both.argmax(0).eq(0).all() and one.argmax(0).eq(1).all()


def test_flip_averages_the_mirrored_view_flipped_back():
    # Unflipped, class 0's logit at column j is j; the flipped view flipped back gives 31 - j. Their softmax
    # probabilities for class 0, sigmoid(j) and sigmoid(31 - j), averaged.
    image = torch.zeros((3, 8, 32), dtype=torch.uint8)
    config = config_with(["DATA.SCALE", "[32, 8]", "TEST.FLIP", True])
    model = ColumnRamp()
    probs = predict(model, image, (8, 32), config)
    j = torch.arange(32, dtype=torch.float32)
    torch.testing.assert_close(probs[0, 0], (torch.sigmoid(j) + torch.sigmoid(31 - j)) / 2)
    torch.testing.assert_close(probs.sum(0), torch.ones(8, 32))
    assert model.passes == [2]  # both views in one batch: the mirror costs no pass of its own
    # slide mode over 2 scales: each window of a scale (32x8 at 1.0: 3 windows of 16 every 8; 16x4 at 0.5: 1) is
    # one pass over both views
    model = ColumnRamp()
    config = config_with(["DATA.SCALE", "[32, 8]", "TEST.FLIP", True, "TEST.SCALES", "[1.0, 0.5]", "TEST.MODE",
                          "slide", "TEST.CROP", 16, "TEST.STRIDE", 8])
    predict(model, image, (8, 32), config)
    assert model.passes == [2, 2, 2, 2]


def test_slide_averages_overlapping_windows():
    # 20 columns, windows of 8 every 6: [0, 8), [6, 14), [12, 20). Each window's class-0 logit is the column within
    # it: columns 0-5 see one window (j), 6-7 two ((j + j - 6) / 2 = j - 3), 8-11 one (j - 6), 12-13 two
    # (j - 9), 14-19 one (j - 12).
    logits = slide(ColumnRamp(), torch.zeros(1, 3, 8, 20), crop=8, stride=6)
    expected = torch.tensor([0, 1, 2, 3, 4, 5, 3, 4, 2, 3, 4, 5, 3, 4, 2, 3, 4, 5, 6, 7], dtype=torch.float32)
    torch.testing.assert_close(logits[0, 0], expected.expand(8, 20))
    # A window as large as the image: one pass, the same as whole-image inference.
    torch.testing.assert_close(slide(ColumnRamp(), torch.zeros(1, 3, 8, 20), crop=32, stride=16),
                               ColumnRamp()(torch.zeros(1, 3, 8, 20)))


def test_final_line_names_the_views(tmp_path, caplog):
    labels = np.ones((32, 32))
    for split in ("training", "validation"):
        write_pair(tmp_path, split, "a", labels)
    config = config_with(["DATA.DATA_PATH", str(tmp_path), "DATA.SCALE", "[32, 32]", "DATA.NUM_WORKERS", 0,
                          "TEST.SCALES", "[0.5, 1.0, 1.75]", "TEST.FLIP", True, "TEST.MODE", "slide",
                          "TEST.CROP", 32, "TEST.STRIDE", 21])
    dataset = SegmentationFolder(str(tmp_path), "val", config, train=False, num_classes=3)
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    with caplog.at_level(logging.INFO, logger=LOG.name):
        evaluate(config, LeftRight(), dataset, env, build_precision("none", env.device), LOG)
    assert re.search(r"mIoU [\d.]+% \(scales 0.5-1.75, flip, slide 32/21\) over 3 classes \(1 images\)", caplog.text)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished one-epoch run on demo data."""
    return finished_dense_run(tmp_path_factory.mktemp("segmentation_run"), TASK, CFG, generate_segmentation, TINY)


@pytest.fixture
def copied_run(finished_run, tmp_path):
    return private_copy(finished_run, tmp_path)


def swap_circle_and_square(data) -> None:
    names = data / "objectInfo150.csv"
    names.write_text(names.read_text().replace("circle", "@").replace("square", "circle").replace("@", "square"))


SEGMENTATION_RUN = "upernet_focal_demo/default"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["auto", "--resume", "--eval"])
def test_resuming_or_evaluating_on_other_class_names_is_refused(copied_run, mode):
    """Label value v is class v-1 whatever its name, and a checkpoint stored no names: resuming (or
    auto-resuming in an output folder of another dataset) or evaluating on classes of the same count but other
    names in ``objectInfo150.csv`` went on silently, each output now meaning another class. Refused before
    anything is written, naming the checkpoint, the names file and the first difference."""
    data, out, before = copied_run
    swap_circle_and_square(data)
    checkpoint = out / SEGMENTATION_RUN / "ckpt_epoch_0.pth"
    flags = {"auto": [], "--resume": ["--resume", str(checkpoint)], "--eval": ["--eval"]}[mode]
    source = rf"--resume {checkpoint}" if mode == "--resume" else rf"auto-resume from {checkpoint}"
    with pytest.raises(UsageError, match=rf"^{source}.*: it was trained on other class names than "
                                         rf"{data}/objectInfo150.csv holds: output 1 is 'circle' there and 'square' "
                                         rf"here"):
        run(TASK, ["--cfg", CFG, "--data-path", str(data), "--output", str(out), "--device", "cpu", *flags,
                   "--opts", *TINY, "TRAIN.EPOCHS", "2"])
    assert_intact(out, before)


@pytest.mark.slow
def test_resuming_on_the_same_class_names_goes_on_and_records_them(copied_run):
    """The class identity a checkpoint records is the class names of ``objectInfo150.csv``; a resume on the same
    names is not disturbed by the check."""
    data, out, _ = copied_run
    assert load(out / SEGMENTATION_RUN / "ckpt_epoch_0.pth")["class_names"] == \
        ["background", "circle", "square", "triangle"]
    run(TASK, ["--cfg", CFG, "--data-path", str(data), "--output", str(out), "--device", "cpu", "--opts", *TINY,
               "TRAIN.EPOCHS", "2"])
    assert load(out / SEGMENTATION_RUN / "ckpt_epoch_1.pth")["epoch"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("unknown", ["checkpoint", "data"])
def test_classes_unknown_to_the_checkpoint_or_the_data_are_not_compared(copied_run, unknown):
    """A checkpoint written before the class record holds no names, and a dataset without ``objectInfo150.csv``
    knows only its class count: there is nothing to compare, and the checkpoint loads as before."""
    data, out, _ = copied_run
    checkpoint = out / SEGMENTATION_RUN / "ckpt_epoch_0.pth"
    if unknown == "checkpoint":
        torch.save({k: v for k, v in load(checkpoint).items() if k not in ("class_names", CHECKSUM_KEY)}, checkpoint)
        swap_circle_and_square(data)
    else:
        (data / "objectInfo150.csv").unlink()
    run(TASK, ["--cfg", CFG, "--data-path", str(data), "--output", str(out), "--device", "cpu", "--eval",
               "--resume", str(checkpoint), "--opts", *TINY])
    log = this_run((out / SEGMENTATION_RUN / "log_rank0.txt").read_text())
    assert f"resumed weights from {checkpoint}" in log and "mIoU" in log


AUX_OPTS = BACKBONE_OPTS + ["MODEL.DECODER_CHANNELS", 16, "MODEL.AUX_CHANNELS", 8]


def test_auxiliary_head_runs_on_stage_three_in_training_only():
    """The head reads stage index 2 (64 channels for the tiny backbone, stride 16: 4x4 for a 64-pixel input) and
    has 64*8*9 (a 3x3 convolution without bias, batch norm follows) + 2*8 (batch norm) + 8*4 + 4 (classifier) =
    4660 parameters. Evaluation gives the decoder's logits alone, the same as a model built without the head."""
    torch.manual_seed(0)
    model = build_segmenter(config_with(AUX_OPTS), num_classes=4)
    torch.manual_seed(0)
    plain = build_segmenter(config_with(AUX_OPTS + ["MODEL.AUX_HEAD", False]), num_classes=4)
    assert sum(p.numel() for p in model.aux_head.parameters()) == 4660
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    model.train()
    model.aux_head.eval()  # no dropout, to compare with the head applied by hand
    logits, aux = model(x)
    assert logits.shape == (2, 4, 64, 64) and aux.shape == (2, 4, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(aux, model.aux_head(backbone(model)(x)[2]))
        model.eval(), plain.eval()
        expected = plain(x)
        plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("aux_head.")})
        torch.testing.assert_close(model(x), plain(x))
    assert expected.shape == logits.shape


class TwoHeads(nn.Module):
    """Decoder logits of zeros (4 classes); auxiliary logits of one pixel favouring class 0 by ln 3."""

    def __init__(self):
        super().__init__()
        self.aux_head = nn.Module()
        self.aux_head.loss_weight = 0.4

    def forward(self, x):
        aux = torch.zeros(x.shape[0], 4, 1, 1)
        aux[:, 0] = math.log(3)
        return torch.zeros(x.shape[0], 4, *x.shape[-2:]), aux


class Wrapped(nn.Module):
    """What DDP looks like to the loss: the model under ``module``."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)


@pytest.mark.parametrize("wrap", [False, True])
def test_auxiliary_loss_is_its_cross_entropy_at_the_labels_size_times_its_weight(wrap):
    from segmentation.train import losses
    # 8x8 labels: rows 0-3 class 0, rows 4-6 class 1, row 7 ignored. Decoder: uniform over 4 classes, ln 4 each.
    # Auxiliary: the 1x1 map upsampled to 8x8 keeps p0 = 3/6 = 1/2 and p1 = 1/6: (32 ln 2 + 24 ln 6) / 56, x 0.4.
    targets = torch.zeros(1, 8, 8, dtype=torch.long)
    targets[:, 4:7], targets[:, 7] = 1, 255
    net = Wrapped(TwoHeads()) if wrap else TwoHeads()
    named = losses(net, (torch.zeros(1, 3, 8, 8), targets), torch.device("cpu"))
    assert named["loss_ce"].item() == pytest.approx(math.log(4))
    assert named["loss_aux"].item() == pytest.approx(0.4 * (32 * math.log(2) + 24 * math.log(6)) / 56)


@pytest.mark.parametrize("opts, key", [(["MODEL.AUX_LOSS_WEIGHT", 0.0], "MODEL.AUX_LOSS_WEIGHT"),
                                       (["MODEL.AUX_STAGE", 4], "MODEL.AUX_STAGE"),
                                       (["MODEL.AUX_CHANNELS", 0], "MODEL.AUX_CHANNELS")])
def test_bad_auxiliary_head_values_are_refused_naming_the_key(opts, key):
    args = parse_args("test", ["--cfg", CFG, "--data-path", "data", "--opts", *map(str, opts)])
    with pytest.raises(UsageError, match=key):
        get_config(args, segmentation_defaults(), SEGMENTATION_RULES)


def test_saturation_is_scaled_in_hsv_as_opencv_does():
    # (0.8, 0.4, 0.2): V 0.8, S 0.75. x0.5: S 0.375, each channel halves its distance to V: (0.8, 0.6, 0.5). x2: S
    # would be 1.5, capped at 1: the distances grow by 1/0.75, the smallest channel reaches 0: (0.8, 0.267, 0).
    pixel = torch.tensor([0.8, 0.4, 0.2]).view(3, 1, 1)
    hue, saturation, value = colorsys.rgb_to_hsv(0.8, 0.4, 0.2)
    for factor, expected in ((0.5, [0.8, 0.6, 0.5]), (2.0, [0.8, 0.8 - 0.4 / 0.75, 0.0])):
        assert colorsys.hsv_to_rgb(hue, min(saturation * factor, 1), value) == pytest.approx(expected)
        assert scale_saturation(pixel, factor).flatten().tolist() == pytest.approx(expected)
    grey = torch.full((3, 1, 1), 0.5)
    assert scale_saturation(grey, 1.5).flatten().tolist() == [0.5] * 3


@pytest.mark.parametrize("colour, expected", [
    # Grey 102: + 32 = 134, unchanged by saturation and hue, x 1.5 = 201.
    ((102, 102, 102), (201 / 255,) * 3),
    # Red: + 32 on every channel: G = B = 32/255; saturation S 223/255 x 1.5 capped at 1: back to (1, 0, 0); hue
    # + 18 of 180 (36 degrees): R = V = 1, G = 36/60 = 0.6, B = 0; contrast x 1.5, clipped: (1, 0.9, 0).
    ((255, 0, 0), (1.0, 0.9, 0.0)),
])
def test_photometric_distortion_with_every_step_at_its_strongest(monkeypatch, colour, expected):
    monkeypatch.setattr(random, "random", lambda: 0.0)  # every step taken, the contrast step last
    monkeypatch.setattr(random, "uniform", lambda low, high: high)
    image = torch.tensor(colour, dtype=torch.uint8).view(3, 1, 1).expand(3, 2, 2)
    out = photometric_distortion(image)
    rounding = sum_roundoff(torch.float32, steps=4)  # four steps on values in [0, 1], each rounded (measured 0.75 eps)
    for channel, value in zip(out, expected):
        torch.testing.assert_close(channel, torch.full((2, 2), value), atol=rounding, rtol=0)


def test_photometric_distortion_without_a_step_only_scales_to_floats(monkeypatch):
    monkeypatch.setattr(random, "random", lambda: 0.99)
    image = torch.randint(0, 256, (3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(photometric_distortion(image), image.float() / 255)


@pytest.mark.parametrize("distortion", [True, False])
def test_padding_stays_black_under_photometric_distortion(tmp_path, monkeypatch, distortion):
    """A 16x16 crop padded to 32: the distortion (every step taken) changes the image's pixels, and leaves the
    padding at 0 before normalisation, as mmsegmentation pads after distorting."""
    write_pair(tmp_path, "training", "a", np.ones((16, 16)))
    config = config_with(["DATA.SCALE", "[16, 16]", "DATA.RATIO_RANGE", "[1.0, 1.0]", "DATA.CROP_SIZE", "32",
                          "DATA.FLIP_PROB", 0.0, "DATA.NUM_CLASSES", 2, "DATA.PHOTOMETRIC_DISTORTION", distortion])
    monkeypatch.setattr(random, "random", lambda: 0.0)
    image, target = SegmentationFolder(str(tmp_path), "train", config, train=True)[0]
    black = normalize(torch.zeros(3, 1, 1, dtype=torch.uint8))
    torch.testing.assert_close(image[:, 16:, :], black.expand(3, 16, 32))
    torch.testing.assert_close(image[:, :, 16:], black.expand(3, 32, 16))
    plain = normalize(torch.tensor([128, 64, 32], dtype=torch.uint8).view(3, 1, 1))  # write_pair's colour
    # changed by the distortion or not: its weakest step here (+32 / 255, over ImageNet's deviation: about 0.5)
    # lies far above 0.05, and the rounding of an unchanged pixel far below
    assert torch.allclose(image[:, 8, 8], plain.flatten(), atol=0.05) != distortion
    assert (target[16:] == 255).all() and (target[:16, :16] == 0).all()


def with_convention(checkpoint, reduce_zero_label) -> None:
    """Rewrite ``checkpoint`` as if trained under ``reduce_zero_label`` (``None``: a checkpoint without a saved
    config, as foreign ones are), re-checksummed as our saver writes it."""
    import yaml
    state = {k: v for k, v in load(checkpoint).items() if k != CHECKSUM_KEY}
    saved = yaml.safe_load(state.pop("config"))
    if reduce_zero_label is not None:
        saved["DATA"]["REDUCE_ZERO_LABEL"] = reduce_zero_label
        state["config"] = yaml.safe_dump(saved)
    state[CHECKSUM_KEY] = content_digest(state)
    torch.save(state, checkpoint)


@pytest.mark.slow
@pytest.mark.parametrize("stored, given, flags", [
    (False, [], ["--eval"]),  # auto-resumed from the run folder; the default (True) against a False checkpoint
    # the demo's values 1-4 are classes 0-3, or under False classes 1-4 of 5 (the checkpoint has 4 outputs)
    (True, ["DATA.REDUCE_ZERO_LABEL", "False", "DATA.NUM_CLASSES", "5"], ["--eval", "--resume"]),
    (False, [], ["--resume"]),  # going on training
], ids=["eval-auto", "eval-resume", "train-resume"])
def test_a_checkpoint_is_used_only_under_its_label_convention(stored, given, flags, copied_run):
    """Under the other DATA.REDUCE_ZERO_LABEL every label value means the neighbouring class: --eval scored the
    checkpoint against shifted labels without a word (the demo's mIoU fell to a few per cent). The convention is
    in the config every checkpoint stores; another one is refused naming the key, before anything is written."""
    data, out, _ = copied_run
    checkpoint = out / SEGMENTATION_RUN / "ckpt_epoch_0.pth"
    with_convention(checkpoint, stored)
    before = snapshot(out)
    args = [*flags, str(checkpoint)] if flags[-1] == "--resume" else flags
    with pytest.raises(UsageError, match=rf"ckpt_epoch_0.pth( \(TRAIN.AUTO_RESUME\))?: it was trained with "
                                         rf"DATA.REDUCE_ZERO_LABEL {stored} "
                                         rf"and this run has {not stored}, so every output would mean another "
                                         rf"class; pass --opts DATA.REDUCE_ZERO_LABEL {stored}$"):
        run(TASK, ["--cfg", CFG, "--data-path", str(data), "--output", str(out), "--device", "cpu", *args,
                   "--opts", *TINY, "TRAIN.EPOCHS", "2", *given])
    assert_intact(out, before)


@pytest.mark.slow
def test_a_checkpoint_without_a_saved_config_is_evaluated_as_before(copied_run):
    data, out, _ = copied_run
    checkpoint = out / SEGMENTATION_RUN / "ckpt_epoch_0.pth"
    with_convention(checkpoint, None)
    run(TASK, ["--cfg", CFG, "--data-path", str(data), "--output", str(out), "--device", "cpu", "--eval",
               "--resume", str(checkpoint), "--opts", *TINY])
    log = this_run((out / SEGMENTATION_RUN / "log_rank0.txt").read_text())
    assert f"resumed weights from {checkpoint}" in log and "mIoU" in log


@pytest.mark.slow
def test_pretrained_weights_of_the_other_label_convention_give_their_backbone_and_say_so(copied_run, caplog):
    _, out, _ = copied_run
    checkpoint = out / SEGMENTATION_RUN / "ckpt_epoch_0.pth"
    with_convention(checkpoint, False)
    args = task_args(CFG)
    args.opts = TINY
    config = get_config(args, segmentation_defaults(), SEGMENTATION_RULES)
    model = build_segmenter(config, num_classes=4)
    with caplog.at_level(logging.INFO, LOG.name):
        load_backbone(str(checkpoint), backbone(model), LOG, config=config)
    assert (f"--pretrained {checkpoint} was trained with DATA.REDUCE_ZERO_LABEL False (this run: True): only its "
            f"backbone is loaded") in caplog.text
    assert f"pretrained backbone and output norms from the dense checkpoint {checkpoint}: " in caplog.text
