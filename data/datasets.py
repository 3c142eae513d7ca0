"""The two ImageNet layouts: class folders (``<split>/<class>/*.JPEG``) and a zip with a map file
(``<split>.zip`` + ``<split>_map.txt``, one ``path<TAB>label`` line per image), whose bytes may be cached."""
from __future__ import annotations

import io
import logging
import multiprocessing
import os
import unicodedata
import zipfile
from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from config import UsageError

logger = logging.getLogger("focal.data")


class UnsupportedImage(ValueError):
    """Pixel values without a known scale to 8 bits: refused by name rather than read black or white."""


# What PIL raises for unreadable, truncated, corrupt and oversized files opened on their own (with UnsupportedImage);
# a dataset item also runs transforms, whose ValueErrors are bugs (see CheckedImages).
PIL_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)

# 16-bit grey images (PNG, TIFF): Pillow's conversion to RGB clips every value above 255 to white.
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def check_mode(image: Image.Image) -> None:
    """Refuse a float image (mode F): 0..1 and 0..255 are both common, and RGB conversion reads the first black."""
    if image.mode == "F":
        raise UnsupportedImage("holds floating-point values (mode F), whose range is unknown (0..1 or 0..255); save "
                               "it as 8- or 16-bit")


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB, grey of more than 8 bits scaled rather than clipped to white: 16-bit by 255/65535,
    mode I by the range it uses (0..255 as is, up to 65535 as 16-bit, beyond refused)."""
    check_mode(image)
    if image.mode in SIXTEEN_BIT_MODES or image.mode == "I":
        values = np.asarray(image)
        if image.mode == "I" and values.size and (values.min() < 0 or values.max() > 65535):
            raise UnsupportedImage(f"holds 32-bit integer values from {values.min()} to {values.max()} (mode I), "
                                   f"beyond 16 bits, whose range is unknown; save it as 8- or 16-bit")
        if image.mode != "I" or values.max(initial=0) > 255:  # "I" images from 16-bit files hold 0..65535
            values = values.astype(np.float64) / 257.0
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")
    return image.convert("RGB")


def load_rgb(source: Any) -> Image.Image:
    """An image file (path or file object) as RGB, turned as shown: a phone photo is stored on its side."""
    with Image.open(source) as image:
        ImageOps.exif_transpose(image, in_place=True)
        return to_rgb(image)


def hidden(name: str) -> bool:
    """Dot names are no data: macOS's ``._<image>`` metadata files, ``.DS_Store``, ``.ipynb_checkpoints``."""
    return name.startswith(".")


def class_folders(directory: str) -> List[str]:
    """The sorted class-folder names under ``directory``, hidden ones left out; none when it is missing."""
    if not os.path.isdir(directory):
        return []
    return sorted(entry.name for entry in os.scandir(directory) if entry.is_dir() and not hidden(entry.name))


def image_files(files: Sequence[str]) -> List[str]:
    """The image file names among ``files`` (torchvision's extensions, hidden files left out), sorted."""
    return sorted(f for f in files if not hidden(f) and has_file_allowed_extension(f, IMG_EXTENSIONS))


def link_stays(path: str, own: str) -> bool:
    """Whether the folder link ``path`` stays inside the class folder ``own`` (a real path); one leaving it is
    skipped with a warning, as everything there would be labelled as this class. File links may lead anywhere."""
    target = os.path.realpath(path)
    if os.path.commonpath([target, own]) == own:
        return True
    logger.warning(f"skipping {path}: a link to {target}, outside its class folder, would label what is there as "
                   f"this class")
    return False


def class_images(class_folder: str) -> List[str]:
    """The image files under ``class_folder``, by folder and name; every folder is entered once (a link back up
    would repeat its images until the path got too long), hidden entries and links leaving it left out."""
    own, visited, found = os.path.realpath(class_folder), set(), []

    def visit(root: str) -> None:
        real = os.path.realpath(root)
        if real in visited:
            return
        visited.add(real)
        with os.scandir(root) as listing:
            entries = [e for e in sorted(listing, key=lambda e: e.name)
                       if not hidden(e.name) and not (e.is_symlink() and e.is_dir() and not link_stays(e.path, own))]
        found.append((root, image_files([e.name for e in entries if not e.is_dir()])))
        for entry in entries:
            if entry.is_dir():
                visit(entry.path)

    visit(class_folder)
    return [os.path.join(root, name) for root, names in sorted(found) for name in names]


