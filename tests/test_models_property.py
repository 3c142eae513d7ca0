"""Property: a small configuration that keeps the rules builds and trains on any input size; one that breaks a
rule is refused at build time with an error naming that rule's key.

Examples are drawn derandomized (the same on every run, no example database), and each test asserts how many
drawn configurations actually built and trained, so a validation that refused everything would fail.
"""
import copy
import re
from typing import List, Optional

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from config import load_config
from models import ConfigError, build_model
from models.kernels import cpu_attention, optimize_for
from tests.helpers import outputs_and_gradients, randomise

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


def assert_floor(outcomes: List[str], examples: int) -> None:
    """At least half of the drawn configurations built and trained; some were refused."""
    assert outcomes.count("trained") >= examples // 2, f"{outcomes.count('trained')} of {len(outcomes)} trained"
    assert "refused" in outcomes


TRAIN_EXAMPLES = 40


def test_small_configs_train_or_are_refused_by_the_broken_key():
    outcomes: List[str] = []

    @profile(TRAIN_EXAMPLES)
    @given(configs())
    def check(case):
        opts, size, broken = case
        model = built_or_refused(opts, broken)
        if model is None:
            outcomes.append("refused")
            return
        model.train()
        out = model(torch.randn(2, 3, *size))
        assert torch.isfinite(out).all()
        out.float().square().mean().backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        outcomes.append("trained")

    check()
    assert_floor(outcomes, TRAIN_EXAMPLES)


KERNEL_EXAMPLES = 40


def test_cpu_attention_in_any_blocking_computes_the_generic_path(monkeypatch):
    """The CPU attention kernel (models/kernels) in blocks of windows, heads or images (ragged last blocks
    included) computes what the plain model computes, forward and backward."""
    outcomes: List[str] = []

    @profile(KERNEL_EXAMPLES)
    @given(configs(), st.sampled_from([0, 1, 700, 3000, 20000]))
    def check(case, block_bytes):
        opts, size, broken = case
        model = built_or_refused(opts + ["MODEL.DROP_PATH_RATE", 0.0], broken)
        if model is None:
            outcomes.append("refused")
            return
        randomise(model)  # zero-initialised tables would hide a wrong bias gradient
        x = torch.randn(3, 3, *size, generator=torch.Generator().manual_seed(0))
        fast = copy.deepcopy(model)
        optimize_for(fast, "cpu", ["attention"])
        want = outputs_and_gradients(model.train(), x)
        with monkeypatch.context() as patch:
            patch.setattr(cpu_attention, "CPU_BLOCK_BYTES", block_bytes)
            got = outputs_and_gradients(fast.train(), x)
        assert len(got) == len(want)
        for g, w in zip(got, want):  # gradients summed over many O(1) terms, in another order
            torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-3)
        outcomes.append("trained")

    check()
    assert_floor(outcomes, KERNEL_EXAMPLES)
