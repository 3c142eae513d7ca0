"""The device-kernel seam (models/kernels): the plain model is the generic path accelerators run; the CPU kernels
must compute the same outputs and gradients, and are chosen, switched and undone as documented."""
import copy

import pytest
import torch
import torch.nn as nn

from config import load_config
from models import build_model
from models.focal_attention import FocalWindowAttention
from models.kernels import KERNELS, cpu_attention, optimize_for, requested, select_kernels
from models.kernels.cpu_attention import CpuKernels, attention_blocks, blocked_attend
from models.kernels.onednn_linear import OneDnnLinear, onednn_available
from models.topk_attention import TopKFocalAttention
from tests.helpers import outputs_and_gradients, randomise, small_model

ALL = [k for k in KERNELS if k != "onednn_linear" or onednn_available()]


def assert_all_close(got, want):
    """Every output and gradient (every parameter has one) equal up to summation order."""
    assert len(got) == len(want) and all(w is not None for w in want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-3)  # other kernels: other summation orders


@pytest.mark.parametrize("model_type", ["focal", "focalv2"])
@pytest.mark.parametrize("block_bytes", [0, 1, 4 << 20], ids=["one-block", "one-window", "default"])
def test_cpu_kernels_compute_the_generic_path(monkeypatch, model_type, block_bytes):
    """Training (outputs and every gradient) and inference, twice (the second from the bias cache)."""
    monkeypatch.setattr(cpu_attention, "CPU_BLOCK_BYTES", block_bytes)
    plain = randomise(small_model("MODEL.FOCAL.USE_SHIFT", True, model_type=model_type))
    fast = copy.deepcopy(plain)
    assert optimize_for(fast, "cpu", ALL) == ALL
    x = torch.randn(2, 3, 100, 60, generator=torch.Generator().manual_seed(3))
    assert_all_close(outputs_and_gradients(fast.train(), x), outputs_and_gradients(plain.train(), x))
    with torch.inference_mode():
        want = plain.eval()(x)
        for _ in range(2):
            torch.testing.assert_close(fast.eval()(x), want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("model_type", ["focal", "focalv2"])
def test_generic_path_trains_under_autocast(model_type, dtype):
    """The path accelerators take, under the mixed precisions they train in; the CPU kernels agree with it."""
    plain = small_model(model_type=model_type).train()
    fast = optimize_for_copy(plain, ALL)
    x = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(5))
    results = []
    for model in (plain, fast):
        with torch.autocast("cpu", dtype=dtype):
            out = model(x)
        assert out.dtype == dtype and torch.isfinite(out).all()
        out.float().logsumexp(-1).sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        results.append(out.float())
    torch.testing.assert_close(results[1], results[0], atol=0.05, rtol=0.05)


def optimize_for_copy(model, kernels):
    fast = copy.deepcopy(model)
    optimize_for(fast, "cpu", kernels)
    return fast


@pytest.mark.parametrize("model_type", ["focal", "focalv2"])
def test_compiled_training_step_with_cpu_kernels(model_type):
    """The blocked attention's custom backward also runs inside a compiled graph (one block there)."""
    torch.compiler.reset()  # earlier compiles at other sizes in this process would make the map size symbolic
    plain = randomise(small_model("MODEL.FOCAL.DEPTHS", [1, 1, 1, 1], model_type=model_type)).train()
    fast = optimize_for_copy(plain, ALL)
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(4))
    assert_all_close(outputs_and_gradients(torch.compile(fast, fullgraph=True), x),
                     outputs_and_gradients(plain, x))


# bytes per attention block -> blocks per image: 0 turns blocking off; 1 gives one window of one head per block
BLOCKINGS = {"one block": 0, "one window": 1, "two heads": 5 * 7 * 8 * 2 * 2, "one image": 5 * 7 * 8 * 2 * 3}


