"""Config trees for the dense-prediction tasks, on ``config.py``'s machinery (YAML with ``BASE:``, ``--opts``, value
rules): each task starts from :func:`dense_defaults` and adds its own keys, so classification is untouched."""
from __future__ import annotations

import inspect
import os
from typing import Any, Collection, Mapping, Sequence

from yacs.config import CfgNode as CN

from config import (AMP_LEVELS, PATH_COMPONENT, PATH_RULES, Rule, apply_flags, at_least, between, check_values,
                    compile_backend, load_config, merge_opts, one_of, one_path_component)
from errors import UsageError, error_text

SCHEDULES = ("multistep", "poly")


def dense_defaults() -> CN:
    """The keys both tasks have. Schedules count optimizer updates for warm-up and epochs for the rest."""
    c = CN()
    c.BASE = [""]
    c.DATA = CN()
    c.DATA.DATA_PATH = ""
    c.DATA.BATCH_SIZE = 2  # training images per process
    c.DATA.TEST_BATCH_SIZE = 1  # evaluation images per process
    c.DATA.NUM_WORKERS = 2
    c.DATA.PIN_MEMORY = True
    c.DATA.FLIP_PROB = 0.5  # chance of a horizontal flip per training image; 0 turns flips off (mirrored text)
    c.MODEL = CN()
    c.MODEL.NAME = "run"  # names the output folder: <OUTPUT>/<NAME>/<TAG>
    # A timm model name registered by models/registry.py, and keyword arguments for it (e.g. embed_dim, depths,
    # num_heads, window_size for a smaller backbone).
    c.MODEL.BACKBONE = "focal_tiny_patch4_window7_224"
    c.MODEL.BACKBONE_ARGS = CN(new_allowed=True)
    c.MODEL.DROP_PATH_RATE = 0.2
    c.MODEL.PRETRAINED = ""  # a classification checkpoint for the backbone (or a dense one of the same task)
    # The backbone stages whose maps reach the neck ([]: what the head needs: all four, or 1-3 for RetinaNet and
    # FCOS); each gets a LayerNorm (norm0..norm3), as Swin's and Focal's detection backbones have.
    c.MODEL.OUT_INDICES = []
    c.MODEL.OUT_NORMS = True  # False: the raw stage maps, without norm0..norm3
    # -1: train everything; 0: freeze the patch embedding; k >= 1: also stages 0..k-1 (eval mode, no gradients).
    c.MODEL.FROZEN_STAGES = -1
    c.MODEL.RESUME = ""
    # With more than one process, batch norms in the decoder and heads become SyncBatchNorm (statistics over the
    # whole batch, on GPUs); their running statistics are also averaged over processes after every epoch.
    c.MODEL.SYNC_BN = True
    c.TRAIN = CN()
    c.TRAIN.START_EPOCH = 0
    c.TRAIN.EPOCHS = 12
    c.TRAIN.BASE_LR = 1e-4
    # The total batch the rates are stated for (8 GPUs x 2 in the seed's runs); they scale linearly to this run's,
    # as mmdetection's auto_scale_lr does, and the saved config records the run's (see lr_scheduler.scale_rates).
    c.TRAIN.LR_BATCH = 16
    c.TRAIN.WEIGHT_DECAY = 0.05
    c.TRAIN.BETAS = (0.9, 0.999)
    c.TRAIN.WARMUP_ITERS = 500
    c.TRAIN.WARMUP_RATIO = 1e-3  # the warm-up starts at BASE_LR * WARMUP_RATIO
    c.TRAIN.SCHEDULE = "multistep"  # multistep: x DECAY_RATE at each of DECAY_EPOCHS; poly: to MIN_LR by POWER
    c.TRAIN.DECAY_EPOCHS = [8, 11]
    c.TRAIN.DECAY_RATE = 0.1
    c.TRAIN.POWER = 1.0
    c.TRAIN.MIN_LR = 0.0
    c.TRAIN.CLIP_GRAD = 0.0  # largest gradient norm; 0 turns clipping off
    c.TRAIN.ACCUMULATION_STEPS = 1  # batches per optimizer update (a larger total batch on fewer devices)
    c.TRAIN.AUTO_RESUME = True
    c.TRAIN.USE_CHECKPOINT = False  # gradient checkpointing in the backbone: less memory, about 30% more time
    # Exponential moving average of the weights (timm's ModelEmaV3), as in main.py: evaluated next to the model,
    # saved in checkpoints, and the score that picks ckpt_best.pth.
    c.MODEL_EMA = False
    c.MODEL_EMA_DECAY = 0.9998
    c.TENSORBOARD = False  # loss, learning rate and gradient norm per update, scores per evaluation
    c.AMP_OPT_LEVEL = ""
    c.COMPILE = ""  # torch.compile backend for training and evaluation ("" runs eagerly)
    c.OUTPUT = ""
    c.TAG = "default"
    c.SAVE_FREQ = 1  # epochs between checkpoints (the last epoch is always saved)
    c.EVAL_FREQ = 1  # epochs between evaluations (the last epoch is always evaluated)
    c.KEEP_CHECKPOINTS = 0
    c.PRINT_FREQ = 50
    c.SEED = 0
    c.EVAL_MODE = False
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

