"""Learning-rate schedules from timm, stepped once per optimizer update (not per epoch) with a linear warm-up:
classification's (Swin's cosine, linear, step) and the dense tasks' (mmdetection's multistep and poly)."""
from __future__ import annotations

from typing import Any

import torch
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler, PolyLRScheduler, StepLRScheduler
from timm.scheduler.scheduler import Scheduler



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
    decay = max(int(train.LR_SCHEDULER.DECAY_EPOCHS * updates_per_epoch), 1)  # "step" (the config rules' last)
    return StepLRScheduler(optimizer, decay_t=decay, decay_rate=train.LR_SCHEDULER.DECAY_RATE, **common)


def build_dense_scheduler(config: Any, optimizer: torch.optim.Optimizer, updates_per_epoch: int) -> Scheduler:
    """mmdetection's shapes, stepped after every update: a linear warm-up from ``BASE_LR * WARMUP_RATIO`` over the
    first ``WARMUP_ITERS`` updates (inside the schedule, not before it), then ``multistep`` (x ``DECAY_RATE`` at
    each epoch of ``DECAY_EPOCHS``, e.g. Mask R-CNN 1x: 8 and 11 of 12) or ``poly`` (to ``MIN_LR`` over all
    ``EPOCHS``, as UPerNet's 160k iterations)."""
    train = config.TRAIN
    common = dict(warmup_t=train.WARMUP_ITERS, warmup_lr_init=train.BASE_LR * train.WARMUP_RATIO,
                  warmup_prefix=False, t_in_epochs=False)
    if train.SCHEDULE == "multistep":
        return MultiStepLRScheduler(optimizer, decay_t=[e * updates_per_epoch for e in train.DECAY_EPOCHS],
                                    decay_rate=train.DECAY_RATE, **common)
    return PolyLRScheduler(optimizer, t_initial=train.EPOCHS * updates_per_epoch, power=train.POWER,
                           lr_min=train.MIN_LR, **common)


# The rates a config scales with the total batch (those of its TRAIN node that it has).
SCALED_RATES = ("BASE_LR", "WARMUP_LR", "MIN_LR")


def scale_rates(config: Any, total_batch: int) -> None:
    """The linear rule (Swin, mmdetection's auto_scale_lr): the configured rates hold for ``TRAIN.LR_BATCH`` images
    per optimizer update and scale to ``total_batch``, which then becomes ``TRAIN.LR_BATCH``: the saved config
    holds the rates this run trained with, and re-running it scales them only by a change of batch."""
    factor = total_batch / config.TRAIN.LR_BATCH
    config.defrost()
    for key in SCALED_RATES:
        if key in config.TRAIN:
            config.TRAIN[key] *= factor
    config.TRAIN.LR_BATCH = total_batch
    config.freeze()
