"""What runs on every process: one training epoch, distributed evaluation, and the throughput measurement."""
from __future__ import annotations

import contextlib
import itertools
import logging
import resource
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch
import torch.nn as nn
from timm.scheduler.scheduler import Scheduler
from timm.utils import AverageMeter, ModelEmaV3

from distributed import all_reduce_sum
from choices import AMP_MODES, APEX_LEVELS
from errors import TrainingError, UsageError
from progress import Progress, duration

logger = logging.getLogger("focal.engine")


@dataclass
class Precision:
    """Autocast dtype (None: full precision) and the gradient scaler fp16 needs (disabled otherwise)."""
    device: torch.device
    dtype: Optional[torch.dtype]
    scaler: torch.amp.GradScaler

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None)


def default_amp(device: torch.device) -> str:
    """bf16 on GPUs that compute in it (Ampere and later: fp16's range without a gradient scaler), else fp16 on
    CUDA; none on the CPU, where autocast is slower than float32 on most processors."""
    if device.type != "cuda":
        return "none"
    return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"


def build_precision(amp: str, device: torch.device) -> Precision:
    """``AMP_OPT_LEVEL`` (``--amp``): bf16, fp16 (CUDA only), none; unset means :func:`default_amp`."""
    mode = APEX_LEVELS.get(amp, amp) or default_amp(device)
    if mode not in AMP_MODES:
        raise UsageError(f"--amp (AMP_OPT_LEVEL) must be one of {AMP_MODES}, got {amp!r}")
    if mode == "fp16" and device.type != "cuda":
        raise UsageError("--amp fp16 needs a CUDA device; on CPU use --amp bf16 or --amp none")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[mode]
    return Precision(device, dtype, torch.amp.GradScaler(device.type, enabled=mode == "fp16"))


