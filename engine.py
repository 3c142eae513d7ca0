"""What runs on every process, for every task: joining the process group, holding the run's output folder, the
training driver (:func:`fit`) and its epoch, classification's distributed evaluation, and the throughput
measurement."""
from __future__ import annotations

import contextlib
import fcntl
import inspect
import itertools
import logging
import os
import resource
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
from timm.scheduler.scheduler import Scheduler
from timm.utils import AverageMeter, ModelEmaV3, distribute_bn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from config import APEX_LEVELS, TrainingError, UsageError, trains, user_message
from logger import (FILE_ONLY, Progress, Terminated, close_log_files, create_logger, create_tensorboard_writer,
                    duration, leaving, scalars_to, stop_on_signals)
from lr_scheduler import scale_rates
from models import ConfigError
from utils import (BEST_CHECKPOINT, LAST_CHECKPOINT, Checkpoint, check_classes, diverged, ensure_writable_folder,
                   missing_folders, restore_checkpoint, resume_checkpoint, save_checkpoint, save_config,
                   seed_everything, training_epochs, training_state)

logger = logging.getLogger("focal.engine")


# --- The process group ------------------------------------------------------------------------------------
# A plain ``python main.py`` is a world of one: no process group is created and every helper is a no-op, so the
# same code path serves one process and many.

@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job and which device it computes on."""
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"environment variable {name} must be an integer, got {value!r}") from None


def resolve_device(name: str, local_rank: int) -> torch.device:
    """``auto`` picks CUDA when present, else CPU; ``cuda`` fails clearly when there is none."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was requested but no CUDA device is available; use --device cpu")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    if local_rank >= torch.cuda.device_count():
        raise UsageError(f"LOCAL_RANK {local_rank} has no GPU: only {torch.cuda.device_count()} are visible")
    return torch.device("cuda", local_rank)


def init_distributed(device: str = "auto") -> DistEnv:
    """Read RANK / WORLD_SIZE / LOCAL_RANK (set by torchrun) and join the process group when there are several."""
    rank, world_size = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise UsageError(f"environment: RANK {rank} and WORLD_SIZE {world_size} need 0 <= RANK < WORLD_SIZE")
    env = DistEnv(rank, world_size, local_rank, resolve_device(device, local_rank))
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
    if env.distributed and not dist.is_initialized():
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
        if missing:
            raise UsageError(f"WORLD_SIZE={world_size} asks for a distributed run, but {' and '.join(missing)} "
                             f"{'is' if len(missing) == 1 else 'are'} not set: start it with torchrun (which sets "
                             f"them), or set MASTER_ADDR and MASTER_PORT on every process")
        join_process_group("nccl" if env.device.type == "cuda" else "gloo", rank, world_size)
        gather_peers()
    return env


