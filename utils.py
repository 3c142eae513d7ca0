"""Checkpoints: read them safely, write them atomically, find the newest good one, restore the training state, and
load weights only (``--pretrained``) into a classifier or a dense task's backbone.

Our checkpoints keep the released layout (``{"model": state_dict, "epoch", "max_accuracy", ...}``) and add the
optimizer, scheduler and AMP scaler states, the update count and the config as YAML text: tensors and plain
containers only, so they load with ``weights_only=True`` and loading them runs no code from the file.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import hashlib
import logging
import os
import pickle
import random
import re
import shutil
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import yaml
from timm.scheduler.scheduler import Scheduler

from config import TrainingError, UsageError
from logger import FILE_ONLY, duration
from models import LoadReport, extract_state_dict, load_weights

CHECKPOINT_NAME = re.compile(r"^ckpt_epoch_(\d+)\.pth$")
# The checkpoint of the epoch with the best validation top-1 (of the EMA model when MODEL_EMA is on).
BEST_CHECKPOINT = "ckpt_best.pth"
# The state after the newest epoch that SAVE_FREQ keeps no epoch file of (timm's last.pth): auto-resume never
# loses a finished epoch; the next epoch file replaces it.
LAST_CHECKPOINT = "ckpt_last.pth"
# What :func:`atomic_write` names its temporary files: ``.<name>.<pid>.<8 hex digits>.tmp``.
TEMPORARY_NAME = re.compile(r"^\..+\.\d+\.[0-9a-f]{8}\.tmp$")
# The key under which a checkpoint carries the digest of the rest of its content.
CHECKSUM_KEY = "content_blake2b"
# The reference release pickled its yacs config into every checkpoint. Reading it as a plain ordered mapping
# keeps loading safe (no yacs code runs); we never use that config.
SAFE_GLOBALS = [(OrderedDict, "yacs.config.CfgNode")]
UNSAFE_HINT = ("--unsafe-load unpickles it anyway, which runs whatever code the file carries: use it only for "
               "files from a source you trust")


class UnreadableCheckpoint(UsageError):
    """The file is truncated, corrupt or holds non-finite weights (not merely unsafe): auto-resume passes over it."""


@dataclass
class Checkpoint:
    path: str
    state: Dict[str, Any]
    auto: bool = False  # found by auto-resume in the run's output folder, not named with --resume

    @property
    def source(self) -> str:
        """How messages name it: as the user gave it, or as auto-resume found it."""
        return f"auto-resume from {self.path} (TRAIN.AUTO_RESUME)" if self.auto else f"--resume {self.path}"

    def restart_hint(self, suggestion: str) -> str:
        """What to do instead of resuming it; an auto-resumed run can also start afresh elsewhere."""
        if self.auto:
            return f"{suggestion}, or start a new run under another --tag or --output"
        return suggestion


def _unsafe_detail(path: str) -> str:
    """What besides tensors and plain containers the file asks the unpickler for, when torch can tell."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (ValueError, RuntimeError):  # not torch's zip format: an old-style or bare pickle
        return "it is not a tensors-only PyTorch checkpoint"
    return f"it needs {', '.join(names[:5])}" if names else "it uses pickle operations beyond tensors and containers"


