"""What runs on every process, for every task: the training driver (:func:`fit`) and its epoch, classification's
distributed evaluation, and the throughput measurement."""
from __future__ import annotations

import contextlib
import itertools
import logging
import os
import resource
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
from timm.scheduler.scheduler import Scheduler
from timm.utils import AverageMeter, ModelEmaV3, distribute_bn
from torch.utils.data import DataLoader

from config import APEX_LEVELS
from distributed import DistEnv, all_reduce_sum, wrap_ddp
from errors import TrainingError, UsageError, user_message
from logger import Progress, create_tensorboard_writer, duration, scalars_to
from utils import (BEST_CHECKPOINT, LAST_CHECKPOINT, Checkpoint, check_classes, diverged, restore_checkpoint,
                   resume_checkpoint, save_checkpoint, save_config, training_epochs, training_state)

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
    """bf16 where the GPU computes in it (no gradient scaler needed), else fp16 on CUDA; none on the CPU, where
    autocast is slower than float32 on most processors."""
    if device.type != "cuda":
        return "none"
    return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"


def build_precision(amp: str, device: torch.device) -> Precision:
    mode = APEX_LEVELS.get(amp, amp) or default_amp(device)  # one of AMP_MODES (config.RULES)
    if mode == "fp16" and device.type != "cuda":
        raise UsageError("--amp fp16 needs a CUDA device; on CPU use --amp bf16 or --amp none")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[mode]
    return Precision(device, dtype, torch.amp.GradScaler(device.type, enabled=mode == "fp16"))


def memory_mb(device: torch.device) -> float:
    """Peak memory: allocated CUDA memory on a GPU, the process's peak resident size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def compiled(model: nn.Module, config: Any) -> nn.Module:
    return torch.compile(model, backend=config.COMPILE) if config.COMPILE else model


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class TrainStats:
    loss: float  # mean over the epoch's steps
    lr: float  # at the end of the epoch


# ``losses(model, batch, device)``: the named losses of one batch, summed for the update.
LossFn = Callable[[nn.Module, Any, torch.device], Dict[str, torch.Tensor]]


def classification_losses(criterion: nn.Module, mixup_fn: Optional[Callable] = None) -> LossFn:
    """The loss of an (images, labels) batch, mixed by ``mixup_fn`` (timm's Mixup/CutMix) when given."""
    def losses(model: nn.Module, batch: Any, device: torch.device) -> Dict[str, torch.Tensor]:
        samples, targets = (t.to(device, non_blocking=True) for t in batch)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)
        return {"loss": criterion(model(samples), targets)}
    return losses


