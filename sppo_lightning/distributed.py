"""``DistContext``: what a pipeline stage knows of the processes it runs in, and nothing more;
``rank_batches``: which batches a rank runs.

A stage takes one of these instead of a Trainer: its rank, the world size, the device, and the
three collectives the stages use (barrier, broadcast from rank 0, gather of Python objects).
``DistContext()`` is one process on CPU, for tests and scripts; ``from_trainer`` wraps a running
Lightning strategy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import math

import torch


def rank_batches(count: int, rank: int, world_size: int, lockstep: bool = False) -> list[tuple[int, bool]]:
    """The batches of ``count`` that ``rank`` runs, as ``(batch index, real)``: ``rank``,
    ``rank + world_size``, ... With ``lockstep`` (a sharded model, where every forward is a
    collective) every rank runs the same number of steps: a rank short of batches repeats a batch
    (``real`` False: run it, drop its output) so that the others are not left waiting."""
    mine = [(b, True) for b in range(rank, count, world_size)]
    if lockstep and count:
        steps = math.ceil(count / world_size)
        mine += [(mine[-1][0] if mine else count - 1, False)] * (steps - len(mine))
    return mine


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    strategy: Optional[Any] = None  # a Lightning strategy; None: a single process

    @classmethod
    def from_trainer(cls, trainer) -> "DistContext":
        return cls(trainer.global_rank, trainer.world_size, trainer.strategy.root_device, trainer.strategy)

    @property
    def is_global_zero(self) -> bool:
        return self.rank == 0

    def barrier(self, name: str) -> None:
        if self.strategy is not None:
            self.strategy.barrier(name)

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        return value if self.strategy is None else self.strategy.broadcast(value)

    def all_gather_object(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order, on every rank."""
        if self.world_size == 1:
            return [value]
        import torch.distributed as dist

        parts: list[Any] = [None] * self.world_size
        dist.all_gather_object(parts, value)
        return parts
