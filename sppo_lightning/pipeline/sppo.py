"""``SPPOPipeline``: one SPPO iteration's training pairs from the current policy, Trainer-free.

``build`` runs the stages of ``stages.py`` shard by shard (``shard_size`` prompts) and persists each
to ``<run_dir>/iteration_<t>/`` (``artifacts.py``): a finished stage is reused on resume, a
killed one resumes from its last written shard, and the rankings (and what follows) are redone
when the ranker's fingerprint changes. It returns the pairs memory-mapped from ``train.parquet``
and the iteration's statistics; it calls nothing back.

    pipeline = SPPOPipeline(HFGenerator(), FunctionJudge("sppo_lightning.ranking.judges:shorter"),
                            run_dir="runs/x", num_samples=5)
    result = pipeline.build(0, policy, tokenizer, prompts)     # the first iteration (runs/x/iteration_1)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import pyarrow.compute as pc
import pyarrow.parquet as pq
from torch import nn

from sppo_lightning import seeds
from sppo_lightning.artifacts import IterationArtifacts, atomic_write_bytes, memory_mapped_on_ranks, run_sharded_stage
from sppo_lightning.data.prompts import Prompt, prompts_fingerprint
from sppo_lightning.errors import ConfigError, DataError
from sppo_lightning.pipeline import stages
from sppo_lightning.pipeline.policy_export import export_policy, offloaded, prune_exports
from sppo_lightning.distributed import DistContext
from sppo_lightning.ranking.cache import attach_judgment_cache, counted
from sppo_lightning.ranking.protocol import fingerprint_hash, fingerprint_of

# What training reads of train.parquet (the other columns are for people and the official format).
TRAINING_COLUMNS = ["prompt_ids", "chosen_ids", "rejected_ids", "chosen_probs", "chosen_probs_win",
                    "chosen_probs_lose", "reference_chosen_logps", "reference_rejected_logps"]


@dataclass
class IterationData:
    """What ``build`` returns: the training pairs (anything with ``len`` and integer indexing; a
    memory-mapped ``datasets.Dataset``), the iteration's statistics for the summary, and the
    first pairs as a table for loggers."""

    pairs: Any
    stats: dict[str, Any]
    samples: tuple[list[str], list[list[Any]]] = field(default_factory=lambda: ([], []))


@dataclass
class SPPOPipeline:
    """The settings of SPPO's self-play data, and the stages that make it.

    Args:
        generator: a ``Generator`` (``HFGenerator``, ``LinearAlignmentGenerator``, ...).
        ranker: a ``Ranker`` (``PairRMRanker``, ``RewardModelRanker``, ``FunctionJudge``, ...).
        run_dir: where the iterations' data go.
        num_samples: K responses per prompt (≥ 2; the paper uses 5).
        seed: fixes every sample; iteration t draws its own stream (``seeds.iteration_stream``).
        shard_size: prompts per shard, rounded up to whole generation batches.
        reference_batch_size: pairs per forward for the reference log-probs.
        log_samples: pairs written to ``samples.md`` per iteration.
        show_progress: progress bars (rank 0) for sampling and the reference log-probs.
    """

    generator: Any
    ranker: Any
    run_dir: Path
    num_samples: int = 5
    seed: int = 0
    shard_size: int = 512
    reference_batch_size: int = 8
    log_samples: int = 3
    show_progress: bool = True

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        checks = [
            (self.num_samples >= 2, f"num_samples (K) must be at least 2 to form a pair, got {self.num_samples}"),
            (self.shard_size >= 1, f"generation_shard_size must be at least 1, got {self.shard_size}"),
            (self.reference_batch_size >= 1, "batch sizes must be at least 1"),
            (hasattr(self.ranker, "pairwise_logits"), "ranker must have pairwise_logits(prompts, candidates)"),
            (hasattr(self.generator, "sample"), "generator must have sample(model, tokenizer, prompts, ...)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"SelfPlay: {message}")

    def settings(self, prompts: Sequence[Prompt]) -> dict[str, Any]:
        """What the iteration's data depend on, besides the ranker (whose change redoes the rankings):
        a run dir made with other settings is refused."""
        return {"num_samples": self.num_samples, "seed": self.seed, "prompts": prompts_fingerprint(prompts),
                "generator": self.generator.fingerprint()}

    def build(self, iteration: int, model: nn.Module, tokenizer, prompts: Sequence[Prompt],
              ctx: Optional[DistContext] = None) -> IterationData:
        """Make (or reload) iteration ``iteration``'s pairs on ``prompts`` from π_t: ``model`` is the
        policy, or a training module that holds it as ``.policy``."""
        ctx = ctx or DistContext()
        policy = model if getattr(model, "policy", None) is None else model.policy
        artifacts = IterationArtifacts(self.run_dir, iteration, self.settings(prompts))
        batch = self.generator.batch_size
        size = math.ceil(self.shard_size / batch) * batch  # shards cut at batch boundaries
        starts = range(0, len(prompts), size)
        seed = seeds.iteration_stream(self.seed, iteration)

        def generations(sampled_from, source: dict[str, Any]) -> None:
            run_sharded_stage(
                ctx, artifacts, "generations", len(starts),
                lambda k: (stages.generate(self.generator, sampled_from, tokenizer,
                                           prompts[starts[k] : starts[k] + size], self.num_samples, seed, ctx,
                                           batch_offset=starts[k] // batch), {}),
                on_every_rank=True, source=source, expect=lambda k: {"first_prompt": starts[k]},
            )

        if getattr(self.generator, "wants_export", False) and not self._finished(artifacts, "generations", ctx):
            self._generate_from_export(artifacts, policy, tokenizer, ctx, generations)
        else:
            generations(policy, {})
        # The rankings and pairs of shard k are made from the generations of shard k (one row group each).
        shards = artifacts.num_shards("generations")
        source = {"generations": artifacts.checksum("generations"),
                  "ranker": fingerprint_hash(fingerprint_of(self.ranker))}
        attach_judgment_cache(self.ranker, self.run_dir)
        run_sharded_stage(ctx, artifacts, "rankings", shards,
                          lambda k: counted(self.ranker, lambda: stages.rank(
                              self.ranker, tokenizer, artifacts.read_shard("generations", k),
                              artifacts.shard_start("generations", k))), source=source)
        source = {"generations": source["generations"], "rankings": artifacts.checksum("rankings")}
        # Every rank: the reference log-probs are split over the ranks (and are collectives under FSDP).
        run_sharded_stage(ctx, artifacts, "train", shards, lambda k: self._pairs(artifacts, k, iteration, policy,
                                                                                tokenizer, ctx),
                          on_every_rank=True, source=source)
        return self._result(artifacts, iteration, prompts, ctx)

    @staticmethod
    def _finished(artifacts: IterationArtifacts, stage: str, ctx: DistContext) -> bool:
        return bool(ctx.broadcast(artifacts.finished(stage) if ctx.is_global_zero else None))

    def _generate_from_export(self, artifacts: IterationArtifacts, policy: nn.Module, tokenizer, ctx: DistContext,
                              generations) -> None:
        """For an engine generator (vLLM): π_t exported to ``iteration_<t>/policy``, sampled by the
        engine with the training policy offloaded, the engine released, old exports pruned. The
        export's checksum is the generations' recorded input: shards sampled from other weights
        are redone."""
        export = export_policy(policy, tokenizer, artifacts.dir / "policy", ctx,
                               lora=getattr(self.generator, "lora", "auto"))
        try:
            with offloaded(policy, getattr(self.generator, "offload_policy", False)):
                generations(export, {"policy": export.checksum})
        finally:
            self.generator.release()
        if ctx.is_global_zero:
            prune_exports(self.run_dir, getattr(self.generator, "keep_policy_exports", -1))
        ctx.barrier("prune_exports")

    def _pairs(self, artifacts: IterationArtifacts, shard: int, iteration: int, policy: nn.Module, tokenizer,
               ctx: DistContext) -> tuple[list[dict], dict]:
        pairs, ties = stages.estimate_pairs(artifacts.read_shard("generations", shard),
                                            artifacts.read_shard("rankings", shard), iteration,
                                            first_row=artifacts.shard_start("generations", shard))
        stages.reference_logps(policy, pairs, tokenizer.pad_token_id, self.reference_batch_size, ctx,
                               self.show_progress)
        return pairs, {"ties_dropped": ties}

    def _result(self, artifacts: IterationArtifacts, iteration: int, prompts: Sequence[Prompt],
                ctx: DistContext) -> IterationData:
        info = artifacts.info("train")
        if info["rows"] == 0:
            raise DataError(f"iteration {iteration + 1}: all {len(prompts)} prompts tied (every response scored "
                            f"the same); nothing to train on. Raise temperature, num_samples or max_new_tokens, "
                            f"or check the ranker")
        means = pq.read_table(artifacts.path("train"), columns=["chosen_probs_win", "chosen_probs_lose"])
        stats = {
            "pairs": info["rows"],
            "ties_dropped": info.get("ties_dropped", 0),
            "prompts_truncated": sum(p.truncated for p in prompts),
            "chosen_p_win": pc.mean(means.column("chosen_probs_win")).as_py(),
            "rejected_p_win": pc.mean(means.column("chosen_probs_lose")).as_py(),
            "seconds": {s: artifacts.info(n).get("seconds", 0.0) for s, n in
                        (("generate", "generations"), ("rank", "rankings"), ("reference", "train"))},
        }
        judge = {k: v for k, v in artifacts.info("rankings").items()
                 if k in ("judge_calls", "cache_hits", "judged_by_logprobs", "judged_by_verdict")}
        if judge:  # an LLM judge: its questions, cache hits, and how its margins were read
            stats["judge"] = judge
        samples = stages.samples_table(artifacts.read_shard("train", 0), self.log_samples)
        if ctx.is_global_zero and self.log_samples > 0:
            atomic_write_bytes(artifacts.dir / "samples.md", stages.markdown_table(*samples).encode())
        return IterationData(memory_mapped_on_ranks(ctx, artifacts, "train", TRAINING_COLUMNS), stats, samples)
