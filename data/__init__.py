"""Datasets, transforms and loaders for ImageNet-layout data, and the generator of the embedded demo dataset."""
from .build import build_mixup, build_train_loader, build_val_loader

__all__ = ["build_mixup", "build_train_loader", "build_val_loader"]
