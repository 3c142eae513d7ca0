"""CPU speed-ups for a built model that do not change its results, behind one call: ``optimize_for(model, device)``.

* ``attention``: attention in cache-sized blocks, with a backward that keeps only the compact key/value table;
* ``bias_cache``: without autograd, each attention module reuses the bias it last built (both ``cpu_attention.py``);
* ``onednn_linear``: float32 linear layers through oneDNN (``onednn_linear.py``).

By default the first two apply on CPUs, oneDNN where ``onednn_linear.onednn_helps`` (measurements: BENCHMARKS.md).
``FOCAL_KERNELS`` (or the ``kernels`` argument) overrides that: ``auto``, ``none``, or a comma-separated list.
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
    """Switch ``model`` (in place) to the kernels that help on ``device``; returns their names. Only module classes
    change (not parameters, buffers, hooks or state dict), so it can be called at any time, and again
    (``kernels="none"`` restores the plain model, e.g. for tools that match ``nn.Linear`` by exact type)."""
    chosen = select_kernels(device, kernels)
    attention = frozenset(k for k in chosen if k in ("attention", "bias_cache"))
    plain = {cpu: base for base, cpu in CPU_CLASSES.items()}
    for module in model.modules():
        base = plain.get(type(module), type(module))
        if base not in CPU_CLASSES:
            continue
        forget_bias(module)
        if attention:
            module.__class__ = CPU_CLASSES[base]
            module.cpu_kernels = attention
        else:
            module.__class__ = base
            module.__dict__.pop("cpu_kernels", None)
    convert_linears(model, onednn="onednn_linear" in chosen)
    return chosen
