"""Independent formulations of v1's key/value gather, kept as oracles for the layout index
(``models/focal_layout.py``): the reference's rolls of the whole map, and an unfold of each window's padded
neighbourhood. Both read what a window attends to from the released bias columns and the unfold kernels of the
reference, not from the layout's index arithmetic.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List

import torch
import torch.nn.functional as F

from models.focal_attention import FocalWindowAttention
from models.focal_layout import FocalLayoutSpec
from models.window_attention import key_value_table, merge_windows, queries_by_window

GATHERS = ("roll", "unfold")


def _first_columns(spec: FocalLayoutSpec) -> List[tuple]:
    """For each distinct surrounding cell, the released ``(a, b, dy, dx)`` that lists it first."""
    first = {}
    for a, b, dy, dx in spec.released_surroundings():
        first.setdefault((a + dy, b + dx), (a, b, dy, dx))
    return [first[cell] for cell in spec.surrounding_cells()[0]]


def local_by_roll(kv: torch.Tensor, spec: FocalLayoutSpec) -> torch.Tensor:
    """``(B, H, W, C)`` -> ``(B, nW, ws*ws + n_sur, C)``: each window, then its surroundings picked from the map
    rolled by every shift (the reference's formulation)."""
    ws = spec.window_size
    windows = queries_by_window(kv, ws, num_heads=1)  # (B, nW, ws*ws, C): one head holds every channel
    if not spec.shifts():
        return windows
    shifted = torch.cat([queries_by_window(torch.roll(kv, shifts=(-dy, -dx), dims=(1, 2)), ws, num_heads=1)
                         for dy, dx in spec.shifts()], dim=2)
    select = [spec.shifts().index((dy, dx)) * ws * ws + a * ws + b for a, b, dy, dx in _first_columns(spec)]
    return torch.cat([windows, shifted[:, :, select]], dim=2)


def local_by_unfold(kv: torch.Tensor, spec: FocalLayoutSpec) -> torch.Tensor:
    """The same as :func:`local_by_roll` from an unfold of each window's circularly padded neighbourhood."""
    ws, b, c = spec.window_size, kv.shape[0], kv.shape[-1]
    reach = max((max(abs(dy), abs(dx)) for dy, dx in spec.shifts()), default=0)
    x = kv.permute(0, 3, 1, 2)
    if reach:
        x = F.pad(x, (reach,) * 4, mode="circular")
    side = ws + 2 * reach
    patches = F.unfold(x, side, stride=ws).view(b, c, side * side, -1)
    cells = [(a, bb) for a in range(ws) for bb in range(ws)]
    if spec.shifts():
        cells += [(a + dy, bb + dx) for a, bb, dy, dx in _first_columns(spec)]
    select = [(y + reach) * side + (x_ + reach) for y, x_ in cells]
    return patches[:, :, select].permute(0, 3, 2, 1)


def pooled_by_unfold(pooled_kv: List[torch.Tensor], spec: FocalLayoutSpec) -> List[torch.Tensor]:
    """Per level ``(B, nW, span**2, C)``: the reference's zero-padded unfold of the pooled map, keeping the kernel
    cells from ``2**level - 1`` on."""
    out = []
    for level, p in enumerate(pooled_kv):
        stride = 2 ** level
        kernel = 2 * (spec.focal_window // 2) + 2 * stride - 1
        keep = [u * kernel + v for u in range(stride - 1, kernel) for v in range(stride - 1, kernel)]
        b, c = p.shape[0], p.shape[-1]
        patches = F.unfold(p.permute(0, 3, 1, 2), kernel, stride=stride, padding=kernel // 2)
        out.append(patches.view(b, c, kernel * kernel, -1)[:, :, keep].permute(0, 3, 2, 1))
    return out


def windows_to_heads(windows: torch.Tensor, num_heads: int) -> tuple:
    """``(B, nW, L, 2C)`` key/value windows -> already gathered tables ``(B, nH, nW*L, hd)``."""
    b, n_win, n_keys, c2 = windows.shape
    kv = windows.view(b, n_win * n_keys, 2, num_heads, c2 // 2 // num_heads)
    return kv[:, :, 0].transpose(1, 2).contiguous(), kv[:, :, 1].transpose(1, 2).contiguous()


def gathered_keys_values(attn: FocalWindowAttention, kv: torch.Tensor, pooled_kv: List[torch.Tensor],
                         method: str) -> tuple:
    """Keys and values of every window, ``(B, nH, nW*L, hd)`` each, gathered by ``method`` (roll / unfold)."""
    local = local_by_roll(kv, attn.spec) if method == "roll" else local_by_unfold(kv, attn.spec)
    windows = torch.cat([local] + pooled_by_unfold(pooled_kv, attn.spec), dim=2)
    return windows_to_heads(windows, attn.num_heads)


def index_keys_values(attn: FocalWindowAttention, kv: torch.Tensor, pooled_kv: List[torch.Tensor]) -> tuple:
    """The same through the layout's index, as the model gathers them."""
    layout = attn.layout(kv.shape[1], kv.shape[2], kv.device)
    k, v = key_value_table([kv] + pooled_kv, attn.num_heads, zero_token=True)
    flat = layout.index.reshape(-1)
    return k.index_select(2, flat), v.index_select(2, flat)


def oracle_forward(attn: FocalWindowAttention, method: str):
    """``attn.forward`` with its keys and values gathered by an oracle instead of the layout index."""
    def forward(x: torch.Tensor, pooled: List[torch.Tensor]) -> torch.Tensor:
        b, h, w, c = x.shape
        qkv = attn.qkv(x)
        q = queries_by_window(qkv[..., :c], attn.window_size, attn.num_heads)
        k, v = gathered_keys_values(attn, qkv[..., c:], [attn.project_kv(p) for p in pooled], method)
        bias = attn.attention_bias(attn.layout(h, w, x.device))
        in_order = torch.arange(k.shape[2], device=x.device).view(-1, bias.shape[-1])  # already gathered
        out = attn.attend(q, k, v, in_order, bias)
        return attn.proj_drop(attn.proj(merge_windows(out, h, w, attn.window_size, attn.num_heads)))
    return forward


@contextlib.contextmanager
def oracle_gather(model: torch.nn.Module, method: str) -> Iterator[int]:
    """Within the block, every v1 attention module of ``model`` gathers by ``method``; yields their number."""
    attns = [m for m in model.modules() if isinstance(m, FocalWindowAttention)]
    for attn in attns:
        attn.forward = oracle_forward(attn, method)
    try:
        yield len(attns)
    finally:
        for attn in attns:
            del attn.forward
