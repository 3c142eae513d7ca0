"""Runs timm's model tests (``test_models.py``, timm's file unchanged: README.md) on our registered Tiny models.

timm parametrises its tests by ``timm.list_models(...)`` when the test module is imported. While that module is
collected, ``list_models`` here answers with our Tiny models only, whatever the filter; its ``module=`` lists name
the timm files whose models implement ``forward_intermediates`` and the feature getter, which ours implement too.
Tests that name timm's own models, and the two that download released weights, are deselected.
"""
from unittest import mock

import pytest
import timm

import focal_transformer

HERE = __file__.rsplit("/", 1)[0]
TINY = tuple(name for name in focal_transformer.MODEL_NAMES if "_tiny_" in name)
NEEDS_NETWORK = ("test_model_load_pretrained", "test_model_features_pretrained")
# Measured on 2 cores (AMD EPYC) at under ~1 s each; every other test of the file takes longer.
FAST = ("test_model_backward", "test_model_forward_features", "test_model_forward_intermediates",
        "test_model_forward_intermediates_features")
# timm's file registers these in its own pyproject.toml; this project runs pytest with --strict-markers.
MARKERS = ("base", "forward", "backward", "cfg", "cfg_nonstd", "torchscript", "features", "fxforward", "fxbackward",
           "timeout(seconds): a time limit for pytest-timeout, where installed")
WARNINGS = (
    "ignore:`torch.jit.script` is deprecated:FutureWarning",  # timm's TorchScript tests use it by design
    "ignore:`torch.jit.script_method` is deprecated:FutureWarning",
    "ignore:NOTE. The nodes obtained by tracing:UserWarning",  # torchvision's hint on train/eval fx graphs
)


def _ours(filter="", module="", pretrained=False, exclude_filters="", name_matches_cfg=False, include_tags=None):
    names = _real_list_models(filter=filter, pretrained=pretrained, exclude_filters=exclude_filters,
                              name_matches_cfg=name_matches_cfg, include_tags=include_tags)
    return [name for name in names if name.split(".")[0] in TINY]


_real_list_models = timm.list_models


def pytest_configure(config):
    for marker in MARKERS:
        config.addinivalue_line("markers", marker)


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    if not (isinstance(collector, pytest.Module) and str(collector.path).startswith(HERE)):
        return (yield)
    with mock.patch.object(timm, "list_models", _ours), mock.patch.object(timm, "list_pretrained", lambda *a, **k: []):
        return (yield)


def pytest_collection_modifyitems(config, items):
    ours, others = [], []
    for item in items:
        if not str(item.path).startswith(HERE):
            continue
        name = item.callspec.params.get("model_name", "") if hasattr(item, "callspec") else ""
        if str(name).split(".")[0] in TINY and item.originalname not in NEEDS_NETWORK:
            ours.append(item)
            for warning in WARNINGS:
                item.add_marker(pytest.mark.filterwarnings(warning))
            if item.originalname not in FAST:
                item.add_marker(pytest.mark.slow)
        else:
            others.append(item)
    if others:
        config.hook.pytest_deselected(items=others)
        items[:] = [item for item in items if item not in others]
