"""The device-kernel seam (models/kernels): the plain model is the generic path accelerators run; the CPU kernels
must compute the same outputs and gradients, on any configuration within the rules (drawn at random), and are
chosen, switched and undone as documented."""
import copy
import re
from typing import Callable, List, Optional

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from config import load_config
from models import ConfigError, build_model
from models.focal_attention import FocalWindowAttention
from models.kernels import KERNELS, cpu_attention, optimize_for, requested, select_kernels
from models.kernels.cpu_attention import CpuKernels, attention_blocks, blocked_attend
from models.kernels.onednn_linear import OneDnnLinear, onednn_available
from models.topk_attention import TopKFocalAttention
from tests.helpers import (assert_agree, assert_outputs_and_gradients_agree, longest_sum, outputs_and_gradients,
                           randomise, relative_error, roundoff, small_model, sum_roundoff)

ALL = [k for k in KERNELS if k != "onednn_linear" or onednn_available()]


# Property: random small configurations, drawn derandomized (the same examples on every run, no example database);
# the test asserts how many drawn configurations actually built and trained, so a validation that refused everything
# would fail.
KEY = re.compile(r"^((?:MODEL|DATA)\.[A-Z_.]+): ")
PATCH = 4  # MODEL.FOCAL.PATCH_SIZE's default, which these configurations keep
FOCALV2_LEVELS = (1, 2)  # the top-k variant: a stage attends its window alone, or with one pooled level
SIZES = (16, 32, 48, 56, 64)
# Rules a configuration can break, each with the key its error must name.
BROKEN = ("DATA.IMG_SIZE", "MODEL.FOCAL.NUM_HEADS", "MODEL.FOCAL.EXPAND_SIZES", "MODEL.FOCAL.FOCAL_LEVELS",
          "MODEL.FOCAL.FOCAL_WINDOWS", "MODEL.FOCAL.FOCAL_POOL")


