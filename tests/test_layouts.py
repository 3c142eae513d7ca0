"""Layouts (what each window attends to) at any size: the reference's nearest-token rule with its tie-breaking,
size linear in the number of windows, a cache bounded by bytes that serves sizes in turn, one definition that
changes the pattern, and the retired ``MODEL.FOCAL.KV_GATHER`` key."""
import copy
import random

import pytest
import torch

from config import load_config
from models import build_model
from models.focal_attention import FocalWindowAttention, focal_layout
from models.focal_layout import CACHE_ENV, LAYOUTS, FocalLayoutSpec, cache_limit
from models.kernels import optimize_for
from models.resize import resize_neighbour_table
from models.topk_attention import build_topk_layout, nearest_tokens
from tests.helpers import assert_agree, longest_sum, randomise, roundoff, small_model
from tests.oracles import GATHERS, gathered_keys_values, index_keys_values, oracle_gather


def reference_nearest(grid, key_grid, top_k):
    """The reference's formulation: every (cell, key) offset, Euclidean distances, ``torch.topk`` of their
    negation."""
    factor = key_grid[0] // grid[0] if grid[0] != key_grid[0] else 1
    qy, qx = torch.arange(grid[0]) * factor + factor // 2, torch.arange(grid[1]) * factor + factor // 2
    q = torch.stack(torch.meshgrid(qy, qx, indexing="ij")).flatten(1)
    k = torch.stack(torch.meshgrid(torch.arange(key_grid[0]), torch.arange(key_grid[1]), indexing="ij")).flatten(1)
    rel = q[:, :, None] - k[:, None, :]
    dist = torch.sqrt(rel[0].float() ** 2 + rel[1].float() ** 2)
    index = torch.topk(-dist, min(top_k, dist.shape[1]), dim=1).indices
    return index, torch.gather(rel, 2, index.unsqueeze(0).expand(2, -1, -1)).permute(1, 2, 0)


# square, non-square and odd maps; rows of fewer than 64*K keys (torch.topk selects, then sorts) and of more
# (it keeps a heap): the two regimes break ties among equidistant keys differently
@pytest.mark.parametrize("grid,key_grid,top_k", [
    ((8, 8), (56, 56), 128), ((8, 8), (56, 56), 64), ((8, 8), (8, 8), 128), ((5, 9), (35, 63), 128),
    ((3, 11), (21, 77), 32), ((7, 2), (49, 14), 40), ((16, 16), (112, 112), 128), ((13, 14), (91, 98), 128),
    ((9, 30), (63, 210), 64), ((2, 3), (14, 21), 500),
])
def test_nearest_tokens_are_the_reference_choice_ties_included(grid, key_grid, top_k):
    index, offsets = nearest_tokens(grid, key_grid, top_k)
    want_index, want_offsets = reference_nearest(grid, key_grid, top_k)
    assert torch.equal(index, want_index)
    assert torch.equal(offsets, want_offsets)


def per_window_bytes(layout, n_windows: int) -> float:
    return layout.nbytes() / n_windows


def test_layouts_grow_linearly_with_the_number_of_windows():
    """Bytes per window stay put from a 14x14 to a 112x210 map: nothing of size windows x queries x keys or
    tokens x tokens is kept."""
    spec = FocalLayoutSpec(7, 3, shift_size=3, focal_window=5, num_pooled=2)
    small, large = spec.build(14, 14), spec.build(112, 210)
    assert per_window_bytes(large, 16 * 30) == per_window_bytes(small, 4)
    assert large.shift_labels.shape == (16 * 30, 49) and large.pooled_outside.shape[0] == 16 * 30
    small, large = build_topk_layout(56, 56, 7, 2, 64), build_topk_layout(112, 210, 7, 2, 64)
    assert per_window_bytes(large, 16 * 30) < 1.1 * per_window_bytes(small, 64)


@pytest.mark.slow
def test_byte_bound_of_the_cache_holds_over_twenty_random_input_sizes(monkeypatch):
    """Multi-scale input through a small focalv2 model: the cache never holds more than its bound, evicts the
    least recently used layouts, and a size seen again gives the same output as the first time."""
    bound = 400_000
    monkeypatch.setenv(CACHE_ENV, str(bound))
    model = randomise(small_model("MODEL.FOCAL.USE_CONV_EMBED", True, "MODEL.FOCAL.FOCAL_TOPK", 64,
                                  model_type="focalv2")).eval()
    rng = random.Random(21)
    sizes = [(rng.randrange(32, 257, 4), rng.randrange(32, 257, 4)) for _ in range(20)]
    LAYOUTS.clear()
    first, peak = {}, 0
    with torch.no_grad():
        for size in sizes + sizes[:2]:
            out = model(torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(size[0] * 1000 + size[1])))
            peak = max(peak, LAYOUTS.nbytes())
            assert LAYOUTS.nbytes() <= bound
            if size in first:
                torch.testing.assert_close(out, first[size], atol=0, rtol=0)
            first.setdefault(size, out)
    assert peak > bound // 2 and len(LAYOUTS.entries) >= 2  # the bound was used, not trivially met
    assert len(LAYOUTS.entries) < 4 * len(set(sizes))  # old sizes were evicted
    LAYOUTS.clear()


