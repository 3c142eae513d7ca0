"""smp's UPerNet or FPN around a Focal Transformer timm encoder (``tu-<MODEL.BACKBONE>``)."""
from __future__ import annotations

from typing import Any

import segmentation_models_pytorch as smp
import torch.nn as nn

import models  # noqa: F401  registers the Focal Transformers with timm, which smp's "tu-" encoders build from


def build_segmenter(config: Any, num_classes: int) -> nn.Module:
    """No weights are downloaded (``encoder_weights=None``): ``--pretrained`` loads a local checkpoint instead."""
    backbone = dict(config.MODEL.BACKBONE_ARGS, drop_path_rate=config.MODEL.DROP_PATH_RATE)
    common = dict(encoder_name=f"tu-{config.MODEL.BACKBONE}", encoder_weights=None, classes=num_classes, **backbone)
    if config.MODEL.ARCH == "upernet":
        return smp.UPerNet(decoder_channels=config.MODEL.DECODER_CHANNELS, **common)
    return smp.FPN(decoder_pyramid_channels=config.MODEL.DECODER_CHANNELS, **common)


def backbone(model: nn.Module) -> nn.Module:
    """The timm ``features_only`` network inside smp's encoder wrapper."""
    return model.encoder.model
