"""Image transforms: timm's ImageNet training recipe, and resize + centre crop for evaluation."""
from __future__ import annotations

from typing import Any, Callable

from timm.data import create_transform

# Resizing to 256 before a 224 crop, and the same ratio at other sizes.
CENTER_CROP_PCT = 224 / 256


def build_transform(is_train: bool, config: Any) -> Callable:
    """``TEST.CROP`` true: resize the short side to ``IMG_SIZE / 0.875`` and centre-crop; false: squash to size."""
    size, interp = config.DATA.IMG_SIZE, config.DATA.INTERPOLATION
    if is_train:
        aug = config.AUG
        return create_transform(
            input_size=size,
            is_training=True,
            color_jitter=aug.COLOR_JITTER if aug.COLOR_JITTER > 0 else None,
            auto_augment=aug.AUTO_AUGMENT if aug.AUTO_AUGMENT not in ("", "none") else None,
            re_prob=aug.REPROB,
            re_mode=aug.REMODE,
            re_count=aug.RECOUNT,
            interpolation=interp,
        )
    if config.TEST.CROP:
        return create_transform(size, is_training=False, interpolation=interp, crop_pct=CENTER_CROP_PCT)
    return create_transform(size, is_training=False, interpolation=interp, crop_pct=1.0, crop_mode="squash")