def content_digest(state: Any) -> str:
    """A digest of every tensor byte, key and value of a checkpoint object, in order: torch's zip container does
    not check its CRCs on reading, so without this a flipped bit in a tensor loads silently as a changed weight."""
    digest = hashlib.blake2b(digest_size=20)

    def feed(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            tensor = obj.detach().cpu().contiguous()
            digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(obj, Mapping):
            digest.update(f"D{len(obj)}".encode())
            for key, value in obj.items():
                feed(key)
                feed(value)
        elif isinstance(obj, (list, tuple)):
            digest.update(f"L{len(obj)}".encode())
            for value in obj:
                feed(value)
        else:
            digest.update(f"V{obj!r}".encode())
    feed(state)
    return digest.hexdigest()


def named_tensors(tree: Any, prefix: str = "") -> Iterator[Tuple[str, torch.Tensor]]:
    """Every tensor of a checkpoint object (nested mappings and sequences), in order, with its dotted path."""
    if isinstance(tree, torch.Tensor):
        yield prefix or "<tensor>", tree
    elif isinstance(tree, Mapping):
        for key, value in tree.items():
            yield from named_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(tree, (list, tuple)):
        for index, value in enumerate(tree):
            yield from named_tensors(value, f"{prefix}.{index}" if prefix else str(index))


def first_non_finite(tree: Any) -> Optional[str]:
    """The name (dotted path) of the first floating tensor holding NaN or infinity, in order; None if all are finite.

    A checksum only proves the file is what was written: weights that went NaN before a save (or were written that
    way by another tool) pass it, and would evaluate to chance accuracy or train into a NaN loss."""
    return next((name for name, tensor in named_tensors(tree)
                 if (tensor.is_floating_point() or tensor.is_complex()) and not torch.isfinite(tensor).all()), None)


def verify_checksum(path: str, state: Any) -> None:
    """Checkpoints we wrote carry :func:`content_digest` of their content; others (released files) have none."""
    if not isinstance(state, dict) or CHECKSUM_KEY not in state:
        return
    expected = state.pop(CHECKSUM_KEY)
    if content_digest(state) != expected:
        raise UnreadableCheckpoint(f"checkpoint {path} is damaged: its content does not match the checksum saved "
                                   f"with it")


def read_checkpoint(path: str, logger: Optional[logging.Logger] = None, unsafe: bool = False) -> Checkpoint:
    """Load on the CPU with ``weights_only=True``; a file that needs arbitrary unpickling is refused unless
    ``unsafe`` (``--unsafe-load``). Truncated, corrupt or damaged files raise ``UnreadableCheckpoint``."""
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive; older torch and bare pickles start with the pickle protocol marker
    if not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")):
        raise UnreadableCheckpoint(f"cannot read checkpoint {path}: it is not a PyTorch checkpoint "
                                   f"(neither torch.save's zip format nor a pickle)")
    try:
        if unsafe:
            if logger is not None:
                logger.warning(f"--unsafe-load: fully unpickling {path}; any code in it runs now")
            state = torch.load(path, map_location="cpu", weights_only=False)
        else:
            with torch.serialization.safe_globals(SAFE_GLOBALS):
                state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if unsafe:
            raise UnreadableCheckpoint(f"cannot read checkpoint {path}: it is corrupt") from None
        raise UsageError(f"refusing to load checkpoint {path}: {_unsafe_detail(path)}; {UNSAFE_HINT}") from None
    except Exception as err:  # whatever a damaged file makes the unpickler or the zip reader raise
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UnreadableCheckpoint(f"cannot read checkpoint {path} (truncated or corrupt): {reason}") from None
    verify_checksum(path, state)
    bad = first_non_finite(state)
    if bad:
        raise UnreadableCheckpoint(f"checkpoint {path} holds non-finite values (NaN or infinity) in {bad}: its weights "
                                   f"are unusable; take an earlier checkpoint")
    return Checkpoint(path, state)


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
    """The newest checkpoint in ``output_dir`` that can be read, by epoch: the epoch files and
    :data:`LAST_CHECKPOINT`. Truncated or corrupt ones are skipped with a warning naming them (a crash, a full
    disk). Files refused as unsafe stop the search: they are not damage."""
    last = None
    if os.path.isfile(os.path.join(output_dir, LAST_CHECKPOINT)):
        try:
            last = replace(read_checkpoint(os.path.join(output_dir, LAST_CHECKPOINT), logger, unsafe), auto=True)
        except UnreadableCheckpoint as err:
            logger.warning(f"auto-resume skips {os.path.join(output_dir, LAST_CHECKPOINT)}: {err}")
    for path in list_checkpoints(output_dir):
        if last is not None and last.state.get("epoch", -1) >= int(CHECKPOINT_NAME.match(os.path.basename(path))[1]):
            return last
        try:
            return replace(read_checkpoint(path, logger, unsafe), auto=True)
        except UnreadableCheckpoint as err:
            logger.warning(f"auto-resume skips {path}: {err}")
    return last


def missing_folders(folder: str) -> List[str]:
    """``folder`` and those of its parents that do not exist yet, deepest first."""
    missing = []
    folder = os.path.abspath(folder)
    while not os.path.exists(folder):
        missing.append(folder)
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    return missing


def ensure_writable_folder(folder: str, flag: str) -> None:
    """Create ``folder`` if needed and check that files can be made in it, before any long work: otherwise say
    in one line, naming ``flag``, why it cannot be used (read-only, a file in the way, no permission, a name too
    long), and remove the parents it made on the way (a path can fail after its first folders were made)."""
    created = missing_folders(folder)
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write_test.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        open(probe, "x").close()
        os.remove(probe)
    except OSError as err:
        for path in created:  # deepest first; one another process wrote to meanwhile stays
            with contextlib.suppress(OSError):
                os.rmdir(path)
        raise UsageError(f"{flag}: cannot write to {folder}: {err.strerror or err}") from None


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


def remove_stale_temporaries(folder: str, logger: logging.Logger) -> None:
    """Delete what saves killed mid-write left behind. One run owns an output folder at a time (see
    ``run_lock``), so no temporary file there belongs to a live writer."""
    for name in os.listdir(folder):
        if TEMPORARY_NAME.match(name):
            os.remove(os.path.join(folder, name))
            logger.info(f"removed {os.path.join(folder, name)}, left by an interrupted save")


def save_failure(err: BaseException, folder: str, state: Any) -> str:
    """Why a save failed, in words: torch's zip writer reports a full disk as an internal position mismatch."""
    needed = sum(tensor.numel() * tensor.element_size() for _, tensor in named_tensors(state))  # about the file size
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    if getattr(err, "errno", None) == errno.ENOSPC or (free is not None and free < needed):
        room = f"{free / 2 ** 20:.0f} MB free, " if free is not None else ""
        return f"no space left on the device ({room}the checkpoint needs about {needed / 2 ** 20:.0f} MB)"
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def save_checkpoint(config: Any, state: Dict[str, Any], logger: logging.Logger, name: Optional[str] = None) -> str:
    """Write ``state`` (see :func:`training_state`) to ``<OUTPUT>/<name>`` (default ``ckpt_epoch_<epoch>.pth``)
    atomically with a checksum of its content, then keep only the newest ``KEEP_CHECKPOINTS`` epoch files, the one
    just written counting as the newest (a run resumed from an older epoch may find higher epochs of an abandoned
    run). A failed write (a full disk) is a ``TrainingError`` naming the file."""
    state = {**state, CHECKSUM_KEY: content_digest(state)}
    path = os.path.join(config.OUTPUT, name) if name else checkpoint_path(config.OUTPUT, state["epoch"])
    remove_stale_temporaries(config.OUTPUT, logger)
    try:
        atomic_save(state, path)
    except (OSError, RuntimeError) as err:  # torch reports a full disk as a RuntimeError from its zip writer
        raise TrainingError(f"cannot save checkpoint {path}: {save_failure(err, config.OUTPUT, state)}; nothing was "
                            f"written (check free space and permissions of {config.OUTPUT})") from None
    logger.info(f"saved {path}")
    if config.KEEP_CHECKPOINTS > 0 and not name:
        for old in [p for p in list_checkpoints(config.OUTPUT) if p != path][config.KEEP_CHECKPOINTS - 1:]:
            os.remove(old)
            logger.info(f"removed {old} (KEEP_CHECKPOINTS {config.KEEP_CHECKPOINTS})")
    return path


def training_state(config: Any, epoch: int, step: int, model: nn.Module, max_accuracy: float,
                   optimizer: torch.optim.Optimizer, scheduler: Scheduler, scaler: torch.amp.GradScaler,
                   ema: Optional[nn.Module] = None, class_names: Optional[List[str]] = None,
                   category_ids: Optional[List[int]] = None) -> Dict[str, Any]:
    """Everything a checkpoint holds: the released layout (``model``, ``epoch``, ``max_accuracy``) plus what
    resuming and prediction need (optimizer, scaler, update count, config, EMA weights, class names, and the COCO
    category ids of a detector's classes: what each output means, see ``check_classes``)."""
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
    if ema is not None:
        state["model_ema"] = ema.state_dict()
    if class_names:
        state["class_names"] = list(class_names)
    if category_ids:
        state["category_ids"] = [int(i) for i in category_ids]
    return state


def _flatten(tree: Any, prefix: str = "") -> Dict[str, Any]:
    """``{"A.B": value}`` for a nested mapping (a yacs node, or a YAML-loaded dict)."""
    if not isinstance(tree, Mapping):
        return {prefix: tree}
    flat = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


# Keys that say how a run was started, not what it trains: their changes on resume are not worth a line.
RUN_KEYS = {"MODEL.RESUME", "MODEL.PRETRAINED", "TRAIN.AUTO_RESUME", "TRAIN.START_EPOCH", "EVAL_MODE",
            "THROUGHPUT_MODE", "OUTPUT"}


# Settings that decide the shapes of a model's weights (its focal layouts follow the image size).
SHAPE_KEYS = ("DATA.IMG_SIZE", "MODEL.TYPE", "MODEL.FOCAL.")


def _changed(saved: Any, config: Any) -> List[Tuple[str, Any, Any]]:
    """``(KEY, old, new)`` for every setting that differs between a checkpoint's config and this run's."""
    if isinstance(saved, str):
        try:
            saved = yaml.safe_load(saved)
        except yaml.YAMLError:
            return []
    if not isinstance(saved, Mapping):
        return []
    old, new = _flatten(saved), _flatten(config)
    return [(key, old[key], new[key]) for key in new
            if key in old and key not in RUN_KEYS and _plain(old[key]) != _plain(new[key])]


def config_changes(saved: Any, config: Any) -> List[str]:
    """``KEY old -> new`` for every setting that differs between a checkpoint's config and this run's."""
    return [f"{key} {old!r} -> {new!r}" for key, old, new in _changed(saved, config)]


def shape_changes(saved: Any, config: Any) -> str:
    """``"; it was trained with KEY old (this config: new), ..."`` for the settings of :data:`SHAPE_KEYS` that differ
    from a checkpoint's config, else ``""``: why its weights do not fit, said as the keys to pass."""
    changes = [f"{key} {_plain(old)} (this config: {_plain(new)})" for key, old, new in _changed(saved, config)
               if key.startswith(SHAPE_KEYS)]
    return f"; it was trained with {', '.join(changes)}" if changes else ""


# Settings that decide what each output of a model means (segmentation's label convention, which every checkpoint
# records in its config): another value would score or train each output on another class's pixels, silently.
MEANING_KEYS = ("DATA.REDUCE_ZERO_LABEL",)


def meaning_changes(saved: Any, config: Any) -> List[Tuple[str, Any, Any]]:
    """``(KEY, old, new)`` for the :data:`MEANING_KEYS` a checkpoint's config (``saved``) has otherwise; none for a
    checkpoint without one (not ours)."""
    return [(key, old, new) for key, old, new in _changed(saved, config) if key in MEANING_KEYS]


def check_meaning(checkpoint: Checkpoint, config: Any) -> None:
    """Refuse a checkpoint whose :data:`MEANING_KEYS` differ from this run's, naming the key and its value."""
    changes = meaning_changes(checkpoint.state.get("config"), config)
    if changes:
        key, old, new = changes[0]
        raise UsageError(f"{checkpoint.source}: it was trained with {key} {old} and this run has {new}, so every "
                         f"output would mean another class; pass --opts {key} {old}")


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def optimizer_kind(group: Mapping[str, Any]) -> str:
    """Which of our optimizers a parameter group belongs to, from the hyper-parameters it holds."""
    return "adamw" if "betas" in group else "sgd" if "momentum" in group else "unknown"


def restore_checkpoint(checkpoint: Checkpoint, model: nn.Module, logger: logging.Logger,
                       optimizer: Optional[torch.optim.Optimizer] = None, scaler: Optional[torch.amp.GradScaler] = None,
                       config: Any = None) -> Tuple[int, int, float]:
    """Restore weights and, when given and present, the optimizer and scaler state (the weight average is
    ``engine.create_ema``'s); returns (next epoch, updates done, best accuracy). Weights must fit the model
    exactly. A weights-only file (a released checkpoint) starts at 0.

    Settings that decide what the outputs mean must be the checkpoint's (:func:`check_meaning`). Otherwise the
    config is the truth: the optimizer keeps its moments but takes its hyper-parameters (rates, decay, betas)
    from this run's, and the caller rebuilds the learning-rate schedule from this run's config rather than loading
    the saved one. Changed settings are logged; a change of optimizer type is refused.
    """
    state, path = checkpoint.state, checkpoint.path
    if config is not None:
        check_meaning(checkpoint, config)
    training = optimizer is not None and all(k in state for k in ("optimizer", "epoch"))
    try:
        report = load_weights(model, state, strict=True, resize=not training)
    except ValueError as err:
        hint = checkpoint.restart_hint(f"to train this model from these weights start a new run with --pretrained "
                                       f"{path}" if training else "to fine-tune from other weights use --pretrained")
        shapes = shape_changes(state.get("config"), config) if config is not None else ""
        raise UsageError(f"{checkpoint.source}: {err}{shapes}; {hint}") from None
    logger.info(f"resumed weights from {path}: {report.summary()}")
    max_accuracy = float(state.get("max_accuracy", 0.0))
    if not training:
        return 0, 0, max_accuracy
    saved_groups = state["optimizer"].get("param_groups", [])
    saved_kind, kind = (optimizer_kind(g[0]) if g else "unknown" for g in (saved_groups, optimizer.param_groups))
    if saved_kind != kind:
        hint = checkpoint.restart_hint(f"resume with {saved_kind}, or start from its weights with --pretrained {path}")
        raise UsageError(f"{checkpoint.source}: it was trained with TRAIN.OPTIMIZER.NAME {saved_kind}, this run asks "
                         f"for {kind}, and optimizer state cannot carry over; {hint}")
    configured = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError) as err:
        raise UsageError(f"{checkpoint.source}: its optimizer state does not fit this model's parameters: "
                         f"{err}") from None
    for group, settings in zip(optimizer.param_groups, configured):
        group.update(settings)
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    changes = config_changes(state.get("config"), config) if config is not None else []
    if changes:
        logger.info(f"resuming with a changed config: {'; '.join(changes)}; the optimizer keeps its state and "
                    f"the learning-rate schedule follows this run's config")
    logger.info(f"resumed training state from {path} (epoch {state['epoch']})")
    if config is not None:
        warn_of_later_checkpoints(config.OUTPUT, state["epoch"], logger)
    return state["epoch"] + 1, int(state.get("step", 0)), max_accuracy


