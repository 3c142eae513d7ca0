"""smp's UPerNet or FPN around a Focal Transformer encoder (``tu-<MODEL.BACKBONE>``, as :class:`DenseBackbone`)."""
from __future__ import annotations

from typing import Any

import segmentation_models_pytorch as smp
import torch.nn as nn

import models  # noqa: F401  registers the Focal Transformers with timm, which smp's "tu-" encoders build from
from dense.backbone import DenseBackbone, build_backbone


def build_segmenter(config: Any, num_classes: int) -> nn.Module:
    """No weights are downloaded (``encoder_weights=None``): ``--pretrained`` loads a local checkpoint instead.
    smp's encoder wrapper gets our :class:`DenseBackbone` (output norms, frozen stages, checkpointing) in place
    of the plain timm model it builds."""
    common = dict(encoder_name=f"tu-{config.MODEL.BACKBONE}", encoder_weights=None, classes=num_classes,
                  **config.MODEL.BACKBONE_ARGS)
    if config.MODEL.ARCH == "upernet":
        model = smp.UPerNet(decoder_channels=config.MODEL.DECODER_CHANNELS, **common)
    else:
        model = smp.FPN(decoder_pyramid_channels=config.MODEL.DECODER_CHANNELS, **common)
    model.encoder.model = build_backbone(config, (0, 1, 2, 3))
    return model


def backbone(model: nn.Module) -> DenseBackbone:
    """The backbone inside smp's encoder wrapper."""
    return model.encoder.model
