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
@pytest.mark.slow
def test_compiled_training_step_with_cpu_kernels(model_type):
    """The blocked attention's custom backward also runs inside a compiled graph (one block there), traced by
    AOTAutograd and run eagerly (``aot_eager``, as test_models_behaviour's compiled training step)."""
    torch.compiler.reset()  # earlier compiles at other sizes in this process would make the map size symbolic
    plain = randomise(small_model("MODEL.FOCAL.DEPTHS", [1, 1, 1, 1], model_type=model_type)).train()
    fast = optimize_for_copy(plain, ALL)
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(4))
    assert_all_close(outputs_and_gradients(torch.compile(fast, fullgraph=True, backend="aot_eager"), x),
                     outputs_and_gradients(plain, x))


# Attention inputs of 3 images, 3 heads, 3 windows of 5 queries over 7 keys, head size 4, in float64: one window
# of one head takes 5 * 7 * 8 bytes of probabilities.
BATCH, HEADS, WINDOWS, N_QUERY, N_KEYS, TOKENS, HD = 3, 3, 3, 5, 7, 9, 4
PER_WINDOW = N_QUERY * N_KEYS * 8
# bytes per attention block -> blocks: 0 turns blocking off; the others split images, heads or windows, the last
# block of each ragged (3 = 2 + 1)
BLOCKINGS = {"one block": (0, 1), "one window": (1, BATCH * HEADS * WINDOWS),
             "two windows": (PER_WINDOW * 2, BATCH * HEADS * 2), "two heads": (PER_WINDOW * WINDOWS * 2, BATCH * 2),
             "two images": (PER_WINDOW * WINDOWS * HEADS * 2, 2)}


def attention_inputs(gathered: bool):
    """q, k, v, index, bias as the attention modules pass them. Gathered: each window's keys picked from a table
    of 9 tokens by an index with repeats (so gradients must accumulate); else the tables are already gathered,
    window after window. The bias holds the -100 penalty of masked keys in a few places."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(BATCH, HEADS * WINDOWS, N_QUERY, HD, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(1, HEADS * WINDOWS, N_QUERY, N_KEYS, generator=gen, dtype=torch.float64)
    bias = bias.masked_fill(torch.rand(bias.shape, generator=gen) < 0.2, -100.0).requires_grad_()
    index = torch.randint(0, TOKENS, (WINDOWS, N_KEYS), generator=gen) if gathered else None
    n_table = TOKENS if gathered else WINDOWS * N_KEYS
    k, v = (torch.randn(BATCH, HEADS, n_table, HD, generator=gen, dtype=torch.float64, requires_grad=True)
            for _ in range(2))
    return q, k, v, index, bias


def naive_attention(q, k, v, index, bias, scale):
    """The definition, one image, head and window at a time: softmax(q k^T * scale + bias) v over the window's
    keys and values, picked from the per-head tables by its row of ``index`` (or its own slice of a table already
    gathered); rows of q and bias are head-major (head * windows + window)."""
    heads = k.shape[1]
    windows, n_keys = q.shape[1] // heads, bias.shape[-1]
    rows = []
    for b in range(q.shape[0]):
        for h in range(heads):
            for w in range(windows):
                cols = index[w] if index is not None else torch.arange(w * n_keys, (w + 1) * n_keys)
                row = h * windows + w
                probs = torch.softmax(q[b, row] @ k[b, h, cols].T * scale + bias[0, row], dim=-1)
                rows.append(probs @ v[b, h, cols])
    return torch.stack(rows).view(q.shape)


@pytest.mark.parametrize("gathered", [True, False], ids=["gathered", "pre-gathered"])
@pytest.mark.parametrize("blocking", BLOCKINGS)
def test_blocked_attention_computes_the_definition(monkeypatch, gathered, blocking):
    """Outputs (with and without autograd, which take different paths) and the gradients of q, k, v and the bias
    equal the naive computation's, whole and in ragged blocks of images, heads or windows."""
    block_bytes, n_blocks = BLOCKINGS[blocking]
    monkeypatch.setattr(cpu_attention, "CPU_BLOCK_BYTES", block_bytes)
    q, k, v, index, bias = attention_inputs(gathered)
    assert len(attention_blocks(q, HEADS, N_KEYS)) == n_blocks
    leaves = (q, k, v, bias)
    want = naive_attention(q, k, v, index, bias, scale=0.5)
    got = blocked_attend(q, k, v, index, bias, scale=0.5)
    grad_out = torch.randn(want.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for g, w in zip(torch.autograd.grad(got, leaves, grad_out), torch.autograd.grad(want, leaves, grad_out)):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(blocked_attend(q, k, v, index, bias, scale=0.5), want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("gathered", [True, False], ids=["gathered", "pre-gathered"])
@pytest.mark.parametrize("blocking", ["one block", "one window", "two heads"])
def test_blocked_attention_gradients_are_exact(monkeypatch, gathered, blocking):
    """The custom backward against finite differences of the forward, in float64."""
    monkeypatch.setattr(cpu_attention, "CPU_BLOCK_BYTES", BLOCKINGS[blocking][0])
    q, k, v, index, bias = attention_inputs(gathered)
    assert torch.autograd.gradcheck(lambda *t: blocked_attend(t[0], t[1], t[2], index, t[3], scale=0.5),
                                    (q, k, v, bias), fast_mode=True)


@pytest.mark.parametrize("model_type", ["focal", "focalv2"])
def test_attention_of_a_real_layout_computes_the_definition(monkeypatch, model_type):
    """The inputs a shifted, padded small model hands to ``attend`` (its precomputed key index with the zero token
    and masks): the plain attention and the CPU kernel both compute the naive definition on them."""
    model = randomise(small_model("MODEL.FOCAL.USE_SHIFT", True, model_type=model_type)).eval()
    seen = []
    cls = type(attention_modules(model)[0])
    original = cls.attend

    def recording(self, q, k, v, index, bias):
        out = original(self, q, k, v, index, bias)
        seen.append((self, (q, k, v, index, bias), out))
        return out
    monkeypatch.setattr(cls, "attend", recording)
    with torch.no_grad():
        model(torch.randn(1, 3, 60, 44, generator=torch.Generator().manual_seed(2)))
    assert len(seen) == len(attention_modules(model)) and any(i is not None for _, (_, _, _, i, _), _ in seen)
    for module, (q, k, v, index, bias), plain in seen:
        want = naive_attention(q.double(), k.double(), v.double(), index, bias.double(), module.scale).float()
        torch.testing.assert_close(plain, want, atol=1e-5, rtol=1e-5)
        with torch.no_grad():
            torch.testing.assert_close(blocked_attend(q, k, v, index, bias, module.scale), want, atol=1e-5, rtol=1e-5)


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
    with torch.device("meta"):  # structure only
        model = build_model(load_config("configs/focal_tiny_patch4_window7_224.yaml"))
    kinds = [type(m) for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(kinds) == 49 and set(kinds) == {nn.Linear}
