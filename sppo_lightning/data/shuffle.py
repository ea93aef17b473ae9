"""``EpochShuffle``: the training order of an epoch, fixed by (seed, epoch) alone."""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch.utils.data import Sampler

from sppo_lightning import seeds


class EpochShuffle(Sampler[int]):
    """A permutation of ``range(size)`` fixed by ``seed`` and ``epoch()``, not by the global RNG.

    The global RNG's state at an epoch's start differs between a fresh and a resumed run, and
    Lightning calls ``iter()`` on a loader twice per epoch in a fresh run but once when resuming;
    this order is the same every time, so resuming is exact. ``epoch()`` is read when iteration
    starts, so one loader can serve every epoch.
    """

    def __init__(self, size: int, seed: int, epoch: Callable[[], int]) -> None:
        self.size, self.seed, self.epoch = size, seed, epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(seeds.indexed(self.seed, self.epoch()))
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size
