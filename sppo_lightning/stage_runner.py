"""Running a stage of an iteration once: rank 0 decides whether it is finished, every rank follows;
made shard by shard so that no more than one shard's rows are in memory, then merged.

``ctx``: the processes (``distributed.DistContext``: ``is_global_zero``, ``broadcast``, ``barrier``);
``artifacts``: the iteration's files (``artifacts.IterationArtifacts``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Union

from sppo_lightning.artifacts import IterationArtifacts
from sppo_lightning.step_store import StepDraw

Store = Union[IterationArtifacts, StepDraw]  # an iteration's files, or a per-step draw in memory


def iteration_store(run_dir: Path, iteration: int, settings: dict[str, Any], in_memory: bool) -> Store:
    """Where a method's iteration keeps its stages: ``iteration_<t>/`` files, or (``in_memory``: a
    per-step draw) a ``StepDraw`` with one line in the run's ``steps.jsonl``."""
    return StepDraw(run_dir, iteration, settings) if in_memory else IterationArtifacts(run_dir, iteration, settings)


def run_stage(ctx, artifacts: Store, stage: str, compute, on_every_rank: bool = False,
              expect: Optional[dict[str, Any]] = None) -> None:
    """Make a stage unless it is finished: ``compute()`` returns ``(rows, info)`` and rank 0 writes.

    ``on_every_rank``: every rank computes (generation: each samples its share, then all gather);
    otherwise rank 0 alone computes (ranking, reference log-probs) and the others read its file.
    Rank 0 decides whether the stage is finished and every rank follows: a rank that looked for
    itself could see the file rank 0 has just written and skip a collective the others are in.
    ``expect``: manifest entries the stage must have to count as finished; they are recorded with it.
    ``ctx``: the processes (``pipeline.DistContext``: ``is_global_zero``, ``broadcast``, ``barrier``).
    A ``StepDraw`` (in memory) keeps the rows on every rank: a rank-0 stage's rows are broadcast.
    """
    import time

    if isinstance(artifacts, StepDraw):
        start = time.perf_counter()
        rows, info = compute() if on_every_rank or ctx.is_global_zero else ([], {})
        if not on_every_rank:
            rows, info = ctx.broadcast((rows, info))
        artifacts.save(stage, rows, seconds=time.perf_counter() - start, **info)
        return
    done = artifacts.finished(stage, expect) if ctx.is_global_zero else False
    if ctx.broadcast(done):  # rank 0 has just checked the file: every rank reuses it
        _reused(ctx, artifacts, stage)
        return
    if on_every_rank or ctx.is_global_zero:
        start = time.perf_counter()
        rows, info = compute()
        if ctx.is_global_zero:
            artifacts.save(stage, rows, seconds=time.perf_counter() - start, **info,
                           **({"input": expect} if expect else {}))
    ctx.barrier(f"stage_{stage}")  # the others read what rank 0 wrote when they need it


def memory_mapped_on_ranks(ctx, artifacts: Store, stage: str, columns: list[str]):
    """``artifacts.memory_mapped`` on every rank: rank 0 writes the Arrow file, the others open it
    after a barrier (two ranks writing the same file would race). A ``StepDraw``'s rows are in memory."""
    if isinstance(artifacts, StepDraw):
        return artifacts.dataset(stage, columns)
    if ctx.is_global_zero:
        data = artifacts.memory_mapped(stage, columns)
    ctx.barrier(f"arrow_{stage}")
    return data if ctx.is_global_zero else artifacts.memory_mapped(stage, columns)


def _reused(ctx, artifacts: Store, stage: str) -> None:
    """One line per stage or shard a resumed run takes from disk (a redone one is warned with its reason)."""
    if ctx.is_global_zero:
        from lightning.pytorch.utilities import rank_zero_info

        rank_zero_info(f"{artifacts.dir.name}: reusing {stage} ({artifacts.info(stage).get('rows', 0)} rows, "
                       f"finished earlier)")


def run_sharded_stage(ctx, artifacts: Store, stage: str, shards: int,
                      compute_shard: Callable[[int], tuple[list[dict], dict]], on_every_rank: bool = False,
                      source: Optional[dict[str, Any]] = None,
                      expect: Optional[Callable[[int], dict[str, Any]]] = None) -> None:
    """Make ``stage`` shard by shard, so that no more than one shard's rows are in memory.

    ``compute_shard(k)`` returns shard k's ``(rows, info)``; each shard is written as it finishes
    (stage ``<stage>.shard_<k>``), so a killed run redoes only the shard it was in. When all are
    written, rank 0 merges them into ``<stage>.parquet`` (one row group per shard, read back with
    ``read_shard``) and removes them. ``source``: what the stage is made from (checksums of earlier
    stages), recorded with it and with every shard: one made from anything else is redone.
    ``expect(k)``: what else shard k's entry must record (which prompts it holds).
    """
    source = source or {}
    done = artifacts.finished(stage, source) if ctx.is_global_zero else False
    if ctx.broadcast(done):
        _reused(ctx, artifacts, stage)
        if ctx.is_global_zero:  # shards left behind by a run killed between merging and removing
            artifacts.remove(*artifacts.stages(prefix=f"{stage}.shard_"))
        return
    parts = [f"{stage}.shard_{k:05d}" for k in range(shards)]
    for k, part in enumerate(parts):
        run_stage(ctx, artifacts, part, lambda k=k: compute_shard(k), on_every_rank,
                  expect={**source, **(expect(k) if expect else {})} or None)
    if ctx.is_global_zero or isinstance(artifacts, StepDraw):  # in memory: every rank holds its copy
        artifacts.merge(stage, parts, shards=shards, **({"input": source} if source else {}))
    ctx.barrier(f"merge_{stage}")
