"""Head-major window attention shared by both variants: queries ``(B, nH*nW, ws*ws, hd)``; keys and values in
separate per-head token tables ``(B, nH, N, hd)``, gathered straight into ``(B, nH*nW, L, hd)`` blocks so that
one bias ``(1, nH*nW, ws*ws, L)`` broadcasts over the batch and nothing is copied before the attention kernel."""
import inspect
import types
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_module, use_fused_attn


def item(container: nn.Module, i: int) -> nn.Module:
    """``container[i]``, also on TorchScript's compiled view of a ``ModuleList``/``ParameterList``, which has no
    ``[]``."""
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
    """Key and value tokens of several ``(B, h, w, 2C)`` maps as two ``(B, nH, N, hd)`` tables."""
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


def gather_windows(table: torch.Tensor, index: Optional[torch.Tensor], n_keys: int) -> torch.Tensor:
    """The keys (or values) ``(B, nH*nW, L, hd)`` of every window: picked from the ``(B, nH, N, hd)`` table by
    the ``(nW, L)`` index, or (without an index) a view of a table that is already gathered (``N = nW*L``)."""
    if index is not None:
        table = table.index_select(2, index.reshape(-1))
    return table.reshape(table.shape[0], -1, n_keys, table.shape[-1])


@register_notrace_module  # its layout depends on the map size: one node (a leaf) for torch.fx
class WindowedAttention(nn.Module):
    """What both variants share: the forward over windowed queries and key tables, of which the subclasses define
    the layout (:meth:`layout`) and its bias (:meth:`attention_bias`)."""

    num_heads: int
    window_size: int
    scale: float
    attn_drop: float
    fused_attn: bool

    def __init__(self, zero_token: bool) -> None:
        super().__init__()
        self.zero_token = zero_token  # the key tables end with a zero token, the key of out-of-map positions
        # False: attend's written-out path (timm's ``fused_attn``, set by TIMM_FUSED_ATTN as for timm's modules)
        self.fused_attn = use_fused_attn()

    def forward(self, x: torch.Tensor, pooled: List[torch.Tensor]) -> torch.Tensor:
        b, h, w, c = x.shape
        index, bias = self.index_and_bias(h, w, x.device)
        qkv = self.qkv(x)
        q = queries_by_window(qkv[..., :c], self.window_size, self.num_heads)
        k, v = key_value_table([qkv[..., c:]] + [self.project_kv(p) for p in pooled], self.num_heads,
                               self.zero_token)
        out = self.attend(q, k, v, index, bias)
        return self.proj_drop(self.proj(merge_windows(out, h, w, self.window_size, self.num_heads)))

    @torch.jit.ignore
    def index_and_bias(self, height: int, width: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """The key index and attention bias on a padded ``height x width`` map. Layouts are cached Python objects,
        so TorchScript leaves this call to Python (``torch.export`` is the way to a saved graph)."""
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
        if self.fused_attn:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=dropout,
                                                  scale=self.scale)
        attn = (q * self.scale) @ k.transpose(-2, -1) + bias.to(q.dtype)  # (B, nH*nW, n, L): every query, every key
        attn = F.dropout(attn.softmax(dim=-1), dropout)
        return attn @ v
