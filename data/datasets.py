"""The two ImageNet layouts: class folders (``<split>/<class>/*.JPEG``) and zips with a map file
(``<split>.zip`` + ``<split>_map.txt``, one ``path<TAB>label`` line per image).

The zip dataset can keep image bytes in memory: ``full`` caches every image, ``part`` only the strided shard this
rank reads (see ``samplers.ShardSampler``).
"""
from __future__ import annotations

import io
import logging
import os
import zipfile
from typing import Any, Callable, List, Optional, Tuple

from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder

from errors import UsageError

CACHE_MODES = ("no", "part", "full")
logger = logging.getLogger("focal.data")


def read_map_file(path: str) -> List[Tuple[str, int]]:
    """``(path inside the zip, label)`` pairs; a malformed line is an error naming the file and line."""
    samples = []
    with open(path, "r") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.rstrip("\n").rsplit("\t", 1) if "\t" in line else line.split()
            if len(parts) != 2 or not parts[1].strip().isdigit():
                raise UsageError(f"{path}:{number}: expected '<path>\\t<label>', got {line.strip()!r}")
            samples.append((parts[0].strip().lstrip("/"), int(parts[1])))
    if not samples:
        raise UsageError(f"{path} lists no images")
    return samples


class ZipImageDataset(Dataset):
    """Images stored in one zip archive, labelled by a map file; yields ``(transformed RGB image, label)``."""

    def __init__(self, zip_path: str, map_path: str, transform: Optional[Callable] = None,
                 cache_mode: str = "no", rank: int = 0, world_size: int = 1):
        for path in (zip_path, map_path):
            if not os.path.isfile(path):
                raise UsageError(f"zip layout (--zip): {path} not found")
        if cache_mode not in CACHE_MODES:
            raise UsageError(f"DATA.CACHE_MODE (--cache-mode) must be one of {CACHE_MODES}, got {cache_mode!r}")
        self.zip_path = zip_path
        self.transform = transform
        self.samples = read_map_file(map_path)
        self.targets = [label for _, label in self.samples]
        with zipfile.ZipFile(zip_path) as archive:
            names = set(archive.namelist())
        missing = [name for name, _ in self.samples if name not in names]
        if missing:
            raise UsageError(f"{len(missing)} images listed in {map_path} are not in {zip_path}, e.g. {missing[0]}")
        self._archive: Optional[zipfile.ZipFile] = None
        self._archive_pid = -1
        self.cache = {}
        if cache_mode != "no":
            self._fill_cache(cache_mode, rank, world_size)

    def _fill_cache(self, cache_mode: str, rank: int, world_size: int) -> None:
        indices = range(len(self)) if cache_mode == "full" else range(rank, len(self), world_size)
        step = max(len(indices) // 10, 1)
        for count, index in enumerate(indices, 1):
            self.cache[index] = self._read(index)
            if count % step == 0 or count == len(indices):
                logger.info(f"cached {count}/{len(indices)} images of {self.zip_path} ({cache_mode} mode)")

    def _read(self, index: int) -> bytes:
        # One handle per process: a ZipFile opened before DataLoader workers fork must not be shared with them.
        if self._archive is None or self._archive_pid != os.getpid():
            self._archive = zipfile.ZipFile(self.zip_path)
            self._archive_pid = os.getpid()
        return self._archive.read(self.samples[index][0])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_archive": None, "_archive_pid": -1}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        data = self.cache.get(index)
        if data is None:
            data = self._read(index)
        image = Image.open(io.BytesIO(data)).convert("RGB")
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


def build_dataset(split: str, config: Any, transform: Optional[Callable], rank: int = 0,
                  world_size: int = 1) -> Tuple[Dataset, int]:
    """The ``train`` or ``val`` split under ``DATA.DATA_PATH`` in the configured layout, and its class count."""
    root = config.DATA.DATA_PATH
    if not root:
        raise UsageError("--data-path (DATA.DATA_PATH) is required for training and evaluation; "
                         "only --throughput runs without data")
    if not os.path.isdir(root):
        raise UsageError(f"--data-path {root} is not a directory")
    if config.DATA.ZIP_MODE:
        dataset = ZipImageDataset(os.path.join(root, f"{split}.zip"), os.path.join(root, f"{split}_map.txt"),
                                  transform, config.DATA.CACHE_MODE, rank, world_size)
        return dataset, max(dataset.targets) + 1
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        hint = " (or pass --zip for train.zip/train_map.txt)" if os.path.isfile(folder + ".zip") else ""
        raise UsageError(f"--data-path {root} has no '{split}' folder: expected the ImageNet layout "
                         f"{split}/<class>/<image>{hint}")
    try:
        dataset = ImageFolder(folder, transform=transform)
    except (FileNotFoundError, RuntimeError) as err:
        raise UsageError(f"cannot read images from {folder}: {err}") from None
    return dataset, len(dataset.classes)
