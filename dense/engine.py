"""The training epoch and learning-rate schedules of the dense tasks: per-update schedules from timm, one loop for
any model that returns named losses."""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch
import torch.nn as nn
from timm.scheduler import MultiStepLRScheduler, PolyLRScheduler
from timm.scheduler.scheduler import Scheduler
from timm.utils import AverageMeter, ModelEmaV3

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
                    epoch: int, device: torch.device, logger: logging.Logger, ema: Optional[ModelEmaV3] = None,
                    ema_source: Optional[nn.Module] = None, tensorboard: Any = None) -> float:
    """One pass over ``loader``; ``losses(model, batch, device)`` gives the named losses, summed for the update.
    Returns the mean total loss. ``ema`` (if given) averages ``ema_source`` (the model without DDP) after every
    update.

    The loss values stay on the device and are read once per ``PRINT_FREQ`` updates (one host synchronisation per
    interval rather than one per loss per update); a non-finite one then raises ``TrainingError`` naming its
    update, before the epoch can end and anything is saved. ``tensorboard`` gets every update's values.
    """
    model.train()
    num_steps = len(loader)
    clip = config.TRAIN.CLIP_GRAD or float("inf")  # an infinite bound measures the norm without clipping
    pending: List[torch.Tensor] = []  # per update: the total loss, each named loss, the gradient norm
    names: List[str] = []
    lrs: List[float] = []
    sums: Dict[str, float] = {}
    batch_time = AverageMeter()
    end = time.time()
    progress = Progress(num_steps, config.PRINT_FREQ)
    for idx, batch in enumerate(loader):
        with precision.autocast():
            named = losses(model, batch, device)
        loss = sum(named.values())
        optimizer.zero_grad(set_to_none=True)
        precision.scaler.scale(loss).backward()
        precision.scaler.unscale_(optimizer)
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), clip)
        precision.scaler.step(optimizer)
        precision.scaler.update()
        update = epoch * num_steps + idx + 1
        scheduler.step_update(update)
        if ema is not None:
            ema.update(ema_source, step=update)
        names = ["loss", *named, "grad_norm"]
        pending.append(torch.stack([loss.detach().float(), *(v.detach().float() for v in named.values()),
                                    grad_norm.float()]))
        lrs.append(optimizer.param_groups[0]["lr"])
        batch_time.update(time.time() - end)
        end = time.time()
        if progress.due(idx):
            rows = torch.stack(pending).cpu()  # the interval's one synchronisation
            first = idx + 1 - len(rows)
            bad = (~torch.isfinite(rows[:, :-1])).any(1).nonzero()
            if len(bad):
                step = first + int(bad[0])
                detail = ", ".join(f"{k} {v:.4g}" for k, v in zip(names[1:-1], rows[int(bad[0]), 1:-1].tolist()))
                raise TrainingError(f"non-finite loss at epoch {epoch}, step {step} ({detail})")
            for k, column in zip(names[:-1], rows[:, :-1].sum(0).tolist()):
                sums[k] = sums.get(k, 0.0) + column
            if tensorboard is not None:
                for offset, (row, lr) in enumerate(zip(rows.tolist(), lrs)):
                    step = epoch * num_steps + first + offset + 1
                    for name, value in zip(names, row):
                        tensorboard.add_scalar(f"train/{name}", value, step)
                    tensorboard.add_scalar("train/lr", lr, step)
            values = "  ".join(f"{k} {v:.4f} ({sums[k] / (idx + 1):.4f})"
                               for k, v in zip(names[:-1], rows[-1].tolist()))
            logger.info(f"Train: [{epoch}/{config.TRAIN.EPOCHS}]{progress.position(idx)}  lr {lrs[-1]:.3e}  "
                        f"time {batch_time.val:.3f} ({batch_time.avg:.3f})  {values}  grad_norm "
                        f"{rows[-1, -1].item():.4f}  mem {memory_mb(device):.0f}MB")
            pending, lrs = [], []
    return sums["loss"] / num_steps
