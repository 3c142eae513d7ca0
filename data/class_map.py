"""Which logit each class folder is scored against when a classifier is evaluated on some of its classes
(ImageNet-A/-R: 200 of the 1000 by WordNet id; ImageNet-V2: folders named by class index)."""
from __future__ import annotations

import logging
import unicodedata
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from timm.data import ImageNetInfo

from config import UsageError

IMAGENET_CLASSES = 1000


def checkpoint_classes(stored: Optional[Sequence[str]], num_classes: int) -> Optional[List[str]]:
    """The names of a checkpoint's outputs: the training folders it stores (main.py does), ImageNet's WordNet ids
    in timm's order for a 1000-class one without names (the released ones), else None."""
    if stored and len(stored) == num_classes:
        return list(stored)
    if num_classes == IMAGENET_CLASSES:
        return list(ImageNetInfo().label_names())
    return None


def _canonical(name: str) -> str:
    """One spelling per name: macOS writes accented names decomposed (NFD), most other tools composed (NFC)."""
    return unicodedata.normalize("NFC", name)


def _shown(names: Sequence[str]) -> str:
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def _by_name(folders: Sequence[str], classes: Sequence[str]) -> Dict[str, int]:
    """The folders that name a class exactly or in another Unicode form of the same text, with its index."""
    exact = {name: i for i, name in enumerate(classes)}
    keys: Dict[str, List[int]] = {}
    for i, name in enumerate(classes):
        keys.setdefault(_canonical(name), []).append(i)
    found = {folder: exact[folder] for folder in folders if folder in exact}
    found.update({folder: alike[0] for folder in folders if folder not in exact
                  and len(alike := keys.get(_canonical(folder), [])) == 1})
    return found


def logit_indices(folders: Sequence[str], classes: Optional[Sequence[str]], num_classes: int, where: str,
                  logger: logging.Logger) -> Optional[torch.Tensor]:
    """For each class folder (sorted), the index of its logit, or None when folder ``i`` is class ``i``. Folders
    match ``classes`` by name (any Unicode form) or are all class indices; as many folders as classes, resembling
    neither, keep their order with a warning. Anything else is a one-line error naming the folders: a label shifted
    without a word would score the wrong classes."""
    if classes is not None and list(folders) == list(classes):
        return None
    texts: Dict[str, str] = {}  # one name in two Unicode forms is one class, whatever the checkpoint knows
    alike = [(texts[key], name) for name in folders if texts.setdefault(key := _canonical(name), name) != name]
    named = _by_name(folders, classes or ())
    # class indices are ASCII digits: str.isdigit alone also takes "²" or "٣", which are names here
    numbers = [name for name in folders if name.isascii() and name.isdigit() and name not in named]
    others = [name for name in folders if name not in named and name not in numbers]

    def refuse(problem: str) -> UsageError:
        return UsageError(f"--eval: {where} {problem}; name every class folder by the checkpoint's class name "
                          f"(WordNet ids such as n01440764 for ImageNet) or every one by class index")

    def twins(pairs: List[Tuple[str, str]]) -> UsageError:  # names that print alike are escaped
        shown = [f"{ascii(a)} and {ascii(b)}" if _canonical(a) == _canonical(b) else f"{a} and {b}" for a, b in pairs]
        return refuse(f"has class folders that name one class twice: {', '.join(shown[:3])}")

    if alike:
        raise twins(alike)
    folded = {_canonical(name).casefold(): name for name in classes or ()}
    cased = [(name, folded[key]) for name in others if (key := _canonical(name).casefold()) in folded]
    if cased:
        raise refuse(f"has class folders that differ from the checkpoint's class names only in letter case: "
                     f"{', '.join(f'{a} (class {b})' for a, b in cased[:3])}")
    if numbers and not others and not named:
        beyond = [name for name in numbers if int(name) >= num_classes]
        if beyond:
            raise refuse(f"has class folders named by numbers that are no class index of the {num_classes}-class "
                         f"checkpoint (0-{num_classes - 1}): {_shown(beyond)}")
        indices, how = [int(name) for name in folders], "as class indices (the folder names are numbers)"
    elif numbers:
        raise refuse(f"mixes class folders named by class index ({_shown(numbers)}) with folders named otherwise "
                     f"({_shown([n for n in folders if n not in numbers])})")
    elif not others:
        indices, how = [named[name] for name in folders], "by name"
    elif not named and len(folders) == num_classes and not any(name.isnumeric() for name in others):
        held = (f"are not the checkpoint's class names ({', '.join(classes[:3])}, ...)" if classes else
                "cannot be matched by name (the checkpoint stores no class names)")
        logger.warning(f"the class folders of {where} {held}: folder i is taken as class i, in sorted order")
        return None
    else:
        many = len(others) > 1
        some = f"{len(others)} class folder{'s' if many else ''} ({_shown(others)}) that {'are' if many else 'is'}"
        known = (f"the checkpoint's {num_classes} class names ({', '.join(classes[:3])}, ...)" if classes else
                 "class names: the checkpoint stores none, and only a 1000-class one is taken to have ImageNet's")
        raise refuse(f"has {some} not among {known}")
    first: Dict[int, str] = {}
    same = [(first[index], name) for name, index in zip(folders, indices) if first.setdefault(index, name) != name]
    if same:
        raise twins(same)
    if indices == list(range(num_classes)):
        return None
    logger.info(f"evaluating {len(folders)} of the checkpoint's {num_classes} classes: the folders of {where} are "
                f"matched {how}, and only their {len(folders)} logits are scored")
    return torch.tensor(indices)
