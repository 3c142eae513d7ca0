"""predict.py end to end: generated images through a real subprocess, whose printed classes and probabilities are
the model's own softmax for each image, and the errors that name the bad input."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from config import UsageError, load_config
from data.transforms import build_transform
from models import build_model, load_weights
from predict import parse_args, predict
from tests.helpers import REPO, randomise
from tools.golden import FIXTURES, case_opts, load_case

CFG = str(REPO / "configs" / "focal_tiny_patch4_window7_224.yaml")
FIXTURE = str(FIXTURES / "small_fc_224.pth")
SMALL_OPTS = [str(v) for v in case_opts(load_case(FIXTURES / "small_fc_224.json"))]  # 10 classes, as the fixture


@pytest.fixture
def images(tmp_path):
    """Three noise images (JPEG, PNG, one in a subfolder) of odd sizes, and a text file to be ignored."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    for name, size in (("a.jpg", (300, 200)), ("b.png", (97, 131)), ("sub/c.JPEG", (224, 224))):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    return folder


def run_predict(*args):
    return subprocess.run([sys.executable, str(REPO / "predict.py"), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def parse_output(stdout):
    """``{image path: [(probability, class label), ...]}`` from the printed blocks."""
    out, current = {}, None
    for line in stdout.splitlines():
        if line.startswith("  "):
            prob, label = line.split(maxsplit=1)
            out[current].append((float(prob), label))
        else:
            current = line
            out[current] = []
    return out


def model_probabilities(model, config, path):
    """The softmax of the model's logits for the image at ``path``, computed here: RGB, the evaluation transform
    of ``config`` (resize, centre crop, normalisation), one forward pass of the plain model."""
    with Image.open(path) as image:
        x = build_transform(False, config)(image.convert("RGB"))
    with torch.no_grad():
        return model.eval()(x[None])[0].double().softmax(-1)


def check_ranked(rows, k, probs):
    """The printed rows are the top ``k`` classes of ``probs``, best first, each with its probability to the 4
    printed decimals (1e-5 more for another kernel's summation order; ties may come in either order)."""
    printed = [p for p, _ in rows]
    indices = [int(label.split()[0]) for _, label in rows]
    assert len(rows) == k and len(set(indices)) == k
    assert printed == sorted(printed, reverse=True)
    for p, i in zip(printed, indices):
        assert abs(p - probs[i].item()) <= 5e-5 + 1e-5, (i, p, probs[i].item())
    others = [probs[i].item() for i in range(len(probs)) if i not in indices]
    assert not others or min(probs[indices]).item() >= max(others) - 1e-5


@pytest.mark.slow
def test_imagenet_model_prints_top5_names_in_batches(images, tmp_path):
    torch.manual_seed(0)
    opts = list(SMALL_OPTS)
    opts[opts.index("MODEL.NUM_CLASSES") + 1] = "1000"
    config = load_config(CFG, opts)
    model = randomise(build_model(config))  # distinct probabilities, not ~1/1000 each
    torch.save({"model": model.state_dict()}, tmp_path / "imagenet.pth")
    result = run_predict("--cfg", CFG, "--opts", *opts, "--checkpoint", str(tmp_path / "imagenet.pth"),
                         "--batch-size", "2", "--device", "cpu", str(images))
    assert result.returncode == 0, result.stderr
    printed = parse_output(result.stdout)
    assert sorted(printed) == sorted(str(images / n) for n in ("a.jpg", "b.png", "sub/c.JPEG"))
    for path, rows in printed.items():
        check_ranked(rows, 5, model_probabilities(model, config, path))
        for _, label in rows:
            index, name = label.split(maxsplit=1)
            assert 0 <= int(index) < 1000 and name  # an ImageNet class description, e.g. "tench, Tinca tinca"


@pytest.mark.slow
def test_released_layout_checkpoint_with_other_class_count_prints_indices(images, capsys):
    result = run_predict("--cfg", CFG, "--opts", *SMALL_OPTS, "--checkpoint", FIXTURE, str(images / "a.jpg"),
                         str(images / "b.png"))
    assert result.returncode == 0, result.stderr
    printed = parse_output(result.stdout)
    assert list(printed) == [str(images / "a.jpg"), str(images / "b.png")]
    config = load_config(CFG, SMALL_OPTS)
    model = build_model(config)
    assert load_weights(model, torch.load(FIXTURE, map_location="cpu", weights_only=True)).clean
    for path, rows in printed.items():
        assert all(label.isdigit() for _, label in rows)
        check_ranked(rows, 5, model_probabilities(model, config, path))
    # --json: the same classes and probabilities, one object per image and line; the classes have no names
    predict(parse_args(["--cfg", CFG, "--checkpoint", FIXTURE, "--json", str(images / "a.jpg"), str(images / "b.png"),
                        "--opts", *SMALL_OPTS]))
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["file"] for line in lines] == list(printed)
    for line, rows in zip(lines, printed.values()):
        assert line["classes"] == [int(label) for _, label in rows] and line["labels"] == [None] * 5
        assert [round(score, 4) for score in line["scores"]] == [p for p, _ in rows]


@pytest.mark.slow
def test_missing_checkpoint_is_a_short_error(images, tmp_path):
    result = run_predict("--cfg", CFG, "--checkpoint", str(tmp_path / "none.pth"), str(images))
    assert result.returncode != 0
    assert "--checkpoint" in result.stderr and "none.pth" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("problem", ["empty folder", "missing path", "unreadable image", "wrong checkpoint",
                                     "bad config"])
def test_bad_input_names_the_flag_or_file(problem, images, tmp_path):
    opts, checkpoint, paths = SMALL_OPTS, FIXTURE, [str(images)]
    expected = {"empty folder": "no images found", "missing path": "nothing.png",
                "unreadable image": "broken.jpg", "wrong checkpoint": "--checkpoint", "bad config": "MODEL.FOCAL.NOPE"}
    if problem == "empty folder":
        (tmp_path / "empty").mkdir()
        paths = [str(tmp_path / "empty")]
    elif problem == "missing path":
        paths = [str(images), str(tmp_path / "nothing.png")]
    elif problem == "unreadable image":
        (images / "broken.jpg").write_bytes(b"not a jpeg")
    elif problem == "wrong checkpoint":
        opts = SMALL_OPTS + ["MODEL.FOCAL.EMBED_DIM", "32"]
    else:
        opts = SMALL_OPTS + ["MODEL.FOCAL.NOPE", "1"]
    with pytest.raises(UsageError, match=expected[problem]):
        predict(parse_args(["--cfg", CFG, "--opts", *opts, "--checkpoint", checkpoint, *paths]))


def test_16_bit_images_are_read_as_main_py_reads_them(tmp_path, capsys):
    """predict.py converted images with Pillow's plain ``convert("RGB")``, which clips 16-bit grey values above 255
    to white, while main.py's loader scales them to 8 bits: a 16-bit PNG got another answer than --eval gives
    for the same file. It must be classified exactly as its 8-bit version."""
    ramp = (np.arange(224 * 224, dtype=np.uint32).reshape(224, 224) % 65536).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    Image.fromarray(np.rint(ramp / 257.0).astype(np.uint8)).save(tmp_path / "flat.png")
    predict(parse_args(["--cfg", CFG, "--opts", *SMALL_OPTS, "--checkpoint", FIXTURE, "--device", "cpu",
                        str(tmp_path / "deep.png"), str(tmp_path / "flat.png")]))
    printed = parse_output(capsys.readouterr().out)
    assert printed[str(tmp_path / "deep.png")] == printed[str(tmp_path / "flat.png")]


def test_an_image_over_the_pixel_limit_is_named_in_one_line(images, monkeypatch):
    """Pillow refuses images over its pixel limit with DecompressionBombError, which predict.py let through as a
    traceback (main.py names the file)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20000)  # a.jpg (300x200) is over twice the limit
    with pytest.raises(UsageError, match=rf"cannot read image {images / 'a.jpg'}: Image size"):
        predict(parse_args(["--cfg", CFG, "--opts", *SMALL_OPTS, "--checkpoint", FIXTURE, str(images / "a.jpg")]))


def test_hidden_files_of_a_folder_are_not_images(images, capsys):
    """A folder copied from macOS holds a ``._<name>`` AppleDouble file beside each image: predict.py stopped on
    the first as an unreadable image. Folders are expanded as main.py reads them, hidden entries left out."""
    (images / "._a.jpg").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X")
    (images / ".ipynb_checkpoints").mkdir()
    (images / ".ipynb_checkpoints" / "d.png").write_bytes((images / "b.png").read_bytes())
    predict(parse_args(["--cfg", CFG, "--opts", *SMALL_OPTS, "--checkpoint", FIXTURE, "--device", "cpu",
                        str(images)]))
    assert sorted(parse_output(capsys.readouterr().out)) == sorted(str(images / n) for n in ("a.jpg", "b.png",
                                                                                          "sub/c.JPEG"))


def test_a_checkpoint_trained_at_another_size_is_refused_naming_the_size_it_was_trained_at(previous_run, images):
    """A run trained with --opts DATA.IMG_SIZE 32, predicted with its config file alone (64 px), was refused with
    only a missing neighbour table's key: nothing said the image size was the setting to pass."""
    from tests.helpers import run_dir
    checkpoint = str(run_dir(previous_run) / "ckpt_epoch_0.pth")
    with pytest.raises(UsageError, match=r"--checkpoint .*: missing 1 keys: .* it was trained with "
                                         r"DATA.IMG_SIZE 32 \(this config: 64\)"):
        predict(parse_args(["--cfg", str(REPO / "configs" / "demo" / "focal_demo.yaml"), "--checkpoint", checkpoint,
                            str(images)]))


def test_images_swallowed_by_opts_are_named_as_such(images, capsys):
    """``--opts DATA.IMG_SIZE 32 photos/`` hands photos/ to --opts (it takes every value up to the next flag), and
    argparse answered 'the following arguments are required: images' to a command that names its images."""
    with pytest.raises(SystemExit):
        parse_args(["--cfg", CFG, "--checkpoint", FIXTURE, "--opts", "DATA.IMG_SIZE", "32", str(images)])
    assert "put the images before --opts, or end --opts with --" in capsys.readouterr().err
