"""timm registrations of the nine released models: ``timm.create_model(name, pretrained=..., features_only=...)``.
The architectures repeat ``configs/<name>.yaml`` (a test checks both build the same model); released weights load
through the adaptation of :func:`models.checkpoint.load_weights`. Nothing is downloaded until ``pretrained=True``."""
from __future__ import annotations

from contextlib import nullcontext
from functools import partial
from typing import Any, Dict, Mapping

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from .checkpoint import adapt_state_dict, extract_state_dict
from .focal_transformer import FocalTransformer

__all__ = ["checkpoint_filter_fn"]

RELEASE_URL = "https://projects4jw.blob.core.windows.net/model/focal-transformer/imagenet1k/"
# What every release shares beyond the constructor defaults: two focal levels pooled by a linear map.
_FOCAL_ARGS = dict(focal_pool="fc", focal_levels=(2, 2, 2, 2))
_TINY = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.2)
_SMALL = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.3)
_BASE = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), drop_path_rate=0.5)


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
    """timm's hook between reading and loading weights: unwrap, drop the reference's index buffers, and fit the
    position tables to the model's geometry (:func:`models.checkpoint.adapt_state_dict`)."""
    adapted, _ = adapt_state_dict(model, extract_state_dict(state_dict), fit_geometry=True)
    return adapted


def _create(name: str, arch: str, pretrained: bool, model_args: Dict[str, Any], **kwargs: Any) -> FocalTransformer:
    # timm's ``device`` argument: parameters are made there (on "meta", no memory and no initialisation time)
    device = kwargs.get("device")
    with torch.device(device) if device is not None else nullcontext():
        # ``variant`` is also build_model_with_cfg's name for the registry name, so the architecture is bound here.
        return build_model_with_cfg(
            partial(FocalTransformer, variant=arch), name, pretrained,
            pretrained_filter_fn=checkpoint_filter_fn,
            # Stages downsample outside their forward, so features come from forward_intermediates, not hooks.
            feature_cfg=dict(feature_cls="getter", out_indices=(0, 1, 2, 3)),
            **{**_FOCAL_ARGS, **model_args, **kwargs})


def _cfg(name: str) -> Dict[str, Any]:
    """Release weights and their evaluation recipe: bicubic resize to 256, centre crop 224, ImageNet mean/std."""
    return {
        "url": RELEASE_URL + name.replace("_patch4_window7_224", "-is224-ws7.pth").replace("_", "-"),
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.875, "crop_mode": "center", "interpolation": "bicubic", "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD, "first_conv": "patch_embed.proj",
        "classifier": "head", "license": "mit", "paper_ids": "arXiv:2107.00641"}


default_cfgs = generate_default_cfgs({f"{name}.ms_in1k": _cfg(name) for name in (
    "focal_tiny_patch4_window7_224", "focal_small_patch4_window7_224", "focal_base_patch4_window7_224",
    "focal_tiny_useconv_patch4_window7_224", "focal_small_useconv_patch4_window7_224",
    "focal_base_useconv_patch4_window7_224", "focalv2_tiny_useconv_patch4_window7_224",
    "focalv2_small_useconv_patch4_window7_224", "focalv2_base_useconv_patch4_window7_224")})


@register_model
def focal_tiny_patch4_window7_224(pretrained: bool = False, **kwargs: Any) -> FocalTransformer:
    """Focal-T: 28.9M parameters, 82.2% ImageNet-1K top-1."""
    return _create("focal_tiny_patch4_window7_224", "focal", pretrained, _TINY, **kwargs)


@register_model
def focal_small_patch4_window7_224(pretrained: bool = False, **kwargs: Any) -> FocalTransformer:
    """Focal-S: 51.1M parameters, 83.6% top-1."""
    return _create("focal_small_patch4_window7_224", "focal", pretrained, _SMALL, **kwargs)


@register_model
def focal_base_patch4_window7_224(pretrained: bool = False, **kwargs: Any) -> FocalTransformer:
    """Focal-B: 89.8M parameters, 84.0% top-1."""
    return _create("focal_base_patch4_window7_224", "focal", pretrained, _BASE, **kwargs)


@register_model
def focal_tiny_useconv_patch4_window7_224(pretrained: bool = False, **kwargs: Any) -> FocalTransformer:
    """Focal-T with overlapping convolutional patch embeddings: 30.8M parameters, 82.7% top-1."""
    return _create("focal_tiny_useconv_patch4_window7_224", "focal", pretrained,
                   dict(_TINY, use_conv_embed=True), **kwargs)


@register_model
def focal_small_useconv_patch4_window7_224(pretrained: bool = False, **kwargs: Any) -> FocalTransformer:
    """Focal-S with convolutional embeddings: 53.1M parameters, 83.8% top-1."""
    return _create("focal_small_useconv_patch4_window7_224", "focal", pretrained,
                   dict(_SMALL, use_conv_embed=True), **kwargs)


@register_model
def focal_base_useconv_patch4_window7_224(pretrained: bool = False, **kwargs: Any) -> FocalTransformer:
    """Focal-B with convolutional embeddings: 93.3M parameters, 84.2% top-1."""
    return _create("focal_base_useconv_patch4_window7_224", "focal", pretrained,
                   dict(_BASE, use_conv_embed=True), **kwargs)


@register_model
def focalv2_tiny_useconv_patch4_window7_224(pretrained: bool = False, **kwargs: Any) -> FocalTransformer:
    """Focal-fast-T (top-k surroundings): 30.2M parameters, 82.4% top-1."""
    return _create("focalv2_tiny_useconv_patch4_window7_224", "focalv2", pretrained,
                   dict(_TINY, use_conv_embed=True), **kwargs)


@register_model
def focalv2_small_useconv_patch4_window7_224(pretrained: bool = False, **kwargs: Any) -> FocalTransformer:
    """Focal-fast-S: 51.5M parameters, 83.6% top-1."""
    return _create("focalv2_small_useconv_patch4_window7_224", "focalv2", pretrained,
                   dict(_SMALL, use_conv_embed=True), **kwargs)


@register_model
def focalv2_base_useconv_patch4_window7_224(pretrained: bool = False, **kwargs: Any) -> FocalTransformer:
    """Focal-fast-B: 91.2M parameters, 84.0% top-1."""
    return _create("focalv2_base_useconv_patch4_window7_224", "focalv2", pretrained,
                   dict(_BASE, use_conv_embed=True), **kwargs)
