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


class _BiasedAttention(torch.autograd.Function):
    """Softmax attention with a learned additive bias, memory-lean in training.

    PyTorch's fused kernels give no gradient for the bias on CPU, and the plain formulation keeps the attention
    probabilities for backward: with focal attention's wide key sets those are the largest activations of the
    model. Here the fused kernel runs forward and backward recomputes the probabilities from q, k and the bias.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                scale: float) -> torch.Tensor:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
        ctx.save_for_backward(q, k, v, bias, out)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        q, k, v, bias, out = ctx.saved_tensors
        probs = torch.matmul(q, k.transpose(-2, -1)).mul_(ctx.scale).add_(bias).softmax(dim=-1)
        grad_v = torch.matmul(probs.transpose(-2, -1), grad_out)
        # d(logits) = P * (dP - rowsum(dO * O)), computed in place in the dP buffer
        grad_logits = torch.matmul(grad_out, v.transpose(-2, -1))
        grad_logits.sub_((grad_out * out).sum(dim=-1, keepdim=True)).mul_(probs)
        del probs
        grad_q = torch.matmul(grad_logits, k).mul_(ctx.scale)
        grad_k = torch.matmul(grad_logits.transpose(-2, -1), q).mul_(ctx.scale)
        grad_bias = grad_logits.sum_to_size(bias.shape) if ctx.needs_input_grad[3] else None
        return grad_q, grad_k, grad_v, grad_bias, None


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float,
           dropout: float) -> torch.Tensor:
    """Softmax attention with an additive bias: the fused kernel, with a lean backward when training."""
    bias = bias.to(q.dtype)
    if torch.is_grad_enabled() and bias.requires_grad and dropout == 0.0:
        return _BiasedAttention.apply(q, k, v, bias, scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, scale=scale)


def attend_gathered(q: torch.Tensor, source: torch.Tensor, index: torch.Tensor, bias: torch.Tensor, scale: float,
                    dropout: float) -> torch.Tensor:
    """Attention over keys/values gathered from ``source`` by a ``(nW, L)`` index."""
    k, v = gather_windows(source, index)
    return attend(q, k, v, bias, scale, dropout)


def project_kv(x: torch.Tensor, qkv: nn.Linear) -> torch.Tensor:
    """Keys and values only, for pooled tokens whose queries are never used."""
    c = qkv.in_features
    return F.linear(x, qkv.weight[c:], None if qkv.bias is None else qkv.bias[c:])
