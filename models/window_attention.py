"""Head-major window attention shared by both variants.

Queries are laid out as ``(B, nH*nW, ws*ws, hd)``. Keys and values live in compact per-head token tables
``(B, nH, N, hd)`` and are gathered straight into ``(B, nH*nW, L, hd)`` blocks, so one additive bias of shape
``(1, nH*nW, ws*ws, L)`` broadcasts over the batch and nothing is copied between the gather and the attention
kernel. Keys and values are kept apart (not one stacked tensor), so their gradients need no stacking copy.
"""
import functools
import inspect
import os
import types
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, List, Optional, Tuple, TypeVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_module

LayoutT = TypeVar("LayoutT")
_BUILDER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="focal-layout")
CACHE_ENV = "FOCAL_LAYOUT_CACHE_BYTES"
# The compact layouts of all stages take 2.9 MB (Focal-T) and 6.0 MB (Focal-fast-T) at 800x1216: the default
# keeps 20-40 such sizes, enough for multi-scale detection training to reuse its layouts.
DEFAULT_CACHE_BYTES = 128 << 20


def cache_limit() -> int:
    """The byte bound of the layout cache: ``FOCAL_LAYOUT_CACHE_BYTES`` or the default (0 keeps nothing)."""
    raw = os.environ.get(CACHE_ENV, "").strip()
    if not raw:
        return DEFAULT_CACHE_BYTES
    try:
        limit = int(raw)
    except ValueError:
        limit = -1
    if limit < 0:
        raise ValueError(f"{CACHE_ENV}: expected a number of bytes >= 0, got {raw!r}")
    return limit


class LayoutCache:
    """Layouts by their arguments, least recently used first out, holding at most :func:`cache_limit` bytes of
    tensors in all (a layout larger than the bound is returned but not kept). Shared by every layout builder."""

    def __init__(self) -> None:
        self.entries: "OrderedDict[tuple, object]" = OrderedDict()
        self.sizes: Dict[tuple, int] = {}

    def nbytes(self) -> int:
        return sum(self.sizes.values())

    def get(self, key: tuple, build: Callable[[], LayoutT]) -> LayoutT:
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        layout = build()
        size, limit = layout.nbytes(), cache_limit()
        if size <= limit:
            while self.entries and self.nbytes() + size > limit:
                old, _ = self.entries.popitem(last=False)
                del self.sizes[old]
            self.entries[key], self.sizes[key] = layout, size
        return layout

    def clear(self) -> None:
        self.entries.clear()
        self.sizes.clear()


LAYOUTS = LayoutCache()


def _single_threaded(build: Callable[..., LayoutT], *args) -> LayoutT:
    """``build(*args)`` with one intra-op thread (the caller waits meanwhile). A layout is many small tensor
    operations: on a busy 2-core machine, two threads made building the 800x1216 focalv2 layouts 3-5x slower
    than one (thread hand-offs); an idle machine was not available to measure."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return build(*args)
    finally:
        torch.set_num_threads(threads)


def layout_cache(build: Callable[..., LayoutT]) -> Callable[..., LayoutT]:
    """Memoise a layout builder in :data:`LAYOUTS`; layouts depend only on their arguments (geometry and device),
    so every block of the same geometry shares one, and ``torch.compile`` evaluates the call once at trace time
    and keeps the result as a constant (the index arithmetic inside would otherwise break the graph)."""

    @torch.compiler.assume_constant_result
    @functools.wraps(build)
    def cached(*args):
        # Built on a worker thread: inference mode and tracing modes (non-strict torch.export's fake tensors) are
        # per thread, so the layout is made of ordinary tensors that serve training too and enter an exported
        # graph as constants.
        return LAYOUTS.get((build.__qualname__,) + args,
                           lambda: _BUILDER.submit(_single_threaded, build, *args).result())
    cached.cache_clear = LAYOUTS.clear
    return cached


def item(container: nn.Module, i: int) -> nn.Module:
    """``container[i]`` of a ``ModuleList`` or ``ParameterList``, also on the compiled view of one that TorchScript
    hands to Python code (see :meth:`WindowedAttention.index_and_bias`), which has no ``[]``."""
    return getattr(container, str(i))


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


def key_value_table(maps: List[torch.Tensor], num_heads: int, zero_token: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Key and value tokens of several ``(B, h, w, 2C)`` maps as two ``(B, nH, N, hd)`` tables (plus a zero
    token)."""
    b, c2 = maps[0].shape[0], maps[0].shape[-1]
    hd = c2 // 2 // num_heads
    parts = [m.reshape(b, -1, 2, num_heads, hd) for m in maps]
    tables = []
    for i in (0, 1):
        part = [p[:, :, i].transpose(1, 2) for p in parts]
        if zero_token:
            part.append(maps[0].new_zeros(b, num_heads, 1, hd))
        tables.append(torch.cat(part, dim=2) if len(part) > 1 else part[0].contiguous())
    return tables[0], tables[1]


