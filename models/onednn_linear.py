"""Float32 fully connected layers through oneDNN on AMD CPUs.

PyTorch computes a float32 ``F.linear`` on the CPU with MKL's sgemm. On AMD processors MKL runs its AVX2 code
even where AVX-512 is present: on the project's AMD EPYC machine it reaches ~220 GFLOP/s on every layer shape of
Focal-T and Swin-T, while the oneDNN matmul that ships inside PyTorch reaches ~450 (BENCHMARKS.md). Linear layers
are most of these models' arithmetic, so routing them through oneDNN makes inference and training ~1.5x faster
there. Both libraries compute in float32; the results differ only in summation order.

``FOCAL_ONEDNN_LINEAR`` chooses: ``auto`` (the default: on where MKL is PyTorch's BLAS and the CPU is AMD's),
``1`` (wherever PyTorch has oneDNN) or ``0`` (never). Everything else falls back to ``F.linear``: other devices and
dtypes, autocast, and ``torch.compile`` / export / tracing, whose compilers pick their own kernels.
"""
from __future__ import annotations

import os
import platform
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.utils._python_dispatch import _get_current_dispatch_mode


def _amd_cpu() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return "AuthenticAMD" in f.read(1 << 16)
    except OSError:
        return "AMD" in platform.processor()


def onednn_available() -> bool:
    try:
        torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        return False
    return torch.backends.mkldnn.is_available()


def _enabled_from_env() -> bool:
    choice = os.environ.get("FOCAL_ONEDNN_LINEAR", "auto").strip().lower()
    if choice not in ("auto", "0", "1"):
        raise ValueError(f"FOCAL_ONEDNN_LINEAR must be auto, 0 or 1, got {choice!r}")
    if choice == "0" or not onednn_available():
        return False
    return choice == "1" or (torch.backends.mkl.is_available() and platform.machine() in ("x86_64", "AMD64")
                             and _amd_cpu())


ENABLED = _enabled_from_env()


def onednn_matmul(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``x @ weight.T + bias`` over the last dimension of ``x``."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _OneDnnLinearFunction(torch.autograd.Function):
    """The three matmuls of a linear layer's forward and backward, all through oneDNN (first derivatives only:
    nothing in training takes a gradient of a gradient)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return onednn_matmul(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = onednn_matmul(grad, weight.t(), None)
        rows = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[1]:
            inputs = x.reshape(-1, x.shape[-1])
            out_features, in_features = weight.shape
            # the long token axis is the reduction; oneDNN is fastest (up to 4x) with the larger side as rows
            if out_features < in_features:
                grad_weight = onednn_matmul(rows.t(), inputs.t(), None)
            else:
                grad_weight = onednn_matmul(inputs.t(), rows.t(), None).t().contiguous()
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = rows.sum(0)
        return grad_x, grad_weight, grad_bias


def _use_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (ENABLED and x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and type(x) is torch.Tensor and x.layout == torch.strided and torch.backends.mkldnn.enabled
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
            and not torch.jit.is_tracing() and _get_current_dispatch_mode() is None)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear``, through oneDNN where that is enabled and applies (see the module docstring)."""
    if not _use_onednn(x, weight):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return _OneDnnLinearFunction.apply(x, weight, bias)
    return onednn_matmul(x, weight, bias)


class OneDnnLinear(nn.Linear):
    """``nn.Linear`` (same parameters, state dict and init) whose forward goes through :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def convert_linears(module: nn.Module, onednn: bool = True) -> nn.Module:
    """Switch every plain ``nn.Linear`` in ``module`` to :class:`OneDnnLinear` (or back, with ``onednn=False``)
    in place. Only the class changes, so parameters, hooks and checkpoints are untouched; this also works on
    other models, e.g. timm's Swin for a like-for-like comparison."""
    source, target = (nn.Linear, OneDnnLinear) if onednn else (OneDnnLinear, nn.Linear)
    for layer in module.modules():
        if type(layer) is source:
            layer.__class__ = target
    return module
