"""Focal Transformer as an installable package: ``pip install -e .`` and, from any directory::

    import timm
    import focal_transformer  # registers the nine released models with timm
    model = timm.create_model("focal_tiny_patch4_window7_224", num_classes=10)

A thin layer over the repository's ``models/`` tree, installed as ``focal_transformer.models`` (pyproject.toml),
so that the package does not claim the generic top-level name ``models``.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Optional


def _share_loaded_tree() -> None:
    """Share the repository's ``models`` modules where they are already importable or imported under that name (an
    uninstalled checkout, main.py, the tests): a second copy would register every timm name twice. Another
    project's ``models`` is never taken for ours: the files must be the same."""
    installed = importlib.util.find_spec(f"{__name__}.models")
    ours = installed.origin if installed else str(Path(__file__).resolve().parents[1] / "models" / "__init__.py")
    if installed is None:
        top = importlib.util.find_spec("models")
        if top is None or not _same_file(top.origin, ours):
            raise ImportError(f"{__name__} is not installed and its models/ tree is not importable here: run "
                              f"`pip install -e {Path(ours).parents[1]}`")
        importlib.import_module("models")
    tree = sys.modules.get("models")
    if tree is None or not _same_file(getattr(tree, "__file__", None), ours):
        return
    for name, module in list(sys.modules.items()):
        if name == "models" or name.startswith("models."):
            sys.modules.setdefault(f"{__name__}.{name}", module)


def _same_file(a: Optional[str], b: Optional[str]) -> bool:
    return bool(a and b) and os.path.realpath(a) == os.path.realpath(b)


_share_loaded_tree()

from . import models  # noqa: E402  (binds the attribute also where the modules were shared above)
from .models import (ConfigError, FocalTransformer, LoadReport, build_model, extract_state_dict,  # noqa: E402
                     load_weights, registry)
from .models.kernels import optimize_for  # noqa: E402

MODEL_NAMES = tuple(registry.default_cfgs)  # the names timm.create_model takes

__all__ = ["ConfigError", "FocalTransformer", "LoadReport", "MODEL_NAMES", "build_model", "extract_state_dict",
           "load_weights", "optimize_for"]
