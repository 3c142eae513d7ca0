"""The yacs configuration trees: defaults, YAML files with ``BASE:`` inheritance, value rules, and the command lines
that override them (the flags every training entry point shares, and their keys).

Every task's tree starts from :func:`run_defaults`; classification's (``_C``) keeps the key names and defaults of
the reference Focal Transformer release, so that its YAML files load unchanged. An unknown key or a value of the
wrong type raises an error that names the full key.
"""
from __future__ import annotations

import argparse
import os
import re
import stat
from typing import Any, Callable, Iterable, NamedTuple, Optional, Sequence, Tuple

import yaml
from yacs.config import CfgNode as CN


# The errors an entry point prints as one line instead of a traceback.
class UsageError(Exception):
    """A flag, config key or file the user supplied cannot be used; the message names it and says what to do."""


class TrainingError(Exception):
    """Training cannot go on (e.g. the loss became non-finite); the message says where and what to resume from."""


def user_message(err: BaseException) -> str:
    """The message to show. An error raised in a DataLoader worker comes back wrapped in the worker's traceback;
    only its original last line is kept."""
    text = str(err).strip()
    if text.startswith("Caught ") and "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return text


def error_text(err: BaseException) -> str:
    """``str(err)`` without the quotes ``KeyError`` adds around its message."""
    if isinstance(err, KeyError) and len(err.args) == 1:
        return str(err.args[0])
    return str(err)


# The values some keys and flags may take, read by the rules below and by the modules acting on them.
CACHE_MODES = ("no", "part", "full")  # DATA.CACHE_MODE
AMP_MODES = ("bf16", "fp16", "none")  # AMP_OPT_LEVEL / --amp
APEX_LEVELS = {"O0": "none", "O1": "fp16", "O2": "fp16"}  # the reference's apex levels and their autocast modes
AMP_LEVELS = ("", *AMP_MODES, *APEX_LEVELS)  # "": the device's default
SCHEDULERS = ("cosine", "linear", "step")  # TRAIN.LR_SCHEDULER.NAME
OPTIMIZERS = ("adamw", "sgd")  # TRAIN.OPTIMIZER.NAME
DEVICES = ("auto", "cpu", "cuda")  # --device
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos", "box", "hamming")


def run_defaults() -> CN:
    """The keys of every task's tree: data loading, the run's folder, schedule length and rates, checkpoints,
    precision and logging. Each task sets its own defaults over these and adds its keys."""
    c = CN()
    c.BASE = [""]
    c.DATA = CN()
    c.DATA.DATA_PATH = ""
    c.DATA.BATCH_SIZE = 128  # per process
    c.DATA.NUM_WORKERS = 8
    c.DATA.PIN_MEMORY = True
    c.MODEL = CN()
    c.MODEL.NAME = "run"  # names the output folder: <OUTPUT>/<NAME>/<TAG>
    c.MODEL.PRETRAINED = ""  # initial weights only: a new run starts from them
    c.MODEL.RESUME = ""
    c.MODEL.DROP_PATH_RATE = 0.1
    c.TRAIN = CN()
    c.TRAIN.START_EPOCH = 0
    c.TRAIN.EPOCHS = 300
    c.TRAIN.BASE_LR = 5e-4
    c.TRAIN.MIN_LR = 5e-6
    # The total batch (images per optimizer update, all processes) the rates are stated for. They scale linearly to
    # the run's own total batch, which is then recorded here: a saved config.yaml re-runs at the rates it trained
    # with, and at another batch scales from them (lr_scheduler.scale_rates).
    c.TRAIN.LR_BATCH = 512
    c.TRAIN.WEIGHT_DECAY = 0.05
    c.TRAIN.CLIP_GRAD = 5.0  # the largest gradient norm; 0 turns clipping off
    c.TRAIN.ACCUMULATION_STEPS = 1  # batches per optimizer update
    c.TRAIN.AUTO_RESUME = True
    c.TRAIN.USE_CHECKPOINT = False  # gradient checkpointing: less memory, more time
    # Exponential moving average of the weights (timm's ModelEmaV3), evaluated next to the model every epoch and
    # saved in checkpoints; with it on, the best checkpoint (ckpt_best.pth) is chosen by the EMA's score.
    c.MODEL_EMA = False
    c.MODEL_EMA_DECAY = 0.9998
    c.AMP_OPT_LEVEL = ""
    c.COMPILE = ""  # torch.compile backend for training and evaluation ("" runs eagerly; --compile: inductor)
    # Loss, learning rate, gradient norm and scores as TensorBoard events in OUTPUT (needs `pip install tensorboard`).
    c.TENSORBOARD = False
    c.OUTPUT = ""
    c.TAG = "default"
    c.SAVE_FREQ = 1  # epochs between checkpoints (the last epoch is always saved)
    c.EVAL_FREQ = 1  # epochs between evaluations (the last epoch is always evaluated)
    c.KEEP_CHECKPOINTS = 0  # keep only the newest N epoch checkpoints (0: keep all)
    c.PRINT_FREQ = 100
    c.SEED = 0
    c.EVAL_MODE = False
    return c


