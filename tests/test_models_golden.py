"""The reference implementation's outputs are the contract: names, shapes, counts, FLOPs and logits."""
import re

import pytest
import torch

from config import load_config
from models import build_model, load_weights
from models.kernels import KERNELS, optimize_for
from models.kernels.onednn_linear import onednn_available
from tests.helpers import GOLDEN
from tests.oracles import GATHERS, oracle_gather
from tools.golden import CASE_FILES, FIXTURES, build_filled, case_input, case_opts, load_case

RELEASED_PARAMS_M = {  # the released model zoo table, in millions
    "focal_tiny_patch4_window7_224": 28.9, "focal_tiny_useconv_patch4_window7_224": 30.8,
    "focalv2_tiny_useconv_patch4_window7_224": 30.2, "focal_small_patch4_window7_224": 51.1,
    "focal_small_useconv_patch4_window7_224": 53.1, "focalv2_small_useconv_patch4_window7_224": 51.5,
    "focal_base_patch4_window7_224": 89.8, "focal_base_useconv_patch4_window7_224": 93.3,
    "focalv2_base_useconv_patch4_window7_224": 91.2,
}


def cases_section() -> str:
    text = (FIXTURES / "README.md").read_text()
    assert "\n## Cases\n" in text
    return text.split("\n## Cases\n", 1)[1]


def test_every_fixture_is_documented_with_its_recipe():
    """tests/fixtures/README.md says how each case was made (tools/make_fixtures.py), and names no missing file."""
    documented = set(re.findall(r"^\| `([\w.]+)` \|", cases_section(), flags=re.M))
    assert documented == {p.stem for p in CASE_FILES}
    assert {load_case(p)["name"] for p in CASE_FILES} == documented


# The released-size cases run full-size models at 224 (5-10 s each on 2 cores): slow.
CASES = [pytest.param(p, marks=pytest.mark.slow) if p.stem in RELEASED_PARAMS_M else p for p in CASE_FILES]


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.stem)
def test_parameters_logits_and_flops_match_reference(path):
    """The plain model (what accelerators run), then the same model switched to every CPU kernel of
    models/kernels (whichever of them this CPU would choose), must both reproduce the fixtures; so must the plain v1
    model with its keys gathered by the roll and unfold oracles instead of the layout index. One model serves all:
    building and filling a released size takes longer than its forward passes."""
    case = load_case(path)
    model = build_filled(case)
    want = torch.tensor(case["output"])
    x = case_input(case)
    for kernels in ("plain", "all-cpu-kernels"):
        if kernels != "plain":
            optimize_for(model, "cpu", [k for k in KERNELS if k != "onednn_linear" or onednn_available()])
        assert [[n, list(p.shape)] for n, p in model.named_parameters()] == case["parameters"]
        assert sum(p.numel() for p in model.parameters()) == case["n_parameters"]
        assert int(model.flops()) == case["flops"]
        with torch.no_grad():
            torch.testing.assert_close(model(x), want, **GOLDEN, msg=lambda m: f"{kernels}: {m}")
        if case["model_type"] == "focal" and kernels == "plain":
            for method in GATHERS:
                with oracle_gather(model, method) as n_modules, torch.no_grad():
                    assert n_modules > 0
                    got = model(x)
                torch.testing.assert_close(got, want, **GOLDEN, msg=lambda m: f"{kernels}, {method}: {m}")


SMALL_CASES = [p for p in CASE_FILES if p.stem not in RELEASED_PARAMS_M]


@pytest.mark.parametrize("kernels", ["plain", "all-cpu-kernels"])
@pytest.mark.parametrize("path", SMALL_CASES, ids=lambda p: p.stem)
def test_training_graph_reproduces_the_fixture_logits(path, kernels):
    """The forward pass that training runs (train mode, autograd recording: other attention kernels, no bias
    cache, the blocked kernel's autograd function), with dropout and drop-path at 0, gives the reference's
    logits too, and they carry a gradient."""
    case = load_case(path)
    model = build_filled(case, ["MODEL.ATTN_DROP_RATE", 0.0]).train()
    if kernels != "plain":
        optimize_for(model, "cpu", [k for k in KERNELS if k != "onednn_linear" or onednn_available()])
    assert torch.is_grad_enabled()
    out = model(case_input(case))
    assert out.requires_grad
    torch.testing.assert_close(out.detach(), torch.tensor(case["output"]), **GOLDEN)


@pytest.mark.parametrize("name", sorted(RELEASED_PARAMS_M))
def test_released_configs_build_with_published_size(name):
    case = load_case(FIXTURES / f"{name}.json")
    with torch.device("meta"):  # sizes and FLOPs only: no weights to initialise
        model = build_model(load_config(f"configs/{name}.yaml"))
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == case["n_parameters"]
    assert round(n_params / 1e6, 1) == RELEASED_PARAMS_M[name]
    assert int(model.flops()) == case["flops"]


def test_official_checkpoint_layout_reproduces_logits():
    case = load_case(FIXTURES / "small_fc_224.json")
    model = build_model(load_config(opts=case_opts(case))).eval()
    checkpoint = torch.load(FIXTURES / "small_fc_224.pth", map_location="cpu", weights_only=True)
    report = load_weights(model, checkpoint)
    assert report.clean, report.summary()
    assert report.dropped_reference_buffers == len(case["buffers"])
    with torch.no_grad():
        got = model(case_input(case))
    torch.testing.assert_close(got, torch.tensor(case["output"]), **GOLDEN)


@pytest.mark.parametrize("problem, message", [
    ("no checkout", r"--reference .*: no classification/__init__.py"),
    ("unknown key", r"config \(--cfg .* / --opts\): .*MODEL.FOCAL.NOPE"),
])
def test_make_fixtures_names_a_bad_reference_or_key_in_one_line(problem, message, tmp_path, capsys, monkeypatch):
    """A wrong --reference path or --opts key of the fixture writer ended in a traceback; nothing is written. Its
    ``main`` in this process (``python -m tools.make_fixtures`` calls it alone): exit status 2 and one line, as
    argparse's own errors; any other exception would fail the test."""
    import sys

    import timm.data.transforms as timm_transforms

    from tools import make_fixtures
    # what importing the (empty) reference leaves behind goes with the test
    monkeypatch.setitem(sys.modules, "focal_reference", None)
    monkeypatch.setattr(timm_transforms, "_pil_interp", timm_transforms.str_to_pil_interp, raising=False)
    (tmp_path / "ref" / "classification").mkdir(parents=True)
    if problem == "unknown key":
        (tmp_path / "ref" / "classification" / "__init__.py").write_text("")
    with pytest.raises(SystemExit) as stop:
        make_fixtures.main(["--reference", str(tmp_path / "ref"), "--cfg", "configs/demo/focal_demo.yaml", "--opts",
                            "MODEL.FOCAL.NOPE", "1", "--output", str(tmp_path / "case.json")])
    stderr = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in stderr, stderr
    assert re.search(message, stderr.strip().splitlines()[-1]), stderr
    assert not (tmp_path / "case.json").exists()
