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


class LengthGroupedShuffle(Sampler[int]):
    """``EpochShuffle``'s permutation with pairs of similar length put into the same batches.

    The epoch's permutation (fixed by ``seed`` and ``epoch()``) is cut into windows of
    ``batch_size * group`` pairs; each window is sorted by length, longest first, and cut into
    batches; the batches are then shuffled (same seed). Packed rows then hold pairs of similar
    length and padded batches pad less. It changes which pairs share a step, so a run differs from
    an ungrouped one: off by default. Like ``EpochShuffle`` it reads no global RNG, so a resumed run
    sees the uninterrupted run's order.

    Args:
        lengths: one length per pair (prompt + chosen + rejected tokens).
        batch_size: the loader's batch size.
        seed, epoch: as for ``EpochShuffle``.
        group: batches per sorting window (more: tighter lengths, less randomness).
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, epoch: Callable[[], int], group: int = 16) -> None:
        self.lengths, self.batch_size, self.seed, self.epoch, self.group = lengths, batch_size, seed, epoch, group

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(seeds.indexed(self.seed, self.epoch()))
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        window = self.batch_size * self.group
        batches = []
        for start in range(0, len(order), window):
            part = sorted(order[start : start + window], key=lambda i: -self.lengths[i])
            batches += [part[b : b + self.batch_size] for b in range(0, len(part), self.batch_size)]
        # The last batch of the epoch stays last: it may be short, and a short batch mid-epoch
        # would shift every later batch's members.
        head, tail = (batches[:-1], batches[-1:]) if len(batches[-1]) < self.batch_size else (batches, [])
        shuffled = [head[i] for i in torch.randperm(len(head), generator=generator).tolist()] + tail
        return iter([i for batch in shuffled for i in batch])

    def __len__(self) -> int:
        return len(self.lengths)


def pair_lengths(examples) -> list[int]:
    """Prompt + chosen + rejected token counts of encoded pairs (dicts or a ``datasets.Dataset``)."""
    if hasattr(examples, "column_names"):  # a Dataset: read the three columns, not row dicts
        columns = [examples[c] for c in ("prompt_ids", "chosen_ids", "rejected_ids")]
        return [len(p) + len(c) + len(r) for p, c, r in zip(*columns)]
    return [len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in examples]


def epoch_sampler(examples, batch_size: int, seed: int, epoch: Callable[[], int], group_by_length: bool) -> Sampler[int]:
    """The training sampler of a pair data module: ``EpochShuffle``, or with ``group_by_length``
    ``LengthGroupedShuffle`` over the pairs' lengths."""
    if group_by_length:
        return LengthGroupedShuffle(pair_lengths(examples), batch_size, seed, epoch)
    return EpochShuffle(len(examples), seed, epoch)
