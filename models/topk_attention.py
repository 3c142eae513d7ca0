"""Top-K focal attention (``focalv2``): each window attends to the K tokens nearest its centre at every level
(level 0: the map, level 1: one pooled token per window), with a position bias from relative coordinates by a small
MLP per level. The key sets depend only on the map size and are computed once per size (:class:`TopKLayout`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn as nn

from .focal_layout import layout_cache
from .window_attention import WindowedAttention, item

MAX_LEVELS = 2
# Squared distances below this are compared as they are: their square roots (what the reference ranks) are
# distinct and in the same order, so torch.topk makes the same choices, ties included.
EXACT_SQUARES = 1 << 20


def nearest_tokens(grid: Tuple[int, int], key_grid: Tuple[int, int], top_k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """For each cell of ``grid`` (at the centre of its stretch of ``key_grid``), the ``top_k`` nearest ``key_grid``
    cells: flat indices (nW, K) and (cell - key) offsets (nW, K, 2). ``torch.topk``'s tie-breaking depends on the
    whole row, so rows are ranked whole, as the reference ranks them, one row of cells at a time."""
    factor = key_grid[0] // grid[0] if grid[0] != key_grid[0] else 1
    qy = torch.arange(grid[0]) * factor + factor // 2
    qx = torch.arange(grid[1]) * factor + factor // 2
    dy = qy[:, None] - torch.arange(key_grid[0])[None]  # (gh, KH)
    dx = qx[:, None] - torch.arange(key_grid[1])[None]  # (gw, KW)
    dy2, dx2 = dy.float() ** 2, dx.float() ** 2
    exact = float(dy2.max() + dx2.max()) < EXACT_SQUARES
    top_k = min(top_k, key_grid[0] * key_grid[1])
    rows = []
    for i in range(grid[0]):
        dist = dy2[i][None, :, None] + dx2[:, None, :]  # (gw, KH, KW)
        if not exact:
            dist = dist.sqrt()
        rows.append(torch.topk(dist.view(grid[1], -1).neg_(), top_k, dim=1).indices)
    index = torch.cat(rows)
    cells = torch.stack(torch.meshgrid(qy, qx, indexing="ij"), -1).view(-1, 1, 2)
    keys = torch.stack([index // key_grid[1], index % key_grid[1]], -1)
    return index, cells - keys


@dataclass
class TopKLayout:
    """Every window's keys on one padded map size. The bias of query ``i`` of window ``w`` for key ``k`` is column
    ``key_code[w, k] + query_code[i, k]`` of :meth:`TopKFocalAttention.bias_table` (per level, the box of relative
    coordinates that occur), so the codes stay linear in windows and keys."""
    index: torch.Tensor       # (nW, K) into [map tokens, pooled tokens], levels concatenated along K
    key_code: torch.Tensor    # (nW, K) int32: the key's relative coordinate, in its level's box
    query_code: torch.Tensor  # (ws*ws, K) int32: the query token's offset within its window, in the key's level box
    coords: List[torch.Tensor]  # per level, the (box rows * box columns, 2) relative coordinates of the table

    def to(self, device: torch.device) -> "TopKLayout":
        return TopKLayout(self.index.to(device), self.key_code.to(device), self.query_code.to(device),
                          [c.to(device) for c in self.coords])

    def nbytes(self) -> int:
        tensors = [self.index, self.key_code, self.query_code] + self.coords
        return sum(t.numel() * t.element_size() for t in tensors)


def build_topk_layout(height: int, width: int, window_size: int, focal_level: int, top_k: int) -> TopKLayout:
    ws = window_size
    grid = (height // ws, width // ws)
    within = torch.stack(torch.meshgrid(torch.arange(ws) - ws // 2, torch.arange(ws) - ws // 2, indexing="ij"), -1)
    within = within.view(-1, 2)  # (ws*ws, 2)
    indices, key_codes, query_codes, coords = [], [], [], []
    offset = base = 0
    for level in range(focal_level):
        key_grid = (height, width) if level == 0 else grid
        index, rel = nearest_tokens(grid, key_grid, top_k)
        if level > 0:
            rel = rel * ws
        low = rel.view(-1, 2).min(0).values + within.min(0).values
        high = rel.view(-1, 2).max(0).values + within.max(0).values
        rows, cols = (high - low + 1).tolist()
        box = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), -1).view(-1, 2)
        coords.append((box + low).float())
        key_codes.append(base + (rel[..., 0] - low[0]) * cols + rel[..., 1] - low[1])
        query_codes.append((within[:, 0] * cols + within[:, 1])[:, None].expand(-1, index.shape[1]))
        indices.append(index + offset)
        offset += key_grid[0] * key_grid[1]
        base += rows * cols
    return TopKLayout(torch.cat(indices, dim=1), torch.cat(key_codes, dim=1).int(),
                      torch.cat(query_codes, dim=1).int().contiguous(), coords)


@layout_cache
def topk_layout(height: int, width: int, window_size: int, focal_level: int, top_k: int,
                device: torch.device) -> TopKLayout:
    return build_topk_layout(height, width, window_size, focal_level, top_k).to(device)


class TopKFocalAttention(WindowedAttention):
    """Multi-head top-K focal attention; input and output are padded, shifted ``(B, Hp, Wp, C)`` maps."""

    def __init__(self, dim: int, num_heads: int, window_size: int, focal_level: int, top_k: int,
                 qkv_bias: bool = True, qk_scale: Optional[float] = None, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__(zero_token=False)
        self.dim = dim
        self.num_heads = num_heads
        self.window_size = window_size
        self.focal_level = focal_level
        self.top_k = top_k
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.coord2rpb_all = nn.ModuleList(
            nn.Sequential(nn.Linear(2, head_dim), nn.ReLU(inplace=True), nn.Linear(head_dim, num_heads))
            for _ in range(focal_level))

    @torch.jit.ignore
    def layout(self, height: int, width: int, device: torch.device) -> TopKLayout:
        return topk_layout(height, width, self.window_size, self.focal_level, self.top_k, device)

    @torch.jit.ignore
    def bias_table(self, layout: TopKLayout) -> torch.Tensor:
        """(nH, codes): each level's MLP run once per relative coordinate of its box, in the MLP's dtype."""
        tables = []
        for level, coords in enumerate(layout.coords):
            mlp = item(self.coord2rpb_all, level)  # .forward: TorchScript's compiled view of a Sequential has no ()
            tables.append(mlp.forward(coords.to(item(mlp, 0).weight.dtype)))
        return torch.cat(tables).t()

    @torch.jit.ignore
    def attention_bias(self, layout: TopKLayout) -> torch.Tensor:
        """(1, nH*nW, ws*ws, K): the table indexed straight into the attention layout."""
        codes = layout.key_code[:, None, :] + layout.query_code  # nW, ws*ws, K
        # index_select rather than advanced indexing: 3.6x faster for this (nH, many) gather on CPU
        bias = self.bias_table(layout).index_select(1, codes.view(-1))  # nH, nW * ws*ws * K
        return bias.view(1, -1, *codes.shape[1:])

    def flops(self, n: int, height: int, width: int) -> float:
        """The reference's multiply-add count for one window of ``n`` query tokens on a ``height x width`` map."""
        hd = self.dim // self.num_heads
        flops = n * self.dim * 3 * self.dim + n * self.dim * self.dim
        n_windows = height // self.window_size * (width // self.window_size)
        for level in range(self.focal_level):
            keys = min(self.top_k, height * width if level == 0 else n_windows)
            n_query = n if level == 0 else n // (self.window_size // 2 ** (level - 1)) ** 2
            flops += 2 * self.num_heads * n * hd * keys + n_query * keys * (2 * hd + hd * self.num_heads)
        return flops

    def extra_repr(self) -> str:
        return f"dim={self.dim}, window_size={self.window_size}, num_heads={self.num_heads}, top_k={self.top_k}"