def step_optimizer(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> bool:
    """One update through the gradient scaler; True when fp16 overflowed and the scaler skipped it (it lowers its
    scale after skipping: read back only when the scaler is in use)."""
    if not scaler.is_enabled():
        optimizer.step()
        return False
    scale = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    return scaler.get_scale() < scale


def train_one_epoch(config: Any, model: nn.Module, losses: LossFn, loader: Iterable, updates_per_epoch: int,
                    optimizer: torch.optim.Optimizer, scheduler: Scheduler, precision: Precision, epoch: int,
                    device: torch.device, ema: Optional[ModelEmaV3] = None, ema_source: Optional[nn.Module] = None,
                    report: Optional[Callable[[int, Dict[str, float]], None]] = None) -> TrainStats:
    """``updates_per_epoch`` optimizer steps of ``TRAIN.ACCUMULATION_STEPS`` batches each (leftover batches are
    skipped; DDP synchronises on the last batch of an update); ``ema`` averages ``ema_source`` after each update.

    Losses and gradient norms stay on the device and are read once per progress line, so no step waits for the
    device; a non-finite loss then raises ``TrainingError`` naming its step, before the epoch is evaluated or saved
    (fp16 overflows are only counted: the scaler skips them). ``report(update, values)`` gets every update's values
    (TensorBoard).
    """
    model.train()
    accum = config.TRAIN.ACCUMULATION_STEPS
    clip = config.TRAIN.CLIP_GRAD or float("inf")  # an infinite bound measures the norm without clipping
    num_steps = updates_per_epoch * accum
    norm = torch.full((), float("nan"), device=device)  # the last measured gradient norm
    pending: List[Tuple[torch.Tensor, Optional[int], float]] = []  # per step: its values, its update, the rate
    sums = torch.zeros(0)
    overflow_skips = 0
    optimizer.zero_grad(set_to_none=True)
    progress = Progress(num_steps, config.PRINT_FREQ)
    start = last_time = time.time()
    last_idx = -1
    for idx, batch in enumerate(itertools.islice(loader, num_steps)):
        update = (idx + 1) % accum == 0
        reported = progress.due(idx)
        sync = contextlib.nullcontext() if update or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with precision.autocast():
                named = losses(model, batch, device)
            loss = sum(named.values())
            precision.scaler.scale(loss / accum).backward()
        update_count = None
        if update:
            precision.scaler.unscale_(optimizer)
            if config.TRAIN.CLIP_GRAD or reported or report is not None:  # only where it is used
                norm = nn.utils.clip_grad_norm_(model.parameters(), clip)
            overflow_skips += step_optimizer(optimizer, precision.scaler)
            optimizer.zero_grad(set_to_none=True)
            update_count = epoch * updates_per_epoch + (idx + 1) // accum
            scheduler.step_update(update_count)
            if ema is not None:
                ema.update(ema_source, step=update_count)
        parts = [] if list(named) == ["loss"] else list(named)
        names = ["loss", *parts, "grad_norm"]
        pending.append((torch.stack([loss.detach().float(), *(named[k].detach().float() for k in parts),
                                     norm.detach().float()]), update_count, optimizer.param_groups[0]["lr"]))
        if not reported:
            continue
        rows = torch.stack([values for values, _, _ in pending]).cpu()  # the interval's one read from the device
        bad = (~torch.isfinite(rows[:, :-1])).any(1).nonzero()
        if len(bad):
            row = rows[int(bad[0])]
            detail = f" ({', '.join(f'{k} {v:.4g}' for k, v in zip(parts, row[1:-1].tolist()))})" if parts else ""
            raise TrainingError(f"the loss is {row[0].item():.4g} at epoch {epoch}, step "
                                f"{idx + 1 - len(rows) + int(bad[0])} of {num_steps}{detail}")
        sums = rows[:, :-1].sum(0) + (sums if len(sums) else 0)
        if report is not None:
            for values, count, lr in pending:
                if count is not None:
                    report(count, {**{f"train/{k}": v for k, v in zip(names, values.tolist())}, "train/lr": lr})
        now, last = time.time(), rows[-1].tolist()
        values = "\t".join(f"{k} {v:.4f} ({total / (idx + 1):.4f})" for k, v, total in zip(names, last, sums.tolist()))
        logger.info(f"Train: [{epoch}/{config.TRAIN.EPOCHS}]{progress.position(idx)} lr {pending[-1][2]:.3e}\t"
                    f"time {(now - last_time) / (idx - last_idx):.4f} ({(now - start) / (idx + 1):.4f})\t"
                    f"{values}\tgrad_norm {last[-1]:.4f}\tmem {memory_mb(device):.0f}MB")
        last_time, last_idx, pending = now, idx, []
    if overflow_skips:
        logger.info(f"fp16: the gradient scaler skipped {overflow_skips} of {updates_per_epoch} updates "
                    f"(inf/NaN gradients), scale now {precision.scaler.get_scale():g}")
    logger.info(f"EPOCH {epoch} training takes {duration(time.time() - start)}")
    return TrainStats(float(sums[0]) / num_steps, optimizer.param_groups[0]["lr"])


@dataclass
class EvalResult:
    acc1: float
    acc5: float
    loss: float
    num_images: int


@torch.no_grad()
def evaluate(config, model: nn.Module, loader: Iterable, precision: Precision, device: torch.device,
             class_indices: Optional[torch.Tensor] = None) -> EvalResult:
    """Top-1/top-5 accuracy (%) and mean cross-entropy; with ``class_indices`` (label ``i`` is the model's class
    ``class_indices[i]``) only those logits compete. Counts and sums, not per-rank averages, are summed across
    ranks, so the result does not depend on the number of processes. Top-5 only for more than 5 classes."""
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
    """Images per second over ``passes`` timed forward passes of one batch, after as many (at most 50) untimed
    ones that pay for allocation, autotuning and compilation."""
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


def create_ema(config: Any, model: nn.Module, checkpoint: Optional[Checkpoint]) -> Optional[ModelEmaV3]:
    """With ``MODEL_EMA``: timm's weight average of ``model``, from the checkpoint's average when it holds one.
    Call it after the DDP wrap has broadcast rank 0's weights, so every process averages from the same start."""
    if not config.MODEL_EMA:
        return None
    ema = ModelEmaV3(model, decay=config.MODEL_EMA_DECAY)
    if checkpoint is not None and "model_ema" in checkpoint.state:
        ema.module.load_state_dict(checkpoint.state["model_ema"])
    return ema


def use_sync_batchnorm(model: nn.Module, config: Any, env: DistEnv, logger: logging.Logger) -> nn.Module:
    """With more than one process and ``MODEL.SYNC_BN``: SyncBatchNorm (GPUs only; elsewhere the running
    statistics are averaged after every epoch by :func:`sync_batchnorm_buffers`)."""
    if not (env.distributed and has_batchnorm(model) and config.MODEL.SYNC_BN):
        return model
    if env.device.type != "cuda":
        logger.info(f"MODEL.SYNC_BN: SyncBatchNorm needs GPUs; on {env.device.type} each process normalises its "
                    f"own batch and the running statistics are averaged over processes after every epoch")
        return model
    logger.info("MODEL.SYNC_BN: batch norms converted to SyncBatchNorm")
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def sync_batchnorm_buffers(model: nn.Module, env: DistEnv) -> None:
    """Average batch-norm running statistics over processes, so every rank evaluates and saves the same model."""
    if env.distributed and has_batchnorm(model):
        distribute_bn(model, env.world_size, reduce=True)


@dataclass
class BestScore:
    """The best validation score so far: ``update`` says whether a new one beats it."""
    value: float = float("-inf")

    def update(self, score: float) -> bool:
        improved = score > self.value
        self.value = max(self.value, score)
        return improved


def save_epoch(config: Any, env: DistEnv, epoch: int, improved: bool, state: Callable[[], Dict[str, Any]],
               logger: logging.Logger) -> Optional[str]:
    """On the main process: the epoch checkpoint every ``SAVE_FREQ`` epochs and after the last, else
    ``ckpt_last.pth`` (a stop loses no finished epoch); ``ckpt_best.pth`` when ``improved``. Returns the path of
    the resumable checkpoint written."""
    if not env.is_main:
        return None
    content = state()
    last = os.path.join(config.OUTPUT, LAST_CHECKPOINT)
    if (epoch + 1) % config.SAVE_FREQ == 0 or epoch == config.TRAIN.EPOCHS - 1:
        path = save_checkpoint(config, content, logger)
        if os.path.exists(last):
            os.remove(last)  # older than the epoch file just written
    else:
        path = save_checkpoint(config, content, logger, name=LAST_CHECKPOINT)
    if improved:
        save_checkpoint(config, content, logger, name=BEST_CHECKPOINT)
    return path


def keep_unevaluated_epoch(err: UsageError, config: Any, env: DistEnv, epoch: int,
                           state: Callable[[], Dict[str, Any]], logger: logging.Logger) -> UsageError:
    """An unreadable validation image shows up after a whole epoch of training: the main process saves that epoch
    before the run stops, so fixing the image loses no training. Returns the error to stop with."""
    if not env.is_main:
        return err
    saved = save_checkpoint(config, state(), logger)
    return UsageError(f"{user_message(err)}. Epoch {epoch}'s training is saved in {saved}: once the image is fixed, "
                      f"the same command resumes after it (that epoch stays unevaluated)")


class DatasetClasses(NamedTuple):
    """A data set's classes, which checkpoints record and a resume or ``--eval`` compares (``utils.check_classes``):
    ``names`` (and COCO ``ids``), the file or folder giving them, what messages call them, and the output of the
    first class (a detector's output 0 is the background)."""
    source: str
    kind: str
    names: List[str]
    ids: Optional[List[int]] = None
    first_output: int = 0


class TaskData(NamedTuple):
    """A task's data for :func:`fit`: the training loader, what its ``evaluate`` takes, and the classes."""
    train: DataLoader
    val: Any
    num_classes: int
    classes: Optional[DatasetClasses]


class Scores(NamedTuple):
    """An evaluation: the score that picks ``ckpt_best.pth`` (higher is better), and the figures for TensorBoard."""
    score: float
    scalars: Dict[str, float]


@dataclass
class Task:
    """What a task (classification, detection, segmentation) supplies to :func:`fit`. ``evaluate(config, model,
    data, env, precision, logger, which)``: ``which`` names the model ("network" or "EMA model")."""
    name: str
    build_data: Callable[[Any, DistEnv, logging.Logger], TaskData]
    build_model: Callable[[Any, int, DistEnv, logging.Logger], nn.Module]
    build_optimizer: Callable[[Any, nn.Module], torch.optim.Optimizer]
    build_scheduler: Callable[[Any, torch.optim.Optimizer, int], Scheduler]
    losses: Callable[[Any, TaskData], LossFn]
    evaluate: Callable[..., Scores]
    load_pretrained: Callable[[Any, nn.Module, logging.Logger, bool], None]
    score_name: str = "score"
    score_unit: str = ""


def fit(task: Task, config: Any, env: DistEnv, logger: logging.Logger, unsafe: bool) -> Tuple[nn.Module,
                                                                                               Optional[ModelEmaV3]]:
    """Train the task's model from ``TRAIN.START_EPOCH`` or a resumed checkpoint, evaluating every ``EVAL_FREQ``
    epochs; returns the model (without wrappers) and its weight average. Everything is checked before the run
    writes more than its log, and the config only after the first epoch, so a refused run leaves an earlier run's
    files as they were."""
    precision = build_precision(config.AMP_OPT_LEVEL, env.device)
    data = task.build_data(config, env, logger)
    model = use_sync_batchnorm(task.build_model(config, data.num_classes, env, logger), config, env, logger)
    accum = config.TRAIN.ACCUMULATION_STEPS
    updates_per_epoch = len(data.train) // accum
    if updates_per_epoch == 0:
        raise UsageError(f"--accumulation-steps {accum} (TRAIN.ACCUMULATION_STEPS) exceeds the {len(data.train)} "
                         f"batches per epoch")
    optimizer = task.build_optimizer(config, model)
    scheduler = task.build_scheduler(config, optimizer, updates_per_epoch)
    start_epoch, best = config.TRAIN.START_EPOCH, BestScore()
    checkpoint = resume_checkpoint(config, logger, unsafe)
    classes = data.classes
    if checkpoint:
        if classes:
            check_classes(checkpoint, classes.names, classes.kind, classes.source, classes.ids,
                          first_output=classes.first_output)
        start_epoch, step, saved_best = restore_checkpoint(checkpoint, model, logger, optimizer, precision.scaler,
                                                           config)
        scored, scoring = ("EMA model" if "model_ema" in checkpoint.state else "network",
                           "EMA model" if config.MODEL_EMA else "network")
        if scored == scoring:  # the best so far is a score of the same model: it carries over
            best.update(saved_best)
        else:
            logger.info(f"{checkpoint.path}'s best score is its {scored}'s; this run's best is its {scoring}'s, "
                        f"which starts afresh (ckpt_best.pth is replaced at its first evaluation)")
        if step and step != start_epoch * updates_per_epoch:
            logger.warning(f"{checkpoint.path} was saved after {step} updates, but {start_epoch} epochs of this run "
                           f"make {start_epoch * updates_per_epoch}: batch size, accumulation or data changed, "
                           f"and the schedule continues from the latter")
        if start_epoch >= config.TRAIN.EPOCHS:
            raise UsageError(f"{checkpoint.path} has already trained {start_epoch} of TRAIN.EPOCHS "
                             f"{config.TRAIN.EPOCHS} epochs: nothing to train; raise TRAIN.EPOCHS to go on, or "
                             f"evaluate it with --eval")
    elif config.MODEL.PRETRAINED:
        task.load_pretrained(config, model, logger, unsafe)
    scheduler.step_update(start_epoch * updates_per_epoch)  # the rate this run's schedule gives the next update
    last_good = checkpoint.path if checkpoint else None
    tensorboard = create_tensorboard_writer(config.OUTPUT) if config.TENSORBOARD and env.is_main else None
    # Building the DDP wrapper broadcasts rank 0's weights and buffers; batch-norm statistics are then kept equal
    # by SyncBatchNorm (GPUs) and averaged after every epoch (sync_batchnorm_buffers).
    wrapped = wrap_ddp(model, env) if env.distributed else model
    ema = create_ema(config, model, checkpoint)  # after the wrap: from rank 0's broadcast weights
    train_model = compiled(wrapped, config)
    eval_model = compiled(model, config) if env.distributed else train_model  # one compilation without DDP
    losses = task.losses(config, data)

    def state_after(epoch: int) -> dict:
        return training_state(config, epoch, (epoch + 1) * updates_per_epoch, model, max(best.value, 0.0), optimizer,
                              scheduler, precision.scaler, ema.module if ema else None,
                              classes.names if classes else None, classes.ids if classes else None)

    logger.info(f"start training: epochs {start_epoch}..{config.TRAIN.EPOCHS - 1}, {updates_per_epoch} updates "
                f"per epoch, total batch {config.TRAIN.LR_BATCH}")
    for epoch in training_epochs(config, env.rank, data.train.sampler, start_epoch, logger):
        try:
            stats = train_one_epoch(config, train_model, losses, data.train, updates_per_epoch, optimizer, scheduler,
                                    precision, epoch, env.device, ema, model, scalars_to(tensorboard))
        except TrainingError as err:
            raise diverged(err, last_good) from None
        sync_batchnorm_buffers(model, env)
        if ema is not None:
            sync_batchnorm_buffers(ema.module, env)
        improved = False
        if (epoch + 1) % config.EVAL_FREQ == 0 or epoch == config.TRAIN.EPOCHS - 1:
            try:
                scores = task.evaluate(config, eval_model, data, env, precision, logger)
                if ema is not None:
                    ema_scores = task.evaluate(config, ema.module, data, env, precision, logger, "EMA model")
                    scores = Scores(ema_scores.score, {**scores.scalars, **{
                        f"ema/{tag}": value for tag, value in ema_scores.scalars.items()}})
            except TrainingError as err:  # e.g. a non-finite validation loss: not to be saved as the best
                raise diverged(TrainingError(f"{err} after epoch {epoch}"), last_good) from None
            except UsageError as err:  # an unreadable validation image, found after a whole epoch of training
                raise keep_unevaluated_epoch(err, config, env, epoch, lambda: state_after(epoch), logger) from None
            improved = best.update(scores.score)  # the first evaluation of a fresh run always counts as the best
            logger.info(f"Max {task.score_name}{' (EMA)' if ema else ''}: {best.value:.2f}{task.score_unit}")
            if tensorboard is not None:
                for tag, value in {"train/epoch_loss": stats.loss, **scores.scalars}.items():
                    tensorboard.add_scalar(tag, value, (epoch + 1) * updates_per_epoch)  # the per-update axis
                tensorboard.flush()
        if env.is_main and epoch == start_epoch:
            save_config(config, logger)  # only now: a run that fails on its data leaves the previous one's
        last_good = save_epoch(config, env, epoch, improved, lambda: state_after(epoch), logger) or last_good
    if tensorboard is not None:
        tensorboard.close()
    return model, ema
