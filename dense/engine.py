"""The training epoch and learning-rate schedules of the dense tasks: per-update schedules from timm, one loop for
any model that returns named losses."""
from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable, Dict, Iterable

import torch
import torch.nn as nn
from timm.scheduler import MultiStepLRScheduler, PolyLRScheduler
from timm.scheduler.scheduler import Scheduler
from timm.utils import AverageMeter

from engine import Precision, memory_mb
from errors import TrainingError
from progress import Progress


def build_schedule(config: Any, optimizer: torch.optim.Optimizer, updates_per_epoch: int) -> Scheduler:
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


def train_one_epoch(config: Any, model: nn.Module, losses: Callable[..., Dict[str, torch.Tensor]],
                    loader: Iterable, optimizer: torch.optim.Optimizer, scheduler: Scheduler, precision: Precision,
                    epoch: int, device: torch.device, logger: logging.Logger) -> float:
    """One pass over ``loader``; ``losses(model, batch, device)`` gives the named losses, summed for the update.
    A non-finite loss raises ``TrainingError`` before its backward pass. Returns the mean total loss."""
    model.train()
    num_steps = len(loader)
    meters: Dict[str, AverageMeter] = {}
    batch_time = AverageMeter()
    end = time.time()
    progress = Progress(num_steps, config.PRINT_FREQ)
    for idx, batch in enumerate(loader):
        with precision.autocast():
            named = losses(model, batch, device)
        loss = sum(named.values())
        if not math.isfinite(loss.item()):
            detail = ", ".join(f"{k} {v.item():.4g}" for k, v in named.items())
            raise TrainingError(f"non-finite loss at epoch {epoch}, step {idx} ({detail})")
        optimizer.zero_grad(set_to_none=True)
        precision.scaler.scale(loss).backward()
        if config.TRAIN.CLIP_GRAD > 0:
            precision.scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), config.TRAIN.CLIP_GRAD)
        precision.scaler.step(optimizer)
        precision.scaler.update()
        scheduler.step_update(epoch * num_steps + idx + 1)
        for name, value in (("loss", loss), *named.items()):
            meters.setdefault(name, AverageMeter()).update(value.item())
        batch_time.update(time.time() - end)
        end = time.time()
        if progress.due(idx):
            lr = optimizer.param_groups[0]["lr"]
            values = "  ".join(f"{k} {m.val:.4f} ({m.avg:.4f})" for k, m in meters.items())
            logger.info(f"Train: [{epoch}/{config.TRAIN.EPOCHS}]{progress.position(idx)}  lr {lr:.3e}  "
                        f"time {batch_time.val:.3f} ({batch_time.avg:.3f})  {values}  mem {memory_mb(device):.0f}MB")
    return meters["loss"].avg
