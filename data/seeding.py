"""Augmentations that depend only on (seed, epoch, image), whichever persistent worker makes them: the sampler tags
each index with its epoch and the dataset seeds the generators from both, so a resumed run sees the same ones."""
from __future__ import annotations

import random
from typing import Any, Iterator, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


class EpochTagged(Sampler):
    """``sampler``'s indices as ``(epoch, index)`` pairs; ``set_epoch`` is passed on."""

    def __init__(self, sampler: Sampler):
        self.sampler, self.epoch = sampler, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        return ((self.epoch, index) for index in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


class SeededSamples(Dataset):
    """``dataset[index]`` made right after seeding python's, numpy's and torch's generators from its key."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Tuple[int, int]) -> Any:
        epoch, index = key
        value = int(np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0])
        random.seed(value)
        np.random.seed(value)
        torch.random.default_generator.manual_seed(value)
        return self.dataset[index]