class ImageTree(ImageFolder):
    """``ImageFolder`` reading each class by :func:`class_images` and each image by :func:`load_rgb`."""

    def __init__(self, root: str, transform: Optional[Callable] = None, allow_empty: bool = False):
        super().__init__(root, transform=transform, loader=load_rgb, allow_empty=allow_empty)

    def find_classes(self, directory: str) -> Tuple[List[str], dict]:
        classes = class_folders(directory)
        if not classes:
            raise FileNotFoundError(f"Couldn't find any class folder in {directory}.")
        return classes, {name: index for index, name in enumerate(classes)}

    @staticmethod
    def make_dataset(directory: str, class_to_idx: dict, extensions: Any = None, is_valid_file: Any = None,
                     allow_empty: bool = False) -> List[Tuple[str, int]]:
        images = {name: class_images(os.path.join(directory, name)) for name in sorted(class_to_idx)}
        empty = [os.path.join(directory, name) for name, paths in images.items() if not paths]
        if empty and not allow_empty:
            raise FileNotFoundError(f"{len(empty)} class folder(s) hold no image ({', '.join(IMG_EXTENSIONS)}): "
                                    f"{', '.join(empty[:3])}; add images or remove the folder from both splits")
        return [(path, class_to_idx[name]) for name, paths in images.items() for path in paths]


def read_map_file(path: str) -> List[Tuple[str, int, int]]:
    """(path in the zip, label, line number) per image; a malformed line is an error naming it. UTF-8, with or
    without the byte-order mark Windows editors write (it would otherwise become part of the first path)."""
    entries = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise UsageError(f"{path}:{number}: not UTF-8 text ({err.reason} at byte {err.start}); save the "
                                 f"map file as UTF-8") from None
            if not line.strip():
                continue
            parts = line.rstrip("\n").rsplit("\t", 1) if "\t" in line else line.split()
            if len(parts) != 2 or not parts[1].strip().isdigit():
                raise UsageError(f"{path}:{number}: expected '<path>\\t<label>', got {line.strip()!r}")
            entries.append((parts[0].strip().lstrip("/"), int(parts[1]), number))
    if not entries:
        raise UsageError(f"{path} lists no images")
    return entries


