"""The config tree: defaults that build the reference model, no imports of what it configures, BASE inheritance,
and errors that name the key."""
import json
import subprocess
import sys

import pytest

from config import load_config
from models import build_model
from tests.helpers import REPO


def test_released_config_over_the_defaults_builds_the_reference_model():
    """The defaults fill every key the released YAML leaves out (MLP ratio, biases, norms, expansion, ...): together
    they must build the reference's Focal-T, whose parameter count and FLOPs tests/fixtures recorded from it."""
    reference = json.loads((REPO / "tests" / "fixtures" / "focal_tiny_patch4_window7_224.json").read_text())
    cfg = load_config(str(REPO / "configs" / "focal_tiny_patch4_window7_224.yaml"))
    assert cfg.is_frozen()
    model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) == reference["n_parameters"]
    assert model.flops() == reference["flops"]


def test_config_imports_none_of_the_modules_it_configures():
    code = ("import sys, config; print(sorted(m for m in ('data', 'data.datasets', 'engine', 'optimizer', "
            "'lr_scheduler', 'models', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_released_yaml_and_opts_override(tmp_path):
    cfg = load_config("configs/focal_small_patch4_window7_224.yaml", ["MODEL.NUM_CLASSES", "10", "DATA.IMG_SIZE", 192])
    assert cfg.MODEL.FOCAL.DEPTHS == [2, 2, 18, 2] and cfg.MODEL.NUM_CLASSES == 10 and cfg.DATA.IMG_SIZE == 192


def test_base_inheritance_is_relative_to_the_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "base.yaml").write_text("MODEL:\n  TYPE: focalv2\n  FOCAL:\n    EMBED_DIM: 64\n")
    (tmp_path / "sub" / "child.yaml").write_text("BASE: ['../base.yaml']\nMODEL:\n  FOCAL:\n    EMBED_DIM: 32\n")
    cfg = load_config(str(tmp_path / "sub" / "child.yaml"))
    assert cfg.MODEL.TYPE == "focalv2" and cfg.MODEL.FOCAL.EMBED_DIM == 32


def test_unknown_key_in_file_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("MODEL:\n  FOCAL:\n    FOCAL_LEVEL: [2, 2, 2, 2]\n")
    with pytest.raises(KeyError, match=r"MODEL\.FOCAL\.FOCAL_LEVEL.*bad\.yaml"):
        load_config(str(path))


def test_unknown_and_mistyped_opts_are_named():
    with pytest.raises(KeyError, match=r"TRAIN\.EPOCH\b"):
        load_config(opts=["TRAIN.EPOCH", 3])
    with pytest.raises(ValueError, match=r"MODEL\.FOCAL\.DEPTHS"):
        load_config(opts=["MODEL.FOCAL.DEPTHS", "'deep'"])
    with pytest.raises(ValueError, match="KEY VALUE"):
        load_config(opts=["MODEL.NUM_CLASSES"])


