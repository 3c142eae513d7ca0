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
import os
import sys
from typing import Any, Iterable, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3

from cli import HelpFormatter
from config import get_config
from data import build_mixup, build_train_loader, build_val_loader
from data.class_map import checkpoint_classes, logit_indices
from data.datasets import CheckedImages, check_val_labels
from distributed import DEVICES, DistEnv, all_reduce_sum, init_distributed, shutdown, wrap_ddp
from engine import (AMP_MODES, EvalResult, Precision, build_precision, classification_losses, evaluate, throughput,
                    train_one_epoch)
from errors import TrainingError, UsageError, error_text, user_message
from logger import create_tensorboard_writer, scalars_to
from lr_scheduler import build_scheduler
from models import ConfigError, build_model, head_classes
from models.kernels import optimize_for
from optimizer import build_optimizer
from run_lock import leaving, locked_run, stop_on_signals
from run_parts import BestScore, check_classes, create_ema, keep_unevaluated_epoch, save_epoch, scale_rates
from utils import (Checkpoint, diverged, latest_checkpoint, load_pretrained, read_checkpoint, restore_checkpoint,
                   save_config, seed_everything, training_epochs, training_state)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="main.py", formatter_class=HelpFormatter,
                                     description="Focal Transformer training, evaluation and throughput.")
    parser.add_argument("--cfg", required=True, metavar="FILE", help="config file (YAML)")
    parser.add_argument("--opts", nargs="+", action="extend", default=None, metavar="KEY VALUE",
                        help="override config keys, e.g. --opts TRAIN.EPOCHS 100 DATA.NUM_WORKERS 4")
    parser.add_argument("--batch-size", type=int, help="batch size per process (DATA.BATCH_SIZE)")
    parser.add_argument("--data-path", help="dataset root in the ImageNet folder or zip layout")
    parser.add_argument("--zip", action="store_true", help="read train.zip/val.zip with their map files")
    parser.add_argument("--cache-mode", choices=("no", "part", "full"),
                        help="zip layout only: keep no images, this process's shard, or all of them in memory")
    parser.add_argument("--pretrained", metavar="FILE", help="initial weights only (e.g. a released checkpoint)")
    parser.add_argument("--resume", metavar="FILE", help="checkpoint to continue training from, or to evaluate")
    parser.add_argument("--unsafe-load", action="store_true",
                        help="DANGEROUS: also load checkpoints that need full unpickling (not tensors only); "
                             "unpickling runs any code the file carries, so use it only for files you trust")
    parser.add_argument("--accumulation-steps", type=int, help="micro-batches per optimizer update")
    parser.add_argument("--use-checkpoint", action="store_true", help="gradient checkpointing to save memory")
    parser.add_argument("--model-ema", action="store_true",
                        help="keep an exponential moving average of the weights (MODEL_EMA, decay MODEL_EMA_DECAY)")
    parser.add_argument("--compile", nargs="?", const="inductor", metavar="BACKEND",
                        help="torch.compile the model for training and evaluation (COMPILE; default backend "
                             "inductor)")
    amp = parser.add_mutually_exclusive_group()
    amp.add_argument("--amp", choices=AMP_MODES,
                     help="autocast precision (default: bf16 on GPUs that support it, else fp16 with a gradient scaler "
                          "on CUDA; none on CPU)")
    amp.add_argument("--disable-amp", action="store_true", help="same as --amp none")
    parser.add_argument("--channels-last", action="store_true",
                        help="convolution weights in NHWC layout (CHANNELS_LAST): cuDNN's tensor-core kernels prefer "
                             "it; only the patch embeddings are convolutions")
    parser.add_argument("--tf32", action="store_true",
                        help="float32 matrix multiplications in TF32 on CUDA GPUs from Ampere on (TF32); speeds up "
                             "runs without --amp at about 1e-3 relative precision")
    parser.add_argument("--output", metavar="PATH", help="output root; the run writes to <output>/<model>/<tag>")
    parser.add_argument("--tag", help="experiment tag (default: 'default')")
    parser.add_argument("--tensorboard", action="store_true",
                        help="write loss, learning rate and accuracy as TensorBoard events to the run's output "
                             "folder (needs `pip install tensorboard`)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--eval", action="store_true", help="evaluate only")
    mode.add_argument("--throughput", nargs="?", type=int, const=True, metavar="PASSES",
                      help="measure inference throughput only: PASSES timed forward passes after as many untimed "
                           "ones, at most 50 (THROUGHPUT_PASSES, default 30)")
    parser.add_argument("--seed", type=int, help="random seed (each process adds its rank)")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="auto: CUDA when available, else CPU")
    # torch.distributed.launch passes --local-rank as well as setting LOCAL_RANK, which distributed.py reads: the
    # flag is accepted so that such launches parse, and otherwise ignored.
    parser.add_argument("--local-rank", "--local_rank", type=int, dest="local_rank", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def load_run_config(args: argparse.Namespace) -> Any:
    """The merged config, with bad files, keys or values (see ``config.RULES``) reported as usage errors."""
    try:
        config = get_config(args)
    except ConfigError:  # names its key already
        raise
    except (KeyError, ValueError, AssertionError, FileNotFoundError) as err:
        raise UsageError(f"config (--cfg {args.cfg} / --opts): {error_text(err)}") from None
    if not config.DATA.DATA_PATH and not config.THROUGHPUT_MODE:
        raise UsageError("--data-path (DATA.DATA_PATH) is required for training and evaluation; "
                         "only --throughput runs without data")
    return config


def build_criterion(config: Any, mixup: bool) -> nn.Module:
    """Soft targets with Mixup (which already smooths labels), else label smoothing, else plain cross-entropy."""
    if mixup:
        return SoftTargetCrossEntropy()
    if config.MODEL.LABEL_SMOOTHING > 0:
        return LabelSmoothingCrossEntropy(smoothing=config.MODEL.LABEL_SMOOTHING)
    return nn.CrossEntropyLoss()


def resume_checkpoint(config: Any, logger: logging.Logger, unsafe: bool) -> Optional[Checkpoint]:
    """``--resume`` when given; otherwise, with ``TRAIN.AUTO_RESUME``, the newest readable checkpoint in the
    output folder (a truncated or corrupt newer one is skipped with a warning)."""
    if config.MODEL.RESUME:
        return read_checkpoint(config.MODEL.RESUME, logger, unsafe)
    if not config.TRAIN.AUTO_RESUME:
        return None
    checkpoint = latest_checkpoint(config.OUTPUT, logger, unsafe)
    if checkpoint:
        logger.info(f"auto-resuming from {checkpoint.path}")
        if config.MODEL.PRETRAINED and not config.EVAL_MODE:
            logger.info(f"--pretrained {config.MODEL.PRETRAINED} is not loaded: the run continues from its own "
                        f"checkpoint (start a new run under another --tag to fine-tune afresh)")
    return checkpoint


def run_throughput(config: Any, env: DistEnv, model: nn.Module, precision: Precision,
                   logger: logging.Logger) -> None:
    """Time one batch: the first validation batch, or random images when there is no ``--data-path``."""
    if config.DATA.DATA_PATH:
        images = next(iter(build_val_loader(config, env)[1]))[0]
    else:
        size = config.DATA.IMG_SIZE
        logger.info(f"no --data-path: timing random {size}x{size} input")
        images = torch.randn(config.DATA.BATCH_SIZE, config.MODEL.FOCAL.IN_CHANS, size, size)
    throughput(model, images.to(env.device), precision, config.THROUGHPUT_PASSES, config.PRINT_FREQ)


def log_accuracy(logger: logging.Logger, result: EvalResult, which: str = "network") -> None:
    """Over the images actually evaluated (with ``DATA.SKIP_BAD_IMAGES``, unreadable ones are not among them)."""
    logger.info(f"Accuracy of the {which} on the {result.num_images} test images: {result.acc1:.1f}%")


def compiled(model: nn.Module, config: Any) -> nn.Module:
    """``torch.compile(model)`` with the ``COMPILE`` backend, or the model itself when it is empty."""
    return torch.compile(model, backend=config.COMPILE) if config.COMPILE else model


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
    ema_weights = None
    if config.MODEL.PRETRAINED and not config.MODEL.RESUME:
        stored_classes = load_pretrained(config.MODEL.PRETRAINED, model, logger, unsafe_load, evaluating=True,
                                         min_loaded=config.MODEL.PRETRAINED_MIN_LOADED)
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
        ema_weights = checkpoint.state.get("model_ema")
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


def validate(config: Any, env: DistEnv, model: nn.Module, ema: Optional[ModelEmaV3], loader: Iterable,
             dataset: CheckedImages, precision: Precision, logger: logging.Logger,
             epoch: int) -> Tuple[EvalResult, float]:
    """Evaluate the model (and its EMA); returns the model's result and the score that picks the best checkpoint
    (the EMA's when there is one). A non-finite validation loss is a ``TrainingError``: the weights went bad
    without a non-finite training loss (a huge last update of the epoch), and must not be saved as the best."""
    results = [("network", evaluate(config, model, loader, precision, env.device))]
    log_accuracy(logger, results[0][1])
    log_skipped_images(dataset, "validation", logger)
    if ema is not None:
        results.append(("EMA model", evaluate(config, ema.module, loader, precision, env.device)))
        log_accuracy(logger, results[1][1], "EMA model")
    for which, result in results:
        if not math.isfinite(result.loss):
            raise TrainingError(f"the validation loss of the {which} is {result.loss} after epoch {epoch}")
    return results[0][1], results[-1][1].acc1


def run_training(config: Any, env: DistEnv, model: nn.Module, precision: Precision, logger: logging.Logger,
                 unsafe_load: bool) -> None:
    """Train from ``TRAIN.START_EPOCH`` (or where a resumed checkpoint left off), evaluating after every epoch.

    Data, weights and TensorBoard are all checked before the run writes anything besides its log, and the config
    file is rewritten only once the first epoch has been evaluated, so a run refused for bad input leaves an
    earlier run's files in the output folder as they were. An unreadable validation image shows up only after an
    epoch of training; that epoch is saved before the run stops, so fixing the image loses no training.
    """
    train_dataset, train_loader = build_train_loader(config, env)
    val_dataset, val_loader = build_val_loader(config, env)
    check_val_labels(train_dataset.dataset, val_dataset.dataset)
    mixup_fn = build_mixup(config)
    accum = config.TRAIN.ACCUMULATION_STEPS
    updates_per_epoch = len(train_loader) // accum
    if updates_per_epoch == 0:
        raise UsageError(f"--accumulation-steps {accum} exceeds the {len(train_loader)} batches per epoch")
    optimizer = build_optimizer(config, model)
    scheduler = build_scheduler(config, optimizer, updates_per_epoch)

    start_epoch, best = config.TRAIN.START_EPOCH, BestScore()
    checkpoint = resume_checkpoint(config, logger, unsafe_load)
    class_names = getattr(train_dataset.dataset, "classes", None)  # the folder layout's class folders
    if checkpoint:
        check_classes(checkpoint, class_names, "class folders", f"{config.DATA.DATA_PATH}/train")
        start_epoch, step, saved_best = restore_checkpoint(checkpoint, model, logger, optimizer, precision.scaler,
                                                           config)
        best.update(saved_best)
        if step and step != start_epoch * updates_per_epoch:
            logger.warning(f"{checkpoint.path} was saved after {step} updates, but {start_epoch} epochs of this run "
                           f"make {start_epoch * updates_per_epoch}: batch size, accumulation or data changed, "
                           f"and the schedule continues from the latter")
        if start_epoch >= config.TRAIN.EPOCHS:
            raise UsageError(f"{checkpoint.path} has already trained {start_epoch} of TRAIN.EPOCHS "
                             f"{config.TRAIN.EPOCHS} epochs: nothing to train; raise TRAIN.EPOCHS to go on, or "
                             f"evaluate it with --eval")
    elif config.MODEL.PRETRAINED:
        load_pretrained(config.MODEL.PRETRAINED, model, logger, unsafe_load,
                        min_loaded=config.MODEL.PRETRAINED_MIN_LOADED)
    scheduler.step_update(start_epoch * updates_per_epoch)  # the rate this run's schedule gives the next update
    last_good = checkpoint.path if checkpoint else None
    tensorboard = create_tensorboard_writer(config.OUTPUT) if config.TENSORBOARD and env.is_main else None
    model_without_ddp = model
    if env.distributed:
        model = wrap_ddp(model, env)
    ema = create_ema(config, model_without_ddp, checkpoint)  # after the wrap: from rank 0's broadcast weights
    train_model = compiled(model, config)
    eval_model = compiled(model_without_ddp, config) if env.distributed else train_model
    losses = classification_losses(build_criterion(config, mixup_fn is not None), mixup_fn)

    def state_after(epoch: int) -> dict:
        return training_state(config, epoch, (epoch + 1) * updates_per_epoch, model_without_ddp, best.value, optimizer,
                              scheduler, precision.scaler, ema.module if ema else None, class_names)

    logger.info(f"start training: epochs {start_epoch}..{config.TRAIN.EPOCHS - 1}, {updates_per_epoch} updates "
                f"per epoch, total batch {config.DATA.BATCH_SIZE * env.world_size * accum}")
    for epoch in training_epochs(config, env.rank, train_loader.sampler, start_epoch, logger):
        try:
            stats = train_one_epoch(config, train_model, losses, train_loader, updates_per_epoch, optimizer,
                                    scheduler, precision, epoch, env.device, ema, model_without_ddp,
                                    scalars_to(tensorboard))
        except TrainingError as err:
            raise diverged(err, last_good) from None
        log_skipped_images(train_dataset, "training", logger)
        try:
            result, score = validate(config, env, eval_model, ema, val_loader, val_dataset, precision, logger, epoch)
        except TrainingError as err:
            raise diverged(err, last_good) from None
        except UsageError as err:  # an unreadable validation image, found after a whole epoch of training
            raise keep_unevaluated_epoch(err, config, env, epoch, lambda: state_after(epoch), logger) from None
        if env.is_main and epoch == start_epoch:
            save_config(config, logger)  # only now: a run that fails on its data leaves the previous one's
        improved = best.update(score)  # the first epoch of a fresh run always counts as the best so far
        logger.info(f"Max accuracy{' (EMA)' if ema else ''}: {best.value:.2f}%")
        if tensorboard is not None:
            for tag, value in (("train/epoch_loss", stats.loss), ("val/acc1", result.acc1),
                               ("val/acc5", result.acc5), ("val/loss", result.loss)):
                tensorboard.add_scalar(tag, value, (epoch + 1) * updates_per_epoch)  # the per-update axis
            tensorboard.flush()
        last_good = save_epoch(config, env, epoch, improved, lambda: state_after(epoch), logger) or last_good
    if tensorboard is not None:
        tensorboard.close()


def run(config: Any, env: DistEnv, unsafe_load: bool = False) -> None:
    scale_rates(config, config.DATA.BATCH_SIZE * env.world_size * config.TRAIN.ACCUMULATION_STEPS)
    with locked_run(config.OUTPUT, env.rank) as logger:
        backend = f", backend {torch.distributed.get_backend()}" if env.distributed else ""
        logger.info(f"rank {env.rank} of {env.world_size} on {env.device}{backend}, pid {os.getpid()}")
        run_mode(config, env, logger, unsafe_load)


def run_mode(config: Any, env: DistEnv, logger: logging.Logger, unsafe_load: bool) -> None:
    """Build the model, then train, evaluate or time it."""
    seed_everything(config.SEED, env.rank, 0)
    if env.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        if config.TF32:
            torch.set_float32_matmul_precision("high")
            logger.info("float32 matrix multiplications in TF32 (--tf32)")
    precision = build_precision(config.AMP_OPT_LEVEL, env.device)

    logger.info(f"creating model {config.MODEL.TYPE}/{config.MODEL.NAME}")
    model = build_model(config).to(env.device)
    if config.CHANNELS_LAST:
        model = model.to(memory_format=torch.channels_last)  # inputs follow: a convolution takes its weight's layout
        logger.info("convolution weights in channels-last (NHWC) layout (--channels-last)")
    logger.info(f"device kernels: {', '.join(optimize_for(model, env.device)) or 'none (plain PyTorch)'}")
    logger.info(f"number of params: {sum(p.numel() for p in model.parameters() if p.requires_grad)}")
    logger.info(f"number of GFLOPs: {model.flops() / 1e9:.3f}")
    if config.THROUGHPUT_MODE:
        run_throughput(config, env, model, precision, logger)
    elif config.EVAL_MODE:
        run_evaluation(config, env, model, precision, logger, unsafe_load)
    else:
        run_training(config, env, model, precision, logger, unsafe_load)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    config = load_run_config(args)
    env = init_distributed(args.device)
    try:
        run(config, env, args.unsafe_load)
    finally:
        shutdown()


if __name__ == "__main__":
    stop_on_signals()
    try:
        main()
    except (UsageError, ConfigError, TrainingError) as err:
        sys.exit(f"main.py: error: {user_message(err)}")
    finally:
        leaving()
