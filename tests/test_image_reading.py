"""Every reader of image files (classification's datasets, predict.py, detection, segmentation) goes through
``data.datasets.load_rgb``: pictures are turned as their EXIF orientation says, grey of more than 8 bits is scaled
by a stated rule, and values of unknown range (float, 32-bit beyond 16 bits) are refused naming the file."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import ExifTags, Image

from config import UsageError
from data.datasets import CheckedImages, ImageTree
from dense.images import image_size, read_rgb
from detection.data import CocoDetection
from main import main
from predict import read_image
from segmentation.config import segmentation_defaults
from segmentation.data import SegmentationFolder
from tests.helpers import demo_args

# Four flat quadrants of a 32x16 (width x height) picture, 8-pixel aligned so that JPEG keeps them flat.
COLOURS = [[(200, 30, 30), (30, 200, 30)], [(30, 30, 200), (220, 220, 30)]]  # [top, bottom][left, right]
# What each EXIF orientation asks a viewer to do, in numpy terms on an (H, W, C) array: 3 turns half way, 6 a
# quarter clockwise (np.rot90 turns anticlockwise), 8 a quarter anticlockwise; 2 mirrors left-right.
SHOWN = {3: lambda a: np.rot90(a, 2), 6: lambda a: np.rot90(a, -1), 8: lambda a: np.rot90(a, 1),
         2: lambda a: a[:, ::-1]}


def stored_pixels() -> np.ndarray:
    return np.array(COLOURS, np.uint8).repeat(8, axis=0).repeat(16, axis=1)


def photo(path: Path, orientation: int) -> np.ndarray:
    """A JPEG (or PNG) stored as :func:`stored_pixels` with an EXIF orientation tag; returns the pixels as shown."""
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    quality = dict(quality=100, subsampling=0) if path.suffix == ".jpg" else {}
    Image.fromarray(stored_pixels()).save(path, exif=exif, **quality)
    return np.ascontiguousarray(SHOWN[orientation](stored_pixels()))


def classification_item(path: Path) -> np.ndarray:
    dataset = ImageTree(str(path.parents[1]))
    return np.asarray(dataset[dataset.samples.index((str(path), 0))][0])


READERS = {
    "classification": classification_item,
    "predict": lambda path: np.asarray(read_image(path)),
    "dense": lambda path: read_rgb(str(path)).permute(1, 2, 0).numpy(),
}


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("orientation, suffix", [(6, "jpg"), (8, "jpg"), (3, "jpg"), (2, "jpg"), (6, "png")])
def test_every_reader_turns_a_photo_as_its_exif_orientation_says(reader, orientation, suffix, tmp_path):
    path = tmp_path / "train" / "cls" / f"phone.{suffix}"
    shown = photo(path, orientation)
    got = READERS[reader](path)
    assert got.shape == shown.shape
    assert np.abs(got.astype(int) - shown).max() <= 6  # JPEG at quality 100 without chroma subsampling, flat blocks
    assert image_size(str(path)) == (shown.shape[1], shown.shape[0])  # dense tasks check sizes from headers


def wide_grey(path: Path, kind: str) -> None:
    """Grey images whose values have no 8-bit reading: float in 0..1 or in 0..255, 32-bit beyond 16 bits."""
    rng = np.random.default_rng(3)
    values = {"float-0-1": rng.random((16, 16), dtype=np.float32),
              "float-0-255": rng.random((16, 16), dtype=np.float32) * 255,
              "int32-beyond-16-bits": rng.integers(0, 1 << 20, (16, 16), dtype=np.int32),
              "int32-negative": rng.integers(-500, 500, (16, 16), dtype=np.int32)}[kind]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values).save(path)
    with Image.open(path) as image:
        assert image.mode == ("F" if kind.startswith("float") else "I")


WIDE = ["float-0-1", "float-0-255", "int32-beyond-16-bits", "int32-negative"]


@pytest.mark.parametrize("kind", WIDE)
def test_values_of_unknown_range_are_refused_naming_the_file_by_every_reader(kind, tmp_path):
    path = tmp_path / "train" / "cls" / "scan.tiff"
    wide_grey(path, kind)
    dataset = ImageTree(str(tmp_path / "train"))
    what = r"\(mode F\)" if kind.startswith("float") else r"32-bit integer values from -?\d+ to \d+ \(mode I\)"
    with pytest.raises(UsageError, match=rf"cannot read image .*scan.tiff: holds .*{what}.*DATA.SKIP_BAD_IMAGES"):
        CheckedImages(dataset, skip=False)[0]
    skipping = CheckedImages(dataset, skip=True)
    assert skipping[0] is None and skipping.take_skipped() == 1
    with pytest.raises(UsageError, match=rf"cannot read image .*scan.tiff: holds .*{what}"):
        read_image(path)
    with pytest.raises(UsageError, match=rf"image .*scan.tiff holds .*{what}"):
        read_rgb(str(path))
    if kind.startswith("float"):  # a float image is refused when a dense set is opened, from its header
        with pytest.raises(UsageError, match=rf"image .*scan.tiff holds .*{what}"):
            image_size(str(path))


@pytest.mark.parametrize("high, expected", [(200, 200), (255, 255), (256, round(256 / 257)), (5140, 20),
                                            (65535, 255)])
def test_32_bit_grey_within_16_bits_reads_by_the_range_it_uses(high, expected, tmp_path):
    # mode I values within 0..255 are 8-bit grey as they are; any value above 255 makes the image 16-bit grey,
    # scaled by 255/65535 = 1/257 (5140 / 257 = 20)
    path = tmp_path / "i32.tif"
    Image.fromarray(np.array([[0, high]], dtype=np.int32)).save(path)
    assert read_rgb(str(path))[:, 0, 1].tolist() == [expected] * 3
    assert read_rgb(str(path))[:, 0, 0].tolist() == [0] * 3


def test_segmentation_labels_are_drawn_on_the_image_as_shown(tmp_path):
    """The image is turned by its EXIF tag; its label PNG has none and is used as stored, so it must have the
    shown size; one in the stored orientation is refused saying the orientation turned the image."""
    shown = photo(tmp_path / "images" / "validation" / "a.jpg", 6)  # stored 32x16, shown 16x32
    labels = np.zeros(shown.shape[:2], np.uint8)
    labels[:, 8:] = 1  # the right half as shown: the stored picture's bottom half
    (tmp_path / "annotations" / "validation").mkdir(parents=True)
    Image.fromarray(labels).save(tmp_path / "annotations" / "validation" / "a.png")
    config = segmentation_defaults()
    config.DATA.REDUCE_ZERO_LABEL = False
    image, target = SegmentationFolder(str(tmp_path), "val", config, train=False, num_classes=2)[0]
    assert image.shape == (3, 32, 16) and target.shape == (32, 16)
    torch.testing.assert_close(image[:, :, 12].T.float(), torch.tensor(shown[:, 12]).float(), atol=6, rtol=0)
    Image.fromarray(np.ascontiguousarray(labels.T)).save(tmp_path / "annotations" / "validation" / "a.png")
    with pytest.raises(UsageError, match=r"annotation .*a.png is 32x16 but its image is 16x32 as shown \(its EXIF "
                                         r"orientation turns the stored picture\)"):
        SegmentationFolder(str(tmp_path), "val", config, train=False, num_classes=2)


@pytest.mark.parametrize("width, height", [(16, 32), (32, 16)])
def test_detection_boxes_are_taken_on_the_image_as_shown(width, height, tmp_path):
    """COCO's sizes and boxes describe the picture as shown; a file whose stored size is listed is refused."""
    shown = photo(tmp_path / "val2017" / "a.jpg", 8)  # stored 32x16, shown 16x32
    box = [2.0, 4.0, 10.0, 9.0]  # x, y, w, h: inside either size, so that only the size check can tell
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps({
        "images": [{"id": 7, "file_name": "a.jpg", "width": width, "height": height}],
        "annotations": [{"id": 1, "image_id": 7, "category_id": 3, "bbox": box, "area": 90.0, "iscrowd": 0}],
        "categories": [{"id": 3, "name": "thing"}]}))
    if (width, height) != (shown.shape[1], shown.shape[0]):
        with pytest.raises(UsageError, match=r"image .*a.jpg is 16x32 as shown \(its EXIF orientation turns the "
                                             r"stored picture\) but .*instances_val2017.json says 32x16"):
            CocoDetection(str(tmp_path), "val2017", masks=False, train=False)
        return
    image, target = CocoDetection(str(tmp_path), "val2017", masks=False, train=False)[0]
    assert image.shape == (3, 32, 16)
    assert target["boxes"].tolist() == [[2.0, 4.0, 12.0, 13.0]]
    torch.testing.assert_close(image.permute(1, 2, 0) * 255, torch.tensor(shown).float(), atol=6, rtol=0)


@pytest.mark.parametrize("kind", ["float-0-1", "int32-beyond-16-bits"])
def test_training_stops_at_an_image_of_unknown_range_naming_it(kind, data, tmp_path):
    """Through main.py's loader (DataLoader, CheckedImages): the float scan trained as a black picture, silently."""
    scan = data / "train" / sorted(p.name for p in (data / "train").iterdir())[3] / "scan.tif"
    wide_grey(scan, kind)
    with pytest.raises(UsageError, match=rf"cannot read image {scan}: holds .*; replace the file"):
        main(demo_args(data, tmp_path / "out"))
