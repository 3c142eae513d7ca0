"""Focal self-attention (v1): each window attends to itself, to its fine-grained surroundings and to pooled
coarse tokens around it.

Key/value order per window, which the bias tables of released checkpoints are laid out for:
  1. the window's own ``ws*ws`` tokens, row-major;
  2. the surroundings: the window shifted diagonally by ``expand_size`` in the four directions
     (+e,+e), (+e,-e), (-e,+e), (-e,-e) (cyclically over the padded map), each row-major, keeping only the
     tokens that fall outside the window. Where two shifted windows overlap, the released layout lists a token
     twice, with two biases; here it is one key whose bias is the log-sum-exp of both, which gives the same
     softmax with fewer keys (Focal-T: 120 instead of 132);
  3. per coarse level ``k``: the pooled tokens under a ``focal_window + 2**k - 1`` square anchored at the window,
     row-major; positions beyond the pooled map are zero keys/values with a -100 logit penalty.

All of that depends only on the map size, so it is computed once per size as a :class:`FocalLayout` and the
keys/values are gathered by one of three equivalent methods (``KV_GATHER``): one precomputed ``index`` gather,
``unfold`` windows, or the reference's ``roll``s.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from .layers import relative_position_index, window_partition
from .window_attention import (WindowedAttention, key_value_table, layout_cache, merge_windows, queries_by_window,
                               windows_to_heads)

GATHER_METHODS = ("index", "unfold", "roll")
MASK_VALUE = -100.0  # the reference's logit penalty (not -inf: fully masked rows stay finite)


def diagonal_offsets(expand_size: int) -> List[Tuple[int, int]]:
    """The four diagonal shifts whose windows make up the surroundings, in key order."""
    e = expand_size
    return [(e, e), (e, -e), (-e, e), (-e, -e)]


def surrounding_offsets(window_size: int, expand_size: int) -> List[Tuple[int, int, int, int]]:
    """``(a, b, dy, dx)`` for every surrounding key of the released layout (the columns of its bias table):
    query-window cell (a, b) read at offset (dy, dx)."""
    ws = window_size
    out = []
    for dy, dx in diagonal_offsets(expand_size):
        for a in range(ws):
            for b in range(ws):
                if not (0 <= a + dy < ws and 0 <= b + dx < ws):
                    out.append((a, b, dy, dx))
    return out


def distinct_surroundings(window_size: int, expand_size: int) -> Tuple[List[Tuple[int, int, int, int]], torch.Tensor]:
    """The surrounding keys that are distinct tokens (first occurrences, in released order) and, for each, the
    released bias-table columns that refer to its token, as a ``(U, m)`` index padded with one past the last."""
    released = surrounding_offsets(window_size, expand_size)
    position: Dict[Tuple[int, int], int] = {}
    kept, columns = [], []
    for column, (a, b, dy, dx) in enumerate(released):
        cell = (a + dy, b + dx)  # the same cell relative to the window is the same token in every window
        if cell not in position:
            position[cell] = len(kept)
            kept.append((a, b, dy, dx))
            columns.append([])
        columns[position[cell]].append(column)
    width = max((len(c) for c in columns), default=1)
    return kept, torch.tensor([c + [len(released)] * (width - len(c)) for c in columns], dtype=torch.long)


def pooled_kernel(focal_window: int, level: int) -> Tuple[int, int, List[Tuple[int, int]]]:
    """Unfold kernel size, stride and the kept kernel cells for coarse level ``level``."""
    stride = 2 ** level
    kernel = 2 * (focal_window // 2) + 2 * stride - 1
    first = stride - 1
    cells = [(u, v) for u in range(first, kernel) for v in range(first, kernel)]
    return kernel, stride, cells


@dataclass
class FocalLayout:
    """Where every key of every window comes from, for one padded map size (all index tensors are int64)."""
    grid: Tuple[int, int]            # windows along H and W
    index: torch.Tensor              # (nW, L) into [map tokens, pooled tokens per level..., one zero token]
    mask: Optional[torch.Tensor]     # (nW, ws*ws, L) additive 0/-100, or None when nothing is masked
    roll_select: Optional[torch.Tensor]  # (n_sur,) into the 4 diagonally shifted windows, concatenated
    unfold_select: torch.Tensor      # (ws*ws + n_sur,) into the (ws + 2e)**2 unfold patch
    pooled_select: List[torch.Tensor]  # per level, kept cells of the unfold kernel

    def to(self, device: torch.device) -> "FocalLayout":
        def move(t):
            return None if t is None else t.to(device)
        return FocalLayout(self.grid, move(self.index), move(self.mask), move(self.roll_select),
                           move(self.unfold_select), [move(t) for t in self.pooled_select])


def shift_mask(height: int, width: int, window_size: int, shift_size: int) -> torch.Tensor:
    """Swin's mask for cyclically shifted windows: (nW, ws*ws, ws*ws), -100 between tokens of different regions."""
    labels = torch.zeros(1, height, width, 1)
    bounds = lambda n: ((0, n - window_size), (n - window_size, n - shift_size), (n - shift_size, n))
    region = 0
    for h0, h1 in bounds(height):
        for w0, w1 in bounds(width):
            labels[:, h0:h1, w0:w1] = region
            region += 1
    windows = window_partition(labels, window_size)[0, :, :, 0]
    different = windows[:, :, None] != windows[:, None, :]
    return different.float() * MASK_VALUE


