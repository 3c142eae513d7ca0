"""The dense tasks' part of the config trees: :func:`dense_defaults` (``config.run_defaults`` with the keys detection
and segmentation share), their rules, and the checks of the keyword arguments handed on to timm and torchvision."""
from __future__ import annotations

import inspect
from typing import Any, Collection, Mapping

from yacs.config import CfgNode as CN

from config import RUN_RULES, Rule, UsageError, at_least, between, one_of, run_defaults

SCHEDULES = ("multistep", "poly")


def dense_defaults() -> CN:
    """:func:`config.run_defaults` with the dense tasks' values and keys. Schedules count optimizer updates for
    warm-up and epochs for the rest."""
    c = run_defaults()
    c.DATA.BATCH_SIZE = 2  # training images per process
    c.DATA.TEST_BATCH_SIZE = 1  # evaluation images per process
    c.DATA.NUM_WORKERS = 2
    c.DATA.FLIP_PROB = 0.5  # chance of a horizontal flip per training image; 0 turns flips off (mirrored text)
    # A timm model name registered by models/registry.py, and keyword arguments for it (e.g. embed_dim, depths,
    # num_heads, window_size for a smaller backbone).
    c.MODEL.BACKBONE = "focal_tiny_patch4_window7_224"
    c.MODEL.BACKBONE_ARGS = CN(new_allowed=True)
    c.MODEL.DROP_PATH_RATE = 0.2
    # The backbone stages whose maps reach the neck ([]: what the head needs: all four, or 1-3 for RetinaNet and
    # FCOS); each gets a LayerNorm (norm0..norm3), as Swin's and Focal's detection backbones have.
    c.MODEL.OUT_INDICES = []
    c.MODEL.OUT_NORMS = True  # False: the raw stage maps, without norm0..norm3
    # -1: train everything; 0: freeze the patch embedding; k >= 1: also stages 0..k-1 (eval mode, no gradients).
    c.MODEL.FROZEN_STAGES = -1
    # With more than one process, batch norms in the decoder and heads become SyncBatchNorm (statistics over the
    # whole batch, on GPUs); their running statistics are also averaged over processes after every epoch.
    c.MODEL.SYNC_BN = True
    c.TRAIN.EPOCHS = 12
    c.TRAIN.BASE_LR = 1e-4
    c.TRAIN.LR_BATCH = 16  # 8 GPUs x 2 in the seed's runs, scaled as mmdetection's auto_scale_lr does
    c.TRAIN.BETAS = (0.9, 0.999)
    c.TRAIN.WARMUP_ITERS = 500
    c.TRAIN.WARMUP_RATIO = 1e-3  # the warm-up starts at BASE_LR * WARMUP_RATIO
    c.TRAIN.SCHEDULE = "multistep"  # multistep: x DECAY_RATE at each of DECAY_EPOCHS; poly: to MIN_LR by POWER
    c.TRAIN.DECAY_EPOCHS = [8, 11]
    c.TRAIN.DECAY_RATE = 0.1
    c.TRAIN.POWER = 1.0
    c.TRAIN.MIN_LR = 0.0
    c.TRAIN.CLIP_GRAD = 0.0
    c.PRINT_FREQ = 50
    return c


def _fits(value: Any, default: Any, annotation: Any) -> bool:
    """Whether ``value`` is of the kind of ``default``: an int for an int (``100.0`` is no count), a number for a
    float, a bool for a bool, text for text, a list of such for a list, or for a single value whose annotation
    allows a sequence (``Union[int, Tuple[int, int]]``). A default of None says nothing."""
    if default is None or default is inspect.Parameter.empty:
        return True
    many = isinstance(default, (list, tuple))
    if isinstance(value, (list, tuple)):
        item = default[0] if many and default else None if many else default
        allowed = many or any(word in str(annotation).lower() for word in ("tuple", "sequence", "list"))
        return allowed and all(_fits(v, item, "") for v in value)
    if many or isinstance(value, bool) != isinstance(default, bool):
        return False
    if isinstance(default, (int, float)):
        return isinstance(value, int) if isinstance(default, int) else isinstance(value, (int, float))
    return isinstance(value, type(default))


def _kind(default: Any) -> str:
    kinds = ((bool, "True or False"), (int, "an integer"), (float, "a number"), (str, "text"),
             ((list, tuple), "a list"))
    return next((name for types, name in kinds if isinstance(default, types)), f"a {type(default).__name__}")


