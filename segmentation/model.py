"""smp's UPerNet or FPN around a Focal Transformer encoder (``tu-<MODEL.BACKBONE>``, as :class:`DenseBackbone`), with
the seed's auxiliary FCN head on one encoder stage for training (``MODEL.AUX_HEAD``)."""
from __future__ import annotations

from typing import Any, Tuple, Union

import segmentation_models_pytorch as smp
import torch
import torch.nn as nn
from torchvision.ops import Conv2dNormActivation

from dense.backbone import DenseBackbone, build_backbone
import models  # noqa: F401  registers the Focal Transformers with timm, which smp's "tu-" encoders build from


class AuxiliaryHead(nn.Sequential):
    """mmsegmentation's FCNHead (3x3 conv-BN-ReLU, dropout, 1x1 classifier), as the seed's UPerNet configs put it on
    stage 3: its loss gives the middle of the backbone a direct training signal; inference does not run it."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, loss_weight: float, dropout: float = 0.1):
        super().__init__(Conv2dNormActivation(in_channels, channels, 3), nn.Dropout2d(dropout),
                         nn.Conv2d(channels, num_classes, 1))
        self.loss_weight = loss_weight


class AuxiliaryOutput:
    """smp's forward; in training with an ``aux_head``, ``(logits, aux_logits)`` on encoder stage ``aux_stage``."""

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        if self.aux_head is None or not self.training:
            return super().forward(x)
        self.check_input_shape(x)
        features = self.encoder(x)  # the input (and an empty stride-2 map), then the four stages
        logits = self.segmentation_head(self.decoder(features))
        return logits, self.aux_head(features[-4:][self.aux_stage])


class UPerNet(AuxiliaryOutput, smp.UPerNet):
    """smp's UPerNet (the seed's decoder)."""


class FPN(AuxiliaryOutput, smp.FPN):
    """smp's FPN decoder (Kirillov et al.'s panoptic FPN head)."""


def build_segmenter(config: Any, num_classes: int) -> nn.Module:
    """No weights are downloaded (``--pretrained`` loads a local checkpoint); smp's encoder wrapper gets our
    :class:`DenseBackbone` in place of the plain timm model it builds."""
    common = dict(encoder_name=f"tu-{config.MODEL.BACKBONE}", encoder_weights=None, classes=num_classes,
                  **config.MODEL.BACKBONE_ARGS)
    if config.MODEL.ARCH == "upernet":
        model = UPerNet(decoder_channels=config.MODEL.DECODER_CHANNELS, **common)
    else:
        model = FPN(decoder_pyramid_channels=config.MODEL.DECODER_CHANNELS, **common)
    model.encoder.model = build_backbone(config, (0, 1, 2, 3))
    model.aux_stage = config.MODEL.AUX_STAGE
    model.aux_head = AuxiliaryHead(backbone(model).feature_info.channels()[model.aux_stage], config.MODEL.AUX_CHANNELS,
                                   num_classes, config.MODEL.AUX_LOSS_WEIGHT) if config.MODEL.AUX_HEAD else None
    return model


def backbone(model: nn.Module) -> DenseBackbone:
    """The backbone inside smp's encoder wrapper."""
    return model.encoder.model
