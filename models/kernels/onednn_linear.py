"""Float32 fully connected layers through the oneDNN matmul inside PyTorch, which on some CPUs is much faster than
its BLAS (MKL) for ``F.linear`` (BENCHMARKS.md); results differ only in summation order. :class:`OneDnnLinear`
falls back to ``F.linear`` for other devices and dtypes, under autocast, and under compile / export / tracing."""
from __future__ import annotations

import functools
import platform
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.utils._python_dispatch import _get_current_dispatch_mode


def onednn_available() -> bool:
    try:
        torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        return False
    return torch.backends.mkldnn.is_available()


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


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear``, through oneDNN where that applies (see the module docstring)."""
    if not (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and type(x) is torch.Tensor and x.layout == torch.strided and torch.backends.mkldnn.enabled
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
            and not torch.jit.is_tracing() and _get_current_dispatch_mode() is None):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return _OneDnnLinearFunction.apply(x, weight, bias)
    return onednn_matmul(x, weight, bias)


class OneDnnLinear(nn.Linear):
    """``nn.Linear`` (same parameters, state dict and init) whose forward goes through :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def _cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id")),
                        platform.processor())
    except OSError:
        return platform.processor()


@functools.lru_cache(maxsize=None)
def onednn_helps() -> bool:
    """Where oneDNN was measured clearly faster: AVX-512 with MKL on a non-Intel CPU, where MKL keeps to its AVX2
    code (2x). A timing probe was tried instead and was not stable on a shared machine."""
    return (onednn_available() and torch.backends.cpu.get_cpu_capability().startswith("AVX512")
            and torch.backends.mkl.is_available() and "Intel" not in _cpu_vendor())


def convert_linears(module: nn.Module, onednn: bool = True) -> nn.Module:
    """Switch every plain ``nn.Linear`` in ``module`` to :class:`OneDnnLinear` (or back) in place; only the class
    changes, so this works on any model (timm's Swin, for a like-for-like comparison)."""
    source, target = (nn.Linear, OneDnnLinear) if onednn else (OneDnnLinear, nn.Linear)
    for layer in module.modules():
        if type(layer) is source:
            layer.__class__ = target
    return module
