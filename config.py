"""The yacs configuration tree: defaults, YAML files with ``BASE:`` inheritance, and command-line overrides.

Key names and defaults follow the reference Focal Transformer release so that its YAML files load unchanged.
An unknown key or a value of the wrong type raises an error that names the full key.
"""
from __future__ import annotations

import os
from typing import Any, Iterable, Optional, Sequence

import yaml
from yacs.config import CfgNode as CN

_C = CN()
_C.BASE = [""]

# Data
_C.DATA = CN()
_C.DATA.BATCH_SIZE = 128  # per process
_C.DATA.DATA_PATH = ""
_C.DATA.DATASET = "imagenet"
_C.DATA.IMG_SIZE = 224
_C.DATA.INTERPOLATION = "bicubic"
_C.DATA.ZIP_MODE = False
_C.DATA.CACHE_MODE = "part"  # no | part | full (zip mode only)
_C.DATA.PIN_MEMORY = True
_C.DATA.NUM_WORKERS = 8
# An image that cannot be decoded stops the run with its path; True leaves such images out and logs the count.
_C.DATA.SKIP_BAD_IMAGES = False

# Model
_C.MODEL = CN()
_C.MODEL.TYPE = "focal"  # focal | focalv2
_C.MODEL.NAME = "focal_tiny_patch4_window7_224"
_C.MODEL.PRETRAINED = ""
_C.MODEL.RESUME = ""
_C.MODEL.NUM_CLASSES = 1000
_C.MODEL.DROP_RATE = 0.0
_C.MODEL.ATTN_DROP_RATE = 0.0
_C.MODEL.DROP_PATH_RATE = 0.1
_C.MODEL.LABEL_SMOOTHING = 0.1
_C.MODEL.SPEC = CN(new_allowed=True)

_C.MODEL.FOCAL = CN()
_C.MODEL.FOCAL.PATCH_SIZE = 4
_C.MODEL.FOCAL.IN_CHANS = 3
_C.MODEL.FOCAL.EMBED_DIM = 96
_C.MODEL.FOCAL.DEPTHS = [2, 2, 6, 2]
_C.MODEL.FOCAL.NUM_HEADS = [3, 6, 12, 24]
_C.MODEL.FOCAL.WINDOW_SIZE = 7
_C.MODEL.FOCAL.MLP_RATIO = 4.0
_C.MODEL.FOCAL.QKV_BIAS = True
_C.MODEL.FOCAL.QK_SCALE = None  # None: head_dim ** -0.5
_C.MODEL.FOCAL.APE = False
_C.MODEL.FOCAL.PATCH_NORM = True
_C.MODEL.FOCAL.USE_SHIFT = False
_C.MODEL.FOCAL.FOCAL_POOL = "none"  # none | fc | conv | mean | max
_C.MODEL.FOCAL.FOCAL_STAGES = [0, 1, 2, 3]
_C.MODEL.FOCAL.FOCAL_LEVELS = [1, 1, 1, 1]
_C.MODEL.FOCAL.FOCAL_WINDOWS = [7, 5, 3, 1]
_C.MODEL.FOCAL.EXPAND_STAGES = [0, 1, 2, 3]
_C.MODEL.FOCAL.EXPAND_SIZES = [3, 3, 3, 3]
_C.MODEL.FOCAL.EXPAND_LAYER = "all"  # all | even | odd
_C.MODEL.FOCAL.USE_CONV_EMBED = False
_C.MODEL.FOCAL.USE_LAYERSCALE = False
_C.MODEL.FOCAL.LAYERSCALE_VALUE = 1e-4
_C.MODEL.FOCAL.USE_PRE_NORM = False
_C.MODEL.FOCAL.FOCAL_TOPK = 128
# How v1 gathers the keys/values around each window: index (one precomputed gather), unfold, or roll.
_C.MODEL.FOCAL.KV_GATHER = "index"

# Training
_C.TRAIN = CN()
_C.TRAIN.START_EPOCH = 0
_C.TRAIN.EPOCHS = 300
_C.TRAIN.WARMUP_EPOCHS = 20
_C.TRAIN.WEIGHT_DECAY = 0.05
_C.TRAIN.BASE_LR = 5e-4
_C.TRAIN.WARMUP_LR = 5e-7
_C.TRAIN.MIN_LR = 5e-6
_C.TRAIN.CLIP_GRAD = 5.0
_C.TRAIN.AUTO_RESUME = True
_C.TRAIN.ACCUMULATION_STEPS = 1
_C.TRAIN.USE_CHECKPOINT = False

_C.TRAIN.LR_SCHEDULER = CN()
_C.TRAIN.LR_SCHEDULER.NAME = "cosine"  # cosine | linear | step
_C.TRAIN.LR_SCHEDULER.DECAY_EPOCHS = 30
_C.TRAIN.LR_SCHEDULER.DECAY_RATE = 0.1

_C.TRAIN.OPTIMIZER = CN()
_C.TRAIN.OPTIMIZER.NAME = "adamw"  # adamw | sgd
_C.TRAIN.OPTIMIZER.EPS = 1e-8
_C.TRAIN.OPTIMIZER.BETAS = (0.9, 0.999)
_C.TRAIN.OPTIMIZER.MOMENTUM = 0.9

