"""The released training recipe as it runs: every released config's training transform over the whole
RandAugment magnitude range on decoded images, every timm augmentation policy op by op, gradient clipping, and
each model variant trained end to end with its released settings (tiny model, tiny data)."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageOps
from timm.data import auto_augment
from timm.data.random_erasing import RandomErasing

from config import load_config
from data.datasets import build_dataset
from data.demo import generate
from data.transforms import augment_ops, build_transform, posterize
from engine import build_precision
from models import build_model

from tests.helpers import (DEMO_CFG, REPO, check, eval_summary, fake_batches, run_epoch, run_main, sum_roundoff,
                           tiny_config)

RELEASED = sorted((REPO / "configs").glob("*.yaml"))
DEMO = Path(DEMO_CFG)
# RandAugment magnitudes from 0 to the clipped edge: 10 is the upper bound, so 10.5 and 13 also run at 10.
MAGNITUDES = list(range(0, 11)) + [9.5, 10.5, 13.0]


def decoded_images(data: Path, config_file: Path, count: int) -> list:
    """The first ``count`` training images as the loader decodes them (RGB)."""
    config = load_config(str(config_file), ["DATA.DATA_PATH", str(data)])
    dataset, _ = build_dataset("train", config, transform=None)
    return [dataset[i][0] for i in range(count)]


def test_posterize_keeps_zero_bits_black_and_otherwise_is_pillows():
    rng = np.random.RandomState(0)
    image = Image.fromarray(rng.randint(0, 256, (12, 10, 3), dtype=np.uint8))
    for bits in (0, -1, -4):  # PosterizeIncreasing at magnitude 10, and beyond it with mmax
        out = posterize(image, bits)
        assert out.mode == "RGB" and out.size == image.size and not np.asarray(out).any()
    for bits in range(1, 8):
        np.testing.assert_array_equal(np.asarray(posterize(image, bits)), np.asarray(ImageOps.posterize(image, bits)))
    assert posterize(image, 8) is image
    assert pickle.loads(pickle.dumps(posterize)) is posterize  # DataLoader workers started by spawn unpickle it


@pytest.mark.parametrize("config_file", RELEASED, ids=lambda p: p.stem)
def test_released_training_transform_runs_over_the_whole_magnitude_range(config_file, demo_data_224):
    """Every op of the released RandAugment (each applied once per call, in random order) at every magnitude,
    through the whole training transform at 224; then the transform exactly as configured."""
    config = load_config(str(config_file))
    transform = build_transform(True, config)
    images = decoded_images(demo_data_224, config_file, 4)
    for image in images:
        assert transform(image).shape == (3, 224, 224)
    rand_augment = [step for step in transform.transforms if isinstance(step, auto_augment.RandAugment)]
    assert len(rand_augment) == 1 and rand_augment[0].num_layers == 2  # the released rand-m9-mstd0.5-inc1
    ops = rand_augment[0].ops
    assert {(op.magnitude, op.magnitude_std, op.prob) for op in ops} == {(9, 0.5, 0.5)}
    assert "PosterizeIncreasing" in {op.name for op in ops}
    assert [step.probability for step in transform.transforms if isinstance(step, RandomErasing)] == [0.25]
    assert pickle.loads(pickle.dumps(transform)) is not None

    rand_augment[0].num_layers, rand_augment[0].choice_weights = len(ops), [1 / len(ops)] * len(ops)
    for op in ops:
        op.prob, op.magnitude_std = 1.0, 0
    for index, magnitude in enumerate(MAGNITUDES):
        for op in ops:
            op.magnitude = magnitude
        out = transform(images[index % len(images)])
        assert out.shape == (3, 224, 224) and torch.isfinite(out).all()


@pytest.mark.parametrize("policy", ["rand-m9-mstd0.5", "rand-m9-mstd0.5-inc1-mmax15", "rand-m15-n3-mstd101",
                                    "original", "originalr", "v0", "v0r", "3a", "augmix-m5-w4-d2"])
def test_every_timm_policy_op_runs_over_its_magnitude_range(policy, demo_data):
    """Other policies a user may set in ``AUG.AUTO_AUGMENT``: each op alone, from magnitude 0 past its upper
    bound (10, or mmax), on decoded RGB images; and the whole transform."""
    config = load_config(DEMO_CFG, ["DATA.IMG_SIZE", 32, "AUG.AUTO_AUGMENT", policy])
    transform = build_transform(True, config)
    ops = list(augment_ops(transform))
    assert ops and not any(op.aug_fn is auto_augment.posterize for op in ops)
    images = decoded_images(demo_data, DEMO, 2)
    for op in ops:
        op.prob, op.magnitude_std = 1.0, 0
        for magnitude in [m / 4 for m in range(int((op.magnitude_max or 10) * 4) + 9)]:
            op.magnitude = magnitude
            for image in images:
                out = op(image)
                assert out.mode == "RGB" and out.size == image.size, (op, magnitude)
    for image in images:
        assert transform(image).shape == (3, 32, 32)


@pytest.mark.parametrize("mode", ["pixel", "rand", "const"])
def test_random_erasing_modes(mode, demo_data):
    config = load_config(DEMO_CFG,
                         ["DATA.IMG_SIZE", 32, "AUG.REPROB", 1.0, "AUG.REMODE", mode, "AUG.RECOUNT", 2])
    transform = build_transform(True, config)
    erasing = transform.transforms[-1]
    assert isinstance(erasing, RandomErasing) and erasing.mode == mode and erasing.max_count == 2
    out = transform(decoded_images(demo_data, DEMO, 1)[0])
    assert out.shape == (3, 32, 32) and torch.isfinite(out).all()


def test_color_jitter_applies_only_without_rand_augment(demo_data):
    """``AUG.COLOR_JITTER`` 0.4 is in every released config, but timm leaves it out next to RandAugment (as in the
    released runs); with ``AUG.AUTO_AUGMENT none`` it is applied."""
    names = {}
    for policy in ("rand-m9-mstd0.5-inc1", "none"):
        config = load_config(DEMO_CFG,
                             ["DATA.IMG_SIZE", 32, "AUG.AUTO_AUGMENT", policy, "AUG.COLOR_JITTER", 0.4])
        transform = build_transform(True, config)
        names[policy] = [type(step).__name__ for step in transform.transforms]
        image = decoded_images(demo_data, DEMO, 1)[0]
        assert transform(image).shape == (3, 32, 32)
    assert "ColorJitter" not in names["rand-m9-mstd0.5-inc1"] and "ColorJitter" in names["none"]


def test_gradient_clipping_scales_the_whole_update():
    """``TRAIN.CLIP_GRAD`` (5.0 in every released run) bounds the global gradient norm. The first SGD update
    (Nesterov: ``lr * (1 + momentum) * gradient``, no weight decay) measures the norm unclipped; with the bound set
    to half of it, the clipped update is exactly half the unclipped one."""
    lr, momentum = 1.0, 0.9
    base = ("MODEL.DROP_PATH_RATE", 0.0, "TRAIN.WARMUP_EPOCHS", 0, "TRAIN.OPTIMIZER.NAME", "sgd",
            "TRAIN.OPTIMIZER.MOMENTUM", momentum, "TRAIN.BASE_LR", lr, "TRAIN.WEIGHT_DECAY", 0.0)
    batches, precision = fake_batches(1), build_precision("none", torch.device("cpu"))
    torch.manual_seed(0)  # as run_epoch seeds its model
    start = [p.detach().clone() for p in build_model(tiny_config(*base)).parameters()]

    def update(clip: float) -> torch.Tensor:
        model = run_epoch(tiny_config(*base, "TRAIN.CLIP_GRAD", clip), batches, precision)[0]
        return torch.cat([(p.detach() - s).flatten() for p, s in zip(model.parameters(), start)])

    free = update(0.0)
    grad_norm = free.norm().item() / (lr * (1 + momentum))
    # Clipping scales the same gradient by bound / (norm + 1e-6) (torch's clip_grad_norm_); the norm read back here
    # sums every parameter's square in float32, and each update is recovered from weights of up to max |w|.
    rtol = sum_roundoff(torch.float32, terms=free.numel(), steps=2) + 1e-6 / grad_norm
    atol = torch.finfo(torch.float32).eps * max(float(s.abs().max()) for s in start)
    torch.testing.assert_close(update(grad_norm / 2), free / 2, atol=atol, rtol=rtol)


# One released config per model variant: fc-pool focal, focal with convolutional embedding, focalv2.
VARIANTS = ["focal_tiny_patch4_window7_224", "focal_tiny_useconv_patch4_window7_224",
            "focalv2_tiny_useconv_patch4_window7_224"]
# The model shrunk, the image size and class count fitted to the data, a short schedule, two loader workers;
# everything else (augmentation, Mixup/CutMix, label smoothing, clipping, schedule, AMP choice) as released.
SHRINK = {"MODEL.FOCAL.EMBED_DIM": 16, "MODEL.FOCAL.DEPTHS": [1, 1, 1, 1], "MODEL.FOCAL.NUM_HEADS": [1, 1, 2, 2],
          "MODEL.FOCAL.WINDOW_SIZE": 4, "MODEL.FOCAL.FOCAL_WINDOWS": [3, 3, 1, 1],
          "MODEL.FOCAL.EXPAND_SIZES": [2, 2, 2, 2], "MODEL.NUM_CLASSES": 10, "DATA.IMG_SIZE": 32,
          "DATA.BATCH_SIZE": 32, "DATA.NUM_WORKERS": 2, "TRAIN.EPOCHS": 2, "TRAIN.WARMUP_EPOCHS": 1,
          "PRINT_FREQ": 4}


@pytest.fixture(scope="module")
def recipe_data(tmp_path_factory) -> Path:
    """300 training and 50 validation images at 32x32."""
    return Path(generate(str(tmp_path_factory.mktemp("recipe") / "data"), size=32, train_per_class=30,
                         val_per_class=5, zip_layout=False, log=None))


def flatten(tree: dict, prefix: str = "") -> dict:
    return {key: value for name, sub in tree.items()
            for key, value in (flatten(sub, f"{prefix}{name}.").items() if isinstance(sub, dict)
                               else [(f"{prefix}{name}", sub)])}


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.slow
def test_released_config_trains_and_evaluates_end_to_end(name, recipe_data, tmp_path):
    config_file = REPO / "configs" / f"{name}.yaml"
    opts = [str(item) for key, value in SHRINK.items() for item in (key, value)]
    log = check(run_main(["--cfg", str(config_file), "--data-path", str(recipe_data), "--output", str(tmp_path),
                          "--opts", *opts], timeout=240)).stdout
    # 300 images in batches of 32: 9 updates per epoch, the first epoch warming up.
    assert "Train: [0/2][8/9]" in log and "Train: [1/2][8/9]" in log
    summary = eval_summary(log)
    assert summary["images"] == summary["counted"] == 50 and np.isfinite(summary["loss"])
    run = tmp_path / name.replace("window7_224", "window4_32") / "default"  # named for the geometry it built
    assert (run / "ckpt_epoch_1.pth").is_file()
    used = flatten(yaml.safe_load((run / "config.yaml").read_text()))
    released = flatten(yaml.safe_load(load_config(str(config_file)).dump()))
    changed = {key for key in released if used[key] != released[key]}
    # scaled to the total batch, which TRAIN.LR_BATCH records
    lr_scaled = {"TRAIN.BASE_LR", "TRAIN.WARMUP_LR", "TRAIN.MIN_LR", "TRAIN.LR_BATCH"}
    assert changed == set(SHRINK) | lr_scaled | {"DATA.DATA_PATH", "OUTPUT", "MODEL.NAME"}, changed
    assert released["AUG.AUTO_AUGMENT"] == "rand-m9-mstd0.5-inc1" and released["AUG.CUTMIX"] == 1.0
