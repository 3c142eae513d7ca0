"""Property: any small configuration either builds and trains on any input size, or is refused at build time
with an error that names the offending config key."""
import re

import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from config import load_config
from models import ConfigError, build_model

KEY = re.compile(r"^(MODEL|DATA)\.[A-Z_.]+: ")


@st.composite
def configs(draw):
    stages = draw(st.integers(1, 4))
    per_stage = lambda strategy: draw(st.lists(strategy, min_size=stages, max_size=stages))
    window = draw(st.integers(1, 8))
    opts = [
        "MODEL.TYPE", draw(st.sampled_from(["focal", "focalv2"])),
        "MODEL.NUM_CLASSES", draw(st.integers(0, 5)),
        "DATA.IMG_SIZE", draw(st.sampled_from([16, 32, 48, 56, 64, 70])),
        "MODEL.FOCAL.EMBED_DIM", draw(st.sampled_from([4, 6, 8])),
        "MODEL.FOCAL.DEPTHS", per_stage(st.integers(1, 2)),
        "MODEL.FOCAL.NUM_HEADS", per_stage(st.sampled_from([1, 2, 3])),
        "MODEL.FOCAL.WINDOW_SIZE", window,
        "MODEL.FOCAL.FOCAL_LEVELS", per_stage(st.integers(0, 3)),
        "MODEL.FOCAL.FOCAL_WINDOWS", per_stage(st.integers(1, 5)),
        "MODEL.FOCAL.EXPAND_SIZES", per_stage(st.integers(0, 3)),
        "MODEL.FOCAL.FOCAL_POOL", draw(st.sampled_from(["none", "fc", "conv", "mean", "max"])),
        "MODEL.FOCAL.FOCAL_STAGES", draw(st.lists(st.integers(0, 3), max_size=4, unique=True)),
        "MODEL.FOCAL.EXPAND_LAYER", draw(st.sampled_from(["all", "even", "odd"])),
        "MODEL.FOCAL.USE_SHIFT", draw(st.booleans()),
        "MODEL.FOCAL.USE_CONV_EMBED", draw(st.booleans()),
        "MODEL.FOCAL.APE", draw(st.booleans()),
        "MODEL.FOCAL.FOCAL_TOPK", draw(st.integers(1, 40)),
        "MODEL.FOCAL.KV_GATHER", draw(st.sampled_from(["index", "unfold", "roll"])),
        "MODEL.DROP_PATH_RATE", 0.1,
    ]
    size = (draw(st.integers(9, 72)), draw(st.integers(9, 72)))
    return opts, size


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs())
def test_small_configs_run_or_are_refused_by_key(case):
    opts, size = case
    try:
        model = build_model(load_config(opts=opts))
    except ConfigError as err:
        assert KEY.match(str(err)), f"error does not start with the key: {err}"
        return
    model.train()
    out = model(torch.randn(2, 3, *size))
    assert torch.isfinite(out).all()
    out.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def outputs_and_gradients(model, x):
    model.zero_grad(set_to_none=True)
    out = model(x)
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(1))).sum().backward()  # O(1) gradients
    return [out.detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs(), st.sampled_from([0, 1, 700, 3000, 20000]))
def test_cpu_attention_in_any_blocking_computes_the_generic_path(case, block_bytes):
    """The CPU attention kernel (models/kernels) in blocks of windows, heads or images (ragged last blocks
    included) computes what the plain model computes, forward and backward."""
    import copy
    from models.kernels import cpu_attention, optimize_for
    opts, size = case
    try:
        model = build_model(load_config(opts=opts + ["MODEL.DROP_PATH_RATE", 0.0]))
    except ConfigError:
        event("refused")
        return
    event("built")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # training-like weights: zero-initialised tables would hide a wrong bias gradient
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    x = torch.randn(3, 3, *size, generator=gen)
    fast = copy.deepcopy(model)
    optimize_for(fast, "cpu", ["attention"])
    want = outputs_and_gradients(model.train(), x)
    saved = cpu_attention.CPU_BLOCK_BYTES
    try:
        cpu_attention.CPU_BLOCK_BYTES = block_bytes
        got = outputs_and_gradients(fast.train(), x)
    finally:
        cpu_attention.CPU_BLOCK_BYTES = saved
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
