"""Head-major window attention shared by both variants.

Queries are laid out as ``(B, nH*nW, ws*ws, hd)``. Keys and values live in a compact per-head token table and
are gathered straight into ``(B, nH*nW, L, hd)`` blocks, so one additive bias of shape ``(1, nH*nW, ws*ws, L)``
broadcasts over the batch and nothing is copied between the gather and the attention kernel.
"""
from __future__ import annotations

import functools
from collections import OrderedDict
from typing import Callable, List, NamedTuple, Optional, Tuple, TypeVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import _disable_current_modes

from .onednn_linear import linear

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
            # a layout first needed under inference_mode serves training too; under a tracing dispatch mode
            # (non-strict torch.export) it is built from real integers and enters the graph as a constant
            with torch.inference_mode(False), _disable_current_modes():
                store[args] = build(*args)
            if len(store) > max_entries:
                store.popitem(last=False)
        return store[args]
    cached.cache_clear = store.clear
    return cached


# Without autograd, an attention module keeps the last full attention bias it built, if it is at most this many
# bytes (at 224 the largest is 8.7 MB). Rebuilding it costs one large write per block: Focal-fast-T at batch 1
# ran ~25% faster on CPU with the cache. A model then holds 27-35 MB of biases for the Tiny models at 224 and up
# to 172 MB for Focal-B at 448. 0 turns the cache off.
BIAS_CACHE_BYTES = 16 << 20