def resume_checkpoint(config: Any, logger: logging.Logger, unsafe: bool) -> Optional[Checkpoint]:
    """``--resume`` when given; otherwise, with ``TRAIN.AUTO_RESUME``, the newest readable checkpoint in the
    output folder (a truncated or corrupt newer one is skipped with a warning)."""
    if config.MODEL.RESUME:
        return read_checkpoint(config.MODEL.RESUME, logger, unsafe)
    if not config.TRAIN.AUTO_RESUME:
        return None
    checkpoint = latest_checkpoint(config.OUTPUT, logger, unsafe)
    if not checkpoint and not config.EVAL_MODE:
        logger.info(f"auto-resume (TRAIN.AUTO_RESUME): no checkpoint to resume from in {config.OUTPUT}")
    if checkpoint:
        logger.info(f"auto-resuming from {checkpoint.path}")
        if config.MODEL.PRETRAINED and not config.EVAL_MODE:
            logger.info(f"--pretrained {config.MODEL.PRETRAINED} is not loaded: the run continues from its own "
                        f"checkpoint (start a new run under another --tag to fine-tune afresh)")
    return checkpoint


def stored_ema(state: Optional[Dict[str, Any]], source: str, config: Any, logger: logging.Logger) -> Optional[Dict]:
    """The EMA weights a checkpoint holds, which ``--eval`` scores after the model's; ``--model-ema`` on weights
    without them (``state`` None: not a checkpoint of ours) is said, not ignored."""
    weights = state.get("model_ema") if state else None
    if weights is None and config.MODEL_EMA:
        logger.warning(f"--model-ema (MODEL_EMA): {source} holds no EMA weights; only the model is evaluated")
    return weights