def windows_to_heads(windows: torch.Tensor, num_heads: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(B, nW, L, 2C)`` key/value windows -> already gathered tables ``(B, nH, nW*L, hd)``."""
    b, n_win, n_keys, c2 = windows.shape
    kv = windows.view(b, n_win * n_keys, 2, num_heads, c2 // 2 // num_heads)
    return kv[:, :, 0].transpose(1, 2).contiguous(), kv[:, :, 1].transpose(1, 2).contiguous()


def gather_windows(table: torch.Tensor, index: Optional[torch.Tensor], n_keys: int) -> torch.Tensor:
    """The keys (or values) ``(B, nH*nW, L, hd)`` of every window: picked from the ``(B, nH, N, hd)`` table by
    the ``(nW, L)`` index, or (without an index) a view of a table that is already gathered (``N = nW*L``)."""
    if index is not None:
        table = table.index_select(2, index.reshape(-1))
    return table.reshape(table.shape[0], -1, n_keys, table.shape[-1])


@register_notrace_module  # its layout depends on the map size: one node (a leaf) for torch.fx
class WindowedAttention(nn.Module):
    """What both attention variants share: the key/value-only projection of pooled tokens and the attention
    itself, :meth:`attend`, which device kernels (``models.kernels``) may replace with a faster equivalent."""

    num_heads: int
    scale: float
    attn_drop: float

    @torch.jit.ignore
    def index_and_bias(self, height: int, width: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """The key index and attention bias on a padded ``height x width`` map (see :meth:`attend`), from the
        subclass's ``layout`` and ``attention_bias``. Layouts are cached Python objects, so TorchScript leaves this
        call to Python: a scripted model runs, and ``torch.export`` is the way to a saved graph."""
        if isinstance(self, torch.jit.RecursiveScriptModule):
            # TorchScript calls this on a compiled view that holds the class's ignored methods unbound
            for name, fn in list(vars(self).items()):
                if inspect.isfunction(fn):
                    setattr(self, name, types.MethodType(fn, self))
        layout = self.layout(height, width, device)
        return layout.index, self.attention_bias(layout)

    def project_kv(self, x: torch.Tensor) -> torch.Tensor:
        """Keys and values only, for pooled tokens whose queries are never used."""
        c = self.qkv.in_features
        bias = None if self.qkv.bias is None else self.qkv.bias[c:]
        return F.linear(x, self.qkv.weight[c:], bias)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: Optional[torch.Tensor],
               bias: torch.Tensor) -> torch.Tensor:
        """Softmax attention of windowed queries ``(B, nH*nW, n, hd)`` with an additive bias ``(1, nH*nW, n, L)``
        over each window's keys and values, gathered from the ``(B, nH, N, hd)`` tables by ``index`` ``(nW, L)``."""
        k, v = gather_windows(k, index, bias.shape[-1]), gather_windows(v, index, bias.shape[-1])
        dropout = self.attn_drop if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=dropout,
                                              scale=self.scale)
