"""Train, evaluate or benchmark a Focal Transformer.

    python main.py --cfg CONFIG --data-path DATA [options]                      # one process, CPU or GPU
    torchrun --nproc_per_node N main.py --cfg CONFIG --data-path DATA [options] # N processes (DDP)

``--eval`` evaluates the weights of ``--resume`` (or ``--pretrained``); ``--throughput`` times forward passes,
on random input when there is no ``--data-path``. See get_started.md.
"""
from __future__ import annotations

import argparse
import logging
import math
from typing import Any, NamedTuple, Optional, Sequence

import timm
import torch
import torch.nn as nn
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch.utils.data import DataLoader

from config import CACHE_MODES, TrainingError, UsageError, get_config, run_parser
from data import build_mixup, build_train_loader, build_val_loader
from data.class_map import checkpoint_classes, logit_indices
from data.datasets import CheckedImages, check_val_labels
from engine import (DatasetClasses, DistEnv, EvalResult, LossFn, Precision, Scores, Task, TaskData, all_reduce_sum,
                    build_precision, classification_losses, command_line, compiled, evaluate, fit, launch, throughput)
from lr_scheduler import build_scheduler
from models import build_model, head_classes
from models.kernels import optimize_for
from optimizer import build_optimizer
from utils import load_pretrained, restore_checkpoint, resume_checkpoint, stored_ema


# What --throughput times beside the model: the released models' usual point of comparison (BENCHMARKS.md).
PEER = "swin_tiny_patch4_window7_224"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser, modes = run_parser("main.py", "Focal Transformer training, evaluation and throughput.",
                               "dataset root in the ImageNet folder or zip layout")
    parser.add_argument("--zip", action="store_true", help="read train.zip/val.zip with their map files")
    parser.add_argument("--cache-mode", choices=CACHE_MODES,
                        help="zip layout only: keep no images, this process's shard, or all of them in memory")
    parser.add_argument("--channels-last", action="store_true",
                        help="convolution weights in NHWC layout (CHANNELS_LAST): cuDNN's tensor-core kernels prefer "
                             "it; only the patch embeddings are convolutions")
    parser.add_argument("--tf32", action="store_true",
                        help="float32 matrix multiplications in TF32 on CUDA GPUs from Ampere on (TF32); speeds up "
                             "runs without --amp at about 1e-3 relative precision")
    modes.add_argument("--throughput", nargs="?", type=int, const=True, metavar="PASSES",
                       help="measure inference throughput only: PASSES timed forward passes after as many untimed "
                            "ones, at most 50 (THROUGHPUT_PASSES, default 30)")
    return parser.parse_args(argv)


def build_criterion(config: Any, mixup: bool) -> nn.Module:
    """Soft targets with Mixup (which already smooths labels), else label smoothing, else plain cross-entropy."""
    if mixup:
        return SoftTargetCrossEntropy()
    if config.MODEL.LABEL_SMOOTHING > 0:
        return LabelSmoothingCrossEntropy(smoothing=config.MODEL.LABEL_SMOOTHING)
    return nn.CrossEntropyLoss()


def run_throughput(config: Any, env: DistEnv, model: nn.Module, precision: Precision,
                   logger: logging.Logger) -> None:
    """Time one batch: the first validation batch, or random images when there is no ``--data-path``; then the
    same for timm's Swin-T (:data:`PEER`), so that the figure has something to be read against on this machine."""
    if config.DATA.DATA_PATH:
        images = next(iter(build_val_loader(config, env)[1]))[0]
    else:
        size = config.DATA.IMG_SIZE
        logger.info(f"no --data-path: timing random {size}x{size} input")
        images = torch.randn(config.DATA.BATCH_SIZE, config.MODEL.FOCAL.IN_CHANS, size, size)
    images = images.to(env.device)
    rate = throughput(model, images, precision, config.THROUGHPUT_PASSES, config.PRINT_FREQ)
    logger.info(f"the same for timm's {PEER} at this batch and size:")
    peer = timm.create_model(PEER, img_size=tuple(images.shape[-2:]), in_chans=images.shape[1]).to(env.device)
    peer_rate = throughput(peer, images, precision, config.THROUGHPUT_PASSES, config.PRINT_FREQ)
    logger.info(f"{config.MODEL.NAME}: {rate / peer_rate:.2f}x the throughput of {PEER}")