def warn_of_later_checkpoints(output_dir: str, epoch: int, logger: logging.Logger) -> None:
    """Auto-resume takes the highest epoch in the output folder: a run resumed from an older epoch (``--resume``)
    into a folder holding later epochs of an abandoned run would, after a stop, go on from the abandoned run's
    until this one has overwritten them. Said once, at the start, naming them."""
    later = [path for path in list_checkpoints(output_dir)
             if int(CHECKPOINT_NAME.match(os.path.basename(path)).group(1)) > epoch]
    if later:
        names = ", ".join(os.path.basename(path) for path in later[:3]) + (", ..." if len(later) > 3 else "")
        logger.warning(f"{output_dir} holds later epochs than the resumed epoch {epoch} ({names}), from an earlier "
                       f"run: until this run overwrites them, auto-resume after a stop would go on from those; "
                       f"remove them, or resume under another --tag or --output")


def load_pretrained(path: str, model: nn.Module, logger: logging.Logger, unsafe: bool = False,
                    evaluating: bool = False, min_loaded: float = 0.5) -> Optional[List[str]]:
    """Weights only, for fine-tuning: a head of another class count is dropped (left freshly initialised), and
    position tables and pooling kernels are carried over to this model's windows (another image, window or
    focal-window size). Ends with the lines of :func:`log_load`.

    Refused: weights that fill less than ``min_loaded`` of the model's tensors (``MODEL.PRETRAINED_MIN_LOADED``:
    most likely a checkpoint of another architecture, which would train a mostly random model), and, for
    ``--eval``, weights that leave any part of the model (e.g. the classifier) at its random initial values.
    Returns the class names the file stores (main.py's checkpoints do), if any.
    """
    state = read_checkpoint(path, logger, unsafe).state
    try:
        size = len(extract_state_dict(state))
        report = load_weights(model, state, strict=False, drop_mismatched_head=True)
    except ValueError as err:
        raise UsageError(f"--pretrained {path}: {err}") from None
    total = len(model.state_dict())
    loaded = total - len(report.missing) - len(report.mismatched)
    if loaded == 0 or loaded < min_loaded * total:
        raise UsageError(f"--pretrained {path}: only {loaded} of this model's {total} tensors find a match in it "
                         f"({report.summary()}); is it a checkpoint of the --cfg model? To start from so partial a "
                         f"transfer anyway, lower MODEL.PRETRAINED_MIN_LOADED (now {min_loaded:g})")
    if evaluating and (report.missing or report.mismatched):
        raise UsageError(f"--eval --pretrained {path}: it leaves part of the model at random initial values "
                         f"({report.summary()}); evaluate with the config it was trained with (class count, sizes)")
    if report.unexpected:
        logger.info(f"--pretrained {path}: ignored {len(report.unexpected)} tensors this model has no place for: "
                    f"{', '.join(report.unexpected)}")
    log_load(logger, f"pretrained {path}", report, size, total)
    return state.get("class_names") if isinstance(state, dict) else None