def check_arguments(node: str, values: Mapping[str, Any], params: Mapping[str, inspect.Parameter], owner: str,
                    own_rules: Collection[str] = (), positive: Collection[str] = ()) -> None:
    """Keyword arguments from a config node (``MODEL.BACKBONE_ARGS``, ``MODEL.DETECTOR_ARGS``) against the
    parameters of what takes them (``owner``): an unknown key, a value of another kind than its default
    (:func:`_fits`; keys in ``own_rules`` have config rules of their own) or a ``positive`` one below 1 is a
    one-line error naming the key, before a run folder is made."""
    unknown = sorted(set(values) - set(params))
    if unknown:
        raise UsageError(f"{node}.{unknown[0]} is not an argument of {owner}; it accepts: {', '.join(sorted(params))}")
    for key, value in values.items():
        default = params[key].default
        if key not in own_rules and not _fits(value, default, params[key].annotation):
            raise UsageError(f"{node}.{key} must be {_kind(default)} for {owner} (default {default!r}), got "
                             f"{value!r}")
        if key in positive and value < 1:
            raise UsageError(f"{node}.{key} must be at least 1 for {owner}, got {value!r}")


def backbone_fits(args: Any, config: CN) -> bool:
    """``MODEL.BACKBONE_ARGS`` are arguments of the backbone's constructor: for the Focal Transformers, keys and
    kinds of value against its signature (:func:`check_arguments`), less those the dense backbone sets
    (``drop_path_rate``: ``MODEL.DROP_PATH_RATE``); another timm model is built on the meta device to find out.
    True, or a UsageError naming the key."""
    import timm
    import torch

    from models import FocalTransformer  # not at the top: the config tree imports nothing it configures
    from models.registry import default_cfgs
    name = config.MODEL.BACKBONE
    if name in default_cfgs:
        params = {key: p for key, p in inspect.signature(FocalTransformer).parameters.items() if key not in SETS}
        check_arguments("MODEL.BACKBONE_ARGS", args, params, f"{name} (MODEL.BACKBONE)")
        return True
    try:
        with torch.device("meta"):
            timm.create_model(name, **args)
    except (TypeError, ValueError, AssertionError) as err:
        raise UsageError(f"MODEL.BACKBONE_ARGS do not build {name} (MODEL.BACKBONE): {err}") from None
    return True


def timm_model(name: str, _: Any) -> bool:
    import timm

    import models  # noqa: F401  registers the Focal Transformers with timm
    return timm.is_model(name)


# Arguments of the Focal Transformer that the dense backbone sets itself, or that name no setting.
SETS = ("variant", "drop_path_rate", "device", "dtype")

DENSE_RULES = RUN_RULES + (
    Rule("MODEL.BACKBONE", timm_model, "must name a timm model: the Focal Transformers of models/registry.py (such as "
         "focal_tiny_patch4_window7_224) or timm's own (such as swin_tiny_patch4_window7_224)"),
    Rule("MODEL.BACKBONE_ARGS", backbone_fits, "must be arguments of MODEL.BACKBONE"),
    Rule("DATA.TEST_BATCH_SIZE", at_least(1), "must be at least 1"),
    Rule("DATA.FLIP_PROB", between(0.0, 1.0), "must be a probability in [0, 1]"),
    Rule("MODEL.OUT_INDICES", lambda value, _: len(set(value)) == len(value) and all(0 <= i <= 3 for i in value)
         and list(value) == sorted(value), "must be distinct stages among 0-3 in increasing order ([]: the head's)"),
    Rule("MODEL.FROZEN_STAGES", between(-1, 4), "must be -1 (none) up to 4 (patch embedding and all four stages)"),
    Rule("TRAIN.BETAS", lambda value, _: len(value) == 2 and all(0 <= b < 1 for b in value),
         "must be two values in [0, 1)"),
    Rule("TRAIN.WARMUP_ITERS", at_least(0), "must be 0 or more"),
    Rule("TRAIN.WARMUP_RATIO", between(0.0, 1.0), "must be in [0, 1]"),
    Rule("TRAIN.SCHEDULE", one_of(SCHEDULES), f"must be one of {SCHEDULES}"),
    Rule("TRAIN.DECAY_EPOCHS", lambda value, _: all(e >= 0 for e in value) and list(value) == sorted(value),
         "must be epochs in increasing order"),
    Rule("TRAIN.DECAY_RATE", lambda value, _: value > 0, "must be above 0"),
    Rule("TRAIN.POWER", lambda value, _: value > 0, "must be above 0"),
)
