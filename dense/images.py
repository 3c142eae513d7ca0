"""What the dense tasks' data share: image files read as classification reads them (``data.datasets.load_rgb``:
turned as shown, 16-bit grey scaled, float refused) with every failure one line naming the file, sizes as shown
(boxes and label PNGs describe the picture as shown), and their loaders: training's and the evaluation's batches."""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Iterator, Sequence, Tuple

import torch
import torchvision.transforms.v2.functional as F
from PIL import ExifTags, Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from config import UsageError
from data.build import worker_count
from data.datasets import PIL_ERRORS, UnsupportedImage, check_mode, load_rgb
from data.samplers import ShardSampler
from engine import DistEnv
from logger import Progress, quiet_worker_teardown

# EXIF orientations that turn the picture by a quarter: its displayed width is the stored height.
QUARTER_TURNS = (5, 6, 7, 8)


@contextlib.contextmanager
def one_line(path: str, what: str) -> Iterator[None]:
    """Reading ``path`` fails as one line naming the ``what`` (image or annotation) and the file."""
    try:
        yield
    except UnsupportedImage as err:
        raise UsageError(f"{what} {path} {err}") from None
    except PIL_ERRORS as err:
        raise UsageError(f"cannot read {what} {path}: {err}") from None


def image_size(path: str, what: str = "image") -> Tuple[int, int]:
    """(width, height) as shown, from the file's header; a float image is refused here, before a run trains on it."""
    with one_line(path, what), Image.open(path) as img:
        if what != "image":
            return img.size
        check_mode(img)
        # Pillow decodes a whole PNG to look for EXIF after its pixels; one written before them comes with the header.
        exif = img.getexif() if img.format != "PNG" or "exif" in img.info else {}
        return img.size[::-1] if exif.get(ExifTags.Base.Orientation) in QUARTER_TURNS else img.size


def read_rgb(path: str) -> torch.Tensor:
    """The image as a uint8 (3, H, W) tensor, as shown."""
    with one_line(path, "image"):
        return F.pil_to_tensor(load_rgb(path))


def shown(size: Tuple[int, int], other: Tuple[int, int]) -> str:
    """``WxH`` for a size mismatch message, saying so where the EXIF orientation turned the picture from ``other``."""
    turned = " as shown (its EXIF orientation turns the stored picture)" if tuple(size) == tuple(other)[::-1] else ""
    return f"{size[0]}x{size[1]}{turned}"


def collate(batch: Sequence[Tuple[Any, Any]]) -> Tuple[list, list]:
    """Images of any size and their targets, as two lists."""
    images, targets = zip(*batch)
    return list(images), list(targets)


def loader(dataset: Dataset, config: Any, env: DistEnv, collate: Callable, train: bool) -> DataLoader:
    """Training: the whole set reshuffled every epoch (``sampler.set_epoch``) and split evenly between processes;
    evaluation: strided shards (see ``data.samplers``), every image exactly once across processes."""
    if train:
        sampler = DistributedSampler(dataset, env.world_size, env.rank, shuffle=True, seed=config.SEED,
                                     drop_last=True)
    else:
        sampler = ShardSampler(len(dataset), env.rank, env.world_size)
    batch = config.DATA.BATCH_SIZE if train else config.DATA.TEST_BATCH_SIZE
    return DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=worker_count(config.DATA.NUM_WORKERS),
                      pin_memory=config.DATA.PIN_MEMORY and env.device.type == "cuda", drop_last=train,
                      collate_fn=collate, worker_init_fn=quiet_worker_teardown)


def progress_line(progress: Progress, idx: int, done: int, batches: DataLoader, env: DistEnv) -> str:
    """A progress line of a dense evaluation, ``done`` images into this process's shard. With several processes
    the loop is this process's share while the result counts every process's images: the line says both."""
    shares = (f"; {done} of this process's {len(batches.sampler)} images, {len(batches.dataset)} on all "
              f"{env.world_size} processes" if env.distributed else "")
    return f"Test: {progress.position(idx)}{shares}"


def evaluation_batches(dataset: Any, config: Any, env: DistEnv, logger: logging.Logger) -> Iterator[Tuple[list, list]]:
    """This process's shard of ``dataset`` in lists, logging progress every ``PRINT_FREQ`` batches."""
    batches = loader(dataset, config, env, collate, train=False)
    progress, done = Progress(len(batches), config.PRINT_FREQ), 0
    for idx, (images, targets) in enumerate(batches):
        yield images, targets
        done += len(images)
        if progress.due(idx):
            logger.info(progress_line(progress, idx, done, batches, env))