def join_process_group(backend: str, rank: int, world_size: int) -> None:
    """``init_process_group`` in a helper thread while the main thread waits.

    The rendezvous blocks in C++ until every rank has arrived (by default for 30 minutes), and Python runs signal
    handlers only in the main thread between bytecodes: called directly, a job missing a rank could not be stopped
    with SIGTERM or Ctrl-C. Waiting in short joins keeps the main thread able to run them.
    """
    if rank == 0:
        print(f"waiting for {world_size} processes at {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} "
              f"({backend})", flush=True)
    failure: list = []

    def join() -> None:
        try:
            dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size)
        except BaseException as err:  # handed to the main thread
            failure.append(err)

    thread = threading.Thread(target=join, name="rendezvous", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(timeout=0.2)
    if failure:
        raise failure[0]


# (host, pid) of every rank, gathered once the group is joined: after a collective fails, which peers on this host
# have ended tells the user which rank died (gloo only reports a reset connection to an address).
PEERS: List[Tuple[str, int]] = []


def gather_peers() -> None:
    PEERS[:] = [("", 0)] * dist.get_world_size()
    dist.all_gather_object(PEERS, (socket.gethostname(), os.getpid()))


def _ended(pid: int) -> bool:
    """The process is gone, or a zombie not yet reaped by torchrun."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, IndexError):
        return True
    except OSError:
        return False


# How gloo and NCCL word a collective whose peer went away.
PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "remote process exited",
             "Socket Timeout")


def lost_peer_message(err: BaseException) -> Optional[str]:
    """For a collective that failed because another rank died: one line saying which (when it ran on this host)
    and how to go on; None for any other error."""
    if not (dist.is_initialized() and PEERS) or not isinstance(err, RuntimeError):
        return None
    if not any(text in str(err) for text in PEER_LOST):
        return None
    rank, host = dist.get_rank(), socket.gethostname()
    neighbours = {r: pid for r, (peer_host, pid) in enumerate(PEERS) if r != rank and peer_host == host}
    dead: List[str] = []
    deadline = time.monotonic() + 1.0  # a killed peer's socket can close before its process has finished ending
    while neighbours and not dead and time.monotonic() < deadline:
        dead = [f"rank {r} (pid {pid})" for r, pid in neighbours.items() if _ended(pid)]
        time.sleep(0.05)
    who = f"{', '.join(dead)} ended" if dead else "another rank ended or became unreachable"
    return (f"rank {rank} lost its connection to the other ranks: {who}. torchrun stops the job; the same command "
            f"resumes from the newest checkpoint in the output folder")


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over all processes in place (identity in a world of one) and return the tensor."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def wrap_ddp(model: nn.Module, env: DistEnv) -> DistributedDataParallel:
    """DDP without syncing buffers in every forward pass (ours are the same on every rank). Newer torch spells this
    ``forward_sync_buffers=False`` and warns (FutureWarning) about the older ``broadcast_buffers=False``."""
    device_ids = [env.device.index] if env.device.type == "cuda" else None
    parameters = inspect.signature(DistributedDataParallel.__init__).parameters
    no_sync = {"forward_sync_buffers" if "forward_sync_buffers" in parameters else "broadcast_buffers": False}
    return DistributedDataParallel(model, device_ids=device_ids, **no_sync)


# --- The run's output folder: one run per folder -----------------------------------------------------------

class OutputLock:
    """An exclusive POSIX record lock (``lockf``) on ``<folder>/.lock_rank<rank>``, held while the run lives.

    A ``lockf`` lock belongs to the process, so forked DataLoader workers do not inherit it, and the kernel drops
    it however the process ends: a killed run's lock file is simply locked anew. A run that ends normally removes
    the file. It holds the owner's pid, for the message.
    """

    def __init__(self, folder: str, rank: int):
        self.folder = folder
        self.path = os.path.join(folder, f".lock_rank{rank}")
        self._fd: Optional[int] = None

    def __enter__(self) -> "OutputLock":
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                owner = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise UsageError(f"--output: {self.folder} is in use by another run (pid {owner}); wait for it to "
                                 f"end, or choose another --output or --tag") from None
            try:
                current = os.stat(self.path).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(fd).st_ino:
                break
            os.close(fd)  # the previous owner removed the file between our open and lock: take the new one
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def __exit__(self, *exc_info) -> None:
        if self._fd is not None:
            os.remove(self.path)
            os.close(self._fd)  # releases the lock
            self._fd = None


def remove_failed_start(folder: str, log_file: str, created: List[str], logger: logging.Logger) -> None:
    """Undo what a run refused for bad input created (its new log and folders) when nothing else was written
    there; an earlier run's folder keeps its log, with the ``stopped:`` line appended."""
    if any(not name.startswith(("log_rank", ".lock_rank")) for name in os.listdir(folder)):
        return
    close_log_files(logger)
    with contextlib.suppress(FileNotFoundError):
        os.remove(log_file)
    for path in created:  # deepest first; one still holding another rank's log stays
        with contextlib.suppress(OSError):
            os.rmdir(path)


@contextlib.contextmanager
def locked_run(folder: str, rank: int) -> Iterator[logging.Logger]:
    """One process's output folder: checked writable, locked, and logged to. A failure ends in the log as one
    ``stopped:`` line (errors the user can act on) or a traceback; a run refused for bad input before it wrote
    anything but its log leaves no trace (the error has gone to the console)."""
    created = missing_folders(folder)
    ensure_writable_folder(folder, "--output")
    log_file = os.path.join(folder, f"log_rank{rank}.txt")
    new_log = not os.path.exists(log_file)
    refused = False
    try:
        with OutputLock(folder, rank):
            logger = create_logger(folder, rank)
            try:
                yield logger
            except Terminated:
                raise
            except BaseException as err:
                leaving()
                lost = lost_peer_message(err)  # None unless a collective broke because another rank died
                # The entry point prints the error itself (one line on stderr): the log file keeps its copy.
                if lost is not None:
                    logger.error(f"stopped: {lost}", extra=FILE_ONLY)
                    raise TrainingError(lost) from None
                if not isinstance(err, (UsageError, ConfigError, TrainingError, SystemExit)):
                    logger.exception("failed")
                    raise
                logger.error(f"stopped: {user_message(err)}", extra=FILE_ONLY)
                refused = isinstance(err, (UsageError, ConfigError))
                raise
    finally:
        if refused and new_log:  # the lock is released (its file gone) by now
            remove_failed_start(folder, log_file, created, logger)


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


# --- Entry points -------------------------------------------------------------------------------------------

def launch(config: Any, device: str, run: Callable[[DistEnv, logging.Logger], None]) -> None:
    """What every entry point does around its work: join the process group, scale the rates to the run's total
    batch (``lr_scheduler.scale_rates``), hold and log to the output folder, say where this process runs, seed the
    model's initialisation, then ``run(env, logger)``."""
    env = init_distributed(device)
    try:
        scale_rates(config, config.DATA.BATCH_SIZE * env.world_size * config.TRAIN.ACCUMULATION_STEPS)
        with locked_run(config.OUTPUT, env.rank) as logger:
            backend = f", backend {dist.get_backend()}" if env.distributed else ""
            rate = (f", learning rate {config.TRAIN.BASE_LR:.3g} for a total batch of {config.TRAIN.LR_BATCH}"
                    if trains(config) else "")
            logger.info(f"rank {env.rank} of {env.world_size} on {env.device}{backend}{rate}, pid {os.getpid()}")
            seed_everything(config.SEED, env.rank, 0)
            run(env, logger)
    finally:
        shutdown()


def command_line(prog: str, main: Callable[[], None]) -> None:
    """An entry point's ``__main__``: a stop signal ends it in one logged line (``logger.stop_on_signals``), and an
    error the user can act on is one line on stderr, not a traceback."""
    stop_on_signals()
    try:
        main()
    except (UsageError, ConfigError, TrainingError) as err:
        sys.exit(f"{prog}: error: {user_message(err)}")
    finally:
        leaving()
