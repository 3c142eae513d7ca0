"""What a v1 focal window attends to, defined once by :class:`FocalLayoutSpec` as offsets from the window's corner:
the key index of every window, its masks, the bias-table columns and their resampling (``models/resize.py``) all
derive from it, so a new pattern is a change (or subclass) of the spec alone.

Key order per window, as the bias tables of released checkpoints are laid out:
  1. the window's own ``ws*ws`` tokens, row-major;
  2. the surroundings: the window cyclically shifted by each of :meth:`~FocalLayoutSpec.shifts`, row-major, less
     its tokens inside the window. A token two shifted windows share is one key whose bias is the log-sum-exp of
     the released layout's two: the same softmax with fewer keys (Focal-T: 120 instead of 132);
  3. per coarse level ``k``: the pooled tokens under a ``focal_window + 2**k - 1`` square anchored at the window,
     row-major; those beyond the pooled map are a zero key/value with a -100 logit penalty.
"""
from __future__ import annotations

import functools
import os
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, TypeVar

import torch

from .window_attention import queries_by_window

MASK_VALUE = -100.0  # the reference's logit penalty (not -inf: fully masked rows stay finite)


def pooled_levels(focal_level: int, pool_method: str) -> int:
    """How many pooled levels a block attends to besides its fine keys: ``focal_level - 1`` when it pools."""
    return max(focal_level - 1, 0) if pool_method != "none" else 0


@dataclass(frozen=True)
class FocalLayoutSpec:
    """The attention pattern of one block: window, surroundings, shift and pooled levels."""
    window_size: int
    expand_size: int
    shift_size: int = 0
    focal_window: int = 1
    num_pooled: int = 0

    def shifts(self) -> List[Tuple[int, int]]:
        """The shifts whose windows make up the surroundings, in key order: the four diagonals."""
        e = self.expand_size
        return [(e, e), (e, -e), (-e, e), (-e, -e)] if e > 0 else []

    def released_surroundings(self) -> List[Tuple[int, int, int, int]]:
        """``(a, b, dy, dx)`` for every column of the released neighbour bias table: cell (a, b) read at (dy, dx)."""
        ws = self.window_size
        return [(a, b, dy, dx) for dy, dx in self.shifts() for a in range(ws) for b in range(ws)
                if not (0 <= a + dy < ws and 0 <= b + dx < ws)]

    def surrounding_cells(self) -> Tuple[List[Tuple[int, int]], torch.Tensor]:
        """The distinct surrounding cells relative to the window corner (in released order) and, for each, the
        released bias-table columns that list it, as a ``(U, m)`` index padded with one past the last column."""
        released = self.released_surroundings()
        columns: Dict[Tuple[int, int], List[int]] = {}
        for column, (a, b, dy, dx) in enumerate(released):
            # the same cell relative to the window is the same token in every window
            columns.setdefault((a + dy, b + dx), []).append(column)
        width = max((len(c) for c in columns.values()), default=1)
        index = [c + [len(released)] * (width - len(c)) for c in columns.values()]
        return list(columns), torch.tensor(index, dtype=torch.long)

    def pooled_span(self, level: int) -> int:
        """Side of the square of pooled tokens a window reads at coarse level ``level``."""
        return self.focal_window + 2 ** level - 1

    def pooled_cells(self, level: int) -> List[Tuple[int, int]]:
        """The pooled tokens read at ``level``, as offsets from the window's own first pooled token, row-major."""
        start = -(self.focal_window // 2)
        span = self.pooled_span(level)
        return [(start + u, start + v) for u in range(span) for v in range(span)]

    def build(self, height: int, width: int) -> "FocalLayout":
        """Where every key of every window comes from on a padded ``height x width`` map."""
        ws = self.window_size
        nh, nw = height // ws, width // ws
        wy = torch.arange(nh).repeat_interleave(nw).view(-1, 1)  # (nW, 1) window row and column
        wx = torch.arange(nw).repeat(nh).view(-1, 1)
        local = [(a, b) for a in range(ws) for b in range(ws)]
        if self.shifts():
            local += self.surrounding_cells()[0]
        ly, lx = (torch.tensor(c).view(1, -1) for c in zip(*local))
        # own tokens and surroundings, cyclic over the padded map (as the reference's rolls)
        parts = [((wy * ws + ly) % height) * width + (wx * ws + lx) % width]
        zero_token = height * width + sum(nh * nw * 4 ** level for level in range(self.num_pooled))
        offset, outside = height * width, []
        for level in range(self.num_pooled):
            ph, pw = nh * 2 ** level, nw * 2 ** level
            py, px = (torch.tensor(c).view(1, -1) for c in zip(*self.pooled_cells(level)))
            rows, cols = wy * 2 ** level + py, wx * 2 ** level + px
            out = (rows < 0) | (rows >= ph) | (cols < 0) | (cols >= pw)
            parts.append(torch.where(out, zero_token, offset + rows * pw + cols))
            outside.append(out)
            offset += ph * pw
        index = torch.cat(parts, dim=1)
        pooled_outside = torch.cat(outside, dim=1) if any(bool(out.any()) for out in outside) else None
        labels = shift_regions(height, width, ws, self.shift_size) if self.shift_size > 0 else None
        return FocalLayout((nh, nw), index, labels, pooled_outside)


@dataclass
class FocalLayout:
    """Every window's keys on one padded map size, with the masks in compact form (index tensors are int64)."""
    grid: Tuple[int, int]                   # windows along H and W
    index: torch.Tensor                     # (nW, L) into [map tokens, pooled tokens per level..., zero token]
    shift_labels: Optional[torch.Tensor]    # (nW, ws*ws) region of each window token under the cyclic shift
    pooled_outside: Optional[torch.Tensor]  # (nW, n_pooled) bool: the pooled key lies beyond the pooled map

    def to(self, device: torch.device) -> "FocalLayout":
        move = lambda t: None if t is None else t.to(device)
        return FocalLayout(self.grid, move(self.index), move(self.shift_labels), move(self.pooled_outside))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.index, self.shift_labels, self.pooled_outside)
                   if t is not None)


