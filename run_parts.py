"""The run pieces classification (``main.py``) and the dense tasks (``dense/run.py``) share: learning-rate scaling,
the weight average (EMA), batch-norm consistency across processes, and the epoch's checkpoints (periodic with
rotation, the best one, and the unevaluated one a bad validation image leaves)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import torch.nn as nn
from timm.utils import ModelEmaV3, distribute_bn

from distributed import DistEnv
from errors import UsageError, user_message
from utils import BEST_CHECKPOINT, Checkpoint, save_checkpoint

# The rates a config scales with the total batch (those of its TRAIN node that it has).
SCALED_RATES = ("BASE_LR", "WARMUP_LR", "MIN_LR")


def scale_rates(config: Any, total_batch: int, reference_batch: int) -> float:
    """The linear rule (Swin, mmdetection's auto_scale_lr): the configured rates hold for ``reference_batch``
    images per optimizer update and scale with ``total_batch``. Returns the factor."""
    factor = total_batch / reference_batch
    config.defrost()
    for key in SCALED_RATES:
        if key in config.TRAIN:
            config.TRAIN[key] *= factor
    config.freeze()
    return factor


def create_ema(config: Any, model: nn.Module, checkpoint: Optional[Checkpoint]) -> Optional[ModelEmaV3]:
    """With ``MODEL_EMA``: timm's weight average of ``model``, from the checkpoint's average when it holds one (a
    checkpoint from before EMA was turned on starts it at the resumed weights). Call it after the DDP wrap, whose
    construction broadcasts rank 0's weights, so every process averages from the same start: a copy taken before
    holds each rank's own random initialisation (timm's first update happens to overwrite it)."""
    if not config.MODEL_EMA:
        return None
    ema = ModelEmaV3(model, decay=config.MODEL_EMA_DECAY)
    if checkpoint is not None and "model_ema" in checkpoint.state:
        ema.module.load_state_dict(checkpoint.state["model_ema"])
    return ema


def use_sync_batchnorm(model: nn.Module, config: Any, env: DistEnv, logger: logging.Logger) -> nn.Module:
    """With more than one process and ``MODEL.SYNC_BN``: batch norms become SyncBatchNorm, which normalises with
    the statistics of the whole batch across processes (torch implements it for GPUs only; on CPUs the running
    statistics are still averaged after every epoch by :func:`sync_batchnorm_buffers`)."""
    if not (env.distributed and config.MODEL.SYNC_BN) or not has_batchnorm(model):
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
    """Average batch-norm running statistics over processes (timm's ``distribute_bn``), so every rank evaluates
    and saves the same model. A no-op for one process or a model without batch norms."""
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
    """On the main process: the epoch checkpoint every ``SAVE_FREQ`` epochs and after the last (older ones
    rotated out by ``KEEP_CHECKPOINTS``), and ``ckpt_best.pth`` when the score ``improved``. ``state`` builds the
    checkpoint content only when something is saved. Returns the path of the epoch checkpoint, if one was
    written."""
    periodic = (epoch + 1) % config.SAVE_FREQ == 0 or epoch == config.TRAIN.EPOCHS - 1
    if not env.is_main or not (periodic or improved):
        return None
    content = state()
    path = save_checkpoint(config, content, logger) if periodic else None
    if improved:
        save_checkpoint(config, content, logger, name=BEST_CHECKPOINT)
    return path


def keep_unevaluated_epoch(err: UsageError, config: Any, env: DistEnv, epoch: int,
                           state: Callable[[], Dict[str, Any]], logger: logging.Logger) -> UsageError:
    """An unreadable validation image shows up only after a whole epoch of training: the main process saves that
    epoch before the run stops, so that fixing the image loses no training. Returns the error to stop with."""
    if not env.is_main:
        return err
    saved = save_checkpoint(config, state(), logger)
    return UsageError(f"{user_message(err)}. Epoch {epoch}'s training is saved in {saved}: once the image is fixed, "
                      f"the same command resumes after it (that epoch stays unevaluated)")
