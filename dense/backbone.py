"""The backbone of the dense tasks, with the options of Swin's and Focal's detection backbones (``out_indices``, a
LayerNorm on each output, frozen stages, checkpointing) around the timm ``features_only`` model of
``MODEL.BACKBONE``, into which a classification checkpoint loads unchanged."""
from __future__ import annotations

from typing import Any, List, Sequence

import timm
import torch
import torch.nn as nn

import models  # noqa: F401  registers the Focal Transformers with timm


class DenseBackbone(nn.Module):
    """Stage maps (NCHW) of ``out_indices``, each through its own LayerNorm ``norm<i>`` (with ``norms``).
    ``frozen_stages``: -1 trains everything, 0 freezes the patch (and position) embedding, k also stages 0..k-1;
    frozen parts get no gradients and stay in eval mode.
    """

    def __init__(self, name: str, out_indices: Sequence[int], frozen_stages: int = -1,
                 grad_checkpointing: bool = False, norms: bool = True, **kwargs: Any):
        super().__init__()
        self.out_indices = tuple(out_indices)
        # timm's "getter" wrapper keeps the whole network (``.model``) and returns NCHW maps, for timm's Swin too
        self.body = timm.create_model(name, features_only=True, feature_cls="getter", out_indices=self.out_indices,
                                      **kwargs)
        self.feature_info = self.body.feature_info
        for index, channels in zip(self.out_indices, self.feature_info.channels()):
            self.add_module(f"norm{index}", nn.LayerNorm(channels) if norms else nn.Identity())
        self.frozen_stages = frozen_stages
        self.network.set_grad_checkpointing(grad_checkpointing)
        for module in self.frozen_modules():
            module.requires_grad_(False)
        if frozen_stages >= 0 and getattr(self.network, "absolute_pos_embed", None) is not None:  # Swin has none
            self.network.absolute_pos_embed.requires_grad_(False)
        self.train()

    @property
    def network(self) -> nn.Module:
        """The classification network inside timm's feature wrapper (what a classification checkpoint fits)."""
        return self.body.model

    def frozen_modules(self) -> List[nn.Module]:
        if self.frozen_stages < 0:
            return []
        return [self.network.patch_embed, *self.network.layers[:self.frozen_stages]]

    def train(self, mode: bool = True) -> "DenseBackbone":
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()
        return self

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return [getattr(self, f"norm{i}")(f.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).contiguous()
                for i, f in zip(self.out_indices, self.body(x))]


def build_backbone(config: Any, default_indices: Sequence[int]) -> DenseBackbone:
    """``MODEL.BACKBONE`` with its options (``default_indices`` when ``MODEL.OUT_INDICES`` is empty)."""
    return DenseBackbone(config.MODEL.BACKBONE, list(config.MODEL.OUT_INDICES) or list(default_indices),
                         config.MODEL.FROZEN_STAGES, config.TRAIN.USE_CHECKPOINT, config.MODEL.OUT_NORMS,
                         drop_path_rate=config.MODEL.DROP_PATH_RATE, **config.MODEL.BACKBONE_ARGS)
