"""``BondPipeline``: each iteration's J-BOND / BOND rows, on the same pieces as SPPO's pipeline
(a ``Generator``, a ``Ranker`` with its fingerprint, ``artifacts.run_stage``, a ``DistContext``).

Per prompt (BOND, arXiv 2407.14622, Algorithm 2 and eq. 17):

* **J-BOND**: 1 sample from the policy and 2 from the anchor. The better anchor sample is the
  forward-KL target; the policy sample's reward is ``-log 16`` if it loses to both anchor samples,
  else 0.
* **BOND** (fixed N, anchor = the initial policy): 1 policy sample, N anchor samples whose best is
  the forward-KL target, and k more whose Monte-Carlo quantile gives the reward
  ``(N-1)·log p̂≤`` (clipped at 1/(2k)).

Ties of a discrete judge are broken by a seeded coin and counted. Generations and the training
rows are per-iteration artifacts, like SPPO's, so a restarted run reuses them; a changed ranker
redoes the rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from lightning.pytorch.utilities import rank_zero_info

from sppo_lightning import seeds
from sppo_lightning.artifacts import IterationArtifacts, run_stage
from sppo_lightning.data.prompts import Prompt, prompts_fingerprint
from sppo_lightning.data.tokenize import collate_pairs
from sppo_lightning.logprobs import model_logprobs
from sppo_lightning.losses import bond_reward, jbond_reward
from sppo_lightning.models import evaluating
from sppo_lightning.distributed import DistContext
from sppo_lightning.pipeline.sppo import IterationData
from sppo_lightning.ranking.estimate import scores_from_pairwise
from sppo_lightning.ranking.protocol import fingerprint_hash, fingerprint_of

TRAINING_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids", "reward")


@dataclass
class BondPipeline:
    """Args: the ``BondSelfPlay`` settings: ``variant`` (``jbond`` | ``bond``), ``n`` (BOND's N),
    ``k`` (quantile samples), the ``generator`` and ``ranker``, ``run_dir`` and ``seed``."""

    generator: Any
    ranker: Any
    run_dir: Path
    variant: str = "jbond"
    n: int = 8
    k: int = 16
    seed: int = 0

    @property
    def anchor_samples(self) -> int:
        return 2 if self.variant == "jbond" else self.n + self.k

    def settings(self, prompts: Sequence[Prompt]) -> dict[str, Any]:
        return {"variant": self.variant, "n": self.n, "k": self.k, "seed": self.seed,
                "generator": self.generator.fingerprint(), "prompts": prompts_fingerprint(prompts)}

    def build(self, iteration: int, module, tokenizer, prompts: Sequence[Prompt],
              ctx: Optional[DistContext] = None) -> IterationData:
        """``module``: a ``BondModule`` (its ``policy``, ``anchor_model()`` and ``initial_model()``)."""
        ctx = ctx or DistContext()
        artifacts = IterationArtifacts(Path(self.run_dir), iteration, self.settings(prompts))
        generations = run_stage(ctx, artifacts, "generations",
                                lambda: self._generate(module, tokenizer, prompts, iteration, ctx), on_every_rank=True)
        source = {"generations": artifacts.checksum("generations"),
                  "ranker": fingerprint_hash(fingerprint_of(self.ranker))}
        rows = run_stage(ctx, artifacts, "train", lambda: self._rows(module, tokenizer, generations, iteration, ctx),
                         expect=source)
        info = artifacts.info("train")
        stats = {
            "reward": sum(r["reward"] for r in rows) / len(rows),
            "ties_broken": info.get("ties_broken", 0),
            "kl_to_initial": info.get("kl_to_initial"),
            "seconds": {"generate": artifacts.info("generations").get("seconds", 0.0), "rank": info.get("seconds", 0.0)},
        }
        return IterationData([{k: r[k] for k in TRAINING_COLUMNS} for r in rows], stats)

    def _generate(self, module, tokenizer, prompts: Sequence[Prompt], iteration: int,
                  ctx: DistContext) -> tuple[list[dict], dict]:
        stream = seeds.iteration_stream(self.seed, 2 * iteration)
        policy = self.generator.sample(module.policy, tokenizer, prompts, 1, stream, ctx)
        with module.anchor_model() as anchor_model:  # generation from the anchor uses the anchor's weights
            anchor = self.generator.sample(anchor_model, tokenizer, prompts, self.anchor_samples, stream + 1, ctx)
        decode = tokenizer.batch_decode
        rows = [{
            "prompt": p.text, "prompt_ids": p.ids, "sample_ids": s[0], "anchor_ids": a,
            "sample": decode(s, skip_special_tokens=True)[0], "anchors": decode(a, skip_special_tokens=True),
        } for p, s, a in zip(prompts, policy, anchor)]
        return rows, {}

    def _rows(self, module, tokenizer, generations: list[dict], iteration: int,
              ctx: DistContext) -> tuple[list[dict], dict]:
        coin = torch.Generator().manual_seed(seeds.coin_stream(self.seed, iteration))
        ties = 0

        def beats(margin: float) -> bool:  # a strict win; a tie is a seeded coin flip, counted
            nonlocal ties
            if margin == 0:
                ties += 1
                return bool(torch.rand(1, generator=coin).item() < 0.5)
            return margin > 0

        prompts = [g["prompt"] for g in generations]
        if self.variant == "jbond":
            m = self.ranker.pairwise_logits(prompts, [[g["sample"], *g["anchors"]] for g in generations]).double()
            best = [1 if beats(float(x[1, 2] - x[2, 1])) else 2 for x in m]
            loses = [not beats(float(x[0, 1] - x[1, 0])) and not beats(float(x[0, 2] - x[2, 0])) for x in m]
            rewards = jbond_reward(torch.tensor(loses)).tolist()
        else:
            pool = self.ranker.pairwise_logits(prompts, [g["anchors"][: self.n] for g in generations]).double()
            best = []
            for scores in scores_from_pairwise(pool):
                tied = (scores == scores.max()).nonzero().flatten()
                ties += len(tied) - 1
                best.append(1 + int(tied[torch.randint(len(tied), (1,), generator=coin)]))
            pairs_prompts = [g["prompt"] for g in generations for _ in range(self.k)]
            pairs = [[g["sample"], q] for g in generations for q in g["anchors"][self.n :]]
            m = self.ranker.pairwise_logits(pairs_prompts, pairs).double()
            wins = torch.tensor([float(beats(float(x[0, 1] - x[1, 0]))) for x in m]).view(len(generations), self.k)
            rewards = bond_reward(wins, self.n).tolist()
        rows = []
        for g, b, r in zip(generations, best, rewards):
            rows.append({"prompt": g["prompt"], "prompt_ids": g["prompt_ids"], "chosen_ids": g["anchor_ids"][b - 1],
                         "rejected_ids": g["sample_ids"], "reward": float(r), "best_anchor": b - 1})
        info = {"ties_broken": ties}
        kl = kl_to_initial(module, rows, tokenizer.pad_token_id, ctx.device)
        if kl is not None:
            info["kl_to_initial"] = kl
        if ties:
            rank_zero_info(f"iteration {iteration}: broke {ties} tie(s) with a seeded coin")
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