# Classification
_C = run_defaults()
_C.DATA.IMG_SIZE = 224
_C.DATA.INTERPOLATION = "bicubic"
_C.DATA.ZIP_MODE = False
_C.DATA.CACHE_MODE = "part"  # no | part | full (zip mode only)
# An image that cannot be decoded stops the run with its path; True leaves such images out and logs the count.
_C.DATA.SKIP_BAD_IMAGES = False

_C.MODEL.TYPE = "focal"  # focal | focalv2
_C.MODEL.NAME = "focal_tiny_patch4_window7_224"
# The smallest share of the model's tensors --pretrained must fill; below it the file is taken for a checkpoint of
# another architecture and refused (0 accepts any partial transfer; the parseable summary line says what loaded).
_C.MODEL.PRETRAINED_MIN_LOADED = 0.5
_C.MODEL.NUM_CLASSES = 1000
_C.MODEL.DROP_RATE = 0.0
_C.MODEL.ATTN_DROP_RATE = 0.0
_C.MODEL.LABEL_SMOOTHING = 0.1

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
# Stages that get EXPAND_SIZES surroundings; the others get none (the reference ignores this key and expands all).
_C.MODEL.FOCAL.EXPAND_STAGES = [0, 1, 2, 3]
_C.MODEL.FOCAL.EXPAND_SIZES = [3, 3, 3, 3]
_C.MODEL.FOCAL.EXPAND_LAYER = "all"  # all | even | odd
_C.MODEL.FOCAL.USE_CONV_EMBED = False
_C.MODEL.FOCAL.USE_LAYERSCALE = False
_C.MODEL.FOCAL.LAYERSCALE_VALUE = 1e-4
_C.MODEL.FOCAL.USE_PRE_NORM = False
_C.MODEL.FOCAL.FOCAL_TOPK = 128

_C.TRAIN.WARMUP_EPOCHS = 20
_C.TRAIN.WARMUP_LR = 5e-7
# Layer-wise learning-rate decay for fine-tuning: the rate of a block is scaled by LAYER_DECAY ** (its depth from
# the top), the head keeping the full rate (timm's param_groups_layer_decay). 1.0 turns it off.
_C.TRAIN.LAYER_DECAY = 1.0

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

# --channels-last: convolution weights (the patch embeddings: the only 4-D layers) in NHWC memory layout, which
# cuDNN's tensor-core kernels prefer; attention and MLP layers are unaffected.
_C.CHANNELS_LAST = False
# --tf32: float32 matrix multiplications on CUDA in TF32 (Ampere and later; 10-bit mantissa), which PyTorch leaves
# off by default. Matters only without --amp, where it speeds up nearly all the work.
_C.TF32 = False
_C.THROUGHPUT_MODE = False
# --throughput [PASSES]: timed forward passes, after as many untimed ones (at most 50).
_C.THROUGHPUT_PASSES = 30


