"""``BondPipeline``: each iteration's J-BOND / BOND rows, on the same pieces as SPPO's pipeline
(a ``Generator``, a ``Ranker`` with its fingerprint, ``artifacts.run_sharded_stage``, a ``DistContext``).

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from lightning.pytorch.utilities import rank_zero_info

from sppo_lightning import seeds
from sppo_lightning.artifacts import IterationArtifacts, memory_mapped_on_ranks, run_sharded_stage
from sppo_lightning.data.prompts import Prompt, prompts_fingerprint
from sppo_lightning.data.tokenize import collate_pairs
from sppo_lightning.distributed import DistContext
from sppo_lightning.errors import ConfigError
from sppo_lightning.logprobs import model_logprobs
from sppo_lightning.losses import bond_reward, jbond_reward
from sppo_lightning.models import evaluating
from sppo_lightning.pipeline.sppo import IterationData
from sppo_lightning.ranking.cache import attach_judgment_cache
from sppo_lightning.ranking.estimate import scores_from_pairwise
from sppo_lightning.ranking.protocol import fingerprint_hash, fingerprint_of

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


@dataclass
class BondPipeline:
    """Args: the ``BondSelfPlay`` settings: ``variant`` (``jbond`` | ``bond``), ``n`` (BOND's N),
    ``k`` (quantile samples), the ``generator`` and ``ranker``, ``run_dir``, ``seed``,
    ``tie_rule`` (``strict`` | ``le`` | ``coin``) and ``shard_size`` (prompts per shard)."""

    generator: Any
    ranker: Any
    run_dir: Path
    variant: str = "jbond"
    n: int = 8
    k: int = 16
    seed: int = 0
    tie_rule: str = "strict"
    shard_size: int = 512

    def __post_init__(self) -> None:
        if self.tie_rule not in TIE_RULES:
            raise ConfigError(f"BondSelfPlay: tie_rule must be one of {', '.join(TIE_RULES)}, got {self.tie_rule!r}")
        if self.shard_size < 1:
            raise ConfigError(f"BondSelfPlay: shard_size must be at least 1, got {self.shard_size}")

    @property
    def anchor_samples(self) -> int:
        return 2 if self.variant == "jbond" else self.n + self.k

    def settings(self, prompts: Sequence[Prompt]) -> dict[str, Any]:
        return {"variant": self.variant, "n": self.n, "k": self.k, "seed": self.seed, "tie_rule": self.tie_rule,
                "generator": self.generator.fingerprint(), "prompts": prompts_fingerprint(prompts)}

    def build(self, iteration: int, module, tokenizer, prompts: Sequence[Prompt],
              ctx: Optional[DistContext] = None) -> IterationData:
        """``module``: a ``BondModule`` (its ``policy``, ``anchor_model()`` and ``initial_model()``)."""
        ctx = ctx or DistContext()
        artifacts = IterationArtifacts(Path(self.run_dir), iteration, self.settings(prompts))
        batch = self.generator.batch_size
        size = math.ceil(self.shard_size / batch) * batch  # shards cut at batch boundaries
        starts = range(0, len(prompts), size)
        run_sharded_stage(
            ctx, artifacts, "generations", len(starts),
            lambda k: self._generate(module, tokenizer, prompts[starts[k] : starts[k] + size], iteration, ctx,
                                     starts[k] // batch),
            on_every_rank=True, expect=lambda k: {"first_prompt": starts[k]},
        )
        attach_judgment_cache(self.ranker, self.run_dir)
        source = {"generations": artifacts.checksum("generations"),
                  "ranker": fingerprint_hash(fingerprint_of(self.ranker))}
        run_sharded_stage(ctx, artifacts, "train", artifacts.num_shards("generations"),
                          lambda k: self._rows(module, tokenizer, artifacts.read_shard("generations", k), iteration,
                                               ctx, artifacts.shard_start("generations", k)), source=source)
        info = artifacts.info("train")
        rewards = pq.read_table(artifacts.path("train"), columns=["reward"]).column("reward")
        stats = {
            "reward": pc.mean(rewards).as_py(),
            "ties": info.get("ties", 0),
            "ties_broken": info.get("ties_broken", 0),
            "kl_to_initial": info["kl_sum"] / info["kl_rows"] if info.get("kl_rows") else None,
            "seconds": {"generate": artifacts.info("generations").get("seconds", 0.0), "rank": info.get("seconds", 0.0)},
        }
        return IterationData(memory_mapped_on_ranks(ctx, artifacts, "train", TRAINING_COLUMNS), stats)

    def _generate(self, module, tokenizer, prompts: Sequence[Prompt], iteration: int, ctx: DistContext,
                  batch_offset: int) -> tuple[list[dict], dict]:
        stream = seeds.iteration_stream(self.seed, 2 * iteration)
        policy = self.generator.sample(module.policy, tokenizer, prompts, 1, stream, ctx, batch_offset=batch_offset)
        with module.anchor_model() as anchor_model:  # generation from the anchor uses the anchor's weights
            anchor = self.generator.sample(anchor_model, tokenizer, prompts, self.anchor_samples, stream + 1, ctx,
                                           batch_offset=batch_offset)
        decode = tokenizer.batch_decode
        rows = [{
            "prompt_index": p.index, "prompt": p.text, "prompt_ids": p.ids, "sample_ids": s[0], "anchor_ids": a,
            "sample": decode(s, skip_special_tokens=True)[0], "anchors": decode(a, skip_special_tokens=True),
        } for p, s, a in zip(prompts, policy, anchor)]
        return rows, {}

    def _rows(self, module, tokenizer, generations: list[dict], iteration: int, ctx: DistContext,
              first_row: int) -> tuple[list[dict], dict]:
        prompts = [g["prompt"] for g in generations]
        # one coin stream per prompt row of the iteration: the same coins whatever the shard size
        deciders = [_Comparisons(self.tie_rule, torch.Generator().manual_seed(
            seeds.indexed(seeds.coin_stream(self.seed, iteration), first_row + n))) for n in range(len(generations))]
        if self.variant == "jbond":
            m = self.ranker.pairwise_logits(prompts, [[g["sample"], *g["anchors"]] for g in generations]).double()
            best, loses = [], []
            for x, decide in zip(m, deciders):
                best.append(1 if decide.wins(float(x[1, 2] - x[2, 1]), tie_wins=True) else 2)
                # the policy sample loses to an anchor sample when it is worse (under le: or tied)
                lose_on_tie = self.tie_rule == "le"
                loses.append(all(not decide.wins(float(x[0, a] - x[a, 0]), tie_wins=not lose_on_tie) for a in (1, 2)))
            rewards = jbond_reward(torch.tensor(loses)).tolist()
        else:
            pool = self.ranker.pairwise_logits(prompts, [g["anchors"][: self.n] for g in generations]).double()
            best = [1 + decide.best(scores) for scores, decide in zip(scores_from_pairwise(pool), deciders)]
            pairs_prompts = [g["prompt"] for g in generations for _ in range(self.k)]
            pairs = [[g["sample"], q] for g in generations for q in g["anchors"][self.n :]]
            m = self.ranker.pairwise_logits(pairs_prompts, pairs).double().view(len(generations), self.k, 2, 2)
            # p̂≤: the reference sample scored at most the policy sample's (a tie counts as beaten)
            wins = torch.tensor([[float(decide.wins(float(x[0, 1] - x[1, 0]), tie_wins=True)) for x in per]
                                 for per, decide in zip(m, deciders)]).view(len(generations), self.k)
            rewards = bond_reward(wins, self.n).tolist()
        rows = [{"prompt_index": g["prompt_index"], "prompt": g["prompt"], "prompt_ids": g["prompt_ids"],
                 "chosen_ids": g["anchor_ids"][b - 1], "rejected_ids": g["sample_ids"], "reward": float(r),
                 "best_anchor": b - 1} for g, b, r in zip(generations, best, rewards)]
        info = {"ties": sum(d.ties for d in deciders), "ties_broken": sum(d.coins for d in deciders)}
        kl = kl_to_initial(module, rows, tokenizer.pad_token_id, ctx.device)
        if kl is not None:
            info.update(kl_sum=kl * len(rows), kl_rows=len(rows))
        if info["ties"]:
            how = "seeded coins" if self.tie_rule == "coin" else f"the {self.tie_rule} rule"
            rank_zero_info(f"iteration {iteration + 1}: {info['ties']} tied comparison(s), decided by {how}")
        return rows, info


@torch.no_grad()
def kl_to_initial(module, rows: list[dict], pad_token_id: int, device: torch.device) -> Optional[float]:
    """Monte-Carlo KL(π‖π_initial) = E_y~π[log π(y) − log π_initial(y)] on the policy samples
    (None without an initial model to compare with). The policy keeps its own mode."""
    batch = collate_pairs([{"prompt_ids": r["prompt_ids"], "chosen_ids": r["rejected_ids"],
                            "rejected_ids": r["rejected_ids"]} for r in rows], pad_token_id)
    batch = {k: v.to(device) for k, v in batch.items()}
    with evaluating(module.policy) as policy:  # with LoRA the initial model is the policy, adapters off
        with module.initial_model() as initial:
            if initial is None:
                return None
            initial.eval()
            initial_logps = model_logprobs(initial, batch).sum
        policy_logps = model_logprobs(policy, batch).sum
    return float((policy_logps - initial_logps).mean())
