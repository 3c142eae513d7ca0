"""torch.export and ONNX: exported programs compute what the eager model computes.

Export runs under ``no_grad``, so the training-time attention backward stays out of the graph. Strict
(TorchDynamo) tracing and PyTorch's default non-strict tracing both keep the per-size layouts as constants.
"""
import onnx  # noqa: F401  the ONNX check is part of CI: requirements-dev.txt installs onnx, onnxscript, onnxruntime
import onnxruntime  # noqa: F401
import pytest
import torch
from torch.export import Dim

from config import load_config
from models import build_model
from models.focal_attention import focal_layout
from models.topk_attention import topk_layout
from tests.golden import FIXTURES, case_opts, load_case
from tests.helpers import REPO, randomise

pytestmark = pytest.mark.slow  # tracing, exporting and checking a model takes 10 s to 90 s

# Training-like weights (position tables and top-k biases not all zero), small enough for the released sizes.
STD = 0.05


def export(model, example, dynamic_batch=False, strict=True):
    shapes = ({0: Dim("batch", min=1, max=64)},) if dynamic_batch else None
    with torch.no_grad():
        return torch.export.export(model, (example,), dynamic_shapes=shapes, strict=strict)


@pytest.mark.parametrize("name", ["focal_tiny_patch4_window7_224", "focalv2_tiny_useconv_patch4_window7_224"])
def test_exported_released_size_model_equals_eager(name):
    torch.manual_seed(0)
    model = randomise(build_model(load_config(str(REPO / "configs" / f"{name}.yaml"))), STD).eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    program = export(model, x)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), atol=1e-5, rtol=1e-5)


def test_onnx_with_dynamic_batch_equals_eager():
    """focalv2 (conv embedding, top-k attention); the v1 model's ONNX export is test_tools_export's, through the
    tool. The released structure at one block per stage and small widths: ONNX translation time grows with the
    graph."""
    opts = case_opts(load_case(FIXTURES / "small_fc_224.json")) + [
        "MODEL.TYPE", "focalv2", "MODEL.FOCAL.USE_CONV_EMBED", True, "MODEL.FOCAL.DEPTHS", [1, 1, 1, 1]]
    torch.manual_seed(0)
    model = randomise(build_model(load_config(opts=opts)), STD).eval()
    program = export(model, torch.randn(2, 3, 160, 192), dynamic_batch=True)
    # Core ATen decompositions first: torch.onnx's own table re-derives strides after decomposing attention and
    # then rejects a reshape in merge_windows (torch 2.14).
    onnx_program = torch.onnx.export(program.run_decompositions(), dynamo=True, verbose=False)
    for batch in (1, 3):
        x = torch.randn(batch, 3, 160, 192, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            want = model(x)
            torch.testing.assert_close(program.module()(x), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(onnx_program(x)[0], want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("model_type", ["focal", "focalv2"])
def test_default_non_strict_export_with_dynamic_batch_equals_eager(model_type):
    opts = case_opts(load_case(FIXTURES / "small_fc_224.json")) + ["MODEL.TYPE", model_type,
                                                                   "MODEL.FOCAL.DEPTHS", [1, 1, 1, 1]]
    torch.manual_seed(0)
    model = randomise(build_model(load_config(opts=opts)), STD).eval()
    focal_layout.cache_clear()  # layouts are then built while tracing, where tensors are fake by default
    topk_layout.cache_clear()
    program = export(model, torch.randn(2, 3, 160, 192), dynamic_batch=True, strict=False)
    for batch in (1, 3):
        x = torch.randn(batch, 3, 160, 192, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x), model(x), atol=1e-5, rtol=1e-5)
