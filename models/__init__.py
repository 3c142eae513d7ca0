"""Focal Transformer models: ``build_model(config)`` for both variants."""
from .build import ConfigError, build_model, validate_model_config
from .focal_transformer import FocalTransformer

__all__ = ["ConfigError", "FocalTransformer", "build_model", "validate_model_config"]