class ZipImageDataset(Dataset):
    """Images stored in one zip archive, labelled by a map file; yields ``(transformed RGB image, label)``."""

    def __init__(self, zip_path: str, map_path: str, transform: Optional[Callable] = None,
                 cache_mode: str = "no", rank: int = 0, world_size: int = 1):
        for path in (zip_path, map_path):
            if not os.path.isfile(path):
                raise UsageError(f"zip layout (--zip): {path} not found")
        self.zip_path, self.map_path, self.transform = zip_path, map_path, transform
        names, self.targets, self.lines = map(list, zip(*read_map_file(map_path)))
        self.samples = list(zip(names, self.targets))
        try:
            with zipfile.ZipFile(zip_path) as archive:
                members = set(archive.namelist())
        except (zipfile.BadZipFile, OSError) as err:
            raise UsageError(f"zip layout (--zip): cannot read {zip_path}: {err}") from None
        missing = [name for name in names if name not in members]
        if missing:
            raise UsageError(f"{len(missing)} images listed in {map_path} are not in {zip_path}, e.g. {missing[0]}")
        self._archive: Optional[Tuple[int, zipfile.ZipFile]] = None  # with the id of the process that opened it
        self.cache = {}
        indices = {"no": [], "full": range(len(self)), "part": range(rank, len(self), world_size)}[cache_mode]
        for count, index in enumerate(indices, 1):
            self.cache[index] = self._read(index)
            if count % max(len(indices) // 10, 1) == 0 or count == len(indices):
                logger.info(f"cached {count}/{len(indices)} images of {self.zip_path} ({cache_mode} mode)")

    def _read(self, index: int) -> bytes:
        # One handle per process: a ZipFile opened before DataLoader workers fork must not be shared with them.
        if self._archive is None or self._archive[0] != os.getpid():
            self._archive = (os.getpid(), zipfile.ZipFile(self.zip_path))
        return self._archive[1].read(self.samples[index][0])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_archive": None}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        image = load_rgb(io.BytesIO(self.cache.get(index) or self._read(index)))
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


def build_dataset(split: str, config: Any, transform: Optional[Callable], rank: int = 0, world_size: int = 1,
                  by_name: bool = False) -> Tuple[Dataset, int]:
    """The ``train`` or ``val`` split under ``DATA.DATA_PATH`` and its class count; ``by_name``: its class folders
    will be matched to a model's classes by name (``data.class_map``), so they may be empty or differ from train's."""
    root = config.DATA.DATA_PATH
    if not os.path.isdir(root):
        raise UsageError(f"--data-path {root!r} is not a directory")
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
        dataset = ImageTree(folder, transform=transform, allow_empty=by_name)
    except FileNotFoundError as err:
        raise UsageError(f"cannot read images from {folder}: {err}") from None
    if split == "val" and not by_name:
        check_same_classes(root)
    return dataset, len(dataset.classes)


def check_same_classes(root: str) -> None:
    """In the folder layout labels are the sorted class-folder names, so ``train`` and ``val`` must have the same
    folders or every label after the first difference would silently mean another class."""
    train, val = (set(class_folders(os.path.join(root, split))) for split in ("train", "val"))
    composed = {unicodedata.normalize("NFC", name): name for name in val - train}
    alike = [(name, composed[key]) for name in sorted(train - val)
             if (key := unicodedata.normalize("NFC", name)) in composed]
    if alike:  # both print the same: say what differs
        ours, theirs = alike[0]
        raise UsageError(f"--data-path {root}: 'train' and 'val' name class folders alike in different Unicode forms, "
                         f"e.g. {ascii(ours)} in train and {ascii(theirs)} in val (macOS writes accents decomposed); "
                         f"rename one split's folders so that the names match byte for byte")
    if train and train != val:
        only = [f"only in {split}: {', '.join(sorted(names)[:5])}" for split, names in
                (("train", train - val), ("val", val - train)) if names]
        raise UsageError(f"--data-path {root}: 'train' and 'val' have different class folders ({'; '.join(only)}); "
                         f"labels are assigned by sorted folder name, so both splits need the same classes")


def label_outlier(dataset: ZipImageDataset) -> Optional[str]:
    """Where a map file's labels stop being one run from 0 and the highest label lies beyond the gap, that label's
    line (a typo such as 57 among 0-9 would otherwise ask for a 58-class model); None when there is no gap."""
    used = set(dataset.targets)
    first_unused = next(label for label in range(len(used) + 1) if label not in used)
    highest = max(used)
    if highest < first_unused:
        return None
    line = dataset.lines[dataset.targets.index(highest)]
    return (f"{dataset.map_path}:{line}: label {highest} lies far above the others (labels 0-{first_unused - 1} "
            f"are used, then none up to {highest}); a typo?")


def check_val_labels(train: Dataset, val: Dataset) -> None:
    """The zip layout's counterpart of :func:`check_same_classes`: every validation label must be one the
    training map uses, or the model is scored on a class it never saw (or on a typo)."""
    if not (isinstance(train, ZipImageDataset) and isinstance(val, ZipImageDataset)):
        return
    known = set(train.targets)
    for label, line in zip(val.targets, val.lines):
        if label not in known:
            raise UsageError(f"{val.map_path}:{line}: label {label} is used by no image of {train.map_path}; "
                             f"both map files must number the classes the same way")


class CheckedImages(Dataset):
    """``dataset`` where an image that cannot be decoded is an error naming its file, or, with ``skip``
    (``DATA.SKIP_BAD_IMAGES``), ``None`` (left out of the batch), counted in shared memory across workers."""

    def __init__(self, dataset: Dataset, skip: bool):
        self.dataset, self.skip = dataset, skip
        zipped = isinstance(dataset, ZipImageDataset)  # its images are named archive.zip/member
        self.sources = [f"{dataset.zip_path}/{name}" if zipped else name for name, _ in dataset.samples]
        self._skipped = multiprocessing.Value("q", 0)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Optional[Tuple[Any, int]]:
        try:
            return self.dataset[index]
        # PIL's errors for unreadable, truncated and unidentified files, and for images over its pixel limit
        except (OSError, SyntaxError, Image.DecompressionBombError, UnsupportedImage) as err:
            if not self.skip:
                raise UsageError(f"cannot read image {self.sources[index]}: {err}; replace the file, or set "
                                 f"DATA.SKIP_BAD_IMAGES True to leave unreadable images out") from None
            logger.warning(f"skipping unreadable image {self.sources[index]}: {err}")
            with self._skipped.get_lock():
                self._skipped.value += 1
            return None

    def take_skipped(self) -> int:
        """Images skipped since the last call."""
        with self._skipped.get_lock():
            count, self._skipped.value = self._skipped.value, 0
        return count
