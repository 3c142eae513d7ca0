"""Data loaders for one process of a (possibly distributed) run, with Mixup/CutMix for training."""
from __future__ import annotations

import functools
import logging
import os
from typing import Any, List, Optional, Tuple

import torch
from timm.data import Mixup
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, default_collate

from config import UsageError, mixup_active
from engine import DistEnv
from logger import quiet_worker_teardown

from .datasets import CheckedImages, build_dataset, label_outlier
from .samplers import ShardSampler
from .seeding import EpochTagged, SeededSamples
from .transforms import build_transform

logger = logging.getLogger("focal.data")


def _dataset(split: str, config: Any, env: DistEnv, by_name: bool = False) -> CheckedImages:
    """``by_name``: folders are matched to the model's classes by name later, so their count may differ."""
    by_name = by_name and not config.DATA.ZIP_MODE
    dataset, num_classes = build_dataset(split, config, build_transform(split == "train", config),
                                         env.rank, env.world_size, by_name)
    if by_name and not len(dataset):
        raise UsageError(f"the '{split}' split of {config.DATA.DATA_PATH} holds no images")
    # A zip map file shows only the labels it uses: a validation set may lack the last classes, never exceed them.
    labels_only = config.DATA.ZIP_MODE and split == "val"
    expected = config.MODEL.NUM_CLASSES
    if not by_name and num_classes != expected and not (labels_only and num_classes < expected):
        outlier = label_outlier(dataset) if config.DATA.ZIP_MODE else None
        if outlier:
            raise UsageError(f"{outlier} Fix that line; if the labels are right, set MODEL.NUM_CLASSES {num_classes} "
                             f"(now {expected})")
        found = f"labels up to {num_classes - 1}" if labels_only else f"{num_classes} classes"
        raise UsageError(f"MODEL.NUM_CLASSES is {expected} but the '{split}' split of {config.DATA.DATA_PATH} has "
                         f"{found}; pass --opts MODEL.NUM_CLASSES {num_classes} (or use matching data)")
    return CheckedImages(dataset, config.DATA.SKIP_BAD_IMAGES)


def collate_readable(batch: List[Optional[tuple]], even: bool = False) -> Any:
    """Collate the samples that could be read; ``even`` keeps the count even, as Mixup/CutMix need."""
    kept = [sample for sample in batch if sample is not None]
    if even and len(kept) % 2:
        kept = kept[:-1]
    if not kept:
        raise UsageError(f"none of the {len(batch)} images of a batch could be read (see the warnings naming "
                         f"them); check the dataset under DATA.DATA_PATH")
    return default_collate(kept)


def worker_count(requested: int) -> int:
    """``DATA.NUM_WORKERS`` capped at the CPUs this process may use (torch warns about more); logged once."""
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if requested > available and requested not in _CAPPED:
        _CAPPED.add(requested)
        logger.info(f"DATA.NUM_WORKERS {requested} capped at the {available} CPUs this process can use")
    return min(requested, available)


_CAPPED: set = set()


def _loader(dataset: Dataset, sampler: Sampler, config: Any, env: DistEnv, train: bool) -> DataLoader:
    """Workers persist for the whole run; training ones seed each sample from (``SEED``, epoch, index)
    (:mod:`data.seeding`) so that a resumed run sees the augmentations of an uninterrupted one."""
    workers = worker_count(config.DATA.NUM_WORKERS)
    if train and workers > 0:
        dataset, sampler = SeededSamples(dataset, config.SEED), EpochTagged(sampler)
    # The loader's own generator, not the global one, which a resumed run would draw at another epoch.
    return DataLoader(dataset, sampler=sampler, batch_size=config.DATA.BATCH_SIZE, num_workers=workers,
                      pin_memory=config.DATA.PIN_MEMORY and env.device.type == "cuda", drop_last=train,
                      persistent_workers=workers > 0, generator=torch.Generator().manual_seed(config.SEED),
                      worker_init_fn=quiet_worker_teardown,
                      collate_fn=functools.partial(collate_readable, even=train and mixup_active(config)))


def build_train_loader(config: Any, env: DistEnv) -> Tuple[CheckedImages, DataLoader]:
    """Shuffled, equally many full batches on every rank; with the zip ``part`` cache, each from its cached shard."""
    dataset = _dataset("train", config, env)
    if config.DATA.ZIP_MODE and config.DATA.CACHE_MODE == "part":
        sampler = ShardSampler(len(dataset), env.rank, env.world_size, shuffle=True, seed=config.SEED,
                               equal_lengths=True)
    else:
        sampler = DistributedSampler(dataset, env.world_size, env.rank, shuffle=True, seed=config.SEED)
    loader = _loader(dataset, sampler, config, env, train=True)
    if len(loader) == 0:
        raise UsageError(f"the training set ({len(dataset)} images over {env.world_size} processes) gives no full "
                         f"batch of --batch-size {config.DATA.BATCH_SIZE}; lower the batch size")
    return dataset, loader


def build_val_loader(config: Any, env: DistEnv, by_name: bool = False) -> Tuple[CheckedImages, DataLoader]:
    """In order and unpadded, so the ranks together see each image once; ``by_name``: see :func:`_dataset`."""
    dataset = _dataset("val", config, env, by_name)
    return dataset, _loader(dataset, ShardSampler(len(dataset), env.rank, env.world_size), config, env,
                            train=False)


def build_mixup(config: Any) -> Optional[Mixup]:
    """timm's Mixup/CutMix (which also applies label smoothing), or None when both are off."""
    aug = config.AUG
    if not mixup_active(config):
        return None
    return Mixup(mixup_alpha=aug.MIXUP, cutmix_alpha=aug.CUTMIX, cutmix_minmax=aug.CUTMIX_MINMAX,
                 prob=aug.MIXUP_PROB, switch_prob=aug.MIXUP_SWITCH_PROB, mode=aug.MIXUP_MODE,
                 label_smoothing=config.MODEL.LABEL_SMOOTHING, num_classes=config.MODEL.NUM_CLASSES)