def build_focal_layout(height: int, width: int, window_size: int, expand_size: int, shift_size: int,
                       focal_window: int, num_pooled: int) -> FocalLayout:
    ws, e = window_size, expand_size
    nh, nw = height // ws, width // ws
    wy, wx = torch.meshgrid(torch.arange(nh), torch.arange(nw), indexing="ij")
    wy, wx = wy.reshape(-1, 1), wx.reshape(-1, 1)  # (nW, 1)
    a, b = torch.arange(ws * ws) // ws, torch.arange(ws * ws) % ws

    # the window itself, then its surroundings (cyclic over the padded map, as the reference's rolls)
    parts = [(wy * ws + a) * width + (wx * ws + b)]
    sur = distinct_surroundings(ws, e)[0] if e > 0 else []
    local_a, local_b = a + e, b + e
    roll_select = None
    if sur:
        sa, sb, dy, dx = (torch.tensor(c) for c in zip(*sur))
        parts.append(((wy * ws + sa + dy) % height) * width + (wx * ws + sb + dx) % width)
        quadrant = torch.tensor([diagonal_offsets(e).index(d) for d in zip(dy.tolist(), dx.tolist())])
        roll_select = quadrant * ws * ws + sa * ws + sb
        local_a, local_b = torch.cat([local_a, sa + dy + e]), torch.cat([local_b, sb + dx + e])
    unfold_select = local_a * (ws + 2 * e) + local_b

    # pooled levels: tokens under each window's kernel; outside the pooled map -> the zero token, masked
    zero_token = height * width + sum(nh * nw * 4 ** level for level in range(num_pooled))
    offset = height * width
    pooled_select, outside = [], []
    for level in range(num_pooled):
        ph, pw = nh * 2 ** level, nw * 2 ** level
        kernel, stride, kept = pooled_kernel(focal_window, level)
        u, v = (torch.tensor(c) for c in zip(*kept))
        rows, cols = wy * stride - kernel // 2 + u, wx * stride - kernel // 2 + v
        out = (rows < 0) | (rows >= ph) | (cols < 0) | (cols >= pw)
        parts.append(torch.where(out, zero_token, offset + rows * pw + cols))
        pooled_select.append(u * kernel + v)
        outside.append(out)
        offset += ph * pw
    index = torch.cat([p.expand(nh * nw, -1) for p in parts], dim=1)

    mask = None
    any_outside = bool(outside) and bool(torch.cat(outside, dim=1).any())
    if shift_size > 0 or any_outside:
        mask = torch.zeros(nh * nw, ws * ws, index.shape[1])
        if shift_size > 0:
            mask[:, :, :ws * ws] = shift_mask(height, width, ws, shift_size)
        if any_outside:
            mask[:, :, ws * ws + len(sur):] = torch.cat(outside, dim=1).float()[:, None, :] * MASK_VALUE
    return FocalLayout((nh, nw), index, mask, roll_select, unfold_select, pooled_select)


