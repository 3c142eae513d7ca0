"""Config trees for the dense-prediction tasks, on ``config.py``'s machinery (YAML with ``BASE:``, ``--opts``, value
rules): each task starts from :func:`dense_defaults` and adds its own keys, so classification is untouched."""
from __future__ import annotations

import os
from typing import Any, Sequence

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


DENSE_RULES = (
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
