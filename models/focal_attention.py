"""Focal self-attention (v1): each window attends to itself, its fine surroundings and pooled coarse tokens
around it, as :class:`~models.focal_layout.FocalLayoutSpec` defines (key order and masks are documented there)."""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from .focal_layout import MASK_VALUE, FocalLayout, FocalLayoutSpec, layout_cache, pooled_levels
from .layers import relative_position_index
from .window_attention import WindowedAttention, item


# Every layout spec a module was built with: a TorchScript-compiled module keeps only plain attributes, so its
# layout calls find the spec by number.
LAYOUT_SPECS: List[FocalLayoutSpec] = []


@layout_cache
def focal_layout(spec: FocalLayoutSpec, height: int, width: int, device: torch.device) -> FocalLayout:
    return spec.build(height, width).to(device)


class FocalWindowAttention(WindowedAttention):
    """Multi-head focal attention on padded, shifted ``(B, Hp, Wp, C)`` maps."""

    def __init__(self, dim: int, num_heads: int, window_size: int, expand_size: int, shift_size: int,
                 focal_level: int, focal_window: int, pool_method: str, qkv_bias: bool = True,
                 qk_scale: Optional[float] = None, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__(zero_token=True)
        self.spec = FocalLayoutSpec(window_size, expand_size if focal_level > 0 else 0, shift_size, focal_window,
                                    pooled_levels(focal_level, pool_method))
        if self.spec not in LAYOUT_SPECS:
            LAYOUT_SPECS.append(self.spec)
        self.spec_number = LAYOUT_SPECS.index(self.spec)
        self.dim = dim
        self.num_heads = num_heads
        self.window_size = self.spec.window_size
        self.expand_size = self.spec.expand_size
        self.num_pooled = self.spec.num_pooled
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        ws = self.window_size

        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * ws - 1) ** 2, num_heads))
        self.register_buffer("window_bias_index", relative_position_index(ws, ws), persistent=False)
        released = len(self.spec.released_surroundings())
        self.register_buffer("surrounding_columns", None, persistent=False)
        if released:
            self.relative_position_bias_table_to_neighbors = nn.Parameter(
                torch.zeros(1, num_heads, ws * ws, released))
            trunc_normal_(self.relative_position_bias_table_to_neighbors, std=0.02)
            self.register_buffer("surrounding_columns", self.spec.surrounding_cells()[1], persistent=False)
        if self.num_pooled:
            self.relative_position_bias_table_to_windows = nn.ParameterList()
            for level in range(self.num_pooled):
                span = self.spec.pooled_span(level)
                table = nn.Parameter(torch.zeros(num_heads, (ws + span - 1) ** 2))
                trunc_normal_(table, std=0.02)
                self.relative_position_bias_table_to_windows.append(table)
                self.register_buffer(f"pooled_bias_index_{level}", relative_position_index(ws, span), persistent=False)

        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    @torch.jit.ignore
    def layout(self, height: int, width: int, device: torch.device) -> FocalLayout:
        return focal_layout(LAYOUT_SPECS[self.spec_number], height, width, device)

    @torch.jit.ignore
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
            table = item(self.relative_position_bias_table_to_windows, level)
            parts.append(table[:, index.view(-1)].view(self.num_heads, n, -1))
        return torch.cat(parts, dim=-1)

    @torch.jit.ignore
    def attention_bias(self, layout: FocalLayout) -> torch.Tensor:
        """(1, nH*nW, ws*ws, L): position biases plus the shift mask (own keys) and out-of-map mask (pooled keys)."""
        bias = self.relative_bias().unsqueeze(1)  # nH, 1, n, L
        n_heads, _, n, n_keys = bias.shape
        labels, outside = layout.shift_labels, layout.pooled_outside
        n_pooled = 0 if outside is None else outside.shape[-1]
        own, middle, pooled = bias[..., :n], bias[..., n:n_keys - n_pooled], bias[..., n_keys - n_pooled:]
        if labels is not None:  # tokens of different shift regions
            own = own + (labels[:, :, None] != labels[:, None, :]).float() * MASK_VALUE
        if outside is not None:
            pooled = pooled + outside.float().unsqueeze(1) * MASK_VALUE
        parts = [p.expand(n_heads, layout.grid[0] * layout.grid[1], n, -1) for p in (own, middle, pooled)]
        return torch.cat(parts, dim=-1).reshape(1, -1, n, n_keys)

    def flops(self, n: int, height: int, width: int) -> float:
        """The reference's multiply-add count for one window of ``n`` query tokens (any map size)."""
        hd = self.dim // self.num_heads
        keys = n + (self.window_size + 2 * self.expand_size) ** 2 - self.window_size ** 2
        if self.num_pooled:
            keys += self.spec.focal_window ** 2
        return n * self.dim * 3 * self.dim + 2 * self.num_heads * n * hd * keys + n * self.dim * self.dim

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, window_size={self.window_size}, num_heads={self.num_heads}, "
                f"expand_size={self.expand_size}, pooled_levels={self.num_pooled}")