# A backbone checkpoint of a classifier carries these, which a backbone does not have.
CLASSIFIER_KEYS = ("head.", "norm.")


def load_backbone(path: str, backbone: nn.Module, logger: logging.Logger, unsafe: bool = False,
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


def log_load(logger: logging.Logger, source: str, report: LoadReport, checkpoint_size: int, model_size: int,
             fresh: Sequence[str] = (), limit: int = 3) -> None:
    """What a weights-only load did, counted in the checkpoint's tensors (``checkpoint_size``; tensors the model
    derives from them are not among its loaded ones) into a model of ``model_size`` tensors, and naming the
    resized, the derived and those left at initial values (``fresh``: parts outside the loaded model), at most
    ``limit`` of each on the console; a line for the log file alone names them all. Tools may parse the first:
    ``<source>: <N> of its <C> tensors loaded; <R> resized[: names]; <D> derived from its tables[: names]; <K> left
    at initial values: <names or none>[; <B> index tables not loaded (...)]``."""
    initial = report.missing + [name for name, _, _ in report.mismatched] + list(fresh)
    loaded = model_size - len(report.missing) - len(report.mismatched) - len(report.derived)

    def named(items: List[str], cap: Optional[int]) -> str:
        shown = items if cap is None else items[:cap]
        return ", ".join(shown) + (f" and {len(items) - len(shown)} more" if len(shown) < len(items) else "")

    def line(cap: Optional[int]) -> str:
        parts = [f"{loaded} of its {checkpoint_size} tensors loaded"]
        parts += [f"{len(items)} {what}" + (f": {named(items, cap)}" if items else "")
                  for what, items in (("resized", report.resized), ("derived from its tables", report.derived))]
        parts.append(f"{len(initial)} left at initial values: {named(initial, cap) or 'none'}")
        if report.dropped_reference_buffers:
            parts.append(f"{report.dropped_reference_buffers} index tables not loaded (this model builds its own)")
        return "; ".join(parts)
    short, full = line(limit), line(None)
    (logger.warning if report.missing or report.mismatched else logger.info)(f"{source}: {short}")
    if full != short:
        logger.info(f"{source} (every name): {full}", extra=FILE_ONLY)


def seed_everything(seed: int, rank: int, stage: int) -> None:
    """Seed python, numpy (Mixup), torch CPU and CUDA from (``SEED``, rank, stage): stage 0 for the model's
    initialisation, ``epoch + 1`` as each epoch starts.

    Reseeding per epoch makes an epoch's random stream (Mixup, drop-path, and augmentations made in the main
    process; DataLoader workers seed each sample themselves, see ``data.seeding``) a function of the epoch alone:
    a run resumed at epoch e replays it exactly as the uninterrupted run did, with no RNG state to save for every
    rank.
    """
    value = int(np.random.SeedSequence([seed, rank, stage]).generate_state(1)[0])
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)  # all CUDA devices too


