"""The two dataset layouts, the zip cache modes, the shard sampler and the demo dataset generator."""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from config import UsageError, load_config
from data import build_train_loader, build_val_loader
from data.datasets import ImageTree, ZipImageDataset, build_dataset
from data.demo import generate
from data.samplers import ShardSampler
from data.transforms import build_transform
from engine import DistEnv

CPU = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def demo_config(data: Path, *opts) -> object:
    return load_config("configs/demo/focal_demo.yaml",
                       ["DATA.DATA_PATH", str(data), "DATA.IMG_SIZE", 32, "DATA.NUM_WORKERS", 0, *opts])


@pytest.mark.parametrize("split", ["train", "val"])
def test_zip_and_folder_layouts_read_the_same_samples(demo_data, split):
    folder, folder_classes = build_dataset(split, demo_config(demo_data), transform=None)
    zipped, zip_classes = build_dataset(split, demo_config(demo_data, "DATA.ZIP_MODE", True), transform=None)
    assert folder_classes == zip_classes == 10
    assert len(folder) == len(zipped) == (40 if split == "train" else 20)
    for index in range(len(folder)):
        (a, label_a), (b, label_b) = folder[index], zipped[index]
        assert label_a == label_b
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_part_cache_holds_only_this_ranks_shard(demo_data):
    args = (str(demo_data / "val.zip"), str(demo_data / "val_map.txt"))
    uncached = ZipImageDataset(*args)
    part = ZipImageDataset(*args, cache_mode="part", rank=1, world_size=3)
    full = ZipImageDataset(*args, cache_mode="full", rank=1, world_size=3)
    assert not uncached.cache
    assert sorted(part.cache) == list(range(1, 20, 3))
    assert sorted(full.cache) == list(range(20))
    for index in (0, 1, 19):
        np.testing.assert_array_equal(np.asarray(part[index][0]), np.asarray(uncached[index][0]))


@pytest.mark.parametrize("num_samples,world_size", [(20, 1), (20, 2), (21, 2), (7, 3), (2, 3)])
def test_shard_sampler_covers_every_index_once(num_samples, world_size):
    shards = [list(ShardSampler(num_samples, rank, world_size)) for rank in range(world_size)]
    assert sorted(i for shard in shards for i in shard) == list(range(num_samples))
    equal = [ShardSampler(num_samples, rank, world_size, shuffle=True, equal_lengths=True)
             for rank in range(world_size)]
    assert len({len(s) for s in equal}) == 1 and len(equal[0]) == num_samples // world_size
    assert all(set(s) <= set(shard) for s, shard in zip(equal, shards))


def test_shard_sampler_shuffles_per_epoch_reproducibly():
    sampler = ShardSampler(40, 0, 2, shuffle=True, seed=3)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(first) == sorted(second) == list(range(0, 40, 2)) and first != second
    sampler.set_epoch(0)
    assert list(sampler) == first


def test_loaders_shard_validation_and_drop_incomplete_training_batches(demo_data):
    config = demo_config(demo_data, "DATA.BATCH_SIZE", 6)
    rank1 = DistEnv(rank=1, world_size=2, local_rank=0, device=torch.device("cpu"))
    _, train = build_train_loader(config, rank1)
    assert len(train) == 3  # 20 images per rank -> three full batches of 6
    images, labels = next(iter(train))
    assert images.shape == (6, 3, 32, 32) and labels.dtype == torch.int64
    _, val = build_val_loader(config, rank1)
    assert list(val.sampler) == list(range(1, 20, 2))


def test_transforms_follow_the_config(demo_data):
    config = demo_config(demo_data, "AUG.AUTO_AUGMENT", "rand-m9-mstd0.5-inc1", "AUG.REPROB", 0.25)
    train = repr(build_transform(True, config))
    assert "RandAugment" in train and "RandomErasing" in train and "bicubic" in train
    crop = repr(build_transform(False, config))
    assert "Resize(size=36" in crop and "CenterCrop(size=(32, 32))" in crop
    squash = repr(build_transform(False, demo_config(demo_data, "TEST.CROP", False)))
    assert "Resize(size=(32, 32)" in squash


def test_class_count_mismatch_is_a_clear_error(demo_data):
    with pytest.raises(UsageError, match=r"MODEL.NUM_CLASSES is 5 .* has 10 classes.*MODEL.NUM_CLASSES 10"):
        build_val_loader(demo_config(demo_data, "MODEL.NUM_CLASSES", 5), CPU)


def test_missing_layouts_are_clear_errors(tmp_path):
    (tmp_path / "train.zip").touch()
    with pytest.raises(UsageError, match=r"has no 'train' folder.*--zip"):
        build_train_loader(demo_config(tmp_path), CPU)
    with pytest.raises(UsageError, match=r"val_map.txt not found|val.zip not found"):
        build_val_loader(demo_config(tmp_path, "DATA.ZIP_MODE", True), CPU)
    with pytest.raises(UsageError, match="--data-path"):
        build_val_loader(demo_config(""), CPU)


def test_class_folders_named_alike_in_other_unicode_forms_are_told_apart(demo_data, tmp_path):
    """macOS writes accents decomposed (NFD), most other tools composed (NFC): a split copied from a Mac has
    folders whose names print exactly as the other split's, and the refusal read 'only in train: café; only in
    val: café'. It must say what differs."""
    for split, name in (("train", "cafe\u0301"), ("val", "caf\u00e9")):
        (tmp_path / split).mkdir()
        (tmp_path / split / name).symlink_to(demo_data / split / "circle")
    with pytest.raises(UsageError, match=r"'train' and 'val' name class folders alike in different Unicode forms, "
                                         r"e.g. 'cafe\\u0301' in train and 'caf\\xe9' in val"):
        build_val_loader(demo_config(tmp_path, "MODEL.NUM_CLASSES", 1), CPU)