@pytest.mark.parametrize("kernels", [[], ["attention", "bias_cache"]], ids=["plain", "cpu-kernels"])
@pytest.mark.parametrize("model_type", ["focal", "focalv2"])
def test_sizes_in_turn_give_what_fresh_models_give(model_type, kernels):
    """One model called at three sizes in turn, twice (the second round from the layout and bias caches), gives
    at each size what a fresh copy with empty caches gives; the second round adds nothing to the layout cache."""
    base = randomise(small_model("MODEL.FOCAL.USE_SHIFT", True, model_type=model_type)).eval()
    optimize_for(base, "cpu", kernels)
    sizes = [(64, 96), (100, 60), (36, 52)]
    inputs = {size: torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(size[0])) for size in sizes}
    fresh = {}
    with torch.no_grad():
        for size in sizes:
            LAYOUTS.clear()
            fresh[size] = copy.deepcopy(base)(inputs[size])
        LAYOUTS.clear()
        model = copy.deepcopy(base)
        for turn in range(2):
            for size in sizes:
                torch.testing.assert_close(model(inputs[size]), fresh[size], atol=0, rtol=0,
                                           msg=lambda m: f"turn {turn}, {size}: {m}")
            if turn == 0:
                kept = set(LAYOUTS.entries)
    assert kept and set(LAYOUTS.entries) == kept and LAYOUTS.nbytes() <= cache_limit()
    LAYOUTS.clear()


def test_cache_bound_from_the_environment_is_checked(monkeypatch):
    monkeypatch.setenv(CACHE_ENV, "lots")
    with pytest.raises(ValueError, match=CACHE_ENV):
        cache_limit()
    monkeypatch.setenv(CACHE_ENV, "0")
    LAYOUTS.clear()
    spec = FocalLayoutSpec(7, 3)
    assert focal_layout(spec, 14, 14, torch.device("cpu")).index.shape == (4, 49 + 120)
    assert LAYOUTS.nbytes() == 0  # bound 0: built, used, not kept


def cross_shifts(self):
    """Surroundings from the four axis-aligned shifts instead of the diagonal ones."""
    e = self.expand_size
    return [(e, 0), (0, e), (-e, 0), (0, -e)] if e > 0 else []


def test_attention_pattern_changes_through_the_one_layout_definition(monkeypatch):
    """Replace the surroundings in FocalLayoutSpec alone: the bias table, the key index, the gathered keys, the
    oracles and the checkpoint resizing all follow."""
    focal_layout.cache_clear()
    monkeypatch.setattr(FocalLayoutSpec, "shifts", cross_shifts)
    try:
        ws, e = 4, 1
        attn = FocalWindowAttention(8, 2, ws, e, 0, focal_level=2, focal_window=3, pool_method="fc")
        # per shift, the cells of the shifted window outside the window: 4 per side of a 4x4 window
        assert attn.relative_position_bias_table_to_neighbors.shape == (1, 2, ws * ws, 4 * ws)
        layout = attn.layout(12, 8, torch.device("cpu"))
        h, w = 12, 8
        for window, (wy, wx) in enumerate([(y, x) for y in range(h // ws) for x in range(w // ws)]):
            expected = {((wy * ws + a) % h, (wx * ws + b) % w) for a in range(-e, ws + e) for b in range(-e, ws + e)
                        if (0 <= a < ws) or (0 <= b < ws)}  # the window and its cross-shaped rim
            local = layout.index[window, : ws * ws + 4 * ws].tolist()
            assert {(t // w, t % w) for t in local} == expected and len(local) == len(expected)
        kv, pooled = torch.randn(2, h, w, 16), [torch.randn(2, h // ws, w // ws, 16)]
        want = index_keys_values(attn, kv, pooled)
        for method in GATHERS:
            for got, ref in zip(gathered_keys_values(attn, kv, pooled, method), want):
                assert torch.equal(got, ref), method
        grown = resize_neighbour_table(attn.relative_position_bias_table_to_neighbors.detach(),
                                       torch.Size((1, 2, 64, len(FocalLayoutSpec(8, 2).released_surroundings()))))
        assert grown.shape == (1, 2, 64, 4 * 2 * 8)  # window 8, expand 2: two rows of 8 per shift
        model = randomise(small_model("MODEL.FOCAL.WINDOW_SIZE", 4, "MODEL.FOCAL.EXPAND_SIZES", [1, 1, 1, 1],
                                      "DATA.IMG_SIZE", 64)).eval()
        x = torch.randn(1, 3, 72, 56)
        with torch.no_grad():
            out = model(x)
            with oracle_gather(model, "roll"):
                assert_agree(model(x), out, 2 * roundoff(model, torch.float32, dot=longest_sum(model, x)))
    finally:
        focal_layout.cache_clear()


def test_retired_kv_gather_key_still_loads():
    """Saved configs of earlier versions name MODEL.FOCAL.KV_GATHER; it is ignored (one gather remains)."""
    cfg = load_config(opts=["MODEL.FOCAL.KV_GATHER", "roll", "MODEL.NUM_CLASSES", 3, "MODEL.FOCAL.EMBED_DIM", 8,
                            "MODEL.FOCAL.DEPTHS", [1, 1, 1, 1], "MODEL.FOCAL.NUM_HEADS", [1, 1, 1, 1]])
    assert "KV_GATHER" not in cfg.MODEL.FOCAL
    assert build_model(cfg)(torch.randn(1, 3, 64, 64)).shape == (1, 3)
