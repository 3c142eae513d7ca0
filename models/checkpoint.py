"""Loading weights into our models: released reference checkpoints, our own, and fine-tuning starts. The reference's
buffers (index tables, masks, top-k sets), which our models compute themselves, are dropped, not unexpected."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from .resize import adapt_geometry, geometry_names

REFERENCE_BUFFER = re.compile(
    r"(^|\.)(attn_mask|relative_position_index(_\d+)?|valid_ind_rolled|valid_ind_unfold_\d+|window_coords"
    r"|topk_cloest_indice_\d+|topk_cloest_coords_\d+)$")


@dataclass
class LoadReport:
    """What did not load, summarised in a few lines instead of a wall of keys."""
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    mismatched: List[Tuple[str, tuple, tuple]] = field(default_factory=list)
    dropped_reference_buffers: int = 0
    resized: List[str] = field(default_factory=list)
    derived: List[str] = field(default_factory=list)  # this model's tensors computed from the checkpoint's tables

    @property
    def clean(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self, limit: int = 3) -> str:
        def head(items):
            shown = ", ".join(str(i) for i in items[:limit])
            return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")
        lines = []
        if self.missing:
            lines.append(f"missing {len(self.missing)} keys: {head(self.missing)}")
        if self.unexpected:
            lines.append(f"unexpected {len(self.unexpected)} keys: {head(self.unexpected)}")
        if self.mismatched:
            shown = [f"{k} (checkpoint {tuple(a)} vs model {tuple(b)})" for k, a, b in self.mismatched]
            lines.append(f"mismatched shapes for {len(self.mismatched)} keys: {head(shown)}")
        if self.resized:
            lines.append(f"resized {len(self.resized)} tensors to this model's windows")
        if self.derived:
            lines.append(f"derived {len(self.derived)} tensors from its tables")
        return "; ".join(lines) if lines else "all keys matched"


def extract_state_dict(checkpoint: Any) -> Dict[str, torch.Tensor]:
    """The weights inside a checkpoint object (``{"model": ...}``, ``{"state_dict": ...}`` or bare), unwrapped."""
    if isinstance(checkpoint, Mapping):
        checkpoint = next((checkpoint[key] for key in ("model", "state_dict", "model_ema")
                           if isinstance(checkpoint.get(key), Mapping)), checkpoint)
    if not isinstance(checkpoint, Mapping) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ValueError("checkpoint holds no state dict of tensors (looked for 'model', 'state_dict' or a bare dict)")
    # DistributedDataParallel's and torch.compile's wrappers, in the order they nest
    return {name.removeprefix("module.").removeprefix("_orig_mod."): value for name, value in checkpoint.items()}


def adapt_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], drop_mismatched_head: bool = False,
                     fit_geometry: bool = False) -> Tuple[Dict[str, torch.Tensor], LoadReport]:
    """Match a checkpoint to ``model``: drop reference buffers and carry window-dependent tensors (position
    tables, pooling kernels) over to this model's geometry. When fine-tuning (``drop_mismatched_head``), a
    classifier of another class count is dropped; then, or with ``fit_geometry``, neighbour tables the
    checkpoint lacks are derived from its window tables (see :mod:`models.resize`). ``fit_geometry`` also drops
    the neighbour tables of blocks that have none at this image size (their map fits in one window)."""
    own = model.state_dict()
    report = LoadReport()
    adapted = {}
    for name, value in state_dict.items():
        if name not in own and REFERENCE_BUFFER.search(name):
            report.dropped_reference_buffers += 1
            continue
        if name not in own and fit_geometry and geometry_names([name]):
            continue
        target = own.get(name)
        if target is not None and target.shape != value.shape:
            reshaped = adapt_geometry(name, value, target, state_dict, getattr(model, "patches_resolution", None))
            if reshaped is not None:
                value = reshaped
                report.resized.append(name)
            elif drop_mismatched_head and name.startswith("head."):
                continue
        adapted[name] = value
    if drop_mismatched_head or fit_geometry:
        for name in geometry_names([n for n in own if n not in adapted and n not in state_dict]):
            derived = adapt_geometry(name, None, own[name], state_dict)
            if derived is not None:
                adapted[name] = derived
                report.derived.append(name)
    for name, value in adapted.items():
        if name not in own:
            report.unexpected.append(name)
        elif own[name].shape != value.shape:
            report.mismatched.append((name, tuple(value.shape), tuple(own[name].shape)))
    report.missing = [n for n in own if n not in adapted]
    return adapted, report


def head_classes(checkpoint: Any) -> Optional[int]:
    """How many classes the checkpoint's classifier has (rows of ``head.weight``), if it has one."""
    try:
        head = extract_state_dict(checkpoint).get("head.weight")
    except ValueError:
        return None
    return int(head.shape[0]) if head is not None and head.dim() == 2 else None


def load_weights(model: nn.Module, checkpoint: Any, strict: bool = True,
                 drop_mismatched_head: bool = False, resize: bool = True, fit_geometry: bool = False) -> LoadReport:
    """Load a checkpoint object's weights. With ``strict`` any missing, unexpected or mismatched key raises a
    ``ValueError`` carrying the short summary; otherwise what matches loads and the report says the rest. Without
    ``resize``, a tensor that would need resizing to this model's windows is a misfit too: optimizer moments
    saved beside the weights keep the old shapes. ``fit_geometry``: see :func:`adapt_state_dict`."""
    state_dict, report = adapt_state_dict(model, extract_state_dict(checkpoint), drop_mismatched_head, fit_geometry)
    if strict and not report.clean:
        raise ValueError(f"checkpoint does not fit this model: {report.summary()}")
    if not resize and report.resized:
        names = ", ".join(report.resized[:3]) + (", ..." if len(report.resized) > 3 else "")
        raise ValueError(f"checkpoint does not fit this model: {len(report.resized)} tensors would have to be resized "
                         f"to its windows ({names})")
    bad = {k for k, _, _ in report.mismatched}
    model.load_state_dict({k: v for k, v in state_dict.items() if k not in bad}, strict=False)
    return report
