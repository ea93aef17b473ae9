"""``SPPO``: the self-play method of SPPO (arXiv 2405.00675), a plug-in of ``SelfPlayDataModule``.

Each iteration ``build`` runs the shared stages (``pipeline/stages.py``) shard by shard
(``generation_shard_size`` prompts): π_t samples K responses per prompt, the ranker scores every
pair, win probabilities become targets, the best/worst pair gets π_t's reference log-probs. Each
stage is persisted to ``<run_dir>/iteration_<t>/`` (``artifacts.py``): a finished stage is reused on
resume, a killed one resumes from its last written shard, and the rankings (and what follows) are
redone when the ranker's fingerprint changes. It returns the pairs memory-mapped from
``train.parquet`` and the iteration's statistics (also in its manifest); it calls nothing back.

    sppo = SPPO(FunctionJudge("sppo_lightning.ranking.judges:shorter"), num_samples=5)
    result = sppo.build(0, prompts, Policies(policy), tokenizer, DistContext(), Path("runs/x"))
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal, Optional, Sequence


from sppo_lightning import seeds
from sppo_lightning.artifacts import IterationArtifacts
from sppo_lightning.contracts import EngineGenerator, Generator, IterationData, LogprobSampler, plugins_of
from sppo_lightning.data.prompts import Prompt, prompts_fingerprint
from sppo_lightning.distributed import DistContext
from sppo_lightning.errors import ConfigError
from sppo_lightning.files import atomic_write_bytes
from sppo_lightning.methods.plugins import check_plugins
from sppo_lightning.pipeline import stages
from sppo_lightning.pipeline.generators import HFGenerator
from sppo_lightning.pipeline.policy_export import export_policy, offloaded, prune_exports
from sppo_lightning.policies import Policies
from sppo_lightning.ranking import Ranker
from sppo_lightning.ranking.cache import attach_judgment_cache, counted
from sppo_lightning.ranking.protocol import fingerprint_hash, fingerprint_of
from sppo_lightning.stage_runner import Store, memory_mapped_on_ranks, run_sharded_stage

# What training reads of train.parquet (the other columns are for people and the official format).
TRAINING_COLUMNS = ["prompt_ids", "chosen_ids", "rejected_ids", "chosen_probs", "chosen_probs_win",
                    "chosen_probs_lose", "reference_chosen_logps", "reference_rejected_logps"]


def check_reference_logps(owner: str, reference_logps: str, generator: Generator) -> None:
    """``reference_logps`` is ``forward`` or ``sampler``; ``sampler`` needs a generator that samples
    π_t itself and returns its log-probs (a ``LogprobSampler``). One line at start-up otherwise."""
    if reference_logps not in ("forward", "sampler"):
        raise ConfigError(f"{owner}: reference_logps must be forward or sampler, got {reference_logps!r}")
    if reference_logps == "sampler" and not isinstance(generator, LogprobSampler):
        raise ConfigError(f"{owner}: reference_logps: sampler needs the generator's own log-probs of π_t, which "
                          f"{type(generator).__name__} does not give (LinearAlignmentGenerator samples a steered "
                          f"distribution, not π_t; VLLMGenerator's are not wired yet): use HFGenerator, or "
                          f"reference_logps: forward")


def exports_policy(generator: Generator, policy) -> bool:
    """Whether ``generator`` samples π_t from a per-iteration export (a vLLM engine that is not live,
    or cannot take this policy in memory) rather than from the module."""
    return isinstance(generator, EngineGenerator) and generator.exports_policy(policy)


def sample_in_shards(ctx: DistContext, artifacts: Store, generator, model, tokenizer,
                     prompts: Sequence[Prompt], num_samples: int, seed: int, shard_size: int,
                     source: Optional[dict[str, Any]] = None, with_logprobs: bool = False) -> None:
    """The ``generations`` stage: K samples per prompt, shard by shard (``shard_size`` prompts rounded
    up to whole generation batches, so that a prompt's seed does not depend on the shard); every
    rank samples its share. ``source``: what the samples are drawn from (π_t's fingerprint, an export's
    checksum): shards recorded with another source are redone. ``with_logprobs``: the sampler's
    log-probs ride with the samples (``reference_logps: sampler``)."""
    batch = generator.batch_size
    size = math.ceil(shard_size / batch) * batch
    starts = range(0, len(prompts), size)
    run_sharded_stage(
        ctx, artifacts, "generations", len(starts),
        lambda k: (stages.generate(generator, model, tokenizer, prompts[starts[k] : starts[k] + size], num_samples,
                                   seed, ctx, batch_offset=starts[k] // batch, with_logprobs=with_logprobs), {}),
        on_every_rank=True, source=source, expect=lambda k: {"first_prompt": starts[k]},
    )


def rank_in_shards(ctx: DistContext, artifacts: Store, ranker, tokenizer, run_dir: Path) -> dict[str, str]:
    """The ``rankings`` stage: shard k of the generations ranked into shard k (one row group each),
    with the judgment cache and the judge's counts; redone when the generations or the ranker's
    fingerprint change. Returns what the pairs are made from (the two stages' checksums)."""
    attach_judgment_cache(ranker, run_dir)
    source = {"generations": artifacts.checksum("generations"), "ranker": fingerprint_hash(fingerprint_of(ranker))}
    run_sharded_stage(ctx, artifacts, "rankings", artifacts.num_shards("generations"),
                      lambda k: counted(ranker, lambda: stages.rank(
                          ranker, tokenizer, artifacts.read_shard("generations", k),
                          artifacts.shard_start("generations", k))), source=source)
    return {"generations": source["generations"], "rankings": artifacts.checksum("rankings")}


class SPPO:
    """SPPO's self-play data: K samples of π_t per prompt, ranked, estimated, with π_t's log-probs.

    Args:
        ranker: the preference oracle (``PairRMRanker``, ``RewardModelRanker``, ``FunctionJudge``,
            ``LLMJudge``, ``OpenAIJudge``, or any class with ``pairwise_logits`` and ``fingerprint``).
        generator: how π_t samples, with its sampling settings (``sppo_lightning.pipeline.HFGenerator``,
            ``sppo_lightning.pipeline.VLLMGenerator``, ``sppo_lightning.decoding.LinearAlignmentGenerator``);
            None: ``HFGenerator()`` with its defaults (temperature 0.7, top_p 0.9). The only place
            sampling is set; the win rate against the initial policy samples with it too.
        num_samples: K responses per prompt (any K ≥ 2; the paper uses 5).
        seed: fixes every sample; iteration t and the win-rate evaluation draw their own streams.
        reference_batch_size: pairs per forward when computing the reference log-probs.
        log_samples: how many pairs per iteration go to ``samples.md`` (and loggers' tables).
        show_progress: progress bars for the reference log-probs (the generator and ranker have their own).
        generation_shard_size: prompts per shard (rounded up to whole generation batches). Every
            stage runs shard by shard and writes each shard as it finishes: memory holds one shard's
            rows whatever the number of prompts, and a killed run resumes from the last written
            shard. Results do not depend on it.
        restarts_optimizer: a fresh optimizer and LR schedule every iteration, as the official
            pipeline (a new training job per iteration) does.
        reference_logps: where π_t's log-probs of chosen and rejected come from: ``forward`` (a
            no-grad forward over the pairs after ranking) or ``sampler`` (recorded by the generator
            while it sampled, from the raw logits: no forward; ``HFGenerator`` only). They agree to
            under 1e-3 nats a sequence in float32 (``bench/README.md`` §13), far below what η = 1000's
            targets of tens of nats can see; ``forward`` stays the default until the vLLM and bf16
            agreement is measured.
    """

    run_folder = "self_play"
    log_prefix = "self_play"
    caches_reference = True  # π_t's log-probs ride with the pairs: the module needs no reference model

    def __init__(
        self,
        ranker: Ranker,
        generator: Optional[Generator] = None,
        num_samples: int = 5,
        seed: int = 0,
        reference_batch_size: int = 8,
        log_samples: int = 3,
        show_progress: bool = True,
        generation_shard_size: int = 512,
        restarts_optimizer: bool = True,
        reference_logps: Literal["forward", "sampler"] = "forward",
    ) -> None:
        self.ranker = ranker
        self.reference_logps = reference_logps
        self.generator = generator if generator is not None else HFGenerator()
        self.num_samples, self.seed = num_samples, seed
        self.reference_batch_size, self.log_samples = reference_batch_size, log_samples
        self.show_progress, self.shard_size = show_progress, generation_shard_size
        self.restarts_optimizer = restarts_optimizer
        integers = {"num_samples": num_samples, "reference_batch_size": reference_batch_size,
                    "log_samples": log_samples, "seed": seed, "generation_shard_size": generation_shard_size}
        for name, value in integers.items():
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name} must be an integer, got {value!r}")
        checks = [
            (self.num_samples >= 2, f"data.method.num_samples (K) must be at least 2 to form a pair, got {self.num_samples}"),
            (self.shard_size >= 1, f"generation_shard_size must be at least 1, got {self.shard_size}"),
            (self.reference_batch_size >= 1, "batch sizes must be at least 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        check_plugins("SPPO", self.generator, self.ranker)
        check_reference_logps("SPPO", reference_logps, self.generator)

    def prompts_per_iteration(self, per_step: int, configured: Optional[int], epochs_per_iteration: int,
                              total: int) -> Optional[int]:
        return configured

    def summary(self, stats: dict[str, Any]) -> dict[str, Any]:
        return dict(stats)

    def settings(self, prompts: Sequence[Prompt]) -> dict[str, Any]:
        """What the iteration's data depend on, besides the ranker (whose change redoes the rankings):
        a run dir made with other settings is refused."""
        return {"num_samples": self.num_samples, "seed": self.seed, "prompts": prompts_fingerprint(prompts),
                "generator": self.generator.fingerprint(),
                **({"reference_logps": "sampler"} if self.reference_logps == "sampler" else {})}

    def build(self, iteration: int, prompts: Sequence[Prompt], policies: Policies, tokenizer, ctx: DistContext,
              run_dir: Path) -> IterationData:
        """Make (or reload from ``run_dir``) iteration ``iteration``'s pairs on ``prompts`` from π_t
        (``policies.policy``)."""
        policy = policies.policy
        run_dir = Path(run_dir)
        artifacts = IterationArtifacts(run_dir, iteration, self.settings(prompts))
        seed = seeds.iteration_stream(self.seed, iteration)

        def generations(sampled_from, source: dict[str, Any]) -> None:
            sample_in_shards(ctx, artifacts, self.generator, sampled_from, tokenizer, prompts, self.num_samples,
                             seed, self.shard_size, source, with_logprobs=self.reference_logps == "sampler")

        drawn_from = policies.drawn_from()  # π_t's fingerprint: samples of other weights are redone
        if exports_policy(self.generator, policy) and not self._finished(artifacts, "generations", ctx, drawn_from):
            self._generate_from_export(artifacts, run_dir, policy, tokenizer, ctx, generations, drawn_from)
        else:
            generations(policy, drawn_from)
            if isinstance(self.generator, EngineGenerator) and self.generator.keep_policy_exports:
                # a live engine: π_t saved for the user
                export_policy(policy, tokenizer, artifacts.dir / "policy", ctx)
                self._prune_exports(run_dir, ctx)
        source = rank_in_shards(ctx, artifacts, self.ranker, tokenizer, run_dir)
        # Every rank: the reference log-probs are split over the ranks (and are collectives under FSDP).
        run_sharded_stage(ctx, artifacts, "train", artifacts.num_shards("generations"),
                          lambda k: self._pairs(artifacts, k, iteration, policies, tokenizer, ctx),
                          on_every_rank=True, source=source)
        return self._result(artifacts, iteration, prompts, ctx)

    @staticmethod
    def _finished(artifacts: IterationArtifacts, stage: str, ctx: DistContext, expect: dict[str, Any]) -> bool:
        return bool(ctx.broadcast(artifacts.finished(stage, expect) if ctx.is_global_zero else None))

    def _generate_from_export(self, artifacts: IterationArtifacts, run_dir: Path, policy, tokenizer,
                              ctx: DistContext, generations, drawn_from: dict[str, Any]) -> None:
        generator = self.generator
        assert isinstance(generator, EngineGenerator)  # exports_policy() said so
        """For an engine generator (vLLM): π_t exported to ``iteration_<t>/policy``, sampled by the
        engine with the training policy offloaded, the engine released, old exports pruned. π_t's
        fingerprint and the export's checksum are the generations' recorded input: shards sampled
        from other weights are redone."""
        export = export_policy(policy, tokenizer, artifacts.dir / "policy", ctx,
                               lora=generator.lora)
        try:
            with offloaded(policy, generator.offload_policy):
                generations(export, {**drawn_from, "export": export.checksum})
        finally:
            generator.release()
        self._prune_exports(run_dir, ctx)

    def _prune_exports(self, run_dir: Path, ctx: DistContext) -> None:
        """Keep the newest ``keep_policy_exports`` exports of π_t (rank 0 removes, every rank waits)."""
        if ctx.is_global_zero:
            keep = self.generator.keep_policy_exports if isinstance(self.generator, EngineGenerator) else -1
            prune_exports(run_dir, keep)
        ctx.barrier("prune_exports")

    def _pairs(self, artifacts: IterationArtifacts, shard: int, iteration: int, policies: Policies, tokenizer,
               ctx: DistContext) -> tuple[list[dict], dict]:
        generations = artifacts.read_shard("generations", shard)
        pairs, ties = stages.estimate_pairs(generations, artifacts.read_shard("rankings", shard), iteration,
                                            first_row=artifacts.shard_start("generations", shard))
        if self.reference_logps == "sampler":
            stages.sampler_reference_logps(pairs, generations)
        else:
            stages.reference_logps(policies.policy, pairs, tokenizer.pad_token_id, self.reference_batch_size, ctx,
                                   self.show_progress, packing=policies.packing)
        return pairs, {"ties_dropped": ties}

    def _result(self, artifacts: IterationArtifacts, iteration: int, prompts: Sequence[Prompt],
                ctx: DistContext) -> IterationData:
        stats = stages.pair_statistics(artifacts, prompts, iteration, self.num_samples)
        samples = stages.samples_table(artifacts.read_shard("train", 0), self.log_samples)
        if ctx.is_global_zero:
            artifacts.record_stats(stats, plugins_of(self))
        if ctx.is_global_zero and self.log_samples > 0:
            atomic_write_bytes(artifacts.dir / "samples.md", stages.markdown_table(*samples).encode())
        return IterationData(memory_mapped_on_ranks(ctx, artifacts, "train", TRAINING_COLUMNS), stats, samples)
