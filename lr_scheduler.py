"""Learning-rate schedules from timm, stepped once per optimizer update (not per epoch) with a linear warm-up."""
from __future__ import annotations

from typing import Any

import torch
from timm.scheduler import CosineLRScheduler, PolyLRScheduler, StepLRScheduler
from timm.scheduler.scheduler import Scheduler

from choices import SCHEDULERS
from errors import UsageError



def build_scheduler(config: Any, optimizer: torch.optim.Optimizer, updates_per_epoch: int) -> Scheduler:
    """The ``TRAIN.LR_SCHEDULER.NAME`` schedule over ``TRAIN.EPOCHS``; call ``step_update(n)`` after update ``n``.

    The warm-up is a prefix: cosine and linear decay span the updates after it and reach ``TRAIN.MIN_LR`` at the
    end; step decay counts ``DECAY_EPOCHS`` from the end of the warm-up.
    """
    train = config.TRAIN
    name = train.LR_SCHEDULER.NAME
    total = int(train.EPOCHS * updates_per_epoch)
    warmup = int(train.WARMUP_EPOCHS * updates_per_epoch)
    common = dict(warmup_t=warmup, warmup_lr_init=train.WARMUP_LR, warmup_prefix=True, t_in_epochs=False)
    if name == "cosine":
        return CosineLRScheduler(optimizer, t_initial=max(total - warmup, 1), lr_min=train.MIN_LR,
                                 cycle_limit=1, **common)
    if name == "linear":
        return PolyLRScheduler(optimizer, t_initial=max(total - warmup, 1), power=1.0, lr_min=train.MIN_LR,
                               cycle_limit=1, **common)
    if name == "step":
        decay = max(int(train.LR_SCHEDULER.DECAY_EPOCHS * updates_per_epoch), 1)
        return StepLRScheduler(optimizer, decay_t=decay, decay_rate=train.LR_SCHEDULER.DECAY_RATE, **common)
    raise UsageError(f"TRAIN.LR_SCHEDULER.NAME must be one of {SCHEDULERS}, got {name!r}")
