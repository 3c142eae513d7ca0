"""AdamW or SGD over parameter groups: weights with decay, and without it for norms, biases, position tables and
whatever the model lists in ``no_weight_decay()`` (exact names) / ``no_weight_decay_keywords()`` (substrings);
with ``TRAIN.LAYER_DECAY`` below 1, timm's layer-wise learning-rate decay on top (for fine-tuning)."""
from __future__ import annotations

from typing import Any, Dict, List

import torch
import torch.nn as nn
from timm.optim import param_groups_layer_decay




def no_decay_names(model: nn.Module) -> List[str]:
    """Parameters trained without weight decay: 1-D tensors (norms, biases) and the exceptions any module of the
    model lists (position tables, absolute position embedding), so a backbone nested in a detector or segmenter
    keeps its own."""
    names, keywords = set(), set()
    for prefix, module in model.named_modules():
        dot = f"{prefix}." if prefix else ""
        if hasattr(module, "no_weight_decay"):
            names |= {dot + name for name in module.no_weight_decay()}
        if hasattr(module, "no_weight_decay_keywords"):
            keywords |= set(module.no_weight_decay_keywords())
    return [name for name, param in model.named_parameters()
            if param.ndim <= 1 or name.endswith(".bias") or name in names or any(k in name for k in keywords)]


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0) -> List[Dict[str, Any]]:
    """Two groups (decay, no decay); or, with ``layer_decay < 1``, one pair per depth of the model's
    ``group_matcher``, whose ``lr_scale`` (``layer_decay ** (depth from the top)``) timm's schedulers apply."""
    skip = set(no_decay_names(model))
    if layer_decay < 1.0:
        return param_groups_layer_decay(model, weight_decay, no_weight_decay_list=sorted(skip),
                                        layer_decay=layer_decay)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if name in skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(config: Any, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer named by ``TRAIN.OPTIMIZER.NAME`` at the (already scaled) ``TRAIN.BASE_LR``."""
    name = config.TRAIN.OPTIMIZER.NAME.lower()
    groups = param_groups(model, config.TRAIN.WEIGHT_DECAY, config.TRAIN.LAYER_DECAY)
    opt = config.TRAIN.OPTIMIZER
    if name == "sgd":
        return torch.optim.SGD(groups, lr=config.TRAIN.BASE_LR, momentum=opt.MOMENTUM, nesterov=True)
    return torch.optim.AdamW(groups, lr=config.TRAIN.BASE_LR, eps=opt.EPS, betas=tuple(opt.BETAS))
