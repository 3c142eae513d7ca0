"""CPU speed-ups that keep a built model's results, behind ``optimize_for(model, device)``: ``attention`` (blocked,
with a lean backward) and ``bias_cache`` (cpu_attention.py) on every CPU, ``onednn_linear`` (onednn_linear.py)
where it helps (BENCHMARKS.md). ``FOCAL_KERNELS`` or the ``kernels`` argument overrides the choice: ``auto``,
``none``, or a comma-separated list.
"""
from __future__ import annotations

import os
from typing import Iterable, List, Optional, Union

import torch
import torch.nn as nn

from .cpu_attention import CPU_CLASSES, forget_bias
from .onednn_linear import convert_linears, onednn_available, onednn_helps

KERNELS = ("attention", "bias_cache", "onednn_linear")
ENV = "FOCAL_KERNELS"

__all__ = ["KERNELS", "optimize_for", "select_kernels"]


def requested(kernels: Optional[Union[str, Iterable[str]]] = None) -> Optional[List[str]]:
    """The kernels asked for by the argument or by ``FOCAL_KERNELS``; ``None`` means decide automatically."""
    if kernels is None:
        kernels = os.environ.get(ENV, "auto")
    if isinstance(kernels, str):
        choice = kernels.strip().lower()
        if choice == "auto":
            return None
        kernels = [] if choice in ("none", "") else [k.strip() for k in choice.split(",")]
    kernels = list(kernels)
    unknown = [k for k in kernels if k not in KERNELS]
    if unknown:
        raise ValueError(f"{ENV} / kernels: unknown kernel(s) {', '.join(map(repr, unknown))}; "
                         f"use auto, none or a comma-separated list of {', '.join(KERNELS)}")
    return kernels


def select_kernels(device: Union[str, torch.device], kernels: Optional[Union[str, Iterable[str]]] = None) -> List[str]:
    """The kernels that :func:`optimize_for` applies on ``device``."""
    if torch.device(device).type != "cpu":
        return []  # every kernel here is a CPU kernel; accelerators run the plain model
    chosen = requested(kernels)
    if chosen is None:
        chosen = ["attention", "bias_cache"] + (["onednn_linear"] if onednn_helps() else [])
    elif "onednn_linear" in chosen and not onednn_available():
        raise ValueError(f"{ENV} / kernels: onednn_linear asked for, but this PyTorch has no oneDNN")
    return [k for k in KERNELS if k in chosen]


def optimize_for(model: nn.Module, device: Union[str, torch.device],
                 kernels: Optional[Union[str, Iterable[str]]] = None) -> List[str]:
    """Switch ``model`` in place to the kernels for ``device`` and return their names. Only module classes change,
    so it can be called at any time, and again (``kernels="none"`` restores the plain model)."""
    chosen = select_kernels(device, kernels)
    attention = frozenset(k for k in chosen if k in ("attention", "bias_cache"))
    plain = {cpu: base for base, cpu in CPU_CLASSES.items()}
    for module in model.modules():
        base = plain.get(type(module), type(module))
        if base in CPU_CLASSES:
            forget_bias(module)
            module.__class__ = CPU_CLASSES[base] if attention else base
            module.__dict__.pop("cpu_kernels", None)
            if attention:
                module.cpu_kernels = attention
    convert_linears(model, onednn="onednn_linear" in chosen)
    return chosen
