"""AdamW or SGD over two parameter groups: with weight decay, and without it for norms, biases, position tables
and whatever the model lists in ``no_weight_decay()`` / ``no_weight_decay_keywords()``."""
from __future__ import annotations

from typing import Any, List

import torch
import torch.nn as nn
from timm.optim import param_groups_weight_decay

from errors import UsageError

OPTIMIZERS = ("adamw", "sgd")


def no_weight_decay_patterns(model: nn.Module) -> List[str]:
    """fnmatch patterns for timm: exact names from ``no_weight_decay()``, substrings from the keywords."""
    names = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    keywords = model.no_weight_decay_keywords() if hasattr(model, "no_weight_decay_keywords") else set()
    return sorted(names) + sorted(f"*{k}*" for k in keywords)


def build_optimizer(config: Any, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer named by ``TRAIN.OPTIMIZER.NAME`` at the (already scaled) ``TRAIN.BASE_LR``."""
    name = config.TRAIN.OPTIMIZER.NAME.lower()
    if name not in OPTIMIZERS:
        raise UsageError(f"TRAIN.OPTIMIZER.NAME must be one of {OPTIMIZERS}, got {config.TRAIN.OPTIMIZER.NAME!r}")
    groups = param_groups_weight_decay(model, config.TRAIN.WEIGHT_DECAY,
                                       no_weight_decay_list=no_weight_decay_patterns(model))
    opt = config.TRAIN.OPTIMIZER
    if name == "sgd":
        return torch.optim.SGD(groups, lr=config.TRAIN.BASE_LR, momentum=opt.MOMENTUM, nesterov=True)
    return torch.optim.AdamW(groups, lr=config.TRAIN.BASE_LR, eps=opt.EPS, betas=tuple(opt.BETAS))
