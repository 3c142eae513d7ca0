"""CPU attention kernels: blocked attention with a lean backward, and an inference cache of attention biases, in
the subclasses at the bottom that :func:`models.kernels.optimize_for` swaps in."""
from __future__ import annotations

import weakref
from typing import Callable, List, NamedTuple, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..focal_attention import FocalWindowAttention
from ..topk_attention import TopKFocalAttention

# Attention runs in blocks of images, heads or windows whose probabilities take at most about this many bytes, so
# a block's working set stays in cache and the allocator reuses its buffers. 0: one block.
CPU_BLOCK_BYTES = 4 << 20

# Without autograd, each attention module keeps the last bias it built, while all kept biases stay within this
# many bytes (first come, first kept; a module's new bias replaces its old one).
BIAS_CACHE_BYTES = 256 << 20
_KEPT: "weakref.WeakKeyDictionary[nn.Module, int]" = weakref.WeakKeyDictionary()  # bytes kept per module


def forget_bias(module: nn.Module) -> None:
    """Drop ``module``'s cached bias and its share of the budget."""
    module.__dict__.pop("_bias_cache", None)
    _KEPT.pop(module, None)


def cached_bias(module: nn.Module, layout: object, build: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``build()``, or the bias ``module`` built last time for the same ``layout`` from the same parameters and
    buffers (same object, storage and version counter: optimizer steps, loading and ``.to()`` all invalidate it).
    Skipped while autograd records and under compile / export."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling() or BIAS_CACHE_BYTES <= 0:
        return build()
    tensors = tuple(module.parameters()) + tuple(module.buffers())
    versions = tuple((t.data_ptr(), t._version) for t in tensors)
    entry = getattr(module, "_bias_cache", None)
    if (entry is not None and entry[0] is layout and entry[2] == versions
            and all(a is b for a, b in zip(entry[1], tensors))):
        return entry[3]
    forget_bias(module)
    bias = build()
    size = bias.numel() * bias.element_size()
    if size + sum(_KEPT.values()) <= BIAS_CACHE_BYTES:
        # the entry holds the layout and tensors themselves, so identity checks cannot match a recycled object
        module._bias_cache = (layout, tensors, versions, bias)
        _KEPT[module] = size
    return bias


def kept_bias_bytes() -> int:
    """Bytes of attention biases kept by all modules."""
    return sum(_KEPT.values())


class Block(NamedTuple):
    """A part of the attention: images, heads and windows, and the matching rows of the (heads x windows) axis."""
    images: slice
    heads: slice
    windows: slice
    rows: slice


def attention_blocks(q: torch.Tensor, num_heads: int, n_keys: int) -> List[Block]:
    """As many whole images as fit the budget per block; else one image and as many of its heads; else one head
    and as many of its windows. One block under ``torch.compile`` / export (the compiler plans memory itself)."""
    whole = slice(None)
    if CPU_BLOCK_BYTES <= 0 or torch.compiler.is_compiling():
        return [Block(whole, whole, whole, whole)]  # no size arithmetic: export keeps the batch symbolic
    batch, rows, n_query, _ = q.shape
    n_win = rows // num_heads
    per_window = n_query * n_keys * q.element_size()
    per_head = per_window * n_win
    if per_head * num_heads <= CPU_BLOCK_BYTES:
        images = min(batch, CPU_BLOCK_BYTES // (per_head * num_heads))
        return [Block(slice(b, b + images), whole, whole, whole) for b in range(0, batch, images)]
    if per_head <= CPU_BLOCK_BYTES:
        heads = CPU_BLOCK_BYTES // per_head
        return [Block(slice(b, b + 1), slice(h, h + heads), whole, slice(h * n_win, (h + heads) * n_win))
                for b in range(batch) for h in range(0, num_heads, heads)]
    windows = max(1, CPU_BLOCK_BYTES // per_window)
    return [Block(slice(b, b + 1), slice(h, h + 1), slice(w, w + windows),
                  slice(h * n_win + w, h * n_win + min(w + windows, n_win)))
            for b in range(batch) for h in range(num_heads) for w in range(0, n_win, windows)]


def block_keys_values(k: torch.Tensor, v: torch.Tensor, index: torch.Tensor, n_keys: int,
                      block: Block) -> Tuple[torch.Tensor, torch.Tensor]:
    """Keys and values ``(b, h*w, L, hd)`` of one block, gathered from the ``(B, nH, N, hd)`` tables by ``index``
    (a block's table slice is contiguous: the gather's fast path)."""
    k, v = (t[block.images, block.heads].index_select(2, index[block.windows].reshape(-1)) for t in (k, v))
    return k.view(k.shape[0], -1, n_keys, k.shape[-1]), v.view(v.shape[0], -1, n_keys, v.shape[-1])


def blocked_attention(q: torch.Tensor, k_table: torch.Tensor, v_table: torch.Tensor, index: torch.Tensor,
                      bias: torch.Tensor, scale: float, blocks: List[Block]) -> torch.Tensor:
    """The fused kernel block by block."""
    n_keys = bias.shape[-1]
    if len(blocks) == 1:
        k, v = block_keys_values(k_table, v_table, index, n_keys, blocks[0])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    out = torch.empty_like(q)
    for block in blocks:
        k, v = block_keys_values(k_table, v_table, index, n_keys, block)
        rows = block.rows
        out[block.images, rows] = F.scaled_dot_product_attention(q[block.images, rows], k, v,
                                                                 attn_mask=bias[:, rows], scale=scale)
    return out


def scatter_add_tokens(table: torch.Tensor, index: torch.Tensor, grad: torch.Tensor) -> None:
    """``table (b, h, N, hd) += grad (b, h, nW*L, hd)`` scattered along the token axis by a ``(nW, L)`` index, as
    one 2-D row scatter (PyTorch's fast path, 6x faster than along dim 2 of the 4-D view)."""
    b, h, n_tokens, hd = table.shape
    offsets = torch.arange(b * h, device=table.device).mul_(n_tokens).unsqueeze(1)
    table.view(-1, hd).index_add_(0, (offsets + index.reshape(1, -1)).reshape(-1), grad.reshape(-1, hd))


class _BlockedAttention(torch.autograd.Function):
    """Softmax attention with a learned bias over gathered keys. PyTorch's fused CPU kernels give no gradient for
    the bias, and the plain path keeps the gathered keys/values and probabilities (the model's largest
    activations); here backward re-gathers each block from the compact tables and recomputes its probabilities.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k_table: torch.Tensor, v_table: torch.Tensor, index: torch.Tensor,
                bias: torch.Tensor, scale: float) -> torch.Tensor:
        blocks = attention_blocks(q, k_table.shape[1], bias.shape[-1])
        # detached: the kernel choice looks at requires_grad, not at grad mode, and would take the 4x slower
        # math path for inputs that need a gradient
        out = blocked_attention(q.detach(), k_table.detach(), v_table.detach(), index, bias.detach(), scale, blocks)
        ctx.save_for_backward(q, k_table, v_table, index, bias, out)
        ctx.scale, ctx.blocks = scale, blocks
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        q, k_table, v_table, index, bias, out = ctx.saved_tensors
        scale, n_keys = ctx.scale, bias.shape[-1]
        grad_q = torch.empty_like(q)
        grad_tables = torch.zeros_like(k_table), torch.zeros_like(v_table)
        grad_bias = torch.zeros_like(bias) if ctx.needs_input_grad[4] else None
        for block in ctx.blocks:
            images, rows = block.images, block.rows
            q_block, grad_block = q[images, rows], grad_out[images, rows]
            k, v = block_keys_values(k_table, v_table, index, n_keys, block)
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
            for table, grad in zip(grad_tables, (grad_k, grad_v)):
                scatter_add_tokens(table[images, block.heads], index[block.windows], grad)
        return grad_q, grad_tables[0], grad_tables[1], None, grad_bias, None


def blocked_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor,
                   bias: torch.Tensor, scale: float) -> torch.Tensor:
    """What ``WindowedAttention.attend`` computes (without dropout), in cache-sized blocks."""
    bias = bias.to(q.dtype)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, bias)):
        return _BlockedAttention.apply(q, k, v, index, bias, scale)
    return blocked_attention(q, k, v, index, bias, scale, attention_blocks(q, k.shape[1], bias.shape[-1]))


class CpuKernels:
    """Mixin for the attention classes: :meth:`attend` and :meth:`attention_bias` through the kernels named in
    ``cpu_kernels`` (``"attention"``, ``"bias_cache"``); anything else goes to the plain class."""

    cpu_kernels: frozenset = frozenset()

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor,
               bias: torch.Tensor) -> torch.Tensor:
        if "attention" in self.cpu_kernels and q.device.type == "cpu" and not (self.training and self.attn_drop):
            return blocked_attend(q, k, v, index, bias, self.scale)
        return super().attend(q, k, v, index, bias)

    def attention_bias(self, layout: object) -> torch.Tensor:
        build = super().attention_bias
        if "bias_cache" not in self.cpu_kernels:
            return build(layout)
        return cached_bias(self, layout, lambda: build(layout))


class CpuFocalWindowAttention(CpuKernels, FocalWindowAttention):
    pass


class CpuTopKFocalAttention(CpuKernels, TopKFocalAttention):
    pass


CPU_CLASSES = {FocalWindowAttention: CpuFocalWindowAttention, TopKFocalAttention: CpuTopKFocalAttention}
