"""``JBOND``: each iteration's J-BOND / BOND rows, a self-play method built from the same stages as
SPPO (``stages.generate``-style sampling with a ``Generator``, ``stages.rank``, ``stage_runner.run_sharded_stage``).

Per prompt (BOND, arXiv 2407.14622, Algorithm 2 and eq. 17):

* **J-BOND**: 1 sample from the policy and 2 from the anchor. The better anchor sample is the
  forward-KL target; the policy sample's reward is ``-log 16`` if it loses to both anchor samples,
  else 0.
* **BOND** (fixed N, anchor = the initial policy): 1 policy sample, N anchor samples whose best is
  the forward-KL target, and k more whose Monte-Carlo quantile gives the reward
  ``(N-1)·log p̂≤`` (clipped at 1/(2k)).

**Ties** of a discrete judge follow ``tie_rule``: ``strict`` (the paper's main text: the policy
sample loses only when strictly worse than both anchor samples, ``r(y) < min(r(y'_1), r(y'_2))``),
``le`` (its appendix: worse or tied), or ``coin`` (a seeded coin per comparison). Under ``strict``
and ``le`` a tie for the best anchor sample goes to the first one, and BOND's quantile counts a
tied reference sample as beaten (it estimates p≤). Ties are counted either way.

Both stages run shard by shard (``shard_size`` prompts) like SPPO's: memory holds one shard's rows
and a killed run resumes from the last written shard. A prompt's samples and coins do not depend
on the shard it falls in (generation seeds come from the global batch, coins from the prompt row).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import torch

from sppo_lightning import seeds
from sppo_lightning.contracts import EngineGenerator, Generator, IterationData, plugins_of
from sppo_lightning.data.prompts import Prompt, prompts_fingerprint
from sppo_lightning.data.tokenize import collate_responses
from sppo_lightning.distributed import DistContext
from sppo_lightning.errors import ConfigError
from sppo_lightning.logprobs import model_logprobs
from sppo_lightning.losses import best_of_n_kl, bond_reward, jbond_reward
from sppo_lightning.methods.on_policy import on_policy_prompts
from sppo_lightning.methods.plugins import check_plugins
from sppo_lightning.models import evaluating
from sppo_lightning.pipeline import stages
from sppo_lightning.pipeline.generators import HFGenerator
from sppo_lightning.policies import Policies
from sppo_lightning.ranking import Ranker
from sppo_lightning.ranking.cache import attach_judgment_cache, counted
from sppo_lightning.ranking.estimate import scores_from_pairwise
from sppo_lightning.ranking.protocol import fingerprint_hash, fingerprint_of
from sppo_lightning.stage_runner import iteration_store, memory_mapped_on_ranks, run_sharded_stage

TRAINING_COLUMNS = ["prompt_ids", "chosen_ids", "rejected_ids", "reward"]
TIE_RULES = ("strict", "le", "coin")


class _Comparisons:
    """Decides comparisons of one prompt under the tie rule, counting ties (and coins thrown)."""

    def __init__(self, rule: str, coin: torch.Generator) -> None:
        self.rule, self.coin, self.ties, self.coins = rule, coin, 0, 0

    def _flip(self) -> bool:
        self.coins += 1
        return bool(torch.rand(1, generator=self.coin).item() < 0.5)

    def wins(self, margin: float, tie_wins: bool) -> bool:
        """Whether the first side wins; a tie goes to ``tie_wins`` unless the rule is ``coin``."""
        if margin != 0:
            return margin > 0
        self.ties += 1
        return self._flip() if self.rule == "coin" else tie_wins

    def best(self, scores: torch.Tensor) -> int:
        """Index of the best score; a tie for it: the first, or a coin among the tied."""
        tied = (scores == scores.max()).nonzero().flatten()
        self.ties += len(tied) - 1
        if len(tied) > 1 and self.rule == "coin":
            self.coins += 1
            return int(tied[torch.randint(len(tied), (1,), generator=self.coin)])
        return int(tied[0])


class JBOND:
    """J-BOND / BOND as a self-play method of ``SelfPlayDataModule``, for
    :class:`~sppo_lightning.bond.BondModule` (which holds the policy, the anchor and the initial policy).

    Args:
        ranker: any ranker (J-BOND only needs comparisons).
        generator: how the policy and the anchor sample (``HFGenerator``, ``LinearAlignmentGenerator``;
            an engine generator (vLLM) needs weights it can follow, and is refused for now); None:
            ``HFGenerator(temperature=1.0, top_p=1.0)``, on-policy sampling.
        variant: ``jbond`` (2 anchor samples, EMA anchor: add the ``EMAAnchor`` callback) or ``bond``
            (fixed N against the initial policy: no ``EMAAnchor``).
        n: BOND's N (best-of-N). quantile_samples: BOND's k.
        seed: sampling and tie-breaking streams.
        on_policy: every optimizer step trains on samples of the current policy and anchor: an
            iteration is exactly one step's prompts (``data.batch_size`` × accumulation × devices).
            ``false`` trains several steps per draw (set ``data.prompts_per_iteration``): the later
            steps are off-policy REINFORCE with no correction, and a warning says so.
        tie_rule: ``strict`` (the paper's main text: the policy sample loses only when strictly
            worse than both anchor samples), ``le`` (its appendix: worse or tied), or ``coin``.
        generation_shard_size: prompts per shard of the generate and rank stages.
        step_folders: write each on-policy step's stages to ``iteration_<t>/`` (generations, ranks,
            rows, as SPPO's iterations), to inspect them; off (the default), a step's draw stays in
            memory and ``steps.jsonl`` gets one line per step (``step_store.py``): no folder per
            step, and a resume is as exact (the draw is made again from the same weights).
    """

    run_folder = "bond"
    log_prefix = "bond"
    restarts_optimizer = False  # J-BOND is online: the paper does not restart Adam
    caches_reference = False  # its loss needs no reference log-probs

    def __init__(
        self,
        ranker: Ranker,
        generator: Optional[Generator] = None,
        variant: Literal["jbond", "bond"] = "jbond",
        n: int = 8,
        quantile_samples: int = 16,
        seed: int = 0,
        on_policy: bool = True,
        tie_rule: Literal["strict", "le", "coin"] = "strict",
        generation_shard_size: int = 512,
        step_folders: bool = False,
    ) -> None:
        self.ranker = ranker
        self.step_folders = step_folders
        self.generator = generator if generator is not None else HFGenerator(temperature=1.0, top_p=1.0)
        self.variant, self.n, self.k, self.seed = variant, n, quantile_samples, seed
        self.on_policy, self.tie_rule, self.shard_size = on_policy, tie_rule, generation_shard_size
        if variant not in ("jbond", "bond"):
            raise ConfigError(f"variant must be jbond or bond, got {variant!r}")
        if variant == "bond" and (n < 2 or quantile_samples < 1):
            raise ConfigError(f"BOND needs n >= 2 and quantile_samples >= 1, got {n}, {quantile_samples}")
        if tie_rule not in TIE_RULES:
            raise ConfigError(f"tie_rule must be one of {', '.join(TIE_RULES)}, got {tie_rule!r}")
        if generation_shard_size < 1:
            raise ConfigError(f"generation_shard_size must be at least 1, got {generation_shard_size}")
        check_plugins("JBOND", self.generator, self.ranker)
        if isinstance(self.generator, EngineGenerator) and not self.generator.live:
            raise ConfigError(f"{type(self.generator).__name__} with live: false samples from an export made once "
                              f"per iteration; J-BOND samples the policy and its anchor at every step: use live: true "
                              f"(the engine follows the weights in memory), HFGenerator or LinearAlignmentGenerator")

    @property
    def anchor_samples(self) -> int:
        return 2 if self.variant == "jbond" else self.n + self.k

    def prompts_per_iteration(self, per_step: int, configured: Optional[int], epochs_per_iteration: int,
                              total: int) -> Optional[int]:
        return on_policy_prompts("JBOND", self.on_policy, per_step, configured, epochs_per_iteration, total)

    def summary(self, stats: dict[str, Any]) -> dict[str, Any]:
        row = {k: v for k, v in stats.items() if v is not None}
        if self.variant == "bond":  # Best-of-N's own KL to its reference, for comparison
            row["best_of_n_kl"] = best_of_n_kl(self.n)
        return row

    def settings(self, prompts: Sequence[Prompt]) -> dict[str, Any]:
        return {"variant": self.variant, "n": self.n, "k": self.k, "seed": self.seed, "tie_rule": self.tie_rule,
                "generator": self.generator.fingerprint(), "prompts": prompts_fingerprint(prompts)}

    def build(self, iteration: int, prompts: Sequence[Prompt], policies: Policies, tokenizer, ctx: DistContext,
              run_dir: Path) -> IterationData:
        """Iteration ``iteration``'s rows: samples of ``policies.policy`` and of the ``anchor`` role,
        ranked, with their rewards (and KL to the ``initial`` role where the module holds one)."""
        in_memory = self.on_policy and not self.step_folders  # a per-step draw: no folder
        artifacts = iteration_store(Path(run_dir), iteration, self.settings(prompts), in_memory)
        batch = self.generator.batch_size
        size = math.ceil(self.shard_size / batch) * batch  # shards cut at batch boundaries
        starts = range(0, len(prompts), size)
        run_sharded_stage(
            ctx, artifacts, "generations", len(starts),
            lambda k: self._generate(policies, tokenizer, prompts[starts[k] : starts[k] + size], iteration, ctx,
                                     starts[k] // batch),
            on_every_rank=True, source=policies.drawn_from(),  # π_t and its anchor: other weights are redone
            expect=lambda k: {"first_prompt": starts[k]},
        )
        attach_judgment_cache(self.ranker, Path(run_dir))
        source = {"generations": artifacts.checksum("generations"),
                  "ranker": fingerprint_hash(fingerprint_of(self.ranker))}
        run_sharded_stage(ctx, artifacts, "train", artifacts.num_shards("generations"),
                          lambda k: self._rows(policies, tokenizer, artifacts.read_shard("generations", k), iteration,
                                               ctx, artifacts.shard_start("generations", k)), source=source)
        info = artifacts.info("train")
        rewards = artifacts.column("train", "reward")
        stats = {
            "reward": sum(rewards) / len(rewards) if rewards else None,
            "ties": info.get("ties", 0),
            "ties_broken": info.get("ties_broken", 0),
            "kl_to_initial": info["kl_sum"] / info["kl_rows"] if info.get("kl_rows") else None,
            "seconds": {"generate": artifacts.info("generations").get("seconds", 0.0), "rank": info.get("seconds", 0.0)},
        }
        judge = {k: v for k, v in info.items() if k in ("judge_calls", "cache_hits", "judged_by_logprobs",
                                                        "judged_by_verdict")}
        if judge:
            stats["judge"] = judge
        if ctx.is_global_zero:
            artifacts.record_stats(stats, plugins_of(self))
        return IterationData(memory_mapped_on_ranks(ctx, artifacts, "train", TRAINING_COLUMNS), stats)

    def _generate(self, policies: Policies, tokenizer, prompts: Sequence[Prompt], iteration: int, ctx: DistContext,
                  batch_offset: int) -> tuple[list[dict], dict]:
        stream = seeds.iteration_stream(self.seed, 2 * iteration)
        policy = self.generator.sample(policies.policy, tokenizer, prompts, 1, stream, ctx, batch_offset=batch_offset)
        with policies.role("anchor") as anchor_model:  # generation from the anchor uses the anchor's weights
            anchor = self.generator.sample(anchor_model, tokenizer, prompts, self.anchor_samples, stream + 1, ctx,
                                           batch_offset=batch_offset)
        decode = tokenizer.batch_decode
        rows = [{
            **stages.prompt_fields(p), "sample_ids": s[0], "anchor_ids": a,
            "sample": decode(s, skip_special_tokens=True)[0], "anchors": decode(a, skip_special_tokens=True),
        } for p, s, a in zip(prompts, policy, anchor)]
        return rows, {}

    def _rank(self, tokenizer, generations: list[dict], candidates: list[list[str]], first_row: int) -> torch.Tensor:
        """``[N, C, C]`` pair logits of each row's ``candidates`` through the shared rank stage
        (the ranker's ``prompt_view``, errors naming the prompt row)."""
        rows = [{**g, "responses": c} for g, c in zip(generations, candidates)]
        return torch.tensor([r["pairwise_logits"] for r in stages.rank(self.ranker, tokenizer, rows, first_row)],
                            dtype=torch.float64)

    def _rows(self, policies: Policies, tokenizer, generations: list[dict], iteration: int, ctx: DistContext,
              first_row: int) -> tuple[list[dict], dict]:
        (rows, info), judge = counted(self.ranker, lambda: self._score(tokenizer, generations, iteration, first_row))
        kl = kl_to_initial(policies, rows, tokenizer.pad_token_id, ctx.device)
        if kl is not None:
            info.update(kl_sum=kl * len(rows), kl_rows=len(rows))
        return rows, {**info, **judge}

    def _score(self, tokenizer, generations: list[dict], iteration: int, first_row: int) -> tuple[list[dict], dict]:
        # one coin stream per prompt row of the iteration: the same coins whatever the shard size
        deciders = [_Comparisons(self.tie_rule, torch.Generator().manual_seed(
            seeds.indexed(seeds.coin_stream(self.seed, iteration), first_row + n))) for n in range(len(generations))]
        if self.variant == "jbond":
            m = self._rank(tokenizer, generations, [[g["sample"], *g["anchors"]] for g in generations], first_row)
            best, loses = [], []
            for x, decide in zip(m, deciders):
                best.append(1 if decide.wins(float(x[1, 2] - x[2, 1]), tie_wins=True) else 2)
                # the policy sample loses to an anchor sample when it is worse (under le: or tied)
                lose_on_tie = self.tie_rule == "le"
                loses.append(all(not decide.wins(float(x[0, a] - x[a, 0]), tie_wins=not lose_on_tie) for a in (1, 2)))
            rewards = jbond_reward(torch.tensor(loses)).tolist()
        else:
            pool = self._rank(tokenizer, generations, [g["anchors"][: self.n] for g in generations], first_row)
            best = [1 + decide.best(scores) for scores, decide in zip(scores_from_pairwise(pool), deciders)]
            # one 2-candidate row per (prompt, quantile sample): the policy sample against it
            expanded = [g for g in generations for _ in range(self.k)]
            pairs = [[g["sample"], q] for g in generations for q in g["anchors"][self.n :]]
            m = self._rank(tokenizer, expanded, pairs, first_row * self.k).view(len(generations), self.k, 2, 2)
            # p̂≤: the reference sample scored at most the policy sample's (a tie counts as beaten)
            wins = torch.tensor([[float(decide.wins(float(x[0, 1] - x[1, 0]), tie_wins=True)) for x in per]
                                 for per, decide in zip(m, deciders)]).view(len(generations), self.k)
            rewards = bond_reward(wins, self.n).tolist()
        rows = [{"prompt_index": g["prompt_index"], "prompt": g["prompt"], "prompt_ids": g["prompt_ids"],
                 "chosen_ids": g["anchor_ids"][b - 1], "rejected_ids": g["sample_ids"], "reward": float(r),
                 "best_anchor": b - 1} for g, b, r in zip(generations, best, rewards)]
        # ties are counted in the iteration's statistics and the summary, not printed per shard
        return rows, {"ties": sum(d.ties for d in deciders), "ties_broken": sum(d.coins for d in deciders)}


@torch.no_grad()
def kl_to_initial(policies: Policies, rows: list[dict], pad_token_id: int, device: torch.device) -> Optional[float]:
    """Monte-Carlo KL(π‖π_initial) = E_y~π[log π(y) − log π_initial(y)] on the policy samples
    (None without an initial model to compare with). The policy keeps its own mode."""
    # one row per policy sample (the pair's rejected side), not a pair of it with itself
    batch = collate_responses(rows, "rejected_ids", pad_token_id)
    batch = {k: v.to(device) for k, v in batch.items()}
    with evaluating(policies.policy) as policy:  # with LoRA the initial model is the policy, adapters off
        with policies.optional_role("initial") as initial:
            if initial is None:
                return None
            initial.eval()
            initial_logps = model_logprobs(initial, batch).sum
        policy_logps = model_logprobs(policy, batch).sum
    return float((policy_logps - initial_logps).mean())