def cached_bias(module: nn.Module, layout: object, build: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``build()``, or the bias ``module`` built last time for the same ``layout`` from the same parameters,
    those of ``module.bias_parameters()``.

    A parameter counts as the same while its object, storage and version counter are: optimizer steps,
    ``load_state_dict`` (copying or assigning) and ``.to()`` all invalidate the entry. The cache is skipped
    whenever autograd is recording (the bias must then be part of the graph) and under ``torch.compile`` / export.
    """
    if torch.is_grad_enabled() or torch.compiler.is_compiling() or BIAS_CACHE_BYTES <= 0:
        return build()
    params = tuple(module.bias_parameters())
    versions = tuple((p.data_ptr(), p._version) for p in params)
    entry = getattr(module, "_bias_cache", None)
    if (entry is not None and entry[0] is layout and entry[2] == versions
            and all(a is b for a, b in zip(entry[1], params))):
        return entry[3]
    bias = build()
    fits = bias.numel() * bias.element_size() <= BIAS_CACHE_BYTES
    # the entry holds the layout and parameters themselves, so identity checks cannot match a recycled object
    module._bias_cache = (layout, params, versions, bias) if fits else None
    return bias


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


def windows_to_heads(windows: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``(B, nW, L, 2C)`` key/value windows -> an already gathered table ``(2, B, nH, nW*L, hd)`` for
    :func:`attend`."""
    b, n_win, n_keys, c2 = windows.shape
    kv = windows.view(b, n_win, n_keys, 2, num_heads, c2 // 2 // num_heads).permute(3, 0, 4, 1, 2, 5)
    return kv.reshape(2, b, num_heads, n_win * n_keys, -1)


# On CPU the attention runs in blocks of images, heads or windows whose attention probabilities take at most
# about this many bytes: a block's working set stays in cache, and the allocator reuses its buffers instead of
# mapping and page-faulting fresh ones. At 224 this made Focal-T's training attention about 1.3x faster.
# 0 turns blocking off.
CPU_BLOCK_BYTES = 4 << 20


class Block(NamedTuple):
    """A part of the attention: images, heads and windows, and the matching rows of the (heads x windows) axis."""
    images: slice
    heads: slice
    windows: slice
    rows: slice


WHOLE = Block(slice(None), slice(None), slice(None), slice(None))


def attention_blocks(q: torch.Tensor, num_heads: int, n_keys: int) -> List[Block]:
    """As many whole images as fit the budget per block; else one image and as many of its heads; else one head
    and as many of its windows. One block under ``torch.compile`` / export (the compiler plans memory itself) and
    on accelerators, where many small kernels would only add launches."""
    if q.device.type != "cpu" or CPU_BLOCK_BYTES <= 0 or torch.compiler.is_compiling():
        return [WHOLE]  # no size arithmetic: export keeps the batch symbolic
    batch, rows, n_query, _ = q.shape
    n_win = rows // num_heads
    per_window = n_query * n_keys * q.element_size()
    per_head = per_window * n_win
    if per_head * num_heads <= CPU_BLOCK_BYTES:
        images = min(batch, CPU_BLOCK_BYTES // (per_head * num_heads))
        return [Block(slice(b, b + images), slice(None), slice(None), slice(None)) for b in range(0, batch, images)]
    if per_head <= CPU_BLOCK_BYTES:
        heads = CPU_BLOCK_BYTES // per_head
        return [Block(slice(b, b + 1), slice(h, h + heads), slice(None), slice(h * n_win, (h + heads) * n_win))
                for b in range(batch) for h in range(0, num_heads, heads)]
    windows = max(1, CPU_BLOCK_BYTES // per_window)
    return [Block(slice(b, b + 1), slice(h, h + 1), slice(w, w + windows),
                  slice(h * n_win + w, h * n_win + min(w + windows, n_win)))
            for b in range(batch) for h in range(num_heads) for w in range(0, n_win, windows)]


def token_range(windows: slice, n_keys: int) -> slice:
    """Where a range of windows lies in an already gathered ``nW*L`` token axis."""
    return slice(None if windows.start is None else windows.start * n_keys,
                 None if windows.stop is None else windows.stop * n_keys)


def block_keys_values(kv: torch.Tensor, index: Optional[torch.Tensor], n_keys: int,
                      block: Block) -> Tuple[torch.Tensor, torch.Tensor]:
    """Keys and values ``(b, h*w, L, hd)`` of one block, gathered from the table by ``index`` if given.

    Blocks are whole images, or heads or windows of one image, so each key or value slice of the table is
    contiguous: the gather's fast path.
    """
    out = []
    for part in (0, 1):
        if index is None:
            table = kv[part, block.images, block.heads, token_range(block.windows, n_keys)]
        else:
            table = kv[part, block.images, block.heads].index_select(2, index[block.windows].reshape(-1))
        out.append(table.reshape(table.shape[0], -1, n_keys, table.shape[-1]))
    return out[0], out[1]


def blocked_attention(q: torch.Tensor, kv: torch.Tensor, index: Optional[torch.Tensor], bias: torch.Tensor,
                      scale: float, blocks: List[Block]) -> torch.Tensor:
    """The fused kernel block by block."""
    n_keys = bias.shape[-1]
    if len(blocks) == 1:
        k, v = block_keys_values(kv, index, n_keys, blocks[0])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    out = torch.empty_like(q)
    for block in blocks:
        k, v = block_keys_values(kv, index, n_keys, block)
        rows = block.rows
        out[block.images, rows] = F.scaled_dot_product_attention(q[block.images, rows], k, v,
                                                                 attn_mask=bias[:, rows], scale=scale)
    return out


def scatter_add_tokens(table: torch.Tensor, index: torch.Tensor, grad: torch.Tensor) -> None:
    """``table (b, h, N, hd) += grad (b, h, nW*L, hd)`` scattered along the token axis by a ``(nW, L)`` index.

    The table slice of a block is contiguous (see :func:`block_keys_values`), so this is one 2-D row scatter,
    PyTorch's fast path: 6x faster than scattering along dim 2 of the 4-D view, which loops over the index with
    one small strided add each."""
    b, h, n_tokens, hd = table.shape
    offsets = torch.arange(b * h, device=table.device).mul_(n_tokens).unsqueeze(1)
    table.view(-1, hd).index_add_(0, (offsets + index.reshape(1, -1)).reshape(-1), grad.reshape(-1, hd))


class _BlockedAttention(torch.autograd.Function):
    """Softmax attention with a learned additive bias over gathered keys, lean in time and memory in training.

    PyTorch's fused kernels give no gradient for the bias on CPU, and the plain formulation keeps the gathered
    keys/values and the attention probabilities for backward: with focal attention's wide key sets those are the
    largest activations of the model. Here only the compact key/value table is kept; backward re-gathers each
    block and recomputes its probabilities from q, k and the bias.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, kv: torch.Tensor, index: Optional[torch.Tensor], bias: torch.Tensor,
                scale: float) -> torch.Tensor:
        blocks = attention_blocks(q, kv.shape[2], bias.shape[-1])
        # detached: the kernel choice looks at requires_grad, not at grad mode, and would take the 4x slower
        # math path for inputs that need a gradient
        out = blocked_attention(q.detach(), kv.detach(), index, bias.detach(), scale, blocks)
        ctx.save_for_backward(q, kv, index, bias, out)
        ctx.scale, ctx.blocks = scale, blocks
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        q, kv, index, bias, out = ctx.saved_tensors
        scale, n_keys = ctx.scale, bias.shape[-1]
        grad_q = torch.empty_like(q)
        grad_kv = torch.zeros_like(kv)
        grad_bias = torch.zeros_like(bias) if ctx.needs_input_grad[3] else None
        for block in ctx.blocks:
            images, rows = block.images, block.rows
            q_block, grad_block = q[images, rows], grad_out[images, rows]
            k, v = block_keys_values(kv, index, n_keys, block)
            probs = torch.matmul(q_block, k.transpose(-2, -1)).mul_(scale).add_(bias[:, rows]).softmax(dim=-1)
            grad_v = torch.matmul(probs.transpose(-2, -1), grad_block)
            # d(logits) = P * (dP - rowsum(dO * O)), computed in place in the dP buffer
            grad_logits = torch.matmul(grad_block, v.transpose(-2, -1))
            grad_logits.sub_((grad_block * out[images, rows]).sum(dim=-1, keepdim=True)).mul_(probs)
            del probs
            grad_q[images, rows] = torch.matmul(grad_logits, k).mul_(scale)
            grad_k = torch.matmul(grad_logits.transpose(-2, -1), q_block).mul_(scale)
            if grad_bias is not None:
                grad_bias[:, rows] += grad_logits.sum_to_size(grad_bias[:, rows].shape)  # no copy for one image
            for part, grad in ((0, grad_k), (1, grad_v)):
                table = grad_kv[part, images, block.heads]
                grad = grad.view(table.shape[0], table.shape[1], -1, table.shape[-1])
                if index is None:
                    table[:, :, token_range(block.windows, n_keys)] = grad
                else:
                    scatter_add_tokens(table, index[block.windows], grad)
        return grad_q, grad_kv, None, grad_bias, None


def attend(q: torch.Tensor, kv: torch.Tensor, index: Optional[torch.Tensor], bias: torch.Tensor, scale: float,
           dropout: float) -> torch.Tensor:
    """Softmax attention of windowed queries ``(B, nH*nW, n, hd)`` with an additive bias ``(1, nH*nW, n, L)``.

    ``kv`` is a ``(2, B, nH, N, hd)`` key/value table and ``index`` ``(nW, L)`` picks every window's keys from
    its token axis; without ``index`` the table is already gathered, ``N = nW*L``.
    """
    bias = bias.to(q.dtype)
    if dropout > 0.0:  # rare (all released models use 0): PyTorch's generic path, one block
        k, v = block_keys_values(kv, index, bias.shape[-1], WHOLE)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, scale=scale)
    if torch.is_grad_enabled() and (q.requires_grad or kv.requires_grad or bias.requires_grad):
        return _BlockedAttention.apply(q, kv, index, bias, scale)
    return blocked_attention(q, kv, index, bias, scale, attention_blocks(q, kv.shape[2], bias.shape[-1]))


def project_kv(x: torch.Tensor, qkv: nn.Linear) -> torch.Tensor:
    """Keys and values only, for pooled tokens whose queries are never used."""
    c = qkv.in_features
    return linear(x, qkv.weight[c:], None if qkv.bias is None else qkv.bias[c:])
