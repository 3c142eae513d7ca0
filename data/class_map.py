"""Evaluating a classifier on a folder of some of its classes (ImageNet-A/-R: 200 of the 1000, named by WordNet
id; ImageNet-V2: folders named by class index): which logit each class folder is scored against.

A checkpoint's classes are the class folders it was trained on (main.py stores them in its checkpoints), else,
for a 1000-class checkpoint without names (the released ones), ImageNet-1K's WordNet ids in timm's order.
"""
from __future__ import annotations

import logging
from typing import List, Optional, Sequence

import torch
from timm.data import ImageNetInfo

from errors import UsageError

IMAGENET_CLASSES = 1000


def checkpoint_classes(stored: Optional[Sequence[str]], num_classes: int) -> Optional[List[str]]:
    """The names of a checkpoint's ``num_classes`` outputs: those it stores, ImageNet's WordNet ids for a
    1000-class one without names, else None."""
    if stored and len(stored) == num_classes:
        return list(stored)
    if num_classes == IMAGENET_CLASSES:
        return list(ImageNetInfo().label_names())
    return None


def logit_indices(folders: Sequence[str], classes: Optional[Sequence[str]], num_classes: int, where: str,
                  logger: logging.Logger) -> Optional[torch.Tensor]:
    """For each class folder (sorted, as labelled), the index of its logit, or None when folder ``i`` is simply
    class ``i``. Folders are matched by name to ``classes``; folders all named by an integer below
    ``num_classes`` (ImageNet-V2's layout) are taken as class indices; as many folders as classes under other names
keep their sorted order, with a warning. Anything else is a one-line error."""
    if classes is not None and list(folders) == list(classes):
        return None
    if classes is not None and set(folders) <= set(classes):
        position = {name: i for i, name in enumerate(classes)}
        indices = [position[name] for name in folders]
        how = "by name"
    elif folders and all(name.isdigit() and int(name) < num_classes for name in folders):
        indices = [int(name) for name in folders]
        how = "as class indices (the folder names are numbers)"
    elif len(folders) == num_classes:
        if classes is not None:
            logger.warning(f"the class folders of {where} are not the checkpoint's class names "
                           f"({', '.join(classes[:3])}, ...): folder i is taken as class i, in sorted order")
        return None
    else:
        unknown = sorted(set(folders) - set(classes or ()))
        shown = ", ".join(unknown[:3]) + (", ..." if len(unknown) > 3 else "")
        many = len(unknown) > 1
        some = f"{len(unknown)} class folder{'s' if many else ''} ({shown}) that {'are' if many else 'is'}"
        known = (f"the checkpoint's {num_classes} class names ({', '.join(classes[:3])}, ...)" if classes else
                 f"class names: the checkpoint stores none, and only a 1000-class one is taken to have ImageNet's")
        raise UsageError(f"--eval: {where} has {some} not among {known}; name the folders by the checkpoint's "
                         f"classes (WordNet ids such as n01440764 for ImageNet) or by class index")
    if indices == list(range(num_classes)):
        return None
    logger.info(f"evaluating {len(folders)} of the checkpoint's {num_classes} classes: the folders of {where} are "
                f"matched {how}, and only their {len(folders)} logits are scored")
    return torch.tensor(indices)
