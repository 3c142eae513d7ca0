"""The oneDNN linear layer (models/kernels): same values and gradients as ``F.linear``, used where it should be
and nowhere else."""
import math

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from models.kernels import onednn_linear
from models.kernels.onednn_linear import OneDnnLinear, convert_linears, linear
from tests.helpers import assert_agree, sum_roundoff

pytestmark = pytest.mark.skipif(not onednn_linear.onednn_available(), reason="this PyTorch has no oneDNN")


@pytest.fixture
def onednn_calls(monkeypatch):
    """Counts the matmuls the oneDNN path runs."""
    calls = []
    matmul = onednn_linear.onednn_matmul

    def counted(*args):
        calls.append(args[0].shape)
        return matmul(*args)
    monkeypatch.setattr(onednn_linear, "onednn_matmul", counted)
    return calls


def close(a: torch.Tensor, b: torch.Tensor, terms: int, steps: int = 1) -> None:
    """Two float32 matmuls summing ``terms`` products each in their own order: within twice the roundoff of one."""
    assert_agree(a, b, 2 * sum_roundoff(torch.float32, terms, steps))


@pytest.mark.parametrize("shape", [(7, 24), (2, 5, 6, 24)], ids=["rows", "map"])
@pytest.mark.parametrize("out_features", [8, 40], ids=["narrowing", "widening"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
def test_values_and_gradients_match_f_linear(onednn_calls, shape, out_features, with_bias):
    torch.manual_seed(0)
    x = torch.randn(shape, requires_grad=True)
    weight = torch.randn(out_features, shape[-1], requires_grad=True)
    bias = torch.randn(out_features, requires_grad=True) if with_bias else None
    leaves = [t for t in (x, weight, bias) if t is not None]
    grad_out = torch.randn(*shape[:-1], out_features)

    got = linear(x, weight, bias)
    got_grads = torch.autograd.grad(got, leaves, grad_out)
    assert len(onednn_calls) == 3  # forward, input gradient, weight gradient
    want = F.linear(x, weight, bias)
    want_grads = torch.autograd.grad(want, leaves, grad_out)
    close(got, want, shape[-1])
    rows = math.prod(shape[:-1])
    # the input's gradient sums over the outputs, the weight's and the bias's over the rows
    for g, w, terms in zip(got_grads, want_grads, (out_features, rows, rows)):
        close(g, w, terms)


def test_frozen_weight_and_non_contiguous_input(onednn_calls):
    torch.manual_seed(0)
    x = torch.randn(2, 16, 6, 6).permute(0, 2, 3, 1).requires_grad_()  # an NCHW map seen as NHWC
    layer = OneDnnLinear(16, 12).requires_grad_(False)
    got = layer(x)
    (grad_x,) = torch.autograd.grad(got.square().sum(), x)
    assert len(onednn_calls) == 2  # no weight gradient asked for
    want = F.linear(x, layer.weight, layer.bias)
    close(got, want, 16)
    close(grad_x, torch.autograd.grad(want.square().sum(), x)[0], 12, steps=2)  # through the square, then back


def test_inference_runs_without_autograd(onednn_calls):
    layer = OneDnnLinear(8, 4)
    with torch.inference_mode():
        out = layer(torch.randn(3, 8))
    assert len(onednn_calls) == 1 and not out.requires_grad


@pytest.mark.parametrize("case", ["float64", "autocast", "flop_counter"])
def test_falls_back_to_f_linear(onednn_calls, case):
    layer = OneDnnLinear(8, 4)
    x = torch.randn(3, 8)
    if case == "float64":
        layer.double()
        assert layer(x.double()).dtype == torch.float64
    elif case == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert layer(x).dtype == torch.bfloat16
    else:  # dispatch modes see an ordinary linear layer, so FLOP counters and tracers stay right
        with FlopCounterMode(display=False) as counter:
            layer(x)
        assert counter.get_total_flops() == 2 * 3 * 8 * 4
    assert onednn_calls == []


def test_compiled_layer_uses_the_compilers_kernels(onednn_calls):
    layer = OneDnnLinear(8, 4)
    x = torch.randn(3, 8)
    close(torch.compile(layer, fullgraph=True, backend="eager")(x), F.linear(x, layer.weight, layer.bias), 8)
    assert onednn_calls == []


def test_convert_linears_switches_class_only_both_ways(onednn_calls):
    torch.manual_seed(0)
    swin = timm.create_model("swin_tiny_patch4_window7_224", num_classes=3, img_size=64, window_size=4).eval()
    x = torch.randn(1, 3, 64, 64)
    state = {k: v.clone() for k, v in swin.state_dict().items()}
    with torch.no_grad():
        want = swin(x)
        convert_linears(swin)
        assert all(type(m) is OneDnnLinear for m in swin.modules() if isinstance(m, nn.Linear))
        got = swin(x)
    assert len(onednn_calls) > 0
    # one step per block, the embedding and the head; the longest sum is the last stage's MLP (4 x 768 wide)
    close(got, want, 4 * swin.num_features, steps=sum(len(stage.blocks) for stage in swin.layers) + 2)
    assert all(torch.equal(v, swin.state_dict()[k]) for k, v in state.items())
    convert_linears(swin, onednn=False)
    assert all(type(m) is nn.Linear for m in swin.modules() if isinstance(m, nn.Linear))
