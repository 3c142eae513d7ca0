"""Checkpoints: read them safely, write them atomically, find the newest good one, restore the training state.

Our checkpoints keep the released layout (``{"model": state_dict, "epoch", "max_accuracy", ...}``) and add the
optimizer, scheduler and AMP scaler states, the update count and the config as YAML text: tensors and plain
containers only, so they load with ``weights_only=True`` and loading them runs no code from the file.
"""
from __future__ import annotations

import logging
import os
import pickle
import re
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from timm.scheduler.scheduler import Scheduler

from errors import UsageError
from models import load_weights

CHECKPOINT_NAME = re.compile(r"^ckpt_epoch_(\d+)\.pth$")
# The reference release pickled its yacs config into every checkpoint. Reading it as a plain ordered mapping
# keeps loading safe (no yacs code runs); we never use that config.
SAFE_GLOBALS = [(OrderedDict, "yacs.config.CfgNode")]
UNSAFE_HINT = ("--unsafe-load unpickles it anyway, which runs whatever code the file carries: use it only for "
               "files from a source you trust")


class UnreadableCheckpoint(UsageError):
    """The file is truncated or corrupt (not merely unsafe): auto-resume passes over it."""


@dataclass
class Checkpoint:
    path: str
    state: Dict[str, Any]


def _unsafe_detail(path: str) -> str:
    """What besides tensors and plain containers the file asks the unpickler for, when torch can tell."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (ValueError, RuntimeError):  # not torch's zip format: an old-style or bare pickle
        return "it is not a tensors-only PyTorch checkpoint"
    return f"it needs {', '.join(names[:5])}" if names else "it uses pickle operations beyond tensors and containers"


def read_checkpoint(path: str, logger: logging.Logger, unsafe: bool = False) -> Checkpoint:
    """Load on the CPU with ``weights_only=True``; a file that needs arbitrary unpickling is refused unless
    ``unsafe`` (``--unsafe-load``). Truncated or corrupt files raise ``UnreadableCheckpoint``."""
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint not found: {path}")
    try:
        if unsafe:
            logger.warning(f"--unsafe-load: fully unpickling {path}; any code in it runs now")
            return Checkpoint(path, torch.load(path, map_location="cpu", weights_only=False))
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return Checkpoint(path, torch.load(path, map_location="cpu", weights_only=True))
    except pickle.UnpicklingError:
        if unsafe:
            raise UnreadableCheckpoint(f"cannot read checkpoint {path}: it is corrupt") from None
        raise UsageError(f"refusing to load checkpoint {path}: {_unsafe_detail(path)}; {UNSAFE_HINT}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UnreadableCheckpoint(f"cannot read checkpoint {path} (truncated or corrupt): {reason}") from None


def checkpoint_path(output_dir: str, epoch: int) -> str:
    return os.path.join(output_dir, f"ckpt_epoch_{epoch}.pth")


def list_checkpoints(output_dir: str) -> List[str]:
    """The ``ckpt_epoch_<N>.pth`` files in ``output_dir``, newest (largest N) first."""
    if not os.path.isdir(output_dir):
        return []
    epochs = sorted((int(m.group(1)) for m in map(CHECKPOINT_NAME.match, os.listdir(output_dir)) if m),
                    reverse=True)
    return [checkpoint_path(output_dir, epoch) for epoch in epochs]


def latest_checkpoint(output_dir: str, logger: logging.Logger, unsafe: bool = False) -> Optional[Checkpoint]:
    """The newest checkpoint in ``output_dir`` that can be read; truncated or corrupt ones are skipped with a
    warning naming them (a crash, a full disk). Files refused as unsafe stop the search: they are not damage."""
    for path in list_checkpoints(output_dir):
        try:
            return read_checkpoint(path, logger, unsafe)
        except UnreadableCheckpoint as err:
            logger.warning(f"auto-resume skips {path}: {err}")
    return None


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """``write(temporary_path)`` in the same folder, flushed to disk, then renamed over ``path``: a crash at any
    point leaves either the old file or the complete new one, never a truncated one under its name. The temporary
    file is created like any other (it honours the umask), so the result has the usual permissions."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        open(tmp, "xb").close()
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` through :func:`atomic_write`."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_checkpoint(config: Any, epoch: int, step: int, model: nn.Module, max_accuracy: float,
                    optimizer: torch.optim.Optimizer, scheduler: Scheduler, scaler: torch.amp.GradScaler,
                    logger: logging.Logger) -> str:
    """Write ``<OUTPUT>/ckpt_epoch_<epoch>.pth`` atomically, then keep only the newest ``KEEP_CHECKPOINTS``."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "max_accuracy": max_accuracy,
        "epoch": epoch,
        "step": step,
        "config": config.dump(),
    }
    path = checkpoint_path(config.OUTPUT, epoch)
    atomic_save(state, path)
    logger.info(f"saved {path}")
    if config.KEEP_CHECKPOINTS > 0:
        for old in list_checkpoints(config.OUTPUT)[config.KEEP_CHECKPOINTS:]:
            os.remove(old)
            logger.info(f"removed {old} (KEEP_CHECKPOINTS {config.KEEP_CHECKPOINTS})")
    return path


def restore_checkpoint(checkpoint: Checkpoint, model: nn.Module, logger: logging.Logger,
                       optimizer: Optional[torch.optim.Optimizer] = None, scheduler: Optional[Scheduler] = None,
                       scaler: Optional[torch.amp.GradScaler] = None) -> Tuple[int, int, float]:
    """Restore weights and, when given and present, the training state; returns (next epoch, updates done, best
    accuracy). Weights must fit the model exactly. A weights-only file (a released checkpoint) starts at 0."""
    state, path = checkpoint.state, checkpoint.path
    try:
        report = load_weights(model, state, strict=True)
    except ValueError as err:
        raise UsageError(f"--resume {path}: {err}; to fine-tune from other weights use --pretrained") from None
    logger.info(f"resumed weights from {path}: {report.summary()}")
    max_accuracy = float(state.get("max_accuracy", 0.0))
    if optimizer is None or not all(k in state for k in ("optimizer", "lr_scheduler", "epoch")):
        return 0, 0, max_accuracy
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["lr_scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    logger.info(f"resumed training state from {path} (epoch {state['epoch']})")
    return state["epoch"] + 1, int(state.get("step", 0)), max_accuracy


def load_pretrained(path: str, model: nn.Module, logger: logging.Logger, unsafe: bool = False) -> None:
    """Weights only, for fine-tuning: a head of another class count is dropped (left freshly initialised) and
    relative-position tables are resized to this model's window size. Anything else that does not fit (e.g. the
    window-sized pooling weights of another window size) keeps its initial values, with a warning."""
    try:
        report = load_weights(model, read_checkpoint(path, logger, unsafe).state, strict=False,
                              drop_mismatched_head=True)
    except ValueError as err:
        raise UsageError(f"--pretrained {path}: {err}") from None
    if report.mismatched or report.unexpected:
        logger.warning(f"--pretrained {path} only partly fits the model; the rest keeps its initial values: "
                       f"{report.summary()}")
    else:
        logger.info(f"loaded pretrained weights from {path}: {report.summary()}")