@layout_cache
def focal_layout(height: int, width: int, window_size: int, expand_size: int, shift_size: int, focal_window: int,
                 num_pooled: int, device: torch.device) -> FocalLayout:
    return build_focal_layout(height, width, window_size, expand_size, shift_size, focal_window, num_pooled).to(device)


class FocalWindowAttention(WindowedAttention):
    """Multi-head focal attention for one block; input and output are padded, shifted ``(B, Hp, Wp, C)`` maps."""

    def __init__(self, dim: int, num_heads: int, window_size: int, expand_size: int, shift_size: int,
                 focal_level: int, focal_window: int, pool_method: str, qkv_bias: bool = True,
                 qk_scale: Optional[float] = None, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 kv_gather: str = "index"):
        super().__init__()
        if kv_gather not in GATHER_METHODS:
            raise ValueError(f"MODEL.FOCAL.KV_GATHER must be one of {GATHER_METHODS}, got {kv_gather!r}")
        self.dim = dim
        self.num_heads = num_heads
        self.window_size = window_size
        self.expand_size = expand_size if focal_level > 0 else 0
        self.shift_size = shift_size
        self.focal_window = focal_window
        self.num_pooled = focal_level - 1 if (pool_method != "none" and focal_level > 1) else 0
        self.kv_gather = kv_gather
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        ws = window_size

        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * ws - 1) ** 2, num_heads))
        self.register_buffer("window_bias_index", relative_position_index(ws, ws), persistent=False)
        released = len(surrounding_offsets(ws, self.expand_size)) if self.expand_size > 0 else 0
        self.register_buffer("surrounding_columns", None, persistent=False)
        if released:
            self.relative_position_bias_table_to_neighbors = nn.Parameter(
                torch.zeros(1, num_heads, ws * ws, released))
            trunc_normal_(self.relative_position_bias_table_to_neighbors, std=0.02)
            self.register_buffer("surrounding_columns", distinct_surroundings(ws, self.expand_size)[1],
                                 persistent=False)
        if self.num_pooled:
            self.relative_position_bias_table_to_windows = nn.ParameterList()
            for level in range(self.num_pooled):
                span = focal_window + 2 ** level - 1
                table = nn.Parameter(torch.zeros(num_heads, (ws + span - 1) ** 2))
                trunc_normal_(table, std=0.02)
                self.relative_position_bias_table_to_windows.append(table)
                self.register_buffer(f"pooled_bias_index_{level}", relative_position_index(ws, span), persistent=False)

        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def layout(self, height: int, width: int, device: torch.device) -> FocalLayout:
        return focal_layout(height, width, self.window_size, self.expand_size, self.shift_size, self.focal_window,
                            self.num_pooled, device)

    def relative_bias(self) -> torch.Tensor:
        """(nH, ws*ws, L): the three position-bias tables laid out along the key order."""
        n = self.window_size ** 2
        parts = [self.relative_position_bias_table[self.window_bias_index.view(-1)].view(n, n, -1).permute(2, 0, 1)]
        if self.surrounding_columns is not None:
            # one bias per distinct surrounding token: the log-sum-exp of the columns that list it (padding: -inf)
            table = F.pad(self.relative_position_bias_table_to_neighbors[0], (0, 1), value=float("-inf"))
            parts.append(torch.logsumexp(table[..., self.surrounding_columns], dim=-1))
        for level in range(self.num_pooled):
            index = getattr(self, f"pooled_bias_index_{level}")
            parts.append(self.relative_position_bias_table_to_windows[level][:, index.view(-1)].view(self.num_heads, n, -1))
        return torch.cat(parts, dim=-1)

    def _local_by_roll(self, kv: torch.Tensor, layout: FocalLayout) -> torch.Tensor:
        windows = window_partition(kv, self.window_size)
        if layout.roll_select is None:
            return windows
        shifted = [window_partition(torch.roll(kv, shifts=(-dy, -dx), dims=(1, 2)), self.window_size)
                   for dy, dx in diagonal_offsets(self.expand_size)]
        return torch.cat([windows, torch.cat(shifted, dim=2)[:, :, layout.roll_select]], dim=2)

    def _local_by_unfold(self, kv: torch.Tensor, layout: FocalLayout) -> torch.Tensor:
        b, _, _, c2 = kv.shape
        e, ws = self.expand_size, self.window_size
        x = kv.permute(0, 3, 1, 2)
        if e:
            x = F.pad(x, (e, e, e, e), mode="circular")
        patches = F.unfold(x, ws + 2 * e, stride=ws).view(b, c2, (ws + 2 * e) ** 2, -1)
        return patches[:, :, layout.unfold_select].permute(0, 3, 2, 1)

    def _pooled_by_unfold(self, pooled_kv: List[torch.Tensor], layout: FocalLayout) -> List[torch.Tensor]:
        out = []
        for level, p in enumerate(pooled_kv):
            kernel, stride, _ = pooled_kernel(self.focal_window, level)
            b, _, _, c2 = p.shape
            patches = F.unfold(p.permute(0, 3, 1, 2), kernel, stride=stride, padding=kernel // 2)
            patches = patches.view(b, c2, kernel * kernel, -1)[:, :, layout.pooled_select[level]]
            out.append(patches.permute(0, 3, 2, 1))
        return out

    def gather_kv(self, kv: torch.Tensor, pooled_kv: List[torch.Tensor],
                  layout: FocalLayout) -> Tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of every window, ``(B, nH, nW*L, hd)`` each, in the documented order (roll / unfold)."""
        local = self._local_by_roll(kv, layout) if self.kv_gather == "roll" else self._local_by_unfold(kv, layout)
        windows = torch.cat([local] + self._pooled_by_unfold(pooled_kv, layout), dim=2)
        return windows_to_heads(windows, self.num_heads)

    def attention_bias(self, layout: FocalLayout) -> torch.Tensor:
        """(1, nH*nW, ws*ws, L): position biases plus the constant shift / out-of-map masks."""
        bias = self.relative_bias().unsqueeze(1)  # nH, 1, ws*ws, L
        if layout.mask is not None:
            bias = bias + layout.mask
        else:
            bias = bias.expand(-1, layout.grid[0] * layout.grid[1], -1, -1)
        return bias.reshape(1, -1, *bias.shape[2:])

    def forward(self, x: torch.Tensor, pooled: List[torch.Tensor]) -> torch.Tensor:
        b, h, w, c = x.shape
        layout = self.layout(h, w, x.device)
        qkv = self.qkv(x)
        q = queries_by_window(qkv[..., :c], self.window_size, self.num_heads)
        kv, pooled_kv = qkv[..., c:], [self.project_kv(p) for p in pooled]
        if self.kv_gather == "index":  # compact tables and each window's key positions in them
            (k, v), index = key_value_table([kv] + pooled_kv, self.num_heads, zero_token=True), layout.index
        else:  # every window's keys already gathered, in the same order
            (k, v), index = self.gather_kv(kv, pooled_kv, layout), None
        out = self.attend(q, k, v, index, self.attention_bias(layout))
        return self.proj_drop(self.proj(merge_windows(out, h, w, self.window_size, self.num_heads)))

    def flops(self, n: int) -> float:
        """The reference's multiply-add count for one window of ``n`` query tokens."""
        hd = self.dim // self.num_heads
        keys = n
        if self.num_pooled:
            keys += self.focal_window ** 2
        if self.expand_size > 0:
            keys += (self.window_size + 2 * self.expand_size) ** 2 - self.window_size ** 2
        return n * self.dim * 3 * self.dim + 2 * self.num_heads * n * hd * keys + n * self.dim * self.dim

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, window_size={self.window_size}, num_heads={self.num_heads}, "
                f"expand_size={self.expand_size}, pooled_levels={self.num_pooled}, kv_gather={self.kv_gather}")
