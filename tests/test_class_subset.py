"""Evaluating a checkpoint on a folder of some of its classes (ImageNet-A/-R/-V2 layouts): folders are matched to
the checkpoint's classes (stored names, else ImageNet's WordNet ids for 1000 classes) and only their logits
compete."""
from __future__ import annotations

import logging
import shutil

import pytest
import torch
import torch.nn.functional as F
from timm.data import ImageNetInfo

from config import UsageError, load_config
from data.class_map import checkpoint_classes, logit_indices
from models import build_model
from tests.helpers import DEMO_CFG, TINY_OPTS, demo_args, eval_summary, read_log, sum_roundoff

LOG = logging.getLogger("focal.test")
WNIDS = ImageNetInfo().label_names()


def test_released_checkpoints_are_named_by_wordnet_id():
    assert checkpoint_classes(None, 1000)[:2] == ["n01440764", "n01443537"]
    assert checkpoint_classes(["a", "b"], 2) == ["a", "b"]
    assert checkpoint_classes(None, 10) is None
    assert checkpoint_classes(["a", "b"], 3) is None  # names that do not fit the head are not trusted


def test_folders_map_to_logits_by_name_or_index(caplog):
    with caplog.at_level(logging.INFO, "focal.test"):
        assert logit_indices(["b", "d"], ["a", "b", "c", "d"], 4, "x/val", LOG).tolist() == [1, 3]
        assert "evaluating 2 of the checkpoint's 4 classes" in caplog.text
        # ImageNet-V2's folders are class indices, labelled in sorted (string) order
        assert logit_indices(["1", "10", "2"], WNIDS, 1000, "x/val", LOG).tolist() == [1, 10, 2]
    assert logit_indices(["a", "b"], ["a", "b"], 2, "x/val", LOG) is None
    assert logit_indices(["b", "a"], None, 2, "x/val", LOG) is None  # no names: position, as before
    # Only the folders that are not the checkpoint's are counted and named (it said "2 class folders (zebra, ...)").
    with pytest.raises(UsageError, match=r"--eval: x/val has 1 class folder \(zebra\) that is not among the "
                                         r"checkpoint's 4"):
        logit_indices(["a", "zebra"], ["a", "b", "c", "d"], 4, "x/val", LOG)
    with pytest.raises(UsageError, match=r"has 4 class folders \(e, f, g, \.\.\.\) that are not among"):
        logit_indices(["a", "e", "f", "g", "h"], ["a", "b", "c", "d"], 4, "x/val", LOG)


NAMES = ["Birke", "apple", "caf\u00e9", "dog", "eel", "fig", "gnu"]  # a 7-class checkpoint's (sorted) folders


@pytest.mark.parametrize("folders, classes, num_classes, expected", [
    # macOS writes folder names decomposed: "cafe\u0301" is the stored "caf\u00e9"; sorted, it still lands 3rd
    (["apple", "cafe\u0301", "gnu"], NAMES, 7, [1, 2, 6]),
    (sorted(["apple", "Birke", "cafe\u0301", "dog", "eel", "fig", "gnu"]), NAMES, 7, None),
    # numbered folders with names stored: indices below the class count (none of them is called a stranger)
    (["2", "5"], NAMES, 7, [2, 5]),
    (["004", "6"], None, 7, [4, 6]),  # leading zeros are still the index
], ids=["unicode-form", "all-unicode-forms", "indices-of-named", "zero-padded"])
def test_folders_matched_exactly(folders, classes, num_classes, expected):
    got = logit_indices(folders, classes, num_classes, "v/val", LOG)
    assert (got if got is None else got.tolist()) == expected