def profile(max_examples: int):
    """The same examples on every run, none stored between runs."""
    return settings(max_examples=max_examples, derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@st.composite
def configs(draw):
    """``(opts, input size, broken key or None)``: a configuration kept within the rules of
    ``models.build.validate_model_config`` (written out here independently), then, for about one draw in four,
    one rule broken."""
    stages = draw(st.integers(1, 4))
    variant = draw(st.sampled_from(["focal", "focalv2"]))
    embed = draw(st.sampled_from([4, 6, 8]))
    size = draw(st.sampled_from([s for s in SIZES if s // PATCH >= 2 ** (stages - 1)]))
    window = draw(st.integers(1, 8))
    pool = draw(st.sampled_from(["none", "fc", "conv", "mean", "max"]))
    focal_stages = draw(st.lists(st.integers(0, 3), max_size=4, unique=True))
    heads, expand, levels, focal_windows, pooled = [], [], [], [], []
    for i in range(stages):
        dim = embed * 2 ** i
        heads.append(draw(st.sampled_from([h for h in (1, 2, 3) if dim % h == 0])))
        expand.append(draw(st.integers(0, window - 1)))
        poolable = pool != "none" and i in focal_stages
        stage_window = min(window, size // PATCH // 2 ** i)  # a map no larger than the window is one window
        if variant == "focalv2":
            allowed = FOCALV2_LEVELS if poolable else (1,)
        else:  # a pooled level k pools sub-windows of window / 2**(k-1) tokens
            allowed = [lv for lv in range(4) if not poolable or lv < 2 or 2 ** (lv - 2) <= stage_window]
        levels.append(draw(st.sampled_from(allowed)))
        pooled.append(poolable and levels[-1] > 1)
        focal_windows.append(draw(st.sampled_from([1, 3, 5] if pooled[-1] else [1, 2, 3, 4, 5])))

    broken: Optional[str] = None
    if draw(st.integers(0, 3)) == 3:
        applicable = [k for k in BROKEN if k != "MODEL.FOCAL.FOCAL_WINDOWS" or any(pooled)]
        broken = draw(st.sampled_from(applicable))
        stage = draw(st.integers(0, stages - 1))
        if broken == "DATA.IMG_SIZE":
            size += 2  # not a multiple of the patch size
        elif broken == "MODEL.FOCAL.NUM_HEADS":
            heads[stage] = embed * 2 ** stage + 1  # more heads than channels: never a divisor
        elif broken == "MODEL.FOCAL.EXPAND_SIZES":
            expand[stage] = window
        elif broken == "MODEL.FOCAL.FOCAL_LEVELS":
            levels[stage] = max(FOCALV2_LEVELS) + 1 if variant == "focalv2" else -1
        elif broken == "MODEL.FOCAL.FOCAL_WINDOWS":
            focal_windows[pooled.index(True)] += 1  # even
        else:
            pool = "avg"
    opts = [
        "MODEL.TYPE", variant,
        "MODEL.NUM_CLASSES", draw(st.integers(0, 5)),
        "DATA.IMG_SIZE", size,
        "MODEL.FOCAL.EMBED_DIM", embed,
        "MODEL.FOCAL.DEPTHS", draw(st.lists(st.integers(1, 2), min_size=stages, max_size=stages)),
        "MODEL.FOCAL.NUM_HEADS", heads,
        "MODEL.FOCAL.WINDOW_SIZE", window,
        "MODEL.FOCAL.FOCAL_LEVELS", levels,
        "MODEL.FOCAL.FOCAL_WINDOWS", focal_windows,
        "MODEL.FOCAL.EXPAND_SIZES", expand,
        "MODEL.FOCAL.FOCAL_POOL", pool,
        "MODEL.FOCAL.FOCAL_STAGES", focal_stages,
        "MODEL.FOCAL.EXPAND_LAYER", draw(st.sampled_from(["all", "even", "odd"])),
        "MODEL.FOCAL.USE_SHIFT", draw(st.booleans()),
        "MODEL.FOCAL.USE_CONV_EMBED", draw(st.booleans()),
        "MODEL.FOCAL.APE", draw(st.booleans()),
        "MODEL.FOCAL.FOCAL_TOPK", draw(st.integers(1, 40)),
        "MODEL.DROP_PATH_RATE", 0.1,
    ]
    input_size = (draw(st.integers(9, 72)), draw(st.integers(9, 72)))
    return opts, input_size, broken


def built_or_refused(opts: list, broken: Optional[str]) -> Optional[torch.nn.Module]:
    """The model, or None after checking that the broken rule, and only a broken one, was refused by its key."""
    try:
        model = build_model(load_config(opts=opts))
    except ConfigError as err:
        match = KEY.match(str(err))
        assert match, f"error does not start with the key: {err}"
        assert broken is not None, f"a configuration within the rules was refused: {err}"
        assert match.group(1) == broken, f"broke {broken}, refused for another key: {err}"
        return None
    assert broken is None, f"broke {broken}, but it built"
    return model


def same_drop_paths(run: Callable, *args):
    """``run(*args)`` with the global generator seeded alike each time, so that two models draw the same
    stochastic-depth masks (the kernels draw no random numbers of their own)."""
    with torch.random.fork_rng():
        torch.manual_seed(2)
        return run(*args)


def assert_floor(outcomes: List[str], examples: int) -> None:
    """At least half of the drawn configurations built and trained; some were refused."""
    assert outcomes.count("trained") >= examples // 2, f"{outcomes.count('trained')} of {len(outcomes)} trained"
    assert "refused" in outcomes


KERNEL_EXAMPLES = 40


def test_small_configs_are_refused_by_the_broken_key_or_train_alike_with_cpu_kernels(monkeypatch):
    """A configuration within the rules builds on any input size (one that breaks a rule is refused, naming that
    rule's key), and the CPU attention kernel in blocks of windows, heads or images (ragged last blocks included)
    computes what its plain model computes: training outputs and every gradient (stochastic depth on, with the same
    masks on both sides), then inference twice (the second from the bias cache), each within float32's roundoff of
    the model for its longest sum. The oneDNN linear layer has its own tests (test_onednn_linear.py)."""
    outcomes: List[str] = []

    @profile(KERNEL_EXAMPLES)
    @given(configs(), st.sampled_from([0, 1, 700, 3000, 20000]))
    def check(case, block_bytes):
        opts, size, broken = case
        model = built_or_refused(opts, broken)
        if model is None:
            outcomes.append("refused")
            return
        randomise(model)  # zero-initialised tables would hide a wrong bias gradient
        x = torch.randn(3, 3, *size, generator=torch.Generator().manual_seed(0))
        fast = optimize_for_copy(model, ["attention", "bias_cache"])
        want = same_drop_paths(outputs_and_gradients, model.train(), x)
        with monkeypatch.context() as patch:
            patch.setattr(cpu_attention, "CPU_BLOCK_BYTES", block_bytes)
            got = same_drop_paths(outputs_and_gradients, fast.train(), x)
            keys = longest_sum(model, x)
            assert_outputs_and_gradients_agree(got, want, model, x, keys)
            bound = 2 * roundoff(model, torch.float32, dot=keys)
            with torch.inference_mode():
                plain = model.eval()(x)
                for _ in range(2):
                    assert_agree(fast.eval()(x), plain, bound)
        outcomes.append("trained")

    check()
    assert_floor(outcomes, KERNEL_EXAMPLES)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("model_type", ["focal", "focalv2"])
def test_generic_path_trains_under_autocast(model_type, dtype):
    """The path accelerators take, under the mixed precisions they train in; the CPU kernels agree with it: each
    path lies within ``roundoff`` of the exact output (its matmuls round to ``dtype`` and sum in float32), so the
    two lie within twice that (0.20 for bfloat16, 0.025 for float16; measured 0.004 and 0.0004, AMD EPYC)."""
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
    assert relative_error(results[1], results[0]) <= 2 * roundoff(plain, dtype)


def optimize_for_copy(model, kernels):
    fast = copy.deepcopy(model)
    optimize_for(fast, "cpu", kernels)
    return fast


@pytest.mark.parametrize("model_type", ["focal", "focalv2"])
@pytest.mark.slow
def test_compiled_training_step_with_cpu_kernels(model_type):
    """The blocked attention's custom backward also runs inside a compiled graph (one block there), traced by
    AOTAutograd and run eagerly (``aot_eager``, as test_models_behaviour's compiled training step, which compiles
    all four stages; two, windowed with surroundings and a pooled level, cover the kernel at 60% of the cost)."""
    torch.compiler.reset()  # earlier compiles at other sizes in this process would make the map size symbolic
    plain = randomise(small_model("MODEL.FOCAL.DEPTHS", [1, 1], "MODEL.FOCAL.NUM_HEADS", [2, 2],
                                  "MODEL.FOCAL.FOCAL_LEVELS", [2, 2], "MODEL.FOCAL.EXPAND_SIZES", [3, 3],
                                  "MODEL.FOCAL.FOCAL_WINDOWS", [3, 3], model_type=model_type)).train()
    fast = optimize_for_copy(plain, ALL)
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(4))
    assert_outputs_and_gradients_agree(
        outputs_and_gradients(torch.compile(fast, fullgraph=True, backend="aot_eager"), x),
        outputs_and_gradients(plain, x), plain, x)


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
    window after window, and the index reads them in order (as the oracles of tests/oracles.py pass them). The bias
    holds the -100 penalty of masked keys in a few places."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(BATCH, HEADS * WINDOWS, N_QUERY, HD, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(1, HEADS * WINDOWS, N_QUERY, N_KEYS, generator=gen, dtype=torch.float64)
    bias = bias.masked_fill(torch.rand(bias.shape, generator=gen) < 0.2, -100.0).requires_grad_()
    index = (torch.randint(0, TOKENS, (WINDOWS, N_KEYS), generator=gen) if gathered
             else torch.arange(WINDOWS * N_KEYS).view(WINDOWS, N_KEYS))
    n_table = TOKENS if gathered else WINDOWS * N_KEYS
    k, v = (torch.randn(BATCH, HEADS, n_table, HD, generator=gen, dtype=torch.float64, requires_grad=True)
            for _ in range(2))
    return q, k, v, index, bias


def attention_roundoff(dtype: torch.dtype, q: torch.Tensor, bias: torch.Tensor) -> float:
    """How far attention computed in ``dtype`` may lie from the exact one: three steps (the scores, the softmax,
    the weighted sum of values), the longest summing a query's head dimension or its list of keys."""
    return sum_roundoff(dtype, max(q.shape[-1], bias.shape[-1]), steps=3)


def naive_attention(q, k, v, index, bias, scale):
    """The definition, one image, head and window at a time: softmax(q k^T * scale + bias) v over the window's
    keys and values, picked from the per-head tables by its row of ``index``; rows of q and bias are head-major
    (head * windows + window)."""
    heads = k.shape[1]
    windows = q.shape[1] // heads
    rows = []
    for b in range(q.shape[0]):
        for h in range(heads):
            for w in range(windows):
                row = h * windows + w
                probs = torch.softmax(q[b, row] @ k[b, h, index[w]].T * scale + bias[0, row], dim=-1)
                rows.append(probs @ v[b, h, index[w]])
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
    # A key's gradient also sums over every query of every window that picks it: at most all of them.
    grad_bound = attention_roundoff(torch.float64, q, bias) * (WINDOWS * N_QUERY) ** 0.5
    for g, w in zip(torch.autograd.grad(got, leaves, grad_out), torch.autograd.grad(want, leaves, grad_out)):
        assert_agree(g, w, grad_bound)
    assert_agree(got, want, attention_roundoff(torch.float64, q, bias))
    with torch.no_grad():
        assert_agree(blocked_attend(q, k, v, index, bias, scale=0.5), want, attention_roundoff(torch.float64, q, bias))


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
        want = naive_attention(q.double(), k.double(), v.double(), index, bias.double(), module.scale)
        bound = attention_roundoff(torch.float32, q, bias)  # measured at most 0.4 of it, AMD EPYC
        assert_agree(plain.double(), want, bound)
        with torch.no_grad():
            assert_agree(blocked_attend(q, k, v, index, bias, module.scale).double(), want, bound)


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


def test_automatic_choice_on_cpu_takes_the_attention_kernels_first(monkeypatch):
    monkeypatch.delenv("FOCAL_KERNELS", raising=False)
    assert select_kernels("cpu")[:2] == ["attention", "bias_cache"]


def test_released_model_has_only_plain_linears():
    with torch.device("meta"):  # structure only
        model = build_model(load_config("configs/focal_tiny_patch4_window7_224.yaml"))
    kinds = [type(m) for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(kinds) == 49 and set(kinds) == {nn.Linear}


@pytest.mark.parametrize("model_type", ["focal", "focalv2"])
def test_plain_attention_path_computes_what_the_fused_one_does(model_type, monkeypatch):
    """attend's plain path (``fused_attn`` False, timm's switch: the softmax over each window's gathered keys
    written out) gives the fused kernel's outputs and every gradient. Both sum each query's dot products over the
    same keys in float32, in another order: the bound is float32's roundoff for the longest key list seen, and
    for the gradients, which also sum over every image and every position of the first stage, for that many more
    terms."""
    from models.window_attention import WindowedAttention
    fused = randomise(small_model("MODEL.FOCAL.USE_SHIFT", True, model_type=model_type))
    plain = copy.deepcopy(fused)
    for module in plain.modules():
        if isinstance(module, WindowedAttention):
            module.fused_attn = False
    keys = []
    attend = WindowedAttention.attend
    monkeypatch.setattr(WindowedAttention, "attend", lambda self, q, k, v, index, bias: keys.append(
        bias.shape[-1]) or attend(self, q, k, v, index, bias))
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    want, got = outputs_and_gradients(fused, x), outputs_and_gradients(plain, x)
    positions = x.shape[0] * x.shape[2] * x.shape[3] // 16  # the first stage's tokens (4x4 patches), all images
    assert relative_error(got[0], want[0]) <= roundoff(fused, torch.float32, dot=max(keys))
    for g, w in zip(got[1:], want[1:]):
        if w is not None:
            assert relative_error(g, w) <= roundoff(fused, torch.float32, dot=max(keys) * positions)
