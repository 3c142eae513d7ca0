"""tools/dense_params.py: counts on the meta device are a real build's, and every dense config of a released backbone
is within 3% of the seed's #params where the seed gives one."""
import pytest

from config import load_config
from detection.config import detection_defaults
from detection.model import build_detector
from segmentation.config import segmentation_defaults
from segmentation.model import build_segmenter
from tests.helpers import REPO
from tools import dense_params


@pytest.mark.parametrize("task, defaults, build, classes", [
    ("detection", detection_defaults, build_detector, 80),
    ("segmentation", segmentation_defaults, build_segmenter, 150)])
def test_meta_device_count_is_the_built_models(task, defaults, build, classes):
    """The demo configs (small backbones) built for real on the CPU count as many parameters as on the meta device."""
    path = str(REPO / "configs" / task / "demo.yaml")
    built = build(load_config(path, None, defaults()), classes)
    counted = dense_params.count(task, path)
    assert counted.params_m == sum(p.numel() for p in built.parameters()) / 1e6
    assert counted.seed_m is None and counted.ratio is None  # a demo backbone is not in the seed's tables


@pytest.mark.slow
def test_every_config_of_a_released_backbone_is_within_3_percent_of_the_seed(capsys):
    counts = dense_params.main([])
    out = capsys.readouterr().out
    paths = [p for task in ("detection", "segmentation") for p in (REPO / "configs" / task).glob("*.yaml")]
    assert {c.config for c in counts} == {p.stem for p in paths if "demo" not in p.stem}
    compared = [c for c in counts if c.seed_m is not None]
    assert {(c.head, c.backbone) for c in compared} >= {("mask_rcnn", dense_params.T), ("upernet", dense_params.B)}
    for c in compared:
        assert abs(c.ratio - 1) <= 0.03, c
        assert f"| {c.params_m:.2f} " in out and f"| {c.ratio:.3f} " in out
