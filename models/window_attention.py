"""Head-major window attention shared by both variants.

Queries are laid out as ``(B, nH*nW, ws*ws, hd)`` and keys/values are gathered straight into
``(B, nH*nW, L, hd)``, so one additive bias of shape ``(1, nH*nW, ws*ws, L)`` broadcasts over the batch and no
tensor is copied between the gather and the attention kernel.
"""
from __future__ import annotations

import functools
from collections import OrderedDict
from typing import Callable, List, Tuple, TypeVar

import torch
import torch.nn as nn
import torch.nn.functional as F


LayoutT = TypeVar("LayoutT")


def layout_cache(build: Callable[..., LayoutT], max_entries: int = 64) -> Callable[..., LayoutT]:
    """Memoise a layout builder; layouts depend only on sizes and device, so every block of the same geometry
    shares one, and ``torch.compile`` evaluates the call once at trace time and keeps the result as a constant
    (the index arithmetic inside would otherwise break the graph)."""
    store: "OrderedDict[tuple, LayoutT]" = OrderedDict()

    @torch.compiler.assume_constant_result
    @functools.wraps(build)
    def cached(*args):
        if args not in store:
            with torch.inference_mode(False):  # a layout first needed under inference_mode serves training too
                store[args] = build(*args)
            if len(store) > max_entries:
                store.popitem(last=False)
        return store[args]
    return cached


def queries_by_window(q: torch.Tensor, window_size: int, num_heads: int) -> torch.Tensor:
    """``(B, H, W, C)`` -> ``(B, nH*nW, ws*ws, hd)``."""
    b, h, w, c = q.shape
    ws = window_size
    q = q.view(b, h // ws, ws, w // ws, ws, num_heads, c // num_heads)
    return q.permute(0, 5, 1, 3, 2, 4, 6).reshape(b, -1, ws * ws, c // num_heads)


def merge_windows(out: torch.Tensor, height: int, width: int, window_size: int, num_heads: int) -> torch.Tensor:
    """Inverse of :func:`queries_by_window`: ``(B, nH*nW, ws*ws, hd)`` -> ``(B, H, W, C)``."""
    b, _, _, hd = out.shape
    ws = window_size
    out = out.view(b, num_heads, height // ws, width // ws, ws, ws, hd)
    return out.permute(0, 2, 4, 3, 5, 1, 6).reshape(b, height, width, num_heads * hd)


def kv_source(maps: List[torch.Tensor], num_heads: int, zero_token: bool) -> torch.Tensor:
    """Key/value tokens of several ``(B, h, w, 2C)`` maps as one ``(2, B, nH, N, hd)`` table (plus a zero token)."""
    b, c2 = maps[0].shape[0], maps[0].shape[-1]
    hd = c2 // 2 // num_heads
    parts = [m.reshape(b, -1, 2, num_heads, hd).permute(2, 0, 3, 1, 4) for m in maps]
    if zero_token:
        parts.append(maps[0].new_zeros(2, b, num_heads, 1, hd))
    return torch.cat(parts, dim=3) if len(parts) > 1 else parts[0].contiguous()


def gather_windows(source: torch.Tensor, index: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Keys and values ``(B, nH*nW, L, hd)`` for a ``(nW, L)`` index into the source's token axis."""
    two, b, nh, _, hd = source.shape
    n_win, n_keys = index.shape
    kv = source.index_select(3, index.reshape(-1)).view(two, b, nh * n_win, n_keys, hd)
    return kv.unbind(0)  # unbind, not indexing: its backward stacks the two gradients instead of zero-filling


def windows_to_heads(windows: torch.Tensor, num_heads: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(B, nW, L, 2C)`` key/value windows -> keys and values ``(B, nH*nW, L, hd)``."""
    b, n_win, n_keys, c2 = windows.shape
    kv = windows.view(b, n_win, n_keys, 2, num_heads, c2 // 2 // num_heads).permute(3, 0, 4, 1, 2, 5)
    kv = kv.reshape(2, b, num_heads * n_win, n_keys, -1)
    return kv.unbind(0)  # unbind, not indexing: its backward stacks the two gradients instead of zero-filling


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float,
           dropout: float) -> torch.Tensor:
    """Softmax attention with an additive bias.

    When the bias itself needs a gradient (training), the fused kernels do not apply and PyTorch's generic
    fallback spends much of its time guarding against fully masked rows, which cannot occur here (masks are
    finite); the plain formulation is then faster and computes the same thing.
    """
    bias = bias.to(q.dtype)
    if not (torch.is_grad_enabled() and bias.requires_grad):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, scale=scale)
    attn = torch.matmul(q * scale, k.transpose(-2, -1)) + bias
    attn = F.dropout(attn.softmax(dim=-1), dropout, training=dropout > 0)
    return torch.matmul(attn, v)


def attend_gathered(q: torch.Tensor, source: torch.Tensor, index: torch.Tensor, bias: torch.Tensor, scale: float,
                    dropout: float) -> torch.Tensor:
    """Attention over keys/values gathered from ``source`` by a ``(nW, L)`` index."""
    k, v = gather_windows(source, index)
    return attend(q, k, v, bias, scale, dropout)


def project_kv(x: torch.Tensor, qkv: nn.Linear) -> torch.Tensor:
    """Keys and values only, for pooled tokens whose queries are never used."""
    c = qkv.in_features
    return F.linear(x, qkv.weight[c:], None if qkv.bias is None else qkv.bias[c:])