def log_accuracy(logger: logging.Logger, result: EvalResult, which: str = "network") -> None:
    """Over the images actually evaluated (with ``DATA.SKIP_BAD_IMAGES``, unreadable ones are not among them)."""
    logger.info(f"Accuracy of the {which} on the {result.num_images} test images: {result.acc1:.1f}%")


def log_skipped_images(dataset: CheckedImages, split: str, logger: logging.Logger) -> None:
    """With ``DATA.SKIP_BAD_IMAGES``: how many unreadable images all ranks left out since the last report."""
    count = int(all_reduce_sum(torch.tensor([dataset.take_skipped()])).item())
    if count:
        logger.warning(f"{count} unreadable {split} images were skipped (DATA.SKIP_BAD_IMAGES)")


def run_evaluation(config: Any, env: DistEnv, model: nn.Module, precision: Precision, logger: logging.Logger,
                   unsafe_load: bool) -> None:
    """Weights from ``--resume``, else ``--pretrained``, else the newest checkpoint of this run's output folder;
    a checkpoint holding EMA weights has them evaluated too. Class folders are matched to the checkpoint's classes
    by name, so a folder of some of them (ImageNet-A, -R) is scored on those logits only (``data.class_map``)."""
    if config.MODEL.PRETRAINED and not config.MODEL.RESUME:
        stored_classes = load_pretrained(config.MODEL.PRETRAINED, model, logger, unsafe_load, evaluating=True,
                                         min_loaded=config.MODEL.PRETRAINED_MIN_LOADED)
        ema_weights = stored_ema(None, f"--pretrained {config.MODEL.PRETRAINED}", config, logger)
    else:
        checkpoint = resume_checkpoint(config, logger, unsafe_load)
        if not checkpoint:
            raise UsageError(f"--eval needs weights: pass --resume <checkpoint> or --pretrained <checkpoint> "
                             f"(no checkpoint to auto-resume in {config.OUTPUT})")
        held = head_classes(checkpoint.state)
        if held is not None and held != config.MODEL.NUM_CLASSES:  # what to pass, not only which shapes differ
            raise UsageError(f"{checkpoint.source}: it classifies {held} classes and MODEL.NUM_CLASSES is "
                             f"{config.MODEL.NUM_CLASSES}; evaluate it with --opts MODEL.NUM_CLASSES {held}")
        restore_checkpoint(checkpoint, model, logger, config=config)
        ema_weights = stored_ema(checkpoint.state, checkpoint.source, config, logger)
        stored_classes = checkpoint.state.get("class_names")
    dataset, loader = build_val_loader(config, env, by_name=True)
    folders = getattr(dataset.dataset, "classes", None)  # the folder layout's; zip labels are class indices
    classes = checkpoint_classes(stored_classes, config.MODEL.NUM_CLASSES)
    indices = (logit_indices(folders, classes, config.MODEL.NUM_CLASSES, f"{config.DATA.DATA_PATH}/val", logger)
               if folders else None)
    log_accuracy(logger, evaluate(config, compiled(model, config), loader, precision, env.device, indices))
    log_skipped_images(dataset, "validation", logger)
    if ema_weights is not None:
        model.load_state_dict(ema_weights)
        log_accuracy(logger, evaluate(config, compiled(model, config), loader, precision, env.device, indices),
                     "EMA model")


def evaluate_epoch(config: Any, model: nn.Module, data: TaskData, env: DistEnv, precision: Precision,
                   logger: logging.Logger, which: str = "network") -> Scores:
    """Accuracy on the validation set, after counting the images the epoch skipped. A non-finite validation loss
    is a ``TrainingError``: the weights went bad without a non-finite training loss (a huge last update of the
    epoch), and must not be saved as the best."""
    if which == "network":
        log_skipped_images(data.val.train_images, "training", logger)
    result = evaluate(config, model, data.val.loader, precision, env.device)
    log_accuracy(logger, result, which)
    if which == "network":
        log_skipped_images(data.val.images, "validation", logger)
    if not math.isfinite(result.loss):
        raise TrainingError(f"the validation loss of the {which} is {result.loss}")
    return Scores(result.acc1, {"val/acc1": result.acc1, "val/acc5": result.acc5, "val/loss": result.loss})


