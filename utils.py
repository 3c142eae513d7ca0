"""Checkpoints: save the full training state, resume it (explicitly or automatically), load pretrained weights.

Our checkpoints keep the released layout (``{"model": state_dict, "epoch", "max_accuracy", ...}``) and add the
optimizer, scheduler and AMP scaler states plus the config as YAML text, so they load with ``weights_only=True``.
"""
from __future__ import annotations

import logging
import os
import pickle
import re
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn
from timm.scheduler.scheduler import Scheduler

from errors import UsageError
from models import load_weights

CHECKPOINT_NAME = re.compile(r"^ckpt_epoch_(\d+)\.pth$")


def read_checkpoint(path: str, logger: logging.Logger) -> Dict[str, Any]:
    """Load a checkpoint file on the CPU, tensors only when possible.

    Files saved by the reference code also pickle a yacs config; those need full unpickling, which runs code from
    the file, so it is done with a warning.
    """
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        logger.warning(f"{path} holds Python objects besides tensors (the reference pickled its config); "
                       f"loading it with full unpickling, so only use checkpoints you trust")
        return torch.load(path, map_location="cpu", weights_only=False)


def checkpoint_path(output_dir: str, epoch: int) -> str:
    return os.path.join(output_dir, f"ckpt_epoch_{epoch}.pth")


def find_latest_checkpoint(output_dir: str) -> Optional[str]:
    """The ``ckpt_epoch_<N>.pth`` in ``output_dir`` with the largest N, or None."""
    if not os.path.isdir(output_dir):
        return None
    epochs = [int(m.group(1)) for m in map(CHECKPOINT_NAME.match, os.listdir(output_dir)) if m]
    return checkpoint_path(output_dir, max(epochs)) if epochs else None


def save_checkpoint(config: Any, epoch: int, model: nn.Module, max_accuracy: float,
                    optimizer: torch.optim.Optimizer, scheduler: Scheduler, scaler: torch.amp.GradScaler,
                    logger: logging.Logger) -> str:
    """Write ``<OUTPUT>/ckpt_epoch_<epoch>.pth`` atomically (a crash mid-write leaves no truncated checkpoint)."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "max_accuracy": max_accuracy,
        "epoch": epoch,
        "config": config.dump(),
    }
    path = checkpoint_path(config.OUTPUT, epoch)
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)
    logger.info(f"saved {path}")
    return path


def load_checkpoint(path: str, model: nn.Module, optimizer: Optional[torch.optim.Optimizer],
                    scheduler: Optional[Scheduler], scaler: Optional[torch.amp.GradScaler],
                    logger: logging.Logger) -> Tuple[int, float]:
    """Restore weights and, when given and present, the training state; returns (next epoch, best accuracy).

    Weights must fit the model exactly. A weights-only file (a released checkpoint) starts at epoch 0.
    """
    checkpoint = read_checkpoint(path, logger)
    try:
        report = load_weights(model, checkpoint, strict=True)
    except ValueError as err:
        raise UsageError(f"--resume {path}: {err}; to fine-tune from other weights use --pretrained") from None
    logger.info(f"resumed weights from {path}: {report.summary()}")
    max_accuracy = float(checkpoint.get("max_accuracy", 0.0))
    if optimizer is None or not all(k in checkpoint for k in ("optimizer", "lr_scheduler", "epoch")):
        return 0, max_accuracy
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["lr_scheduler"])
    if scaler is not None and checkpoint.get("scaler"):
        scaler.load_state_dict(checkpoint["scaler"])
    logger.info(f"resumed training state from {path} (epoch {checkpoint['epoch']})")
    return checkpoint["epoch"] + 1, max_accuracy


def load_pretrained(path: str, model: nn.Module, logger: logging.Logger) -> None:
    """Weights only, for fine-tuning: a head of another class count is dropped (left freshly initialised) and
    relative-position tables are resized to this model's window size. Anything else that does not fit (e.g. the
    window-sized pooling weights of another window size) keeps its initial values, with a warning."""
    try:
        report = load_weights(model, read_checkpoint(path, logger), strict=False, drop_mismatched_head=True)
    except ValueError as err:
        raise UsageError(f"--pretrained {path}: {err}") from None
    if report.mismatched or report.unexpected:
        logger.warning(f"--pretrained {path} only partly fits the model; the rest keeps its initial values: "
                       f"{report.summary()}")
    else:
        logger.info(f"loaded pretrained weights from {path}: {report.summary()}")
