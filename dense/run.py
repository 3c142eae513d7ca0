"""The command line and the run of a dense-prediction task, wired as ``main.py`` wires classification: the same
config machinery, output lock, logger, signals, AMP, checkpoints (atomic, checksummed, auto-resumed) and process
group; the task supplies its data, model, loss and evaluation as a :class:`Task`."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from cli import HelpFormatter
from data.build import worker_count
from data.samplers import ShardSampler
from distributed import DEVICES, DistEnv, init_distributed, shutdown, wrap_ddp
from engine import AMP_MODES, build_precision, train_one_epoch
from errors import TrainingError, UsageError, user_message
from logger import create_tensorboard_writer, scalars_to
from models import ConfigError
from models.checkpoint import extract_state_dict, load_weights
from lr_scheduler import build_dense_scheduler
from optimizer import param_groups
from run_lock import leaving, locked_run, quiet_worker_teardown, stop_on_signals
from run_parts import (BestScore, check_classes, create_ema, keep_unevaluated_epoch, save_epoch, scale_rates,
                       sync_batchnorm_buffers, use_sync_batchnorm)
from utils import (diverged, latest_checkpoint, read_checkpoint, restore_checkpoint, save_config, seed_everything,
                   training_epochs, training_state)

from .backbone import DenseBackbone
from .config import get_task_config

# A backbone checkpoint of a classifier carries these, which a backbone does not have.
CLASSIFIER_KEYS = ("head.", "norm.")


def parse_args(description: str, argv: Optional[Sequence[str]] = None,
               prog: Optional[str] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)
    parser.add_argument("--cfg", required=True, metavar="FILE", help="config file (YAML)")
    parser.add_argument("--opts", nargs="+", action="extend", default=None, metavar="KEY VALUE",
                        help="override config keys, e.g. --opts TRAIN.EPOCHS 24 DATA.NUM_WORKERS 4")
    parser.add_argument("--data-path", help="dataset root (see the get_started guide of the task)")
    parser.add_argument("--batch-size", type=int, help="training images per process (DATA.BATCH_SIZE)")
    parser.add_argument("--pretrained", metavar="FILE",
                        help="classification checkpoint (ours or a released one) to start the backbone from")
    parser.add_argument("--resume", metavar="FILE", help="checkpoint to continue training from, or to evaluate")
    parser.add_argument("--unsafe-load", action="store_true",
                        help="DANGEROUS: also load checkpoints that need full unpickling; only for trusted files")
    amp = parser.add_mutually_exclusive_group()
    amp.add_argument("--amp", choices=AMP_MODES,
                     help="autocast precision (default: bf16 on GPUs that support it, else fp16 on CUDA; none on CPU)")
    amp.add_argument("--disable-amp", action="store_true", help="same as --amp none")
    parser.add_argument("--output", metavar="PATH", help="output root; the run writes to <output>/<name>/<tag>")
    parser.add_argument("--tag", help="experiment tag (default: 'default')")
    parser.add_argument("--eval", action="store_true", help="evaluate --resume (or the newest checkpoint) only")
    parser.add_argument("--seed", type=int, help="random seed (each process adds its rank)")
    parser.add_argument("--model-ema", action="store_true", help="keep a moving average of the weights (MODEL_EMA)")
    parser.add_argument("--use-checkpoint", action="store_true",
                        help="gradient checkpointing in the backbone (TRAIN.USE_CHECKPOINT)")
    parser.add_argument("--tensorboard", action="store_true",
                        help="write per-update loss, learning rate and gradient norm as TensorBoard events "
                             "(TENSORBOARD; needs `pip install tensorboard`)")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="auto: CUDA when available, else CPU")
    parser.add_argument("--local-rank", "--local_rank", type=int, dest="local_rank", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


class DatasetClasses(NamedTuple):
    """What a data set's classes are, for its checkpoints to record and a resume or ``--eval`` to compare (see
    ``run_parts.check_classes``): their ``names`` (with their COCO category ``ids`` in detection), the file that
    gives them (``source``) and what messages call them (``kind``), and the output of the first class
    (``first_output``: a detector's output 0 is the background)."""
    source: str
    kind: str
    names: List[str]
    ids: Optional[List[int]] = None
    first_output: int = 0


def unnamed_classes(config: Any, dataset: Dataset) -> Optional[DatasetClasses]:
    """A task whose data names no classes: its checkpoints hold only their count (in the weights' shapes)."""
    return None


@dataclass
class Task:
    """What a task supplies. ``build_data(config, env, logger)`` returns (train set, val set, number of classes),
    checked before anything is written; ``losses(model, batch, device)`` the named losses of a training batch;
    ``evaluate(config, model, val_set, env, precision, logger)`` the score (higher is better) after logging its
    summary; ``backbone(model)`` the :class:`DenseBackbone` that ``--pretrained`` loads into;
    ``class_record(config, dataset)`` the :class:`DatasetClasses` of a set, or None where it knows only their
    count."""
    name: str
    defaults: Any
    rules: Sequence[Any]
    build_data: Callable[..., tuple]
    build_model: Callable[[Any, int], nn.Module]
    collate: Callable
    losses: Callable[[nn.Module, Any, torch.device], Dict[str, torch.Tensor]]
    evaluate: Callable[..., float]
    backbone: Callable[[nn.Module], DenseBackbone]
    class_record: Callable[[Any, Dataset], Optional[DatasetClasses]] = unnamed_classes


def load_backbone(path: str, backbone: DenseBackbone, logger: logging.Logger, unsafe: bool = False) -> None:
    """Backbone weights from ``path``: a dense checkpoint of this backbone (the network and its output norms,
    found under whatever prefix the task's model gives them) or a classification checkpoint (ours or a released
    one) for the network alone, position tables resized to the window size and the classifier's head and final
    norm left out; the output norms then start fresh, as the log line says. Anything else is refused: a partly
    random backbone is a silent mistake."""
    try:
        weights = extract_state_dict(read_checkpoint(path, logger, unsafe).state)
    except ValueError as err:
        raise UsageError(f"--pretrained {path}: {err}") from None
    own = list(backbone.state_dict())
    prefix = next((key[:-len(own[0])] for key in weights if key.endswith(own[0])), None)
    if prefix is not None and f"{prefix}{own[-1]}" in weights:
        dense = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        # A checkpoint whose model took more stages (Mask R-CNN, segmentation: norm0..3) than this one (RetinaNet,
        # FCOS: norm1..3) carries norms this backbone has no use for: left out, not a misfit.
        unused = [f"norm{i}" for i in range(len(backbone.network.layers)) if i not in backbone.out_indices
                  and f"norm{i}.weight" in dense]
        dense = {k: v for k, v in dense.items() if k.split(".", 1)[0] not in unused}
        try:
            report = load_weights(backbone, dense)
        except ValueError as err:
            raise UsageError(f"--pretrained {path}: its backbone ({prefix}*) does not fit: {err}") from None
        left_out = f"; left out (stages this backbone does not output): {', '.join(unused)}" if unused else ""
        logger.info(f"loaded backbone weights and output norms from the dense checkpoint {path}: "
                    f"{report.summary()}{left_out}")
        return
    report = load_weights(backbone.network, weights, strict=False)
    report.unexpected = [k for k in report.unexpected if not k.startswith(CLASSIFIER_KEYS)]
    if not report.clean:
        raise UsageError(f"--pretrained {path} does not fit the backbone ({report.summary()}); is it a checkpoint "
                         f"of MODEL.BACKBONE with these MODEL.BACKBONE_ARGS?")
    fresh = [name for name, module in backbone.named_children()
             if name != "body" and next(module.parameters(), None) is not None]
    logger.info(f"loaded backbone weights from {path}: {report.summary()}; created fresh (a classification "
                f"checkpoint has no such layers): {', '.join(fresh) or 'none'}")


def loader(dataset: Dataset, config: Any, env: DistEnv, collate: Callable, train: bool) -> DataLoader:
    """Training: the whole set reshuffled every epoch (``sampler.set_epoch``) and split evenly between processes;
    evaluation: strided shards (see ``data.samplers``), every image exactly once across processes."""
    if train:
        sampler = DistributedSampler(dataset, env.world_size, env.rank, shuffle=True, seed=config.SEED,
                                     drop_last=True)
    else:
        sampler = ShardSampler(len(dataset), env.rank, env.world_size)
    batch = config.DATA.BATCH_SIZE if train else config.DATA.TEST_BATCH_SIZE
    return DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=worker_count(config.DATA.NUM_WORKERS),
                      pin_memory=config.DATA.PIN_MEMORY and env.device.type == "cuda", drop_last=train,
                      collate_fn=collate, worker_init_fn=quiet_worker_teardown)