class Validation(NamedTuple):
    """What evaluation after an epoch reads: the validation loader, and both sets of images for the counts of
    unreadable ones skipped (``DATA.SKIP_BAD_IMAGES``)."""
    loader: DataLoader
    images: CheckedImages
    train_images: CheckedImages


def build_data(config: Any, env: DistEnv, logger: logging.Logger) -> TaskData:
    """ImageNet-layout folders (or zips): the class folders' names are what the checkpoints record."""
    train_dataset, train_loader = build_train_loader(config, env)
    val_dataset, val_loader = build_val_loader(config, env)
    check_val_labels(train_dataset.dataset, val_dataset.dataset)
    names = getattr(train_dataset.dataset, "classes", None)  # the folder layout's class folders
    classes = DatasetClasses(f"{config.DATA.DATA_PATH}/train", "class folders", names) if names else None
    return TaskData(train_loader, Validation(val_loader, val_dataset, train_dataset), config.MODEL.NUM_CLASSES, classes)


def training_losses(config: Any, data: TaskData) -> LossFn:
    mixup_fn = build_mixup(config)
    return classification_losses(build_criterion(config, mixup_fn is not None), mixup_fn)


def build_classifier(config: Any, num_classes: int, env: DistEnv, logger: logging.Logger) -> nn.Module:
    """The configured model (``num_classes`` is ``MODEL.NUM_CLASSES``) on the run's device, with the device
    kernels and memory layout asked for."""
    logger.info(f"creating model {config.MODEL.TYPE}/{config.MODEL.NAME}")
    model = build_model(config).to(env.device)
    if config.CHANNELS_LAST:
        model = model.to(memory_format=torch.channels_last)  # inputs follow: a convolution takes its weight's layout
        logger.info("convolution weights in channels-last (NHWC) layout (--channels-last)")
    logger.info(f"device kernels: {', '.join(optimize_for(model, env.device)) or 'none (plain PyTorch)'}")
    logger.info(f"number of params: {sum(p.numel() for p in model.parameters() if p.requires_grad)}")
    logger.info(f"number of GFLOPs: {model.flops() / 1e9:.3f}")
    return model


def load_weights_only(config: Any, model: nn.Module, logger: logging.Logger, unsafe: bool) -> None:
    load_pretrained(config.MODEL.PRETRAINED, model, logger, unsafe, min_loaded=config.MODEL.PRETRAINED_MIN_LOADED)


CLASSIFICATION = Task(name="classification", build_data=build_data, build_model=build_classifier,
                      build_optimizer=build_optimizer, build_scheduler=build_scheduler, losses=training_losses,
                      evaluate=evaluate_epoch, load_pretrained=load_weights_only, score_name="accuracy",
                      score_unit="%")


def run_mode(config: Any, env: DistEnv, logger: logging.Logger, unsafe_load: bool) -> None:
    """Train, evaluate or time the model."""
    if env.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        if config.TF32:
            torch.set_float32_matmul_precision("high")
            logger.info("float32 matrix multiplications in TF32 (--tf32)")
    if not (config.THROUGHPUT_MODE or config.EVAL_MODE):
        fit(CLASSIFICATION, config, env, logger, unsafe_load)
        return
    precision = build_precision(config.AMP_OPT_LEVEL, env.device)
    model = build_classifier(config, config.MODEL.NUM_CLASSES, env, logger)
    if config.THROUGHPUT_MODE:
        run_throughput(config, env, model, precision, logger)
    else:
        run_evaluation(config, env, model, precision, logger, unsafe_load)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    config = get_config(args)
    launch(config, args.device, lambda env, logger: run_mode(config, env, logger, args.unsafe_load))


if __name__ == "__main__":
    command_line("main.py", main)
