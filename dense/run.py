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
from models.checkpoint import extract_state_dict, load_weights
from optimizer import param_groups
from utils import (check_classes, log_load, meaning_changes, read_checkpoint, restore_checkpoint, resume_checkpoint,
                   stored_ema)

from .backbone import DenseBackbone

# A backbone checkpoint of a classifier carries these, which a backbone does not have.
CLASSIFIER_KEYS = ("head.", "norm.")


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


def load_backbone(path: str, backbone: DenseBackbone, logger: logging.Logger, unsafe: bool = False,
                  config: Any = None) -> None:
    """Backbone weights from ``path``: a dense checkpoint of this backbone (the network and its output norms,
    found under whatever prefix the task's model gives them) or a classification checkpoint (ours or a released
    one) for the network alone, position tables resized to the window size and the classifier's head and final
    norm left out; the output norms then start fresh, as the log line says. Anything else is refused: a partly
    random backbone is a silent mistake. A label convention of the checkpoint other than this run's (``config``)
    is said, and concerns only the decoder or heads, which are not loaded."""
    try:
        state = read_checkpoint(path, logger, unsafe).state
        weights = extract_state_dict(state)
    except ValueError as err:
        raise UsageError(f"--pretrained {path}: {err}") from None
    for key, old, new in meaning_changes(state.get("config"), config) if config is not None else []:
        logger.info(f"--pretrained {path} was trained with {key} {old} (this run: {new}): only its backbone is "
                    f"loaded, so its outputs' meaning does not carry over")
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
        left_out = f" (left out: {', '.join(unused)}, stages this backbone does not output)" if unused else ""
        log_load(logger, f"pretrained backbone and output norms{left_out} from the dense checkpoint {path}", report,
                 len(weights), len(own))
        return
    # A classification checkpoint made at a smaller image size lacks the neighbour tables of stages whose maps fit
    # in one window there but not at the dense task's sizes: they are derived from its window tables.
    report = load_weights(backbone.network, weights, strict=False, fit_geometry=True)
    report.unexpected = [k for k in report.unexpected if not k.startswith(CLASSIFIER_KEYS)]
    if not report.clean:
        raise UsageError(f"--pretrained {path} does not fit the backbone ({report.summary()}); is it a checkpoint "
                         f"of MODEL.BACKBONE with these MODEL.BACKBONE_ARGS?")
    fresh = [name for name in own if not name.startswith("body.")]  # a classification checkpoint has no such layers
    log_load(logger, f"pretrained backbone from {path}", report, len(weights), len(backbone.network.state_dict()),
             fresh)


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