@pytest.mark.parametrize("gathered", [True, False])
@pytest.mark.parametrize("blocking", BLOCKINGS)
def test_blocked_attention_gradients_are_exact(monkeypatch, gathered, blocking):
    """The custom backward in float64, whole and in blocks of windows or heads."""
    monkeypatch.setattr(cpu_attention, "CPU_BLOCK_BYTES", BLOCKINGS[blocking])
    gen = torch.Generator().manual_seed(0)
    batch, heads, windows, n_query, n_keys, tokens, hd = 2, 3, 2, 5, 7, 9, 4
    q = torch.randn(batch, heads * windows, n_query, hd, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(1, heads * windows, n_query, n_keys, generator=gen, dtype=torch.float64, requires_grad=True)
    index = torch.randint(0, tokens, (windows, n_keys), generator=gen) if gathered else None
    n_table = tokens if gathered else windows * n_keys  # gathered: with repeats, so the gradient must accumulate
    k, v = (torch.randn(batch, heads, n_table, hd, generator=gen, dtype=torch.float64, requires_grad=True)
            for _ in range(2))
    n_blocks = {"one block": 1, "one window": batch * heads * windows, "two heads": batch * 2, "one image": batch}
    assert len(attention_blocks(q, heads, n_keys)) == n_blocks[blocking]
    assert torch.autograd.gradcheck(lambda *t: blocked_attend(t[0], t[1], t[2], index, t[3], scale=0.5),
                                    (q, k, v, bias))


def test_blocked_attention_equals_one_block(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(3, 4 * 6, 49, 8, generator=gen)
    k, v = torch.randn(2, 3, 4, 100, 8, generator=gen).unbind(0)
    index = torch.randint(0, 100, (6, 60), generator=gen)
    bias = torch.randn(1, 4 * 6, 49, 60, generator=gen)
    monkeypatch.setattr(cpu_attention, "CPU_BLOCK_BYTES", 0)
    whole = blocked_attend(q, k, v, index, bias, scale=0.3)
    per_window = 49 * 60 * 4
    # 4 windows of one head, 2 heads of one image, 2 images per block
    for block_bytes, n_blocks in ((per_window * 4, 3 * 4 * 2), (per_window * 6 * 2, 3 * 2), (per_window * 24 * 2, 2)):
        monkeypatch.setattr(cpu_attention, "CPU_BLOCK_BYTES", block_bytes)
        assert len(attention_blocks(q, 4, 60)) == n_blocks
        torch.testing.assert_close(blocked_attend(q, k, v, index, bias, scale=0.3), whole, atol=1e-6, rtol=0)


def attention_modules(model):
    return [m for m in model.modules() if isinstance(m, (FocalWindowAttention, TopKFocalAttention))]


@pytest.mark.parametrize("model_type", ["focal", "focalv2"])
def test_optimize_for_switches_classes_only_and_back(model_type):
    model = small_model(model_type=model_type)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert {type(m) for m in model.modules() if isinstance(m, nn.Linear)} == {nn.Linear}
    assert not any(isinstance(m, CpuKernels) for m in model.modules())

    optimize_for(model, "cpu", ALL)
    assert all(isinstance(m, CpuKernels) and m.cpu_kernels == {"attention", "bias_cache"}
               for m in attention_modules(model))
    if "onednn_linear" in ALL:
        assert {type(m) for m in model.modules() if isinstance(m, nn.Linear)} == {OneDnnLinear}
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())

    assert optimize_for(model, "cpu", "none") == []
    assert {type(m) for m in model.modules() if isinstance(m, nn.Linear)} == {nn.Linear}
    assert {type(m) for m in attention_modules(model)} == {FocalWindowAttention if model_type == "focal"
                                                           else TopKFocalAttention}
    assert not any(hasattr(m, "cpu_kernels") for m in attention_modules(model))


def test_plain_models_work_with_tools_that_match_nn_linear():
    """What OneDnnLinear everywhere broke: dynamic quantization finds every linear layer of a built model."""
    model = small_model().eval()
    n_linear = sum(type(m) is nn.Linear for m in model.modules())
    quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    assert n_linear > 20 and not any(type(m) is nn.Linear for m in quantized.modules())


def test_accelerators_get_the_plain_model():
    assert select_kernels("cuda") == [] and select_kernels(torch.device("mps"), ALL) == []
    model = small_model()
    assert optimize_for(model, "cuda") == []
    assert not any(isinstance(m, (CpuKernels, OneDnnLinear)) for m in model.modules())


@pytest.mark.parametrize("value, expected", [("auto", None), (" NONE ", []), ("", []),
                                             ("attention", ["attention"]),
                                             ("bias_cache, attention", ["bias_cache", "attention"])])
def test_environment_choice(monkeypatch, value, expected):
    monkeypatch.setenv("FOCAL_KERNELS", value)
    assert requested() == expected
    if expected is not None:
        assert select_kernels("cpu") == [k for k in KERNELS if k in expected]


def test_unknown_kernel_names_the_variable(monkeypatch):
    monkeypatch.setenv("FOCAL_KERNELS", "attention,fast")
    with pytest.raises(ValueError, match="FOCAL_KERNELS.*'fast'"):
        select_kernels("cpu")


def test_automatic_choice_on_cpu(monkeypatch):
    monkeypatch.delenv("FOCAL_KERNELS", raising=False)
    chosen = select_kernels("cpu")
    assert chosen[:2] == ["attention", "bias_cache"]
    from models.kernels import onednn_linear
    assert ("onednn_linear" in chosen) == onednn_linear.onednn_helps()


def test_released_model_has_only_plain_linears():
    model = build_model(load_config("configs/focal_tiny_patch4_window7_224.yaml"))
    kinds = [type(m) for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(kinds) == 49 and set(kinds) == {nn.Linear}
