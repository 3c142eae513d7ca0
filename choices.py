"""The values a config key may take, read both by the config's value rules (config.py) and by the modules that act
on the key: here, so that the config tree imports none of the modules it configures."""
from __future__ import annotations

CACHE_MODES = ("no", "part", "full")  # DATA.CACHE_MODE: data/datasets.py
AMP_MODES = ("bf16", "fp16", "none")  # AMP_OPT_LEVEL / --amp: engine.py
APEX_LEVELS = {"O0": "none", "O1": "fp16", "O2": "fp16"}  # the reference's apex levels and their autocast modes
SCHEDULERS = ("cosine", "linear", "step")  # TRAIN.LR_SCHEDULER.NAME: lr_scheduler.py
OPTIMIZERS = ("adamw", "sgd")  # TRAIN.OPTIMIZER.NAME: optimizer.py
DEVICES = ("auto", "cpu", "cuda")  # --device: distributed.py resolves "auto"
