"""Image transforms: timm's ImageNet training recipe, and resize + centre crop for evaluation."""
from __future__ import annotations

from typing import Any, Callable, Iterator, Tuple

from PIL import Image
from timm.data import auto_augment, create_transform

# Resizing to 256 before a 224 crop, and the same ratio at other sizes.
CENTER_CROP_PCT = 224 / 256


def posterize(img: Image.Image, bits_to_keep: int, **kwargs: Any) -> Image.Image:
    """timm's posterize, except that keeping 0 bits gives a black image, as Pillow up to 12 did (the released
    models' augmentation) and Pillow 13 refuses; timm asks for 0 bits at high magnitudes."""
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


def augment_ops(transform: Callable) -> Iterator[auto_augment.AugmentOp]:
    """The ``AugmentOp``s of the RandAugment, AutoAugment or AugMix steps in a (composed) timm transform."""
    for step in getattr(transform, "transforms", [transform]):
        if isinstance(step, (auto_augment.RandAugment, auto_augment.AugMixAugment)):
            yield from step.ops
        elif isinstance(step, auto_augment.AutoAugment):
            for sub_policy in step.policy:
                yield from sub_policy


def build_transform(is_train: bool, config: Any) -> Callable:
    """timm's training recipe (with :func:`posterize`), or resize and centre-crop (``TEST.CROP``) or squash."""
    size, interp = config.DATA.IMG_SIZE, config.DATA.INTERPOLATION
    if is_train:
        aug = config.AUG
        transform = create_transform(size, is_training=True, interpolation=interp,
                                     color_jitter=aug.COLOR_JITTER if aug.COLOR_JITTER > 0 else None,
                                     auto_augment=aug.AUTO_AUGMENT if aug.AUTO_AUGMENT not in ("", "none") else None,
                                     re_prob=aug.REPROB, re_mode=aug.REMODE, re_count=aug.RECOUNT)
        for op in augment_ops(transform):
            if op.aug_fn is auto_augment.posterize:
                op.aug_fn = posterize
        return transform
    crop_pct, crop_mode = eval_crop(config)
    return create_transform(size, is_training=False, interpolation=interp, crop_pct=crop_pct, crop_mode=crop_mode)


def eval_crop(config: Any) -> Tuple[float, str]:
    """timm's ``crop_pct`` and ``crop_mode`` of the evaluation transform."""
    return (CENTER_CROP_PCT, "center") if config.TEST.CROP else (1.0, "squash")
