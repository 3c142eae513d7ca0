"""Building blocks of both Focal Transformer variants: patch embedding, windowing and window pooling. Token maps
travel between modules as channels-last ``(B, H, W, C)`` tensors, which carry their own size."""
from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_function

POOL_METHODS = ("none", "fc", "conv", "mean", "max")


@register_notrace_function  # shape-dependent padding: one node for torch.fx (timm's feature extraction)
def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad a ``(B, H, W, C)`` map at the bottom and right so both sides are multiples of ``multiple``."""
    pad_h = -x.shape[1] % multiple
    pad_w = -x.shape[2] % multiple
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    return x


def relative_position_index(query_size: int, key_size: int) -> torch.Tensor:
    """Index into a ``(query_size + key_size - 1)**2`` bias table for every (query, key) pair of two square grids
    that start at the same corner (with equal sizes, Swin's window table)."""
    q = torch.stack(torch.meshgrid(torch.arange(query_size), torch.arange(query_size), indexing="ij")).flatten(1)
    k = torch.stack(torch.meshgrid(torch.arange(key_size), torch.arange(key_size), indexing="ij")).flatten(1)
    rel = q[:, :, None] - k[:, None, :] + (key_size - 1)
    return rel[0] * (query_size + key_size - 1) + rel[1]


@register_notrace_function  # shape-dependent padding: one node for torch.fx
def centre_fit(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Crop or zero-pad a ``(B, H, W, C)`` map symmetrically (extra row/column at the bottom/right) to a size."""
    dh, dw = height - x.shape[1], width - x.shape[2]
    if dh or dw:  # int(d / 2) rounds towards zero: the odd row or column goes to the bottom or right
        x = F.pad(x, (0, 0, int(dw / 2), dw - int(dw / 2), int(dh / 2), dh - int(dh / 2)))
    return x


class WindowPool(nn.Module):
    """Summarises each sub-window of a map into one token: level ``k`` of focal attention pools sub-windows of
    ``window_size // 2**k`` tokens, after centre-cropping or padding the map to a whole number of them."""

    def __init__(self, dim: int, window_size: int, level: int, method: str):
        super().__init__()
        self.window_size = window_size
        self.level = level
        self.method = method
        self.per_window = 2 ** level  # sub-windows across an attention window
        self.pool_size = window_size // self.per_window
        if method == "fc":
            self.weight = nn.Parameter(torch.full((1, self.pool_size ** 2), 1.0 / self.pool_size ** 2))
            self.bias = nn.Parameter(torch.zeros(1))
        elif method == "conv":
            self.weight = nn.Parameter(torch.empty(dim, 1, self.pool_size, self.pool_size))
            self.bias = nn.Parameter(torch.empty(dim))
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Conv2d's initialisation
            nn.init.uniform_(self.bias, -1 / self.pool_size, 1 / self.pool_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, Hp, Wp, C)`` with sides multiple of the window -> ``(B, Hp/ws * 2**k, Wp/ws * 2**k, C)``."""
        grid_h = x.shape[1] // self.window_size * self.per_window
        grid_w = x.shape[2] // self.window_size * self.per_window
        p = self.pool_size
        x = centre_fit(x, grid_h * p, grid_w * p)
        if self.method == "fc":
            b, _, _, c = x.shape
            x = x.view(b, grid_h, p, grid_w, p, c)
            kernel = self.weight.view(p, p)
            return torch.einsum("bipjqc,pq->bijc", x, kernel) + self.bias
        x = x.permute(0, 3, 1, 2)
        if self.method == "conv":
            x = F.conv2d(x, self.weight, self.bias, stride=p, groups=x.shape[1])
        elif self.method == "mean":
            x = F.avg_pool2d(x, p)
        else:
            x = F.max_pool2d(x, p)
        return x.permute(0, 2, 3, 1)

    def extra_repr(self) -> str:
        return f"method={self.method}, level={self.level}, pool_size={self.pool_size}"


@register_notrace_function  # shape-dependent padding: one node for torch.fx
def pad_nchw(x: torch.Tensor, multiple: int, least: int) -> torch.Tensor:
    """Zero-pad a ``(B, C, H, W)`` map at the bottom and right to sides that are multiples of ``multiple`` and
    at least ``least`` long."""
    pad_h = max(-x.shape[2] % multiple, least - x.shape[2])
    pad_w = max(-x.shape[3] % multiple, least - x.shape[3])
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h))
    return x


class PatchEmbed(nn.Module):
    """Strided (or overlapping, with ``use_conv_embed``) convolution of an NCHW image (the stem: zero-padded to whole
    patches) or of an NHWC map, where, as in the reference, an odd side loses its last row to the 2x2 merging and
    keeps it in the 3x3 overlapping one (a map one token wide is padded to two)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, use_conv_embed: bool = False,
                 norm: bool = True, use_pre_norm: bool = False, is_stem: bool = False):
        super().__init__()
        self.is_stem = is_stem
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.stride = patch_size
        if use_conv_embed:
            self.kernel_size, padding, self.stride = (7, 2, 4) if is_stem else (3, 1, 2)
        else:
            self.kernel_size, padding = patch_size, 0
        self.proj = nn.Conv2d(in_chans, embed_dim, self.kernel_size, stride=self.stride, padding=padding)
        self.pre_norm = nn.GroupNorm(1, in_chans) if (use_pre_norm and norm) else None
        self.norm = nn.LayerNorm(embed_dim) if norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # channels-last in, channels-last out: the convolution kernels are faster and the result is already NHWC
        if self.is_stem:
            x = pad_nchw(x.contiguous(memory_format=torch.channels_last), self.stride, 0)
        else:
            reach = self.kernel_size - 2 * self.proj.padding[0]  # the narrowest map the convolution accepts
            x = pad_nchw(x.permute(0, 3, 1, 2), 1, reach)
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        x = self.proj(x).permute(0, 2, 3, 1)
        if self.norm is not None:
            x = self.norm(x)
        return x

    def flops(self, height: int, width: int) -> int:
        """Multiply-adds at the output size ``height x width`` (the reference's count)."""
        flops = height * width * self.embed_dim * self.in_chans * self.kernel_size ** 2
        if self.norm is not None:
            flops += height * width * self.embed_dim
        return flops


@register_notrace_function  # shape-dependent resampling: one node for torch.fx
def interpolate_pos_embed(pos_embed: torch.Tensor, grid: Tuple[int, int], new_grid: Tuple[int, int]) -> torch.Tensor:
    """Resample a ``(1, H*W, C)`` absolute position embedding to another grid (bicubic)."""
    if tuple(grid) == tuple(new_grid):
        return pos_embed
    c = pos_embed.shape[-1]
    pe = pos_embed.reshape(1, grid[0], grid[1], c).permute(0, 3, 1, 2)
    pe = F.interpolate(pe, size=new_grid, mode="bicubic", align_corners=False)
    return pe.permute(0, 2, 3, 1).reshape(1, -1, c)