def memory_mb(device: torch.device) -> float:
    """Peak memory: allocated CUDA memory on a GPU, the process's peak resident size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class TrainStats:
    loss: float  # mean over the epoch's samples
    lr: float  # at the end of the epoch


class LossWatch:
    """The epoch's losses kept on the device: their sum, the last one, and the first non-finite one with its step.
    Nothing is read back to the host until :meth:`read`, so the training loop does not wait for the device at
    every step."""

    def __init__(self, device: torch.device):
        self.sum = torch.zeros((), dtype=torch.float64, device=device)
        self.count = 0
        self.last = torch.zeros((), device=device)
        self.bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self.bad_value = torch.zeros((), device=device)

    def add(self, loss: torch.Tensor, step: int, samples: int) -> None:
        self.last = loss.detach().float()
        first_bad = ~torch.isfinite(self.last) & (self.bad_step < 0)
        self.bad_step = torch.where(first_bad, step, self.bad_step)
        self.bad_value = torch.where(first_bad, self.last, self.bad_value)
        self.sum += self.last.double() * samples
        self.count += samples

    def read(self, epoch: int, num_steps: int) -> Tuple[float, float]:
        """(last loss, mean so far); a ``TrainingError`` naming the first non-finite step if there was one."""
        step = int(self.bad_step)
        if step >= 0:
            raise TrainingError(f"the loss is {float(self.bad_value)} at epoch {epoch}, step {step} of {num_steps}")
        return float(self.last), float(self.sum) / max(self.count, 1)


def train_one_epoch(config, model: nn.Module, criterion: nn.Module, loader: Iterable, updates_per_epoch: int,
                    optimizer: torch.optim.Optimizer, scheduler: Scheduler, precision: Precision, epoch: int,
                    mixup_fn: Optional[Callable], device: torch.device, ema: Optional[ModelEmaV3] = None,
                    ema_source: Optional[nn.Module] = None,
                    report: Optional[Callable[[int, Dict[str, float]], None]] = None) -> TrainStats:
    """``updates_per_epoch`` optimizer steps of ``TRAIN.ACCUMULATION_STEPS`` micro-batches each; leftover
    micro-batches that cannot fill an update are skipped. Under DDP, gradients are synchronised only on the last
    micro-batch of each update.

    Losses stay on the device (:class:`LossWatch`) and are read at each progress line (every ``PRINT_FREQ`` steps
    and at least every 10 s) and at the end of the epoch: no step waits for the device. A non-finite loss raises
    ``TrainingError`` there, naming its step, before the epoch's weights are evaluated or saved. fp16 overflows are
    different: the scaler skips those updates and lowers its scale, and they are only counted (reading the scale
    after each update). The gradient norm is computed at every update when ``TRAIN.CLIP_GRAD`` clips, else only
    for the updates that are reported. ``report(update, {"train/loss", "train/lr", "train/grad_norm"})`` receives
    the values of each progress line (TensorBoard). ``ema`` (if given) averages ``ema_source`` (the model without
    DDP or compile wrappers) after every update.
    """
    model.train()
    accum = config.TRAIN.ACCUMULATION_STEPS
    clip = config.TRAIN.CLIP_GRAD
    num_steps = updates_per_epoch * accum
    losses = LossWatch(device)
    norm = None  # the last measured gradient norm (a device tensor)
    overflow_skips = 0
    optimizer.zero_grad(set_to_none=True)
    start = last_time = time.time()
    last_idx = -1
    progress = Progress(num_steps, config.PRINT_FREQ)
    for idx, (samples, targets) in enumerate(itertools.islice(loader, num_steps)):
        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)
        update = (idx + 1) % accum == 0
        reported = progress.due(idx)
        sync = contextlib.nullcontext() if update or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with precision.autocast():
                loss = criterion(model(samples), targets)
            losses.add(loss, idx, targets.size(0))
            precision.scaler.scale(loss / accum).backward()
        if update:
            precision.scaler.unscale_(optimizer)
            if clip or reported:  # an infinite bound measures the norm without clipping
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip or float("inf"))
            if precision.scaler.is_enabled():
                scale = precision.scaler.get_scale()
                precision.scaler.step(optimizer)
                precision.scaler.update()
                overflow_skips += precision.scaler.get_scale() < scale  # the scaler backs off after skipping
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            update_count = epoch * updates_per_epoch + (idx + 1) // accum
            scheduler.step_update(update_count)
            if ema is not None:
                ema.update(ema_source, step=update_count)
        if reported:
            last, mean = losses.read(epoch, num_steps)
            now = time.time()
            lr = optimizer.param_groups[0]["lr"]
            grad_norm = float("nan") if norm is None else float(norm)
            logger.info(
                f"Train: [{epoch}/{config.TRAIN.EPOCHS}][{idx}/{num_steps}]\t"
                f"eta {progress.eta()} lr {lr:.6f}\t"
                f"time {(now - last_time) / (idx - last_idx):.4f} ({(now - start) / (idx + 1):.4f})\t"
                f"loss {last:.4f} ({mean:.4f})\t"
                f"grad_norm {grad_norm:.4f}\t"
                f"mem {memory_mb(device):.0f}MB")
            last_time, last_idx = now, idx
            if report is not None:
                report(epoch * updates_per_epoch + (idx + 1) // accum,
                       {"train/loss": last, "train/lr": lr, "train/grad_norm": grad_norm})
    _, mean = losses.read(epoch, num_steps)
    if overflow_skips:
        logger.info(f"fp16: the gradient scaler skipped {overflow_skips} of {updates_per_epoch} updates "
                    f"(inf/NaN gradients), scale now {precision.scaler.get_scale():g}")
    logger.info(f"EPOCH {epoch} training takes {duration(time.time() - start)}")
    return TrainStats(mean, optimizer.param_groups[0]["lr"])


@dataclass
class EvalResult:
    acc1: float
    acc5: float
    loss: float
    num_images: int


@torch.no_grad()
def evaluate(config, model: nn.Module, loader: Iterable, precision: Precision, device: torch.device,
             class_indices: Optional[torch.Tensor] = None) -> EvalResult:
    """Top-1/top-5 accuracy (%) and mean cross-entropy over the whole validation set; with ``class_indices``
    (label ``i`` is the model's class ``class_indices[i]``, see ``data.class_map``) only those logits compete.

    Each rank evaluates its own images; correct counts and loss sums (not per-rank averages) are summed across
    ranks, so the result is the same for any number of processes. Top-5 is reported only for more than 5 classes.
    """
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # top-1 hits, top-5 hits, loss sum, images
    indices = None if class_indices is None else class_indices.to(device)
    batch_time = AverageMeter()
    end = time.time()
    num_batches = len(loader)
    progress = Progress(num_batches, config.PRINT_FREQ)
    top5 = False
    for idx, (images, targets) in enumerate(loader):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with precision.autocast():
            output = model(images)
        output = output.float() if indices is None else output.float()[:, indices]
        top5 = output.shape[1] > 5
        hits = output.topk(min(5, output.shape[1]), dim=1).indices.eq(targets[:, None])
        totals[0] += hits[:, 0].sum()
        totals[1] += hits.sum()
        totals[2] += criterion(output, targets)
        totals[3] += len(targets)
        batch_time.update(time.time() - end)
        end = time.time()
        if progress.due(idx):
            seen = max(totals[3].item(), 1)
            acc5 = f"Acc@5 ({100 * totals[1].item() / seen:.3f})\t" if top5 else ""
            logger.info(
                f"Test: {progress.position(idx)}\t"
                f"time {batch_time.val:.3f} ({batch_time.avg:.3f})\t"
                f"loss ({totals[2].item() / seen:.4f})\t"
                f"Acc@1 ({100 * totals[0].item() / seen:.3f})\t{acc5}"
                f"mem {memory_mb(device):.0f}MB")
    hits1, hits5, loss_sum, count = all_reduce_sum(totals).tolist()
    result = EvalResult(100 * hits1 / count, 100 * hits5 / count, loss_sum / count, int(count))
    acc5 = f" Acc@5 {result.acc5:.3f}" if top5 else ""
    logger.info(f" * Acc@1 {result.acc1:.3f}{acc5} loss {result.loss:.4f} ({result.num_images} images)")
    return result


@torch.no_grad()
def throughput(model: nn.Module, images: torch.Tensor, precision: Precision, passes: int = 30,
               print_freq: int = 10) -> float:
    """Images per second over ``passes`` timed forward passes of one batch, after as many untimed ones (at most
    50: the first passes pay for allocation, autotuning and compilation). Long runs report their progress."""
    model.eval()
    device = images.device
    warmup = min(passes, 50)
    progress = Progress(warmup + passes, print_freq)
    with precision.autocast():
        for idx in range(warmup + passes):
            if idx == warmup:
                synchronize(device)
                logger.info(f"throughput averaged over {passes} forward passes (after {warmup} untimed)")
                tic = time.time()
            model(images)
            if progress.due(idx):
                logger.info(f"Throughput: {progress.position(idx)}\t{'timed' if idx >= warmup else 'warm-up'}")
        synchronize(device)
    rate = passes * images.shape[0] / (time.time() - tic)
    logger.info(f"batch_size {images.shape[0]} throughput {rate:.2f} images/s")
    return rate