DENSE_RULES = (
    Rule("MODEL.BACKBONE", timm_model, "must name a timm model: the Focal Transformers of models/registry.py (such as "
         "focal_tiny_patch4_window7_224) or timm's own (such as swin_tiny_patch4_window7_224)"),
    Rule("MODEL.BACKBONE_ARGS", backbone_fits, "must be arguments of MODEL.BACKBONE"),
    Rule("DATA.BATCH_SIZE", at_least(1), "must be at least 1"),
    Rule("DATA.TEST_BATCH_SIZE", at_least(1), "must be at least 1"),
    Rule("DATA.NUM_WORKERS", at_least(0), "must be 0 (load in the main process) or more"),
    Rule("DATA.FLIP_PROB", between(0.0, 1.0), "must be a probability in [0, 1]"),
    Rule("MODEL.DROP_PATH_RATE", between(0.0, 1.0, high_open=True), "must be in [0, 1)"),
    Rule("MODEL.OUT_INDICES", lambda value, _: len(set(value)) == len(value) and all(0 <= i <= 3 for i in value)
         and list(value) == sorted(value), "must be distinct stages among 0-3 in increasing order ([]: the head's)"),
    Rule("MODEL.FROZEN_STAGES", between(-1, 4), "must be -1 (none) up to 4 (patch embedding and all four stages)"),
    Rule("MODEL_EMA_DECAY", between(0.0, 1.0, high_open=True), "must be in [0, 1)"),
    Rule("TRAIN.EPOCHS", at_least(1), "must be at least 1"),
    Rule("TRAIN.START_EPOCH", lambda value, c: 0 <= value < c.TRAIN.EPOCHS or c.EVAL_MODE,
         "must be 0 or more and below TRAIN.EPOCHS (there would be nothing to train)"),
    Rule("TRAIN.BASE_LR", lambda value, _: value > 0, "must be above 0"),
    Rule("TRAIN.LR_BATCH", at_least(1), "must be at least 1 (the total batch the learning rates are stated for)"),
    Rule("TRAIN.WEIGHT_DECAY", at_least(0), "must be 0 or more"),
    Rule("TRAIN.BETAS", lambda value, _: len(value) == 2 and all(0 <= b < 1 for b in value),
         "must be two values in [0, 1)"),
    Rule("TRAIN.WARMUP_ITERS", at_least(0), "must be 0 or more"),
    Rule("TRAIN.WARMUP_RATIO", between(0.0, 1.0), "must be in [0, 1]"),
    Rule("TRAIN.SCHEDULE", one_of(SCHEDULES), f"must be one of {SCHEDULES}"),
    Rule("TRAIN.DECAY_EPOCHS", lambda value, _: all(e >= 0 for e in value) and list(value) == sorted(value),
         "must be epochs in increasing order"),
    Rule("TRAIN.DECAY_RATE", lambda value, _: value > 0, "must be above 0"),
    Rule("TRAIN.POWER", lambda value, _: value > 0, "must be above 0"),
    Rule("TRAIN.MIN_LR", at_least(0), "must be 0 or more"),
    Rule("TRAIN.CLIP_GRAD", at_least(0), "must be 0 (off) or more"),
    Rule("TRAIN.ACCUMULATION_STEPS", at_least(1), "must be at least 1"),
    Rule("AMP_OPT_LEVEL", one_of(AMP_LEVELS), f"must be one of {AMP_LEVELS[1:]} (or empty: the device's default)"),
    Rule("COMPILE", compile_backend, "must name a torch.compile backend (torch._dynamo.list_backends(), e.g. "
         "inductor, aot_eager or eager)"),
    Rule("SAVE_FREQ", at_least(1), "must be at least 1"),
    Rule("EVAL_FREQ", at_least(1), "must be at least 1"),
    Rule("KEEP_CHECKPOINTS", at_least(0), "must be 0 (keep all) or more"),
    Rule("PRINT_FREQ", at_least(1), "must be at least 1"),
    Rule("SEED", at_least(0), "must be 0 or more"),
    Rule("MODEL.NAME", one_path_component, PATH_COMPONENT),
    Rule("TAG", one_path_component, PATH_COMPONENT),
) + PATH_RULES


def merge_task_opts(config: CN, opts: Sequence[Any]) -> None:
    """``config.merge_opts``, where keys may also be new under the nodes that allow them (``BACKBONE_ARGS``,
    ``DETECTOR_ARGS``: keyword arguments passed on to timm or torchvision)."""
    opts = list(opts)
    for key, value in zip(opts[0::2], opts[1::2]):
        *path, leaf = str(key).split(".")
        node = config
        for part in path:
            node = node.get(part) if isinstance(node, CN) else None
        if isinstance(node, CN) and node.is_new_allowed() and leaf not in node:
            node[leaf] = CN._decode_cfg_value(value)
    merge_opts(config, opts)


def get_task_config(args: Any, defaults: CN, rules: Sequence[Rule]) -> CN:
    """``--cfg`` and ``--opts`` over ``defaults``, then the command-line flags; checked against ``rules``. Bad
    files, keys or values are usage errors naming them."""
    try:
        config = load_config(args.cfg, None, defaults)
        config.defrost()
        merge_task_opts(config, args.opts or [])
        apply_flags(config, args)
        config.OUTPUT = os.path.join(config.OUTPUT or "output", config.MODEL.NAME, config.TAG)
        config.freeze()
        check_values(config, rules)
    except (KeyError, ValueError, AssertionError, FileNotFoundError) as err:
        raise UsageError(f"config (--cfg {args.cfg} / --opts): {error_text(err)}") from None
    if not config.DATA.DATA_PATH:
        raise UsageError("--data-path (DATA.DATA_PATH) is required")
    return config