# Augmentation
_C.AUG = CN()
_C.AUG.COLOR_JITTER = 0.4
_C.AUG.AUTO_AUGMENT = "rand-m9-mstd0.5-inc1"
_C.AUG.REPROB = 0.25
_C.AUG.REMODE = "pixel"
_C.AUG.RECOUNT = 1
_C.AUG.MIXUP = 0.8
_C.AUG.CUTMIX = 1.0
_C.AUG.CUTMIX_MINMAX = None
_C.AUG.MIXUP_PROB = 1.0
_C.AUG.MIXUP_SWITCH_PROB = 0.5
_C.AUG.MIXUP_MODE = "batch"

# Testing
_C.TEST = CN()
_C.TEST.CROP = True

# Misc
_C.AMP_OPT_LEVEL = ""
_C.OUTPUT = ""
_C.TAG = "default"
_C.SAVE_FREQ = 1
# Keep only the newest N epoch checkpoints (0: keep all).
_C.KEEP_CHECKPOINTS = 0
# Also write loss, learning rate and accuracy as TensorBoard events to OUTPUT (needs `pip install tensorboard`).
_C.TENSORBOARD = False
_C.PRINT_FREQ = 100
_C.SEED = 0
_C.EVAL_MODE = False
_C.THROUGHPUT_MODE = False
_C.DEBUG_MODE = False
_C.LOCAL_RANK = 0


def _merge_file(config: CN, cfg_file: str, seen: tuple[str, ...] = ()) -> None:
    """Merge ``cfg_file`` after the files named in its ``BASE`` list, which are relative to it."""
    cfg_file = os.path.abspath(cfg_file)
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"config file not found: {cfg_file}")
    if cfg_file in seen:
        raise ValueError(f"config file {cfg_file} inherits from itself through BASE")
    with open(cfg_file, "r") as f:
        try:
            content = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"config file {cfg_file} is not valid YAML: {err}") from err
    if not isinstance(content, dict):
        raise ValueError(f"config file {cfg_file} must hold a mapping of keys, not {type(content).__name__}")
    for base in content.get("BASE", [""]) or []:
        if base:
            _merge_file(config, os.path.join(os.path.dirname(cfg_file), base), seen + (cfg_file,))
    try:
        config.merge_from_other_cfg(CN(content))
    except (KeyError, ValueError) as err:
        raise type(err)(f"{err} (in {cfg_file})") from err


def load_config(cfg_file: Optional[str] = None, opts: Optional[Sequence[Any]] = None) -> CN:
    """Defaults, then ``cfg_file`` (with its BASE chain), then ``opts`` as a yacs ``KEY VALUE ...`` list; frozen."""
    config = _C.clone()
    if cfg_file:
        _merge_file(config, cfg_file)
    if opts:
        merge_opts(config, opts)
    config.freeze()
    return config


def merge_opts(config: CN, opts: Iterable[Any]) -> None:
    """Merge a ``KEY VALUE ...`` list; string values are parsed as Python literals, as yacs does."""
    opts = list(opts)
    if len(opts) % 2:
        raise ValueError(f"--opts needs KEY VALUE pairs, got an odd number of items: {opts}")
    try:
        config.merge_from_list(opts)
    except AssertionError as err:  # yacs reports unknown keys with a bare assert
        raise KeyError(str(err)) from None


def get_config(args: Any) -> CN:
    """The configuration for ``main.py``: ``--cfg`` and ``--opts``, then the dedicated command-line flags."""
    config = load_config(getattr(args, "cfg", None), getattr(args, "opts", None))
    config.defrost()
    flag_to_key = {
        "batch_size": "DATA.BATCH_SIZE",
        "data_path": "DATA.DATA_PATH",
        "cache_mode": "DATA.CACHE_MODE",
        "pretrained": "MODEL.PRETRAINED",
        "resume": "MODEL.RESUME",
        "accumulation_steps": "TRAIN.ACCUMULATION_STEPS",
        "output": "OUTPUT",
        "tag": "TAG",
        "seed": "SEED",
    }
    for flag, key in flag_to_key.items():
        value = getattr(args, flag, None)
        if value is not None:
            config.merge_from_list([key, value])
    for flag, key in {"zip": "DATA.ZIP_MODE", "use_checkpoint": "TRAIN.USE_CHECKPOINT",
                      "eval": "EVAL_MODE", "throughput": "THROUGHPUT_MODE", "tensorboard": "TENSORBOARD"}.items():
        if getattr(args, flag, False):
            config.merge_from_list([key, True])
    amp = "none" if getattr(args, "disable_amp", False) else getattr(args, "amp", None)
    if amp is not None:
        config.AMP_OPT_LEVEL = amp
    config.LOCAL_RANK = int(os.environ.get("LOCAL_RANK", getattr(args, "local_rank", 0) or 0))
    config.OUTPUT = os.path.join(config.OUTPUT or "output", config.MODEL.NAME, config.TAG)
    config.freeze()
    return config