class Trained(NamedTuple):
    """What :func:`fit` leaves: the model (without the DDP wrapper) and its weight average, if any."""
    model: nn.Module
    ema: Optional[ModelEmaV3]


def fit(task: Task, config: Any, env: DistEnv, logger: logging.Logger, unsafe: bool) -> Trained:
    """Train (or with ``--eval`` only evaluate) the task's model."""
    seed_everything(config.SEED, env.rank, 0)
    precision = build_precision(config.AMP_OPT_LEVEL, env.device)
    train_set, val_set, num_classes = task.build_data(config, env, logger)
    model = task.build_model(config, num_classes).to(env.device)
    changed = ", ".join(f"{key} {value}" for key, value in config.MODEL.BACKBONE_ARGS.items())
    logger.info(f"model {config.MODEL.NAME}: {sum(p.numel() for p in model.parameters())} parameters, "
                f"{num_classes} classes, backbone {config.MODEL.BACKBONE}{f' with {changed}' if changed else ''} "
                f"({sum(p.numel() for p in task.backbone(model).parameters()) / 1e6:.1f}M parameters)")
    checkpoint = None
    if config.MODEL.RESUME:
        checkpoint = read_checkpoint(config.MODEL.RESUME, logger, unsafe)
    elif config.TRAIN.AUTO_RESUME:
        checkpoint = latest_checkpoint(config.OUTPUT, logger, unsafe)
        if checkpoint:
            logger.info(f"auto-resuming from {checkpoint.path}")
    classes = task.class_record(config, val_set if config.EVAL_MODE else train_set)  # the set the run labels with
    if checkpoint and classes:
        check_classes(checkpoint, classes.names, classes.kind, classes.source, classes.ids, config.EVAL_MODE,
                      classes.first_output)
    if config.EVAL_MODE:
        if not checkpoint:
            raise UsageError(f"--eval needs weights: pass --resume <checkpoint> (no checkpoint to auto-resume in "
                             f"{config.OUTPUT})")
        restore_checkpoint(checkpoint, model, logger)
        task.evaluate(config, model, val_set, env, precision, logger)
        return Trained(model, None)

    model = use_sync_batchnorm(model, config, env, logger)
    train_loader = loader(train_set, config, env, task.collate, train=True)
    updates_per_epoch = len(train_loader) // config.TRAIN.ACCUMULATION_STEPS
    if updates_per_epoch == 0:
        raise UsageError(f"--batch-size {config.DATA.BATCH_SIZE} x {env.world_size} processes x "
                         f"TRAIN.ACCUMULATION_STEPS {config.TRAIN.ACCUMULATION_STEPS} exceeds the {len(train_set)} "
                         f"training images")
    optimizer = torch.optim.AdamW(param_groups(model, config.TRAIN.WEIGHT_DECAY), lr=config.TRAIN.BASE_LR,
                                  betas=tuple(config.TRAIN.BETAS))
    scheduler = build_dense_scheduler(config, optimizer, updates_per_epoch)
    start_epoch, best = 0, BestScore()
    if checkpoint:
        start_epoch, _, saved_best = restore_checkpoint(checkpoint, model, logger, optimizer, precision.scaler,
                                                        config)
        best.update(saved_best)
        if start_epoch >= config.TRAIN.EPOCHS:
            raise UsageError(f"{checkpoint.path} has already trained {start_epoch} of TRAIN.EPOCHS "
                             f"{config.TRAIN.EPOCHS} epochs: nothing to train; evaluate it with --eval")
    elif config.MODEL.PRETRAINED:
        load_backbone(config.MODEL.PRETRAINED, task.backbone(model), logger, unsafe)
    scheduler.step_update(start_epoch * updates_per_epoch)
    train_model = model
    if env.distributed:
        # Building the wrapper broadcasts rank 0's weights and buffers; batch-norm statistics are then kept equal
        # by SyncBatchNorm (GPUs) and averaged after every epoch (sync_batchnorm_buffers).
        train_model = wrap_ddp(model, env)
    ema = create_ema(config, model, checkpoint)
    tensorboard = create_tensorboard_writer(config.OUTPUT) if config.TENSORBOARD and env.is_main else None
    last_good = checkpoint.path if checkpoint else None

    def state_after(epoch: int) -> dict:
        return training_state(config, epoch, (epoch + 1) * updates_per_epoch, model, max(best.value, 0.0), optimizer,
                              scheduler, precision.scaler, ema.module if ema else None,
                              classes.names if classes else None, classes.ids if classes else None)

    logger.info(f"start training: epochs {start_epoch}..{config.TRAIN.EPOCHS - 1}, {updates_per_epoch} updates per "
                f"epoch, total batch {config.TRAIN.LR_BATCH}")
    for epoch in training_epochs(config, env.rank, train_loader.sampler, start_epoch, logger):
        try:
            train_one_epoch(config, train_model, task.losses, train_loader, updates_per_epoch, optimizer, scheduler,
                            precision, epoch, env.device, ema, model, scalars_to(tensorboard))
        except TrainingError as err:
            raise diverged(err, last_good) from None
        sync_batchnorm_buffers(model, env)
        if ema is not None:
            sync_batchnorm_buffers(ema.module, env)
        last = epoch == config.TRAIN.EPOCHS - 1
        improved = False
        if (epoch + 1) % config.EVAL_FREQ == 0 or last:
            try:
                score = task.evaluate(config, model, val_set, env, precision, logger)
                if ema is not None:
                    logger.info("EMA model:")
                    score = task.evaluate(config, ema.module, val_set, env, precision, logger)
            except UsageError as err:  # an unreadable validation image, found after a whole epoch of training
                raise keep_unevaluated_epoch(err, config, env, epoch, lambda: state_after(epoch), logger) from None
            if tensorboard is not None:
                tensorboard.add_scalar("val/score", score, (epoch + 1) * updates_per_epoch)
                tensorboard.flush()
            improved = best.update(score)
        if env.is_main and epoch == start_epoch:
            save_config(config, logger)
        saved = save_epoch(config, env, epoch, improved, lambda: state_after(epoch), logger)
        last_good = saved or last_good
    if tensorboard is not None:
        tensorboard.close()
    return Trained(model, ema)


def run(task: Task, argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> None:
    """Parse, check, join the process group, lock the output folder, log, and :func:`fit`."""
    args = parse_args(f"Focal Transformer {task.name}: training and evaluation.", argv, prog)
    config = get_task_config(args, task.defaults, task.rules)
    env = init_distributed(args.device)
    try:
        scale_rates(config, config.DATA.BATCH_SIZE * env.world_size * config.TRAIN.ACCUMULATION_STEPS)
        with locked_run(config.OUTPUT, env.rank) as logger:
            logger.info(f"rank {env.rank} of {env.world_size} on {env.device}, pid {os.getpid()}; learning rate "
                        f"{config.TRAIN.BASE_LR:.3g} for a total batch of {config.TRAIN.LR_BATCH}")
            fit(task, config, env, logger, args.unsafe_load)
    finally:
        shutdown()


def main(task: Task, prog: str) -> None:
    """The ``python -m <task>.train`` entry point: signals as in ``main.py``, one-line errors."""
    stop_on_signals()
    try:
        run(task, prog=f"python -m {prog}")
    except (UsageError, ConfigError, TrainingError) as err:
        sys.exit(f"{prog}: error: {user_message(err)}")
    finally:
        leaving()