def save_config(config: Any, logger: logging.Logger) -> None:
    """``config.yaml`` in the run's folder, with ``OUTPUT`` as the output root it was run under: re-run with
    ``--cfg``, it writes to (and resumes) this run's folder again, ``<OUTPUT>/<MODEL.NAME>/<TAG>``, instead of one
    nested inside it."""
    path = os.path.join(config.OUTPUT, "config.yaml")
    saved = config.clone()
    saved.defrost()
    saved.OUTPUT = os.path.dirname(os.path.dirname(config.OUTPUT))
    text = saved.dump()
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    logger.info(f"full config saved to {path}")


def training_epochs(config: Any, rank: int, sampler: Any, start_epoch: int, logger: logging.Logger) -> Iterator[int]:
    """The epochs left to train, each entered with its seeds (:func:`seed_everything`) and the sampler's shuffle
    set; after each, a line with the estimated time the rest of the run takes; the total time once all have run."""
    start = time.time()
    epochs = range(start_epoch, config.TRAIN.EPOCHS)
    for done, epoch in enumerate(epochs, 1):
        seed_everything(config.SEED, rank, epoch + 1)
        sampler.set_epoch(epoch)
        yield epoch
        left = len(epochs) - done
        logger.info(f"EPOCH {epoch} done (training, evaluation, checkpoints); {left} of {len(epochs)} epochs left, "
                    f"run eta {duration((time.time() - start) / done * left)}")
    logger.info(f"training time {datetime.timedelta(seconds=int(time.time() - start))}")


def diverged(err: TrainingError, last_good: Optional[str]) -> TrainingError:
    """The error that stops a run whose training went non-finite, naming the checkpoint to resume from."""
    if last_good:
        return TrainingError(f"{err}: stopping. The last good checkpoint is {last_good}; resume from it with a lower "
                             f"TRAIN.BASE_LR or TRAIN.CLIP_GRAD")
    return TrainingError(f"{err}: stopping. No checkpoint was saved yet; start again with a lower TRAIN.BASE_LR or "
                         f"TRAIN.CLIP_GRAD")


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
