"""The run pieces classification (``main.py``) and the dense tasks (``dense/run.py``) share: learning-rate scaling,
the weight average (EMA), batch-norm consistency across processes, the epoch's checkpoints (periodic with
rotation, the best one, and the unevaluated one a bad validation image leaves), and the check that a resumed
checkpoint was trained on the data's classes."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch.nn as nn
from timm.utils import ModelEmaV3, distribute_bn

from distributed import DistEnv
from errors import UsageError, user_message
from utils import BEST_CHECKPOINT, LAST_CHECKPOINT, Checkpoint, save_checkpoint

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
    rotated out by ``KEEP_CHECKPOINTS``), else ``ckpt_last.pth`` in its place, so a stop loses no finished epoch;
    and ``ckpt_best.pth`` when the score ``improved``. Returns the path of the resumable checkpoint written."""
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
    """An unreadable validation image shows up only after a whole epoch of training: the main process saves that
    epoch before the run stops, so that fixing the image loses no training. Returns the error to stop with."""
    if not env.is_main:
        return err
    saved = save_checkpoint(config, state(), logger)
    return UsageError(f"{user_message(err)}. Epoch {epoch}'s training is saved in {saved}: once the image is fixed, "
                      f"the same command resumes after it (that epoch stays unevaluated)")


# What one output of a model means: a class name, or (category id, name) for a detector on COCO annotations.
ClassIdentity = Union[str, Tuple[int, str]]


def class_identities(names: Optional[Sequence[str]], ids: Optional[Sequence[int]] = None) -> List[ClassIdentity]:
    """The names, each paired with its category id when there are ids: a renamed and a re-id'ed category both
    count as another class."""
    if not names:
        return []
    return list(names) if ids is None else [(int(i), str(name)) for i, name in zip(ids, names)]


def describe_class(identity: ClassIdentity) -> str:
    """As a refusal names it: the quoted name, and the category id when there is one."""
    return f"'{identity[1]}' (category id {identity[0]})" if isinstance(identity, tuple) else f"'{identity}'"


def check_classes(checkpoint: Checkpoint, names: Optional[Sequence[str]], kind: str, source: str,
                  ids: Optional[Sequence[int]] = None, evaluating: bool = False, first_output: int = 0) -> None:
    """Labels are positions in a list of classes (sorted class folders, sorted category ids, label values), so
    resuming on other classes than those the checkpoint records would go on teaching each output another class
    from the first difference on, and evaluating would score it as one: refused, naming the difference (``kind``
    of classes ``source`` holds; output numbers start at ``first_output``). Checkpoints that record no classes
    (older or released ones) and data that names none (the zip layout, a segmentation set without class names)
    have nothing to compare."""
    stored = class_identities(checkpoint.state.get("class_names"), checkpoint.state.get("category_ids"))
    current = class_identities(names, ids)
    if not stored or not current or stored == current:
        return
    index = next((i for i, (old, new) in enumerate(zip(stored, current)) if old != new), min(len(stored), len(current)))
    there, here = (describe_class(found[index]) if index < len(found) else "none" for found in (stored, current))
    if evaluating:
        outcome = "evaluating would score its outputs as other classes. Evaluate it on the classes it was trained on"
    else:
        weights = f"--pretrained {checkpoint.path}"
        hint = (f"Start a new run under another --tag or --output ({weights} there starts from its weights)"
                if checkpoint.auto else f"{weights} starts from its weights in a new run")
        outcome = f"resuming would train its outputs on other classes. {hint}"
    raise UsageError(f"{checkpoint.source}: it was trained on other {kind} than {source} holds: output "
                     f"{index + first_output} is {there} there and {here} here; {outcome}")
