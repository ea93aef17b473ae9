"""``OnlinePairs``: online preference optimisation with K samples per prompt, one optimizer step per draw.

Every optimizer step samples K ≥ 2 responses per prompt from the current policy, ranks them with
any ranker, and trains on the best and the worst (the pair of ``ranking/estimate.select_pairs``,
with SPPO's win probabilities on it), with any pair loss of the table: DPO, IPO, SimPO, or SPPO.
TRL's online DPO draws K = 2; here K is a setting, and best-of-K against worst-of-K gives the
widest margin the samples hold.

The reference of the loss is either the module's (``reference: module``: the initial policy, a
frozen copy or the LoRA base with adapters off, as online DPO anchors it), or π_t itself
(``reference: iteration``: the sampling policy's log-probs cached with the pairs, as SPPO does).

Built from the shared stages only (``stages.generate``, ``stages.rank``, ``stages.estimate_pairs``,
``stages.reference_logps``) and the artifacts runner, so it resumes exactly after a kill, shard by
shard, like the other methods.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Sequence

from sppo_lightning import seeds
from sppo_lightning.contracts import EngineGenerator, Generator, IterationData, plugins_of
from sppo_lightning.data.prompts import Prompt, prompts_fingerprint
from sppo_lightning.distributed import DistContext
from sppo_lightning.errors import ConfigError
from sppo_lightning.labels import NO_PAIR
from sppo_lightning.methods.on_policy import on_policy_prompts
from sppo_lightning.methods.plugins import check_plugins
from sppo_lightning.methods.sppo import check_reference_logps, rank_in_shards, sample_in_shards
from sppo_lightning.pipeline import stages
from sppo_lightning.pipeline.generators import HFGenerator
from sppo_lightning.policies import Policies
from sppo_lightning.ranking import Ranker
from sppo_lightning.stage_runner import Store, iteration_store, memory_mapped_on_ranks, run_sharded_stage

PAIR_COLUMNS = ["prompt_ids", "chosen_ids", "rejected_ids", "chosen_probs", "chosen_probs_win", "chosen_probs_lose"]
REFERENCE_COLUMNS = ["reference_chosen_logps", "reference_rejected_logps"]


class OnlinePairs:
    """Online pairs: K samples of the current policy per prompt, best against worst, every step.

    Args:
        ranker: any ranker (``FunctionJudge``, ``PairRMRanker``, ``RewardModelRanker``, ``LLMJudge``, ...).
        generator: how the policy samples (``HFGenerator``, ``LinearAlignmentGenerator``); None:
            ``HFGenerator(temperature=1.0, top_p=1.0)``, sampling the policy as it is.
        num_samples: K responses per prompt (≥ 2; TRL's online DPO is fixed at 2).
        seed: fixes every sample; each iteration (step) draws its own stream.
        on_policy: an iteration is one optimizer step's prompts, sampled by the policy of that step;
            ``false`` draws ``data.prompts_per_iteration`` prompts per iteration (warned: off-policy).
        reference: ``module`` (the loss's reference is the module's: set ``model.reference`` to
            copy, adapter or auto) or ``iteration`` (π_t's log-probs cached with the pairs; then
            ``model.reference: cached``).
        reference_batch_size: pairs per forward for ``reference: iteration``.
        reference_logps: with ``reference: iteration``, where π_t's log-probs come from: ``forward``
            (a no-grad forward over the pairs) or ``sampler`` (recorded while sampling; as SPPO's).
        generation_shard_size: prompts per shard of each stage.
        step_folders: write each on-policy step's stages to ``iteration_<t>/`` (as SPPO's
            iterations), to inspect them; off (the default), a step's draw stays in memory and
            ``steps.jsonl`` gets one line per step (``step_store.py``): no folder per step, and a
            resume is as exact (the draw is made again from the same weights).
    """

    run_folder = "online"
    log_prefix = "online"
    restarts_optimizer = False  # one optimizer for the run: every step is its own draw

    def __init__(
        self,
        ranker: Ranker,
        generator: Optional[Generator] = None,
        num_samples: int = 4,
        seed: int = 0,
        on_policy: bool = True,
        reference: Literal["module", "iteration"] = "module",
        reference_batch_size: int = 8,
        generation_shard_size: int = 512,
        step_folders: bool = False,
        reference_logps: Literal["forward", "sampler"] = "forward",
    ) -> None:
        self.ranker = ranker
        self.reference_logps = reference_logps
        self.step_folders = step_folders
        self.generator = generator if generator is not None else HFGenerator(temperature=1.0, top_p=1.0)
        self.num_samples, self.seed, self.on_policy, self.reference = num_samples, seed, on_policy, reference
        self.reference_batch_size, self.shard_size = reference_batch_size, generation_shard_size
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 2:
            raise ConfigError(f"data.method.num_samples (K) must be an integer of at least 2 to form a pair, "
                              f"got {num_samples!r}")
        if reference not in ("module", "iteration"):
            raise ConfigError(f"reference must be module or iteration, got {reference!r}")
        if reference_batch_size < 1 or generation_shard_size < 1:
            raise ConfigError("reference_batch_size and generation_shard_size must be at least 1")
        check_plugins("OnlinePairs", self.generator, self.ranker)
        check_reference_logps("OnlinePairs", reference_logps, self.generator)
        if isinstance(self.generator, EngineGenerator) and not self.generator.live:
            raise ConfigError(f"{type(self.generator).__name__} with live: false samples from an export made once per "
                              f"iteration; online pairs sample at every step: use live: true (the engine follows "
                              f"the weights in memory), HFGenerator or LinearAlignmentGenerator")

    @property
    def caches_reference(self) -> bool:
        return self.reference == "iteration"

    def prompts_per_iteration(self, per_step: int, configured: Optional[int], epochs_per_iteration: int,
                              total: int) -> Optional[int]:
        return on_policy_prompts("OnlinePairs", self.on_policy, per_step, configured, epochs_per_iteration, total)

    def summary(self, stats: dict[str, Any]) -> dict[str, Any]:
        return dict(stats)

    def settings(self, prompts: Sequence[Prompt]) -> dict[str, Any]:
        return {"method": "online", "num_samples": self.num_samples, "seed": self.seed, "reference": self.reference,
                "generator": self.generator.fingerprint(), "prompts": prompts_fingerprint(prompts),
                **({"reference_logps": "sampler"} if self.sampler_reference else {})}

    @property
    def sampler_reference(self) -> bool:
        """π_t's log-probs as the sampler recorded them (only where π_t is the loss's reference)."""
        return self.reference == "iteration" and self.reference_logps == "sampler"

    def build(self, iteration: int, prompts: Sequence[Prompt], policies: Policies, tokenizer, ctx: DistContext,
              run_dir: Path) -> IterationData:
        """Iteration ``iteration``'s best/worst pairs of K samples of ``policies.policy`` on ``prompts``."""
        run_dir = Path(run_dir)
        policy = policies.policy
        in_memory = self.on_policy and not self.step_folders  # a per-step draw: no folder
        artifacts = iteration_store(run_dir, iteration, self.settings(prompts), in_memory)
        sample_in_shards(ctx, artifacts, self.generator, policy, tokenizer, prompts, self.num_samples,
                         seeds.iteration_stream(self.seed, iteration), self.shard_size, policies.drawn_from(),
                         with_logprobs=self.sampler_reference)
        source = rank_in_shards(ctx, artifacts, self.ranker, tokenizer, run_dir)
        run_sharded_stage(ctx, artifacts, "train", artifacts.num_shards("generations"),
                          lambda k: self._pairs(artifacts, k, iteration, policies, tokenizer, ctx),
                          on_every_rank=self.reference == "iteration", source=source)
        stats = stages.pair_statistics(artifacts, prompts, iteration, self.num_samples, allow_empty=True,
                                       reference=self.reference == "iteration")
        if ctx.is_global_zero:
            artifacts.record_stats(stats, plugins_of(self))
        columns = PAIR_COLUMNS + (REFERENCE_COLUMNS if self.reference == "iteration" else [])
        if stats["pairs"] == 0:  # every prompt of the step tied: the step trains on nothing
            return IterationData(self._no_pair(artifacts, columns), stats)
        return IterationData(memory_mapped_on_ranks(ctx, artifacts, "train", columns), stats)

    @staticmethod
    def _no_pair(artifacts: Store, columns: list[str]):
        """One placeholder row marked ``NO_PAIR``: the step's batch, which the module skips (an
        epoch without a batch would end Lightning's fit)."""
        from datasets import Dataset

        first = artifacts.read_shard("generations", 0)[0]
        row: dict[str, Any] = {c: 0.5 if c.startswith("chosen_probs") else 0.0 for c in columns}
        row.update(prompt_ids=first["prompt_ids"], chosen_ids=first["response_ids"][0],
                   rejected_ids=first["response_ids"][0], **{NO_PAIR: 1.0})
        return Dataset.from_list([row])

    def _pairs(self, artifacts: Store, shard: int, iteration: int, policies: Policies, tokenizer,
               ctx: DistContext) -> tuple[list[dict], dict]:
        generations = artifacts.read_shard("generations", shard)
        pairs, ties = stages.estimate_pairs(generations, artifacts.read_shard("rankings", shard), iteration,
                                            first_row=artifacts.shard_start("generations", shard), quiet=True)
        if self.sampler_reference:
            stages.sampler_reference_logps(pairs, generations)
        elif self.reference == "iteration":
            stages.reference_logps(policies.policy, pairs, tokenizer.pad_token_id, self.reference_batch_size, ctx,
                                   packing=policies.packing)
        return pairs, {"ties_dropped": ties}
