"""Strided shards of a dataset: rank r of W takes indices r, r+W, r+2W, ... Evaluation uses them unpadded (each
image counted once); the zip ``part`` cache shuffled and trimmed to equal length (each rank reads what it cached)."""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class ShardSampler(Sampler[int]):
    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1, shuffle: bool = False,
                 seed: int = 0, equal_lengths: bool = False):
        self.indices = list(range(rank, num_samples, world_size))
        if equal_lengths:
            self.indices = self.indices[:num_samples // world_size]
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle differently each epoch, identically on every run with the same seed."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(self.indices)
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter([self.indices[i] for i in torch.randperm(len(self.indices), generator=generator).tolist()])

    def __len__(self) -> int:
        return len(self.indices)
