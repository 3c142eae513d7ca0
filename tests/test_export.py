"""torch.export: exported programs compute what the eager model computes (ONNX: test_tools_export.py).

Export runs under ``no_grad``, so the training-time attention backward stays out of the graph. Strict
(TorchDynamo) tracing and PyTorch's default non-strict tracing both keep the per-size layouts as constants.
"""
import pytest
import torch
from torch.export import Dim

from config import load_config
from models import build_model
from models.focal_attention import focal_layout
from models.topk_attention import topk_layout
from tests.helpers import REPO, assert_agree, longest_sum, randomise, roundoff
from tools.golden import FIXTURES, case_opts, load_case

pytestmark = pytest.mark.slow  # tracing, exporting and checking a model takes 2 s to 20 s

# Training-like weights (position tables and top-k biases not all zero), small enough for the released sizes.
STD = 0.05


def export(model, example, dynamic_batch=False, strict=True):
    shapes = ({0: Dim("batch", min=1, max=64)},) if dynamic_batch else None
    with torch.no_grad():
        return torch.export.export(model, (example,), dynamic_shapes=shapes, strict=strict)


@pytest.mark.parametrize("name", ["focal_tiny_patch4_window7_224", "focalv2_tiny_useconv_patch4_window7_224"])
def test_exported_released_size_model_equals_eager(name):
    """Traced as tools.export traces (non-strict, a quarter of TorchDynamo's time here); both tracers: below."""
    torch.manual_seed(0)
    model = randomise(build_model(load_config(str(REPO / "configs" / f"{name}.yaml"))), STD).eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    program = export(model, x, strict=False)
    with torch.no_grad():
        assert_agree(program.module()(x), model(x), 2 * roundoff(model, torch.float32, dot=longest_sum(model, x)))


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "non-strict"])
@pytest.mark.parametrize("model_type", ["focal", "focalv2"])
def test_export_with_dynamic_batch_equals_eager(model_type, strict):
    """Both tracers, any batch: the released structure at one block per stage and small widths. (ONNX: the
    v1 model through tools/export.py, test_tools_export.)"""
    opts = case_opts(load_case(FIXTURES / "small_fc_224.json")) + ["MODEL.TYPE", model_type,
                                                                   "MODEL.FOCAL.DEPTHS", [1, 1, 1, 1]]
    torch.manual_seed(0)
    model = randomise(build_model(load_config(opts=opts)), STD).eval()
    focal_layout.cache_clear()  # layouts are then built while tracing (non-strict: where tensors are fake)
    topk_layout.cache_clear()
    program = export(model, torch.randn(2, 3, 160, 192), dynamic_batch=True, strict=strict)
    for batch in (1, 3):
        x = torch.randn(batch, 3, 160, 192, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            assert_agree(program.module()(x), model(x), 2 * roundoff(model, torch.float32, dot=longest_sum(model, x)))