# Keys of earlier versions of this tree (and of Swin's, which it follows) that nothing reads any more: merged
# files and --opts may still name them (saved config.yaml files do); yacs ignores them with a warning.
# MODEL.FOCAL.KV_GATHER chose among three equivalent ways of gathering v1's keys (index, unfold, roll); the
# models now have one, derived from the layout definition (models/focal_layout.py).
RETIRED_KEYS = ("DATA.DATASET", "MODEL.SPEC", "DEBUG_MODE", "LOCAL_RANK", "MODEL.FOCAL.KV_GATHER")
for _key in RETIRED_KEYS:
    _C.register_deprecated_key(_key)


def _where(mark: Any) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}"


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's error on one line: where, what, and what it was parsing (its own message spans several lines and
    repeats the file name)."""
    if not isinstance(err, yaml.MarkedYAMLError) or err.problem_mark is None:
        return " ".join(str(err).split())
    context = ""
    if err.context:
        start = f" from {_where(err.context_mark)}" if err.context_mark is not None else ""
        context = f" ({err.context}{start})"
    return f"{_where(err.problem_mark)}: {err.problem}{context}"


def _merge_file(config: CN, cfg_file: str, seen: tuple[str, ...] = ()) -> None:
    """Merge ``cfg_file`` after the files named in its ``BASE`` list, which are relative to it."""
    cfg_file = os.path.abspath(cfg_file)
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"config file not found: {cfg_file}")
    if cfg_file in seen:
        raise ValueError(f"config file {cfg_file} inherits from itself through BASE")
    with open(cfg_file, "r", encoding="utf-8") as f:
        try:
            content = yaml.safe_load(f)
        except yaml.YAMLError as err:
            raise ValueError(f"config file {cfg_file} is not valid YAML: {_yaml_problem(err)}") from err
        except UnicodeDecodeError as err:  # names no file by itself, and BASE chains read several
            raise ValueError(f"config file {cfg_file} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    if content is None:  # an empty file (or comments only) would silently mean every default: Focal-T, 1000 classes
        raise ValueError(f"config file {cfg_file} is empty: it sets no key")
    if not isinstance(content, dict):
        raise ValueError(f"config file {cfg_file} must hold a mapping of keys, not {type(content).__name__}")
    for base in content.get("BASE", [""]) or []:
        if base:
            _merge_file(config, os.path.join(os.path.dirname(cfg_file), base), seen + (cfg_file,))
    try:
        _check_sections(config, content)
        config.merge_from_other_cfg(CN(content))
    except (KeyError, ValueError) as err:
        raise type(err)(f"{error_text(err)} (in {cfg_file})") from err


def _check_sections(node: CN, content: dict, prefix: str = "") -> None:
    """A section given a value, or a value given a section, as one line naming the key: yacs's own message prints
    the whole section of defaults over dozens of lines. The usual cause is a YAML section left empty (``DATA:``
    with its keys commented out or not indented under it), which reads as ``None``."""
    for key, value in content.items():
        if key not in node:
            continue  # unknown and retired keys: yacs's merge names them
        full, default = f"{prefix}{key}", node[key]
        if isinstance(default, CN):
            if not isinstance(value, dict):
                hint = " (an empty section: indent its keys under it, or remove it)" if value is None else ""
                raise ValueError(f"{full} is a section of keys ({', '.join(sorted(default)[:4])}, ...), not a "
                                 f"value: got {value!r}{hint}")
            _check_sections(default, value, f"{full}.")
        elif isinstance(value, dict):
            raise ValueError(f"{full} takes one value (now {default!r}), not a section of keys "
                             f"({', '.join(map(str, value))})")


def load_config(cfg_file: Optional[str] = None, opts: Optional[Sequence[Any]] = None,
                defaults: Optional[CN] = None) -> CN:
    """``defaults`` (this module's classification tree unless another task passes its own), then ``cfg_file``
    (with its BASE chain), then ``opts`` as a yacs ``KEY VALUE ...`` list; frozen."""
    config = (_C if defaults is None else defaults).clone()
    if cfg_file:
        _merge_file(config, cfg_file)
    if opts:
        merge_opts(config, opts)
    config.freeze()
    return config


def merge_opts(config: CN, opts: Iterable[Any]) -> None:
    """Merge a ``KEY VALUE ...`` list; string values are parsed as Python literals, as yacs does, a whole number
    given for a float key counts as that float (``TRAIN.CLIP_GRAD 1``), which yacs would refuse, and nodes that
    allow new keys take them."""
    opts = list(opts)
    if len(opts) % 2:
        raise ValueError(f"--opts needs KEY VALUE pairs, got an odd number of items: {opts}")
    pairs = []
    for key, value in zip(opts[0::2], opts[1::2]):
        value = CN._decode_cfg_value(value)
        *parents, leaf = str(key).split(".")
        node = config
        for part in parents:
            node = node.get(part) if isinstance(node, CN) else None
        if isinstance(node, CN):
            _check_sections(node, {leaf: value}, "".join(f"{part}." for part in parents))
            if node.is_new_allowed() and leaf not in node:  # keyword arguments handed on (MODEL.BACKBONE_ARGS)
                node[leaf] = value
        if _is_float_key(config, key) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        pairs += [key, value]
    try:
        config.merge_from_list(pairs)
    except AssertionError as err:  # yacs reports unknown keys with a bare assert
        raise KeyError(str(err)) from None


def _is_float_key(config: CN, key: Any) -> bool:
    node = config
    for part in str(key).split("."):
        if not isinstance(node, CN) or part not in node:
            return False
        node = node[part]
    return isinstance(node, float)



# --- Value rules -------------------------------------------------------------------------------------------------
# Every option with a limited range or a fixed set of values, checked once before a run writes anything. yacs
# already enforces each key's type; these catch the values that would otherwise fail deep inside a run, or worse,
# train silently wrong (a negative clip norm flips the gradient).

# The command-line flags that set a key (named in its error messages) and the switches that turn one on, for every
# entry point (cli.run_parser and main.py's own): each applies those it has.
KEY_FLAGS = {
    "DATA.BATCH_SIZE": "--batch-size", "DATA.DATA_PATH": "--data-path", "DATA.CACHE_MODE": "--cache-mode",
    "MODEL.PRETRAINED": "--pretrained", "MODEL.RESUME": "--resume",
    "TRAIN.ACCUMULATION_STEPS": "--accumulation-steps", "OUTPUT": "--output", "TAG": "--tag", "SEED": "--seed",
    "AMP_OPT_LEVEL": "--amp", "COMPILE": "--compile", "THROUGHPUT_PASSES": "--throughput",
}
SWITCHES = {
    "DATA.ZIP_MODE": "--zip", "TRAIN.USE_CHECKPOINT": "--use-checkpoint", "EVAL_MODE": "--eval",
    "THROUGHPUT_MODE": "--throughput", "TENSORBOARD": "--tensorboard", "MODEL_EMA": "--model-ema",
    "CHANNELS_LAST": "--channels-last", "TF32": "--tf32",
}


def apply_flags(config: CN, args: Any) -> None:
    """The command-line flags over the (unfrozen) config: a flag given sets its key, a switch given turns its key
    on; ``--throughput PASSES`` also sets ``THROUGHPUT_PASSES`` and ``--disable-amp`` means ``--amp none``."""
    def given(flag: str, default: Any = None) -> Any:
        return getattr(args, flag.lstrip("-").replace("-", "_"), default)
    for key, flag in KEY_FLAGS.items():
        if given(flag) is not None and flag not in ("--amp", "--throughput"):
            config.merge_from_list([key, given(flag)])
    for key, flag in SWITCHES.items():
        if given(flag, False):
            config.merge_from_list([key, True])
    if given("--throughput") not in (None, True):
        config.THROUGHPUT_PASSES = given("--throughput")
    amp = "none" if given("--disable-amp", False) else given("--amp")
    if amp is not None:
        config.AMP_OPT_LEVEL = amp


class Rule(NamedTuple):
    key: str
    valid: Callable[[Any, CN], bool]  # (value, whole config)
    requirement: str  # completes "<KEY> ...", e.g. "must be at least 1"


def at_least(low: float) -> Callable[[Any, CN], bool]:
    return lambda value, _: value >= low


def between(low: float, high: float, high_open: bool = False) -> Callable[[Any, CN], bool]:
    return lambda value, _: low <= value < high if high_open else low <= value <= high


def one_of(choices: Sequence[str]) -> Callable[[Any, CN], bool]:
    return lambda value, _: value in choices


def one_path_component(value: Any, _: Any = None) -> bool:
    """A name that becomes exactly one folder under ``--output``: no separator, not ``.`` or ``..``, so that
    ``<OUTPUT>/<MODEL.NAME>/<TAG>`` can never point outside ``--output``."""
    return (isinstance(value, str) and value not in ("", ".", "..")
            and not any(char in value for char in ("/", "\\", "\0")))


PATH_COMPONENT = "must be one folder name (no '/' or '\\', not '.' or '..'): the run writes to <output>/<model>/<tag>"


def plain_path(value: str, _: Any = None) -> bool:
    """False where ``value``, or the nearest part of it that exists, is a FIFO, socket or device: opening a FIFO
    waits for a writer forever, a socket cannot be opened at all. A missing path passes, to be refused where it
    is opened, with its own reason."""
    path = os.path.abspath(value) if value else os.sep
    while not os.path.exists(path):
        path = os.path.dirname(path)
    mode = os.stat(path).st_mode
    return stat.S_ISREG(mode) or stat.S_ISDIR(mode)


PLAIN_PATH = "must be a file or a folder, not a FIFO, socket or device"


def path_arg(text: str) -> str:
    """The argparse ``type`` of a tool's path flag, refused by :func:`plain_path` with the flag's name."""
    if not plain_path(text):
        raise argparse.ArgumentTypeError(f"{text} {PLAIN_PATH}")
    return text


def compile_backend(value: str, _: Any) -> bool:
    if not value:
        return True
    import torch._dynamo  # only when asked for: importing it takes a while
    return value in torch._dynamo.list_backends(exclude_tags=())


def trains(config: CN) -> bool:
    """The run trains (not ``--eval`` or ``--throughput``)."""
    return not (config.EVAL_MODE or config.get("THROUGHPUT_MODE", False))


def mixup_active(config: CN) -> bool:
    """timm's Mixup/CutMix is on (classification's AUG keys)."""
    aug = config.AUG
    return aug.MIXUP > 0 or aug.CUTMIX > 0 or aug.CUTMIX_MINMAX is not None


def in_unit_interval(value: Any, _: Any) -> bool:
    return 0 <= value < 1


# The rules of run_defaults()'s keys, which every task's rules start from.
RUN_RULES = (
    Rule("DATA.BATCH_SIZE", at_least(1), "must be at least 1"),
    Rule("DATA.NUM_WORKERS", at_least(0), "must be 0 (load in the main process) or more"),
    Rule("MODEL.NAME", one_path_component, PATH_COMPONENT),
    Rule("MODEL.RESUME", lambda value, c: not (value and c.MODEL.PRETRAINED),
         "cannot be combined with --pretrained (MODEL.PRETRAINED): --resume continues a run with its weights, "
         "optimizer and schedule; --pretrained starts a new run from weights only. Pass one of them"),
    Rule("MODEL.DROP_PATH_RATE", in_unit_interval, "must be in [0, 1)"),
    Rule("TRAIN.EPOCHS", at_least(1), "must be at least 1"),
    Rule("TRAIN.START_EPOCH", at_least(0), "must be 0 or more"),
    Rule("TRAIN.START_EPOCH", lambda value, c: value < c.TRAIN.EPOCHS or not trains(c),
         "must be below TRAIN.EPOCHS (there would be nothing to train)"),
    Rule("TRAIN.BASE_LR", lambda value, _: value > 0, "must be above 0"),
    Rule("TRAIN.MIN_LR", at_least(0), "must be 0 or more"),
    Rule("TRAIN.LR_BATCH", at_least(1), "must be at least 1 (the total batch the learning rates are stated for)"),
    Rule("TRAIN.WEIGHT_DECAY", at_least(0), "must be 0 or more"),
    Rule("TRAIN.CLIP_GRAD", lambda value, _: value is None or value >= 0,
         "must be 0 or more (the largest gradient norm; 0 or None turns clipping off)"),
    Rule("TRAIN.ACCUMULATION_STEPS", at_least(1), "must be at least 1"),
    Rule("MODEL_EMA_DECAY", in_unit_interval, "must be in [0, 1)"),
    Rule("AMP_OPT_LEVEL", one_of(AMP_LEVELS), f"must be one of {AMP_LEVELS[1:]} (or empty: the device's default)"),
    Rule("COMPILE", compile_backend, "must name a torch.compile backend (torch._dynamo.list_backends(), e.g. "
         "inductor, aot_eager or eager)"),
    Rule("TAG", one_path_component, PATH_COMPONENT),
    Rule("SAVE_FREQ", at_least(1), "must be at least 1"),
    Rule("EVAL_FREQ", at_least(1), "must be at least 1"),
    Rule("KEEP_CHECKPOINTS", at_least(0), "must be 0 (keep all) or more"),
    Rule("PRINT_FREQ", at_least(1), "must be at least 1"),
    Rule("SEED", at_least(0), "must be 0 or more"),
) + tuple(Rule(key, plain_path, PLAIN_PATH) for key in ("DATA.DATA_PATH", "MODEL.PRETRAINED", "MODEL.RESUME", "OUTPUT"))

RULES = RUN_RULES + (
    Rule("DATA.IMG_SIZE", at_least(1), "must be at least 1"),
    Rule("DATA.INTERPOLATION", one_of(INTERPOLATIONS), f"must be one of {INTERPOLATIONS}"),
    Rule("DATA.CACHE_MODE", one_of(CACHE_MODES), f"must be one of {CACHE_MODES}"),
    Rule("MODEL.PRETRAINED_MIN_LOADED", between(0.0, 1.0), "must be a share of the model's tensors in [0, 1]"),
    Rule("MODEL.LABEL_SMOOTHING", in_unit_interval, "must be in [0, 1)"),
    Rule("MODEL.NUM_CLASSES", lambda value, c: value >= 2 or c.THROUGHPUT_MODE,
         "must be at least 2 to train or evaluate (0 builds the model without a classifier head; with 1 the "
         "softmax is always 1, so the loss is 0 and nothing is learned)"),
    Rule("MODEL.FOCAL.IN_CHANS", at_least(1), "must be at least 1"),
    Rule("MODEL.FOCAL.IN_CHANS", lambda value, c: value == 3 or c.THROUGHPUT_MODE,
         "must be 3 to train or evaluate: images are read as RGB"),
    Rule("TRAIN.WARMUP_EPOCHS", at_least(0), "must be 0 or more"),
    Rule("TRAIN.WARMUP_EPOCHS", lambda value, c: value < c.TRAIN.EPOCHS or not trains(c),
         "must be below TRAIN.EPOCHS: a warm-up as long as the run never reaches TRAIN.BASE_LR"),
    Rule("TRAIN.WARMUP_LR", at_least(0), "must be 0 or more"),
    Rule("TRAIN.LAYER_DECAY", lambda value, _: 0 < value <= 1, "must be in (0, 1] (1 turns layer decay off)"),
    Rule("TRAIN.LR_SCHEDULER.NAME", one_of(SCHEDULERS), f"must be one of {SCHEDULERS}"),
    Rule("TRAIN.LR_SCHEDULER.DECAY_EPOCHS", lambda value, _: value > 0, "must be above 0"),
    Rule("TRAIN.LR_SCHEDULER.DECAY_RATE", lambda value, _: value > 0, "must be above 0"),
    Rule("TRAIN.OPTIMIZER.NAME", lambda value, _: value.lower() in OPTIMIZERS, f"must be one of {OPTIMIZERS}"),
    Rule("TRAIN.OPTIMIZER.EPS", lambda value, _: value > 0, "must be above 0"),
    Rule("TRAIN.OPTIMIZER.BETAS", lambda value, _: len(value) == 2 and all(0 <= b < 1 for b in value),
         "must be two values in [0, 1)"),
    Rule("TRAIN.OPTIMIZER.MOMENTUM", in_unit_interval, "must be in [0, 1)"),
    Rule("AUG.COLOR_JITTER", at_least(0), "must be 0 (off) or more"),
    Rule("AUG.REPROB", between(0.0, 1.0), "must be a probability in [0, 1]"),
    Rule("AUG.REMODE", one_of(("pixel", "rand", "const")), "must be one of ('pixel', 'rand', 'const')"),
    Rule("AUG.RECOUNT", at_least(1), "must be at least 1"),
    Rule("AUG.MIXUP", at_least(0), "must be 0 (off) or more"),
    Rule("AUG.CUTMIX", at_least(0), "must be 0 (off) or more"),
    Rule("AUG.CUTMIX_MINMAX", lambda value, _: value is None or (len(value) == 2 and 0 < value[0] < value[1] <= 1),
         "must be None or two fractions (min, max) with 0 < min < max <= 1"),
    Rule("AUG.MIXUP_PROB", between(0.0, 1.0), "must be a probability in [0, 1]"),
    Rule("AUG.MIXUP_SWITCH_PROB", between(0.0, 1.0), "must be a probability in [0, 1]"),
    Rule("AUG.MIXUP_MODE", one_of(("batch", "pair", "elem")), "must be one of ('batch', 'pair', 'elem')"),
    Rule("DATA.BATCH_SIZE", lambda value, c: value % 2 == 0 or not trains(c) or not mixup_active(c),
         "must be even to train with Mixup/CutMix (AUG.MIXUP or AUG.CUTMIX above 0): timm mixes each image with "
         "its mirror in the batch"),
    Rule("THROUGHPUT_PASSES", at_least(1), "must be at least 1"),
)


def _lookup(config: CN, key: str) -> Any:
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def check_values(config: CN, rules: Sequence[Rule], flags: Optional[dict] = None) -> None:
    """Raise ``ValueError`` for the first value outside its rule, naming the key and its flag (``flags``: the
    entry points' :data:`KEY_FLAGS` unless a tool passes its own)."""
    flags = KEY_FLAGS if flags is None else flags
    for rule in rules:
        value = _lookup(config, rule.key)
        try:
            ok = rule.valid(value, config)
        except TypeError:  # e.g. None where a number belongs
            ok = False
        if not ok:
            flag = flags.get(rule.key)
            name = f"{flag} ({rule.key})" if flag else rule.key
            raise ValueError(f"{name} {rule.requirement}, got {value!r}")


def get_config(args: Any, defaults: Optional[CN] = None, rules: Sequence[Rule] = RULES) -> CN:
    """A run's config: ``defaults`` (classification's tree unless a task passes its own), ``--cfg`` and ``--opts``,
    then the command-line flags, every value checked against ``rules``: a bad file, key or value is a
    ``UsageError`` naming it, before the run writes anything. A classifier's model settings are checked by
    ``validate_model_config`` (``ConfigError``), and its ``MODEL.NAME`` states the geometry it is built at."""
    try:
        config = load_config(args.cfg, args.opts, defaults)
        config.defrost()
        apply_flags(config, args)
        check_values(config, rules)
    except (KeyError, ValueError, AssertionError, FileNotFoundError) as err:
        raise UsageError(f"config (--cfg {args.cfg} / --opts): {error_text(err)}") from None
    if "FOCAL" in config.MODEL:
        from models import validate_model_config  # not at the top: the config tree imports nothing it configures
        validate_model_config(config)
        if "MODEL.NAME" not in list(args.opts or [])[::2]:
            config.MODEL.NAME = name_for_geometry(config)
    if not config.DATA.DATA_PATH and not config.get("THROUGHPUT_MODE", False):
        raise UsageError("--data-path (DATA.DATA_PATH) is required for training and evaluation"
                         + ("; only --throughput runs without data" if "THROUGHPUT_MODE" in config else ""))
    config.OUTPUT = os.path.join(config.OUTPUT or "output", config.MODEL.NAME, config.TAG)
    config.freeze()
    return config


# The part of a model name that states its geometry, as in focal_tiny_patch4_window7_224.
GEOMETRY = re.compile(r"patch\d+_window\d+_\d+")


def name_for_geometry(config: CN) -> str:
    """``MODEL.NAME`` with its ``patch<P>_window<W>_<size>`` part stating the model actually built, so that a
    config run at another size or window (a fine-tune through --opts) is named, and writes its output, as what it
    is; names without that part are kept."""
    geometry = f"patch{config.MODEL.FOCAL.PATCH_SIZE}_window{config.MODEL.FOCAL.WINDOW_SIZE}_{config.DATA.IMG_SIZE}"
    return GEOMETRY.sub(geometry, config.MODEL.NAME, count=1)


# --- Command lines ------------------------------------------------------------------------------------------

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` to a flag's help where the default is a value; flags whose default is unset (the
    config's value applies, named in their help), and switches (``store_true``/``store_false``: the flag's name
    says what it does) show none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, []) or action.default is argparse.SUPPRESS or action.nargs == 0:
            return action.help or ""
        return super()._get_help_string(action)


def run_parser(prog: Optional[str], description: str, data_help: str) -> Tuple[argparse.ArgumentParser,
                                                                                 argparse._MutuallyExclusiveGroup]:
    """The flags every training entry point takes (``main.py`` and the dense tasks), each setting the config key
    ``config.KEY_FLAGS`` / ``config.SWITCHES`` map it to; and the group of run modes (``--eval``), to which an
    entry point adds its own."""
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)
    parser.add_argument("--cfg", required=True, metavar="FILE", help="config file (YAML)")
    parser.add_argument("--opts", nargs="+", action="extend", default=None, metavar="KEY VALUE",
                        help="override config keys, e.g. --opts TRAIN.EPOCHS 100 DATA.NUM_WORKERS 4")
    parser.add_argument("--batch-size", type=int, help="batch size per process (DATA.BATCH_SIZE)")
    parser.add_argument("--data-path", help=data_help)
    parser.add_argument("--pretrained", metavar="FILE", help="initial weights only (e.g. a released checkpoint)")
    parser.add_argument("--resume", metavar="FILE", help="checkpoint to continue training from, or to evaluate")
    parser.add_argument("--unsafe-load", action="store_true",
                        help="DANGEROUS: also load checkpoints that need full unpickling (not tensors only); "
                             "unpickling runs any code the file carries, so use it only for files you trust")
    parser.add_argument("--accumulation-steps", type=int,
                        help="batches per optimizer update (TRAIN.ACCUMULATION_STEPS)")
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
    parser.add_argument("--output", metavar="PATH", help="output root; the run writes to <output>/<model>/<tag>")
    parser.add_argument("--tag", help="experiment tag (default: 'default')")
    parser.add_argument("--tensorboard", action="store_true",
                        help="write losses, learning rate, gradient norm and scores as TensorBoard events to the "
                             "run's output folder (TENSORBOARD; needs `pip install tensorboard`)")
    parser.add_argument("--seed", type=int, help="random seed (each process adds its rank)")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="auto: CUDA when available, else CPU")
    # torch.distributed.launch passes --local-rank as well as setting LOCAL_RANK, which engine.init_distributed reads:
    # the flag is accepted so that such launches parse, and otherwise ignored.
    parser.add_argument("--local-rank", "--local_rank", type=int, dest="local_rank", help=argparse.SUPPRESS)
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--eval", action="store_true", help="evaluate only")
    return parser, modes