def _digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_demo_generator_is_deterministic_and_guards_other_folders(tmp_path):
    first = _digest(Path(generate(str(tmp_path / "a"), size=16, train_per_class=1, val_per_class=1, log=None)))
    second = _digest(Path(generate(str(tmp_path / "b"), size=16, train_per_class=1, val_per_class=1, log=None)))
    assert first == second and len(first) == 2 * 10 + 5  # 20 images, 2 zips, 2 maps, the marker
    # Regenerating in place replaces its own output ...
    assert _digest(Path(generate(str(tmp_path / "a"), size=16, train_per_class=1, val_per_class=1,
                                 log=None))) == first
    # ... but never touches a dataset it did not make.
    (tmp_path / "imagenet" / "train").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="not made by data.demo"):
        generate(str(tmp_path / "imagenet"), size=16, log=None)


@pytest.mark.parametrize("task, theirs", [("detection", "annotations/instances_val2017.json"),
                                          ("segmentation", "objectInfo150.csv")])
def test_the_dense_demo_generators_never_write_over_a_users_dataset(task, theirs, tmp_path):
    """python -m dense.demo --out <a folder with data>: it overwrote the user's annotation files and mixed its
    images into theirs. A folder it made itself is regenerated as before."""
    from dense.demo import GENERATORS
    user = tmp_path / "mine"
    (user / theirs).parent.mkdir(parents=True, exist_ok=True)
    (user / theirs).write_text("the user's own")
    with pytest.raises(FileExistsError, match=f"{user} already holds .* not made by dense.demo"):
        GENERATORS[task](str(user), 32, 1, 1)
    assert (user / theirs).read_text() == "the user's own" and len(list(user.rglob("*"))) <= 2
    ours = tmp_path / "demo"
    GENERATORS[task](str(ours), 32, 2, 1)
    first = _digest(ours)
    GENERATORS[task](str(ours), 32, 2, 1)
    assert _digest(ours) == first


def class_tree(root: Path) -> Path:
    """train/cat/{a,b}.png, train/cat/sub/c.png, train/dog/d.png, and elsewhere/e.png outside the dataset."""
    for name in ("train/cat/a.png", "train/cat/b.png", "train/cat/sub/c.png", "train/dog/d.png", "elsewhere/e.png"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (4, 4), 9).save(root / name)
    return root / "train"


@pytest.mark.parametrize("link, target", [
    ("cat/up", ".."), ("cat/sub/up", "../../.."), ("cat/dogs", "../dog"), ("cat/sub/dogs", "../../dog"),
    ("cat/extra", "{root}/elsewhere"), ("cat/split", "{root}/train"),
], ids=["parent", "dataset-root", "sibling-class", "sibling-class-nested", "outside", "absolute-split"])
def test_a_folder_link_leaving_its_class_folder_is_skipped_with_one_warning(link, target, tmp_path, caplog):
    train = class_tree(tmp_path)
    os.symlink(target.format(root=tmp_path), train / link)
    os.symlink("sub", train / "cat" / "alias")  # stays inside the class folder: read, its image once
    with caplog.at_level(logging.WARNING, "focal.data"):
        samples = ImageTree(str(train)).samples
    cat = {str(train / "cat" / name) for name in ("a.png", "b.png")}
    assert {path for path, label in samples if label == 0} - cat in ({str(train / "cat/sub/c.png")},
                                                                      {str(train / "cat/alias/c.png")})
    assert [(path, label) for path, label in samples if label == 1] == [(str(train / "dog" / "d.png"), 1)]
    assert len(samples) == 4
    (warning,) = [record.getMessage() for record in caplog.records]  # named by the path it was found at
    named = Path(warning.split(":")[0].removeprefix("skipping "))
    assert named.name == Path(link).name and named.parent.resolve() == (train / link).parent.resolve()


def test_a_linked_class_folder_and_its_inner_links_still_work(tmp_path):
    pool = class_tree(tmp_path)
    (tmp_path / "linked").mkdir()
    os.symlink(pool / "cat", tmp_path / "linked" / "cat")  # the class folder itself lives elsewhere
    os.symlink("sub", pool / "cat" / "alias")
    os.symlink("sub/c.png", pool / "cat" / "c-again.png")  # a file link inside: one more sample of that image
    samples = ImageTree(str(tmp_path / "linked")).samples
    assert sorted(Path(path).name for path, _ in samples) == ["a.png", "b.png", "c-again.png", "c.png"]


def test_file_links_into_a_pool_of_images_are_labelled_by_where_they_are(tmp_path, caplog):
    """A split made of file links (a common way to carve a subset out of one image pool) loads every link."""
    pool = class_tree(tmp_path)
    split = tmp_path / "subset"
    for link, target in (("dog/a.png", pool / "cat/a.png"), ("dog/e.png", tmp_path / "elsewhere/e.png"),
                         ("cat/d.png", pool / "dog/d.png")):
        (split / link).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, split / link)
    with caplog.at_level(logging.WARNING, "focal.data"):
        samples = ImageTree(str(split)).samples
    assert [(Path(path).relative_to(split).as_posix(), label) for path, label in samples] == [
        ("cat/d.png", 0), ("dog/a.png", 1), ("dog/e.png", 1)]
    assert not caplog.records