def test_missing_file_and_self_inheritance(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(str(tmp_path / "nope.yaml"))
    loop = tmp_path / "loop.yaml"
    loop.write_text("BASE: ['loop.yaml']\n")
    with pytest.raises(ValueError, match="inherits from itself"):
        load_config(str(loop))


def test_retired_keys_of_saved_configs_still_load(tmp_path, caplog):
    """A config.yaml saved by an earlier version (or a Swin-style file) names keys this tree no longer has."""
    saved = tmp_path / "config.yaml"
    saved.write_text("DEBUG_MODE: false\nLOCAL_RANK: 0\nDATA:\n  DATASET: imagenet\n  IMG_SIZE: 192\n"
                     "MODEL:\n  SPEC: {NUM_STAGES: 4}\n")
    with caplog.at_level("WARNING"):
        cfg = load_config(str(saved), opts=["LOCAL_RANK", 1])
    assert cfg.DATA.IMG_SIZE == 192
    assert not {"DEBUG_MODE", "LOCAL_RANK"} & set(cfg) and "DATASET" not in cfg.DATA and "SPEC" not in cfg.MODEL
    assert "DEBUG_MODE" in caplog.text and "DATA.DATASET" in caplog.text


def test_a_section_given_a_value_is_one_line_naming_it(tmp_path):
    """A YAML section left empty (``DATA:`` with its keys commented out) reads as None; yacs refused it with the
    whole section of defaults printed over some 35 lines, which main.py passed on as its 'one-line' error."""
    empty = tmp_path / "empty_section.yaml"
    empty.write_text("MODEL:\n  TYPE: focal\nDATA:\n#  IMG_SIZE: 64\n")
    with pytest.raises(ValueError) as info:
        load_config(str(empty))
    message = str(info.value)
    assert "\n" not in message and message.startswith("DATA is a section of keys (BATCH_SIZE, ")
    assert message.endswith("got None (an empty section: indent its keys under it, or remove it) "
                            f"(in {empty})")
    with pytest.raises(ValueError, match=r"^MODEL.FOCAL is a section of keys \(.*\), not a value: got 3$"):
        load_config(opts=["MODEL.FOCAL", "3"])
    with pytest.raises(ValueError, match=r"^DATA.IMG_SIZE takes one value \(now 224\), not a section of keys \(X\)"):
        load_config(opts=["DATA.IMG_SIZE", "{'X': 1}"])


def test_invalid_yaml_is_one_line_naming_file_line_and_column(tmp_path):
    """PyYAML's messages span three to five lines, repeating the file name; main.py's error is one line."""
    tabbed = tmp_path / "tabbed.yaml"
    tabbed.write_text("MODEL:\n\tTYPE: focal\n")
    with pytest.raises(ValueError) as info:
        load_config(str(tabbed))
    assert str(info.value) == (f"config file {tabbed} is not valid YAML: line 2, column 1: found character '\\t' "
                               f"that cannot start any token (while scanning for the next token)")
    unclosed = tmp_path / "unclosed.yaml"
    unclosed.write_text("MODEL:\n  TYPE: [focal\n")
    with pytest.raises(ValueError) as info:
        load_config(str(unclosed))
    assert str(info.value) == (f"config file {unclosed} is not valid YAML: line 3, column 1: expected ',' or ']', "
                               f"but got '<stream end>' (while parsing a flow sequence from line 2, column 9)")


def test_a_base_file_that_is_not_utf8_is_named(tmp_path):
    """A config saved in Latin-1 (an accent in a comment) raised the bare UnicodeDecodeError, which names no file:
    with BASE inheritance the user could not tell which one."""
    (tmp_path / "base.yaml").write_bytes(b"# r\xe9glages\nMODEL:\n  TYPE: focal\n")
    (tmp_path / "child.yaml").write_text("BASE: ['base.yaml']\nDATA:\n  IMG_SIZE: 64\n")
    with pytest.raises(ValueError, match=rf"^config file {tmp_path / 'base.yaml'} is not UTF-8 text \(invalid "
                                         rf"continuation byte at byte 3\)$"):
        load_config(str(tmp_path / "child.yaml"))


TREES = {
    "classification": ("configs/demo/focal_demo.yaml", None, None),
    "detection": ("configs/detection/demo.yaml", "detection.config:detection_defaults", "DETECTION_RULES"),
    "segmentation": ("configs/segmentation/demo.yaml", "segmentation.config:segmentation_defaults",
                     "SEGMENTATION_RULES"),
}


@pytest.mark.parametrize("task", TREES)
@pytest.mark.parametrize("opts, message", [
    (["TRAIN.CLIP_GRAD", -1], r"TRAIN.CLIP_GRAD must be 0 or more \(the largest gradient norm"),
    (["TRAIN.START_EPOCH", 12], r"TRAIN.START_EPOCH must be below TRAIN.EPOCHS"),
    (["MODEL.DROP_PATH_RATE", 1.0], r"MODEL.DROP_PATH_RATE must be in \[0, 1\)"),
    (["TAG", "a/b"], r"--tag \(TAG\) must be one folder name"),
    (["DATA.DATA_PATH", ""], r"--data-path \(DATA.DATA_PATH\) is required for training and evaluation"),
])
def test_every_task_refuses_the_shared_keys_alike(task, opts, message):
    """The keys every task has (config.run_defaults) have one set of rules (config.RUN_RULES), read by
    classification's and the dense tasks' one get_config: a value is refused in the same words by all three."""
    import argparse
    import importlib

    from config import UsageError, get_config
    cfg, defaults, rules = TREES[task]
    extra = ()
    if defaults:
        module, name = defaults.split(":")
        module = importlib.import_module(module)
        extra = (getattr(module, name)(), getattr(module, rules))
    args = argparse.Namespace(cfg=str(REPO / cfg), opts=["TRAIN.EPOCHS", 12, "DATA.DATA_PATH", "data", *opts])
    with pytest.raises(UsageError, match=message):
        get_config(args, *extra)


@pytest.mark.parametrize("opts, refused", [
    (["AUG.MIXUP", 0.8], True),
    (["AUG.CUTMIX", 1.0], True),
    ([], False),  # the demo config mixes nothing: any batch
    (["AUG.MIXUP", 0.8, "EVAL_MODE", True], False),  # evaluation mixes nothing
])
def test_an_odd_batch_with_mixup_is_refused_with_the_config(opts, refused):
    """timm's Mixup pairs each image with its mirror in the batch and fails at the first step on an odd one."""
    import argparse

    from config import UsageError, get_config
    args = argparse.Namespace(cfg=str(REPO / "configs/demo/focal_demo.yaml"),
                              opts=["DATA.DATA_PATH", "data", "DATA.BATCH_SIZE", 3, *opts])
    if refused:
        with pytest.raises(UsageError, match=r"--batch-size \(DATA.BATCH_SIZE\) must be even to train with Mixup/CutMix"
                                             r".*got 3"):
            get_config(args)
    else:
        assert get_config(args).DATA.BATCH_SIZE == 3