@pytest.mark.parametrize("folders, classes, num_classes, message", [
    (["birke", "dog"], NAMES, 7, r"only in letter case: birke \(class Birke\)"),
    (["APPLE", "Birke", "cafe\u0301", "dog", "eel", "fig", "gnu"], NAMES, 7, r"only in letter case: APPLE"),
    (["caf\u00e9", "cafe\u0301"], NAMES, 7, r"name one class twice: 'cafe\\u0301' and 'caf\\xe9'"),
    (["02", "2", "3"], None, 5, r"name one class twice: 02 and 2"),
    # as many folders as classes and no names to go by: still one name twice, not two classes in sorted order
    (["Kl\u00e4ger", "Kla\u0308ger"], None, 2, r"name one class twice: 'Kla\\u0308ger' and 'Kl\\xe4ger'"),
    # 1-based numbers on a 5-class checkpoint: as many folders as classes, yet "5" is no index (sorted order would
    # have made "5" class 4 and every folder after "1" another class)
    (["1", "2", "3", "4", "5"], None, 5, r"numbers that are no class index of the 5-class checkpoint \(0-4\): 5"),
    (["1", "12", "3"], NAMES, 7, r"no class index of the 7-class checkpoint \(0-6\): 12"),
    # "\u00b3" passes str.isdigit but int() refuses it: a name, mixed here with an index
    (["3", "\u00b3"], None, 2, r"mixes class folders named by class index \(3\) with folders named otherwise"),
    (["4", "dog", "eel"], NAMES, 7, r"mixes class folders named by class index \(4\) with folders named otherwise "
                                    r"\(dog, eel\)"),
    # as many as the classes, but digits all the same: no sorted-order guess
    (["\u00b2", "\u00b3"], None, 2, r"2 class folders \(\u00b2, \u00b3\) that are not among class names"),
    (["gnu", "yak", "zebu"], NAMES, 7, r"2 class folders \(yak, zebu\) that are not among"),
], ids=["case", "case-all-classes", "unicode-twins", "zero-padded-twins", "unicode-twins-unnamed", "one-based", "index-too-high",
        "superscript-mixed", "index-among-names", "superscripts", "unknown-names"])
def test_folders_that_cannot_be_matched_exactly_are_refused_in_one_line(folders, classes, num_classes, message):
    with pytest.raises(UsageError, match=message) as refused:
        logit_indices(sorted(folders), classes, num_classes, "v/val", LOG)
    assert str(refused.value).startswith("--eval: v/val ") and "\n" not in str(refused.value)
    assert "not among" not in str(refused.value) or not any(f.isdigit() and f.isascii() for f in folders)


def test_the_sorted_order_is_kept_only_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, "focal.test"):
        assert logit_indices(["p", "q", "r"], ["a", "b", "c"], 3, "v/val", LOG) is None
        assert logit_indices(["p", "q"], None, 2, "v/val", LOG) is None
    assert [r.message.split(":")[0] for r in caplog.records] == [
        "the class folders of v/val are not the checkpoint's class names (a, b, c, ...)",
        "the class folders of v/val cannot be matched by name (the checkpoint stores no class names)"]


@pytest.mark.slow
def test_eval_of_1000_class_checkpoint_on_three_named_classes(demo_data, tmp_path):
    """A stand-in released checkpoint (1000 classes, no names) whose constant logits favour class 999 overall and
    the second of three WordNet-id folders among them; one more folder of the subset is empty."""
    wnids = [WNIDS[5], WNIDS[17], WNIDS[400]]
    data = tmp_path / "subset"
    for wnid, source in zip(wnids, sorted((demo_data / "val").iterdir())):
        shutil.copytree(source, data / "val" / wnid)
    (data / "val" / WNIDS[3]).mkdir()  # a class of the subset without images
    opts = ["MODEL.NUM_CLASSES", "1000"]
    torch.manual_seed(0)
    model = build_model(load_config(DEMO_CFG, TINY_OPTS + opts))
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
        model.head.bias[999] = 10.0
        model.head.bias[17] = 5.0
    checkpoint = tmp_path / "released.pth"
    torch.save({"model": model.state_dict()}, checkpoint)

    from main import main
    main(demo_args(data, tmp_path / "out", "--eval", "--pretrained", str(checkpoint), opts=opts))
    log = read_log(tmp_path / "out")
    assert f"evaluating 4 of the checkpoint's 1000 classes: the folders of {data}/val are matched by name" in log
    summary = eval_summary(log)
    per_class = len(list((data / "val" / wnids[0]).iterdir()))
    assert summary["counted"] == 3 * per_class
    # every image is called WNIDS[17]; printed to 3 decimals: within half the last
    assert float(summary["acc1"]) == pytest.approx(100 / 3, abs=5e-4)
    assert summary["acc5"] == ""  # top-5 of 4 classes says nothing: not printed
    logits = torch.tensor([0.0, 0.0, 5.0, 0.0])  # folders sorted: WNIDS[3], [5], [17], [400]
    targets = torch.tensor([1, 2, 3]).repeat_interleave(per_class)
    expected = F.cross_entropy(logits.expand(len(targets), 4), targets).item()
    # printed to 4 decimals (within half the last), after the float32 rounding of the mean over the images
    assert summary["loss"] == pytest.approx(expected, abs=5e-5 + sum_roundoff(torch.float32, len(targets)) * expected)
