"""Build a model from the config tree, rejecting inconsistent settings with errors that name the key."""
from __future__ import annotations

from typing import Any

from .focal_layout import pooled_levels
from .focal_transformer import FocalTransformer
from .layers import POOL_METHODS
from .topk_attention import MAX_LEVELS

MODEL_TYPES = ("focal", "focalv2")
EXPAND_LAYERS = ("all", "even", "odd")


class ConfigError(ValueError):
    """A model setting that cannot be built; the message names the config key."""


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


def validate_model_config(config: Any) -> None:
    m, f = config.MODEL, config.MODEL.FOCAL
    choices = {"MODEL.TYPE": (m.TYPE, MODEL_TYPES), "MODEL.FOCAL.FOCAL_POOL": (f.FOCAL_POOL, POOL_METHODS),
               "MODEL.FOCAL.EXPAND_LAYER": (f.EXPAND_LAYER, EXPAND_LAYERS)}
    for key, (value, allowed) in choices.items():
        _require(value in allowed, key, f"must be one of {allowed}, got {value!r}")
    n = len(f.DEPTHS)
    _require(n >= 1 and all(d >= 1 for d in f.DEPTHS), "MODEL.FOCAL.DEPTHS", f"needs positive depths, got {f.DEPTHS}")
    for key in ("NUM_HEADS", "FOCAL_LEVELS", "FOCAL_WINDOWS", "EXPAND_SIZES"):
        _require(len(f[key]) == n, f"MODEL.FOCAL.{key}",
                 f"needs one value per stage ({n}, as MODEL.FOCAL.DEPTHS), got {list(f[key])}")
    for key in ("PATCH_SIZE", "EMBED_DIM", "WINDOW_SIZE", "FOCAL_TOPK"):
        _require(f[key] >= 1, f"MODEL.FOCAL.{key}", f"must be >= 1, got {f[key]}")
    _require(f.PATCH_SIZE == 4 or not f.USE_CONV_EMBED, "MODEL.FOCAL.PATCH_SIZE",
             f"must be 4 with MODEL.FOCAL.USE_CONV_EMBED (its stem is a 7x7 convolution of stride 4), "
             f"got {f.PATCH_SIZE}")
    _require(m.NUM_CLASSES >= 0, "MODEL.NUM_CLASSES", f"must be >= 0, got {m.NUM_CLASSES}")
    size = config.DATA.IMG_SIZE
    _require(size > 0 and size % f.PATCH_SIZE == 0, "DATA.IMG_SIZE",
             f"must be a positive multiple of MODEL.FOCAL.PATCH_SIZE ({f.PATCH_SIZE}), got {size}")
    _require(size // f.PATCH_SIZE >= 2 ** (n - 1), "DATA.IMG_SIZE",
             f"{size} is too small for {n} stages of 2x downsampling after {f.PATCH_SIZE}x{f.PATCH_SIZE} patches")
    _require(f.MLP_RATIO > 0, "MODEL.FOCAL.MLP_RATIO", f"must be > 0, got {f.MLP_RATIO}")
    for rate in ("DROP_RATE", "ATTN_DROP_RATE", "DROP_PATH_RATE"):
        _require(0.0 <= m[rate] < 1.0, f"MODEL.{rate}", f"must be in [0, 1), got {m[rate]}")
    for i in range(n):
        dim = f.EMBED_DIM * 2 ** i
        _require(f.NUM_HEADS[i] >= 1 and dim % f.NUM_HEADS[i] == 0, "MODEL.FOCAL.NUM_HEADS",
                 f"stage {i} has {dim} channels, not divisible by {f.NUM_HEADS[i]} heads")
        _require(0 <= f.EXPAND_SIZES[i] < f.WINDOW_SIZE, "MODEL.FOCAL.EXPAND_SIZES",
                 f"stage {i}: expand size must be in [0, WINDOW_SIZE={f.WINDOW_SIZE}), got {f.EXPAND_SIZES[i]}")
        level = f.FOCAL_LEVELS[i]
        _require(level >= 0, "MODEL.FOCAL.FOCAL_LEVELS", f"stage {i}: must be >= 0, got {level}")
        pooled = i in f.FOCAL_STAGES and pooled_levels(level, f.FOCAL_POOL) > 0
        if pooled:
            # a stage whose map is no larger than the window uses one window of the map's size
            window = min(f.WINDOW_SIZE, size // f.PATCH_SIZE // 2 ** i)
            _require(2 ** (level - 2) <= window, "MODEL.FOCAL.FOCAL_LEVELS",
                     f"stage {i}: {level} levels pool sub-windows smaller than one token (its window is {window})")
            _require(f.FOCAL_WINDOWS[i] % 2 == 1, "MODEL.FOCAL.FOCAL_WINDOWS",
                     f"stage {i}: pooled focal windows must be odd, got {f.FOCAL_WINDOWS[i]}")
        if m.TYPE == "focalv2":
            _require(1 <= level <= MAX_LEVELS, "MODEL.FOCAL.FOCAL_LEVELS",
                     f"focalv2 supports 1 or {MAX_LEVELS} levels per stage, stage {i} has {level}")
            _require(level == 1 or pooled, "MODEL.FOCAL.FOCAL_POOL",
                     f"focalv2 stage {i} has {level} levels, so it needs pooling: set FOCAL_POOL (not 'none') "
                     f"and list the stage in MODEL.FOCAL.FOCAL_STAGES")


def build_model(config: Any) -> FocalTransformer:
    """The model selected by ``MODEL.TYPE``; every ``MODEL.FOCAL`` key is the constructor argument of its name."""
    validate_model_config(config)
    focal = {key.lower(): list(value) if isinstance(value, (list, tuple)) else value
             for key, value in config.MODEL.FOCAL.items()}
    focal["qk_scale"] = focal["qk_scale"] or None
    m = config.MODEL
    return FocalTransformer(variant=m.TYPE, img_size=config.DATA.IMG_SIZE, num_classes=m.NUM_CLASSES,
                            drop_rate=m.DROP_RATE, attn_drop_rate=m.ATTN_DROP_RATE, drop_path_rate=m.DROP_PATH_RATE,
                            use_checkpoint=config.TRAIN.USE_CHECKPOINT, **focal)