def shift_regions(height: int, width: int, window_size: int, shift_size: int) -> torch.Tensor:
    """Swin's regions of a cyclically shifted map per window token ``(nW, ws*ws)``, which must not mix."""
    labels = torch.zeros(1, height, width, 1, dtype=torch.uint8)
    bounds = lambda n: ((0, n - window_size), (n - window_size, n - shift_size), (n - shift_size, n))
    region = 0
    for h0, h1 in bounds(height):
        for w0, w1 in bounds(width):
            labels[:, h0:h1, w0:w1] = region
            region += 1
    return queries_by_window(labels, window_size, num_heads=1)[0, :, :, 0].contiguous()


LayoutT = TypeVar("LayoutT")
_BUILDER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="focal-layout")
CACHE_ENV = "FOCAL_LAYOUT_CACHE_BYTES"
# Enough for multi-scale detection training to reuse its layouts (all of Focal-T's stages: 2.9 MB at 800x1216).
DEFAULT_CACHE_BYTES = 128 << 20


def cache_limit() -> int:
    """The byte bound of the layout cache: ``FOCAL_LAYOUT_CACHE_BYTES`` or the default (0 keeps nothing)."""
    raw = os.environ.get(CACHE_ENV, "").strip() or str(DEFAULT_CACHE_BYTES)
    if not raw.isdecimal():
        raise ValueError(f"{CACHE_ENV}: expected a number of bytes >= 0, got {raw!r}")
    return int(raw)


class LayoutCache:
    """Layouts by their arguments, least recently used first out, within :func:`cache_limit` bytes in all."""

    def __init__(self) -> None:
        self.entries: "OrderedDict[tuple, Any]" = OrderedDict()

    def nbytes(self) -> int:
        return sum(layout.nbytes() for layout in self.entries.values())

    def get(self, key: tuple, build: Callable[[], LayoutT]) -> LayoutT:
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        layout, limit = build(), cache_limit()
        if layout.nbytes() <= limit:
            while self.nbytes() + layout.nbytes() > limit:
                self.entries.popitem(last=False)
            self.entries[key] = layout
        return layout

    def clear(self) -> None:
        self.entries.clear()


LAYOUTS = LayoutCache()


def _single_threaded(build: Callable[..., LayoutT], *args) -> LayoutT:
    """``build(*args)`` with one intra-op thread: a layout is many small operations that thread hand-offs slow."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return build(*args)
    finally:
        torch.set_num_threads(threads)


def layout_cache(build: Callable[..., LayoutT]) -> Callable[..., LayoutT]:
    """Memoise a layout builder in :data:`LAYOUTS`: blocks of one geometry share a layout, and ``torch.compile``
    keeps it as a constant (its index arithmetic would otherwise break the graph)."""

    @torch.compiler.assume_constant_result
    @functools.wraps(build)
    def cached(*args):
        # Built on a worker thread, where no inference or tracing mode applies: ordinary tensors serve training
        # too and enter an exported graph as constants.
        return LAYOUTS.get((build.__qualname__,) + args,
                           lambda: _BUILDER.submit(_single_threaded, build, *args).result())
    cached.cache_clear = LAYOUTS.clear
    return cached
