"""AdamW or SGD over two parameter groups: with weight decay, and without it for norms, biases, position tables
and whatever the model lists in ``no_weight_decay()`` (exact names) / ``no_weight_decay_keywords()`` (substrings)."""
from __future__ import annotations

from typing import Any, Dict, List

import torch
import torch.nn as nn

from errors import UsageError

OPTIMIZERS = ("adamw", "sgd")


def param_groups(model: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """Decay only weight matrices and kernels; 1-D tensors (norms, biases) and the model's named exceptions
    (position tables, absolute position embedding) get none."""
    names = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    keywords = set(model.no_weight_decay_keywords()) if hasattr(model, "no_weight_decay_keywords") else set()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        skip = param.ndim <= 1 or name.endswith(".bias") or name in names or any(k in name for k in keywords)
        (no_decay if skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(config: Any, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer named by ``TRAIN.OPTIMIZER.NAME`` at the (already scaled) ``TRAIN.BASE_LR``."""
    name = config.TRAIN.OPTIMIZER.NAME.lower()
    if name not in OPTIMIZERS:
        raise UsageError(f"TRAIN.OPTIMIZER.NAME must be one of {OPTIMIZERS}, got {config.TRAIN.OPTIMIZER.NAME!r}")
    groups = param_groups(model, config.TRAIN.WEIGHT_DECAY)
    opt = config.TRAIN.OPTIMIZER
    if name == "sgd":
        return torch.optim.SGD(groups, lr=config.TRAIN.BASE_LR, momentum=opt.MOMENTUM, nesterov=True)
    return torch.optim.AdamW(groups, lr=config.TRAIN.BASE_LR, eps=opt.EPS, betas=tuple(opt.BETAS))
