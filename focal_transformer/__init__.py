"""Focal Transformer as an installable package: ``pip install -e .`` and, from any directory::

    import timm
    import focal_transformer  # registers the nine released models with timm
    model = timm.create_model("focal_tiny_patch4_window7_224", num_classes=10)

This is a thin layer over the repository's ``models/`` tree, which the package installs as
``focal_transformer.models`` (see pyproject.toml), so it does not claim the generic top-level name ``models``.
"""
from __future__ import annotations

import importlib.util
import sys


def _share_loaded_tree() -> None:
    """Use the repository's ``models`` modules when they are the ones this package stands for: inside a checkout
    that was not installed (the tree is importable only as ``models``), or where ``models`` is already imported
    under its own name (main.py, the tests). A second copy would register every timm name twice."""
    spec = importlib.util.find_spec(f"{__name__}.models")
    if spec is None:
        importlib.import_module("models")
    tree = sys.modules.get("models")
    if tree is None or (spec is not None and getattr(tree, "__file__", None) != spec.origin):
        return
    for name, module in list(sys.modules.items()):
        if name == "models" or name.startswith("models."):
            sys.modules.setdefault(f"{__name__}.{name}", module)


_share_loaded_tree()

from . import models  # noqa: E402  (binds the attribute also where the modules were shared above)
from .models import (ConfigError, FocalTransformer, LoadReport, build_model, extract_state_dict,  # noqa: E402
                     load_weights, registry)
from .models.kernels import optimize_for  # noqa: E402

MODEL_NAMES = tuple(registry.default_cfgs)  # the names timm.create_model takes

__all__ = ["ConfigError", "FocalTransformer", "LoadReport", "MODEL_NAMES", "build_model", "extract_state_dict",
           "load_weights", "optimize_for"]
