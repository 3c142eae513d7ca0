"""The command line and the run of a dense-prediction task: the task supplies its data, model, loss and evaluation
as a :class:`Task`, which :func:`training_task` hands to the one training driver (``engine.fit``) that
classification uses too, started by the same ``engine.launch`` and ``engine.command_line`` as ``main.py``."""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence

import torch
import torch.nn as nn
from torch.utils.data import Dataset

import engine
from config import UsageError, get_config, run_parser
from dense.images import loader
from engine import DatasetClasses, DistEnv, Precision, Scores, TaskData, build_precision, command_line, fit, launch
from lr_scheduler import build_dense_scheduler
from optimizer import param_groups
from utils import check_classes, load_backbone, restore_checkpoint, resume_checkpoint, stored_ema

from .backbone import DenseBackbone

def parse_args(description: str, argv: Optional[Sequence[str]] = None,
               prog: Optional[str] = None) -> argparse.Namespace:
    parser, _ = run_parser(prog, description, "dataset root (see the get_started guide of the task)")
    return parser.parse_args(argv)


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
    count; ``score_name`` what the log calls the score."""
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
    score_name: str = "score"


def training_task(task: Task) -> engine.Task:
    """The dense task as :func:`engine.fit` drives it: its data through :func:`loader`, AdamW over the parameter
    groups, mmdetection's schedules, and the backbone as what ``--pretrained`` loads."""
    def build_data(config: Any, env: DistEnv, logger: logging.Logger) -> TaskData:
        train_set, val_set, num_classes = task.build_data(config, env, logger)
        return TaskData(loader(train_set, config, env, task.collate, train=True), val_set, num_classes,
                        task.class_record(config, train_set))

    def evaluate(config: Any, model: nn.Module, data: TaskData, env: DistEnv, precision: Precision,
                 logger: logging.Logger, which: str = "network") -> Scores:
        if which != "network":
            logger.info(f"{which}:")
        score = task.evaluate(config, model, data.val, env, precision, logger)
        return Scores(score, {"val/score": score})

    return engine.Task(
        name=task.name, build_data=build_data,
        build_model=lambda config, num_classes, env, logger: build_dense_model(task, config, num_classes, env, logger),
        build_optimizer=lambda config, model: torch.optim.AdamW(param_groups(model, config.TRAIN.WEIGHT_DECAY),
                                                                lr=config.TRAIN.BASE_LR,
                                                                betas=tuple(config.TRAIN.BETAS)),
        build_scheduler=build_dense_scheduler, losses=lambda config, data: task.losses, evaluate=evaluate,
        load_pretrained=lambda config, model, logger, unsafe: load_backbone(config.MODEL.PRETRAINED,
                                                                            task.backbone(model), logger, unsafe,
                                                                            config),
        score_name=task.score_name)


def build_dense_model(task: Task, config: Any, num_classes: int, env: DistEnv, logger: logging.Logger) -> nn.Module:
    """The task's model; backbone arguments of the right kinds that do not go together (two depths and four head
    counts) are one line, not the model's traceback (the config rules have checked each on its own)."""
    try:
        model = task.build_model(config, num_classes).to(env.device)
    except (TypeError, ValueError, IndexError, AssertionError, ArithmeticError) as err:
        raise UsageError(f"the model cannot be built from MODEL.BACKBONE {config.MODEL.BACKBONE} with "
                         f"MODEL.BACKBONE_ARGS {dict(config.MODEL.BACKBONE_ARGS)} and MODEL.OUT_INDICES "
                         f"{list(config.MODEL.OUT_INDICES)}: {err}") from None
    changed = ", ".join(f"{key} {value}" for key, value in config.MODEL.BACKBONE_ARGS.items())
    logger.info(f"model {config.MODEL.NAME}: {sum(p.numel() for p in model.parameters())} parameters, "
                f"{num_classes} classes, backbone {config.MODEL.BACKBONE}{f' with {changed}' if changed else ''} "
                f"({sum(p.numel() for p in task.backbone(model).parameters()) / 1e6:.1f}M parameters)")
    return model


def evaluate_checkpoint(task: Task, config: Any, env: DistEnv, logger: logging.Logger, unsafe: bool) -> None:
    """``--eval``: the weights of ``--resume`` (or the newest checkpoint of the run) on the validation set, which
    must hold the classes the checkpoint records; then its EMA weights, if it holds them."""
    precision = build_precision(config.AMP_OPT_LEVEL, env.device)
    _, val_set, num_classes = task.build_data(config, env, logger)
    model = build_dense_model(task, config, num_classes, env, logger)
    checkpoint = resume_checkpoint(config, logger, unsafe)
    if not checkpoint:
        raise UsageError(f"--eval needs weights: pass --resume <checkpoint> (no checkpoint to auto-resume in "
                         f"{config.OUTPUT})")
    classes = task.class_record(config, val_set)
    if classes:
        check_classes(checkpoint, classes.names, classes.kind, classes.source, classes.ids, True, classes.first_output)
    restore_checkpoint(checkpoint, model, logger, config=config)
    task.evaluate(config, model, val_set, env, precision, logger)
    ema_weights = stored_ema(checkpoint.state, checkpoint.source, config, logger)
    if ema_weights is not None:  # scored as main.py --eval scores them
        model.load_state_dict(ema_weights)
        logger.info("EMA model:")
        task.evaluate(config, model, val_set, env, precision, logger)


def run(task: Task, argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> None:
    """Train the task's model (:func:`engine.fit`), or with ``--eval`` score a checkpoint."""
    args = parse_args(f"Focal Transformer {task.name}: training and evaluation.", argv, prog)
    config = get_config(args, task.defaults, task.rules)

    def train_or_evaluate(env: DistEnv, logger: logging.Logger) -> None:
        if config.EVAL_MODE:
            evaluate_checkpoint(task, config, env, logger, args.unsafe_load)
        else:
            fit(training_task(task), config, env, logger, args.unsafe_load)
    launch(config, args.device, train_or_evaluate)


def main(task: Task, prog: str) -> None:
    """The ``python -m <task>.train`` entry point."""
    command_line(prog, lambda: run(task, prog=f"python -m {prog}"))
