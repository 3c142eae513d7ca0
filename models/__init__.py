"""Focal Transformer models: ``build_model(config)`` for both variants."""
from .build import ConfigError, build_model, validate_model_config
from .checkpoint import LoadReport, extract_state_dict, head_classes, load_weights
from .focal_transformer import FocalTransformer
from . import registry  # noqa: F401  registers the released models with timm (no network)

__all__ = ["ConfigError", "FocalTransformer", "LoadReport", "build_model", "extract_state_dict", "head_classes",
           "load_weights", "validate_model_config"]
