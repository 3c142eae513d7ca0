"""timm integration: the nine registered names build the configs' models, load released-layout checkpoints, and
serve as feature backbones at detection sizes."""
import pytest
import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from config import load_config
from models import build_model
from models.registry import RELEASE_URL
from tests.golden import FIXTURES, case_input, load_case
from tests.helpers import REPO

RELEASED = sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))
FIXTURE = FIXTURES / "small_fc_224.pth"


def small_case_kwargs() -> dict:
    """The fixture's architecture as ``create_model`` keyword overrides (config keys are the kwargs, upper-cased)."""
    case = load_case(FIXTURES / "small_fc_224.json")
    return dict({k.lower(): v for k, v in case["focal"].items()}, num_classes=case["num_classes"],
                drop_path_rate=0.0)


def from_fixture(**kwargs) -> torch.nn.Module:
    """Focal-T's registration with the fixture's sizes, loading the fixture file the way timm loads releases."""
    overlay = dict(file=str(FIXTURE), num_classes=10)
    return timm.create_model("focal_tiny_patch4_window7_224", pretrained=True, pretrained_cfg_overlay=overlay,
                             **dict(small_case_kwargs(), **kwargs)).eval()


def test_nine_released_names_registered_with_release_configs():
    assert len(RELEASED) == 9
    assert set(RELEASED) <= set(timm.list_models("focal*"))
    for name in RELEASED:
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.url == RELEASE_URL + name.replace("_patch4_window7_224", "-is224-ws7.pth").replace("_", "-")
        assert (cfg.input_size, cfg.interpolation, cfg.crop_pct, cfg.num_classes) == ((3, 224, 224), "bicubic",
                                                                                      0.875, 1000)
        assert (cfg.mean, cfg.std) == (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
        assert not cfg.hf_hub_id


@pytest.mark.parametrize("name", RELEASED)
def test_create_model_builds_the_config_model(name):
    with torch.device("meta"):  # structure only: no weights to initialise
        ours = build_model(load_config(str(REPO / "configs" / f"{name}.yaml")))
        theirs = timm.create_model(name)
    assert [(n, p.shape) for n, p in theirs.named_parameters()] == [(n, p.shape) for n, p in ours.named_parameters()]
    assert str(theirs) == str(ours)  # every module setting, drop-path rates included


def test_pretrained_local_file_reproduces_fixture_logits():
    case = load_case(FIXTURES / "small_fc_224.json")
    with torch.no_grad():
        got = from_fixture()(case_input(case))
    torch.testing.assert_close(got, torch.tensor(case["output"]), atol=1e-4, rtol=1e-4)


def test_pretrained_filter_unwraps_reference_layout_and_prefixes(tmp_path):
    case = load_case(FIXTURES / "small_fc_224.json")
    checkpoint = torch.load(FIXTURE, map_location="cpu", weights_only=True)
    wrapped = {"model": {f"module._orig_mod.{k}": v for k, v in checkpoint["model"].items()}, "epoch": 3}
    for overlay in (dict(state_dict=wrapped), dict(file=str(tmp_path / "w.pth"))):
        torch.save(wrapped, tmp_path / "w.pth")
        model = timm.create_model("focal_tiny_patch4_window7_224", pretrained=True,
                                  pretrained_cfg_overlay=dict(overlay, num_classes=10), **small_case_kwargs()).eval()
        with torch.no_grad():
            torch.testing.assert_close(model(case_input(case)), torch.tensor(case["output"]), atol=1e-4, rtol=1e-4)


def test_pretrained_with_other_class_count_keeps_backbone_and_resets_head():
    reference = from_fixture()
    model = from_fixture(num_classes=3)
    assert model.head.out_features == 3
    for name, value in reference.state_dict().items():
        if not name.startswith("head."):
            torch.testing.assert_close(model.state_dict()[name], value, atol=0, rtol=0, msg=name)


# Released structure (conv stem for focalv2, two pooled levels, window 7) at small widths and depths.
SMALL_V1 = dict(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(2, 2, 4, 8))


@pytest.mark.parametrize("name", ["focal_tiny_patch4_window7_224", "focalv2_tiny_useconv_patch4_window7_224"])
@pytest.mark.parametrize("size", [(224, 224), pytest.param((800, 1216), marks=pytest.mark.slow)])
def test_features_only_gives_stride_4_to_32_maps(name, size):
    torch.manual_seed(0)
    backbone = timm.create_model(name, features_only=True, **SMALL_V1).eval()
    assert backbone.feature_info.reduction() == [4, 8, 16, 32]
    assert backbone.feature_info.channels() == [16, 32, 64, 128]
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        feats = backbone(x)
        final, inter = backbone.model.forward_intermediates(x)
        picked = timm.create_model(name, features_only=True, out_indices=(1, 3), **SMALL_V1).eval()
        picked.load_state_dict(backbone.state_dict())
        odd = picked(x)
    want = [(1, 16 * 2 ** i, size[0] // (4 * 2 ** i), size[1] // (4 * 2 ** i)) for i in range(4)]
    assert [tuple(f.shape) for f in feats] == want
    assert final.shape == (1, size[0] // 32, size[1] // 32, 128)
    for got, expected in zip(inter, feats):
        torch.testing.assert_close(got, expected, atol=0, rtol=0)
    assert picked.feature_info.reduction() == [8, 32]
    for got, expected in zip(odd, [feats[1], feats[3]]):
        torch.testing.assert_close(got, expected, atol=0, rtol=0)


@pytest.mark.parametrize("name", ["focal_tiny_patch4_window7_224", "focalv2_tiny_useconv_patch4_window7_224"])
def test_backbones_carry_only_the_stages_they_use(name):
    torch.manual_seed(0)
    full = timm.create_model(name, **SMALL_V1).eval()
    backbone = timm.create_model(name, features_only=True, out_indices=(0, 1), **SMALL_V1).eval()
    backbone.model.load_state_dict(full.state_dict(), strict=False)
    names = [n for n, _ in backbone.model.named_parameters()]
    assert not [n for n in names if n.startswith(("norm.", "head.", "layers.2", "layers.3", "layers.1.downsample"))]
    assert names == [n for n in names if n in dict(full.named_parameters())]
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        want = full.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
        got = backbone(x)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=0, rtol=0)


def test_pretrained_backbone_loads_released_layout():
    backbone = timm.create_model("focal_tiny_patch4_window7_224", features_only=True, pretrained=True,
                                 pretrained_cfg_overlay=dict(file=str(FIXTURE), num_classes=10),
                                 **small_case_kwargs()).eval()
    x = torch.randn(1, 3, 160, 96)
    with torch.no_grad():
        want = from_fixture().forward_intermediates(x, intermediates_only=True)
        got = backbone(x)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=0, rtol=0)
