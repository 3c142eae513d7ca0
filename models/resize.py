"""Carrying learned geometry-dependent tensors over to another window, focal window or image size (a block's window
follows the image size, so fine-tuning at another resolution changes shapes): each is resampled from its trained
counterpart or, where there is none, derived from the block's own relative-position table."""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from .focal_layout import FocalLayoutSpec
from .layers import interpolate_pos_embed

NEIGHBOURS = "relative_position_bias_table_to_neighbors"
WINDOW_TABLE = "relative_position_bias_table"
POOLED_TABLE = ".relative_position_bias_table_to_windows."
POS_EMBED = "absolute_pos_embed"


def resize_square_table(table: torch.Tensor, side: int, heads_first: bool) -> torch.Tensor:
    """Bicubic resize of a bias table with one axis of heads and one flattened square grid of offsets."""
    grid = table if heads_first else table.t()
    heads, old = grid.shape[0], math.isqrt(grid.shape[1])
    img = F.interpolate(grid.reshape(1, heads, old, old).float(), size=(side, side), mode="bicubic",
                        align_corners=False)
    resized = img.reshape(heads, side * side).to(table.dtype)
    return resized if heads_first else resized.t()


def resize_pool_weight(weight: torch.Tensor, target: torch.Size) -> torch.Tensor:
    """A window-pooling kernel (fc: ``(1, p*p)``; conv: ``(C, 1, p, p)``) resampled to another sub-window size and
    rescaled to keep its sum (a pooled token keeps its scale)."""
    old_side = math.isqrt(weight.shape[-1]) if weight.ndim == 2 else weight.shape[-1]
    new_side = math.isqrt(target[-1]) if len(target) == 2 else target[-1]
    grid = weight.reshape(-1, 1, old_side, old_side).float()
    resized = F.interpolate(grid, size=(new_side, new_side), mode="bilinear", align_corners=False)
    resized = resized * (old_side ** 2 / new_side ** 2)
    return resized.reshape(target).to(weight.dtype)


def _window_and_expand(table_shape: torch.Size) -> Tuple[int, int]:
    """``(window, expand size)`` of a ``(1, heads, ws*ws, n_surrounding)`` neighbour table."""
    window = math.isqrt(table_shape[2])
    for expand in range(1, window):
        if len(FocalLayoutSpec(window, expand).released_surroundings()) == table_shape[3]:
            return window, expand
    raise ValueError(f"no window/expand size gives a neighbour table of shape {tuple(table_shape)}")


def _cells(window: int, expand: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Window-local coordinates of the queries ``(ws*ws, 2)`` and surrounding keys ``(n, 2)`` of a table."""
    queries = torch.tensor([(a, b) for a in range(window) for b in range(window)], dtype=torch.float64)
    keys = torch.tensor([(a + dy, b + dx) for a, b, dy, dx in FocalLayoutSpec(window, expand).released_surroundings()],
                        dtype=torch.float64)
    return queries, keys


def resize_neighbour_table(table: torch.Tensor, target: torch.Size) -> torch.Tensor:
    """Each (query cell, surrounding key) bias takes the value of the nearest old pair, positions scaled by the ratio
    of the windows (pairs form a full grid: the nearest query with the nearest key)."""
    old_window, old_expand = _window_and_expand(table.shape)
    new_window, new_expand = _window_and_expand(target)
    old_q, old_k = _cells(old_window, old_expand)
    new_q, new_k = _cells(new_window, new_expand)
    scale = old_window / new_window
    rows = torch.cdist((new_q + 0.5) * scale - 0.5, old_q).argmin(dim=1)
    cols = torch.cdist((new_k + 0.5) * scale - 0.5, old_k).argmin(dim=1)
    return table[:, :, rows][:, :, :, cols].clone()


def neighbour_table_from_window_table(window_table: torch.Tensor, target: torch.Size) -> torch.Tensor:
    """A neighbour table for a block trained without one: the window table's bias for each pair's offset, scaled to
    the trained window and clamped to the offsets it knows."""
    old_window = (math.isqrt(window_table.shape[0]) + 1) // 2
    new_window, new_expand = _window_and_expand(target)
    queries, keys = _cells(new_window, new_expand)
    offsets = (keys[None, :, :] - queries[:, None, :]) * (old_window / new_window)
    offsets = offsets.round().clamp(-(old_window - 1), old_window - 1).long() + old_window - 1
    index = offsets[..., 0] * (2 * old_window - 1) + offsets[..., 1]  # (ws*ws, n)
    return window_table[index].permute(2, 0, 1).unsqueeze(0).to(window_table.dtype).contiguous()


def adapt_geometry(name: str, value: Optional[torch.Tensor], target: torch.Tensor, checkpoint: Dict[str, torch.Tensor],
                   grid: Optional[Tuple[int, int]] = None) -> Optional[torch.Tensor]:
    """``value`` (the checkpoint's ``name``, or None) reshaped for ``target``, or None when ``name`` is no tensor
    this module carries over; an absolute position embedding is resampled to the model's patch ``grid``."""
    if value is not None and value.shape == target.shape:
        return value
    if name.endswith(NEIGHBOURS):
        if value is not None:
            return resize_neighbour_table(value, target.shape)
        window_table = checkpoint.get(name[: -len(NEIGHBOURS)] + WINDOW_TABLE)
        return None if window_table is None else neighbour_table_from_window_table(window_table, target.shape)
    if value is None:
        return None
    if POOLED_TABLE in name:
        return resize_square_table(value, math.isqrt(target.shape[-1]), heads_first=True)
    if name.endswith(WINDOW_TABLE):
        return resize_square_table(value, math.isqrt(target.shape[0]), heads_first=False)
    if ".pool_layers." in name and name.endswith(".weight") and value.ndim == target.ndim:
        return resize_pool_weight(value, target.shape)
    if name == POS_EMBED and grid is not None:
        side = math.isqrt(value.shape[1])
        return interpolate_pos_embed(value, (side, side), grid) if side * side == value.shape[1] else None
    return None


def geometry_names(names: List[str]) -> List[str]:
    """The tensors of ``names`` that :func:`adapt_geometry` can create without a counterpart of the same name."""
    return [n for n in names if n.endswith(NEIGHBOURS)]
