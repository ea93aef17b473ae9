"""``BondSelfPlay``: each iteration's J-BOND / BOND data, on the self-play machinery.

Per prompt, at the start of an iteration (``SelfPlayDataModule`` asks for it):

* **J-BOND**: 1 sample from the policy and 2 from the anchor. The better anchor sample is the
  forward-KL target; the policy sample's reward is ``-log 16`` if it loses to both anchor samples,
  else 0 (BOND eq. 17).
* **BOND** (fixed N, anchor = the initial policy): 1 policy sample, N anchor samples whose best is
  the forward-KL target, and k more whose Monte-Carlo quantile gives the reward
  ``(N-1)·log p̂≤`` (clipped at 1/(2k)).

Ties of a discrete judge are broken by a seeded coin and counted. Generations, comparisons and the
training rows are per-iteration artifacts, like SPPO's, so a restarted run reuses them. With
``prompts_per_iteration`` of a few batches the samples stay close to on-policy.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal, Optional

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from sppo_lightning.artifacts import IterationArtifacts, RunSummary, run_stage
from sppo_lightning.callbacks.win_rate import InitialPolicyWinRate
from sppo_lightning.data.prompts import prompts_fingerprint
from sppo_lightning.data.self_play import SelfPlayDataModule
from sppo_lightning.data.tokenize import collate_pairs
from sppo_lightning.errors import ConfigError
from sppo_lightning.generation import sample_on_ranks
from sppo_lightning.logprobs import model_logprobs
from sppo_lightning.losses import bond_reward, jbond_reward
from sppo_lightning.ranking import Ranker, scores_from_pairwise


class BondSelfPlay(L.Callback):
    """Builds J-BOND / BOND training rows each iteration for :class:`~sppo_lightning.bond.BondModule`.

    Args:
        ranker: any ranker (J-BOND only needs comparisons).
        variant: ``jbond`` (2 anchor samples, EMA anchor: add the ``EMAAnchor`` callback) or ``bond``
            (fixed N against the initial policy: no ``EMAAnchor``).
        n: BOND's N (best-of-N). quantile_samples: BOND's k.
        temperature, top_p, max_new_tokens, generation_batch_size: sampling (on-policy: T = 1).
        seed: sampling and tie-breaking streams. run_dir: default ``<default_root_dir>/bond``.
        eval_samples: responses per held-out prompt for the win rate against the initial policy.
    """

    def __init__(
        self,
        ranker: Ranker,
        variant: Literal["jbond", "bond"] = "jbond",
        n: int = 8,
        quantile_samples: int = 16,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 512,
        generation_batch_size: int = 16,
        seed: int = 0,
        run_dir: Optional[str] = None,
        eval_samples: int = 1,
        show_progress: bool = True,
    ) -> None:
        self.ranker, self.variant, self.n, self.k = ranker, variant, n, quantile_samples
        self.temperature, self.top_p, self.max_new_tokens = temperature, top_p, max_new_tokens
        self.generation_batch_size, self.seed = generation_batch_size, seed
        self.run_dir_setting, self.eval_samples, self.show_progress = run_dir, eval_samples, show_progress
        self.stats: dict[int, dict[str, Any]] = {}

    @property
    def anchor_samples(self) -> int:
        return 2 if self.variant == "jbond" else self.n + self.k

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.variant == "bond" and (self.n < 2 or self.k < 1):
            raise ConfigError(f"BondSelfPlay: BOND needs n >= 2 and quantile_samples >= 1, got {self.n}, {self.k}")
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or self.max_new_tokens < 1:
            raise ConfigError("BondSelfPlay: temperature must be > 0, top_p in (0, 1], max_new_tokens >= 1")
        if not hasattr(pl_module, "anchor_model"):
            raise ConfigError("BondSelfPlay needs model.class_path: sppo_lightning.bond.BondModule")
        if not isinstance(trainer.datamodule, SelfPlayDataModule):
            raise ConfigError("BondSelfPlay needs data.class_path: sppo_lightning.data.SelfPlayDataModule")
        self.trainer, self.module, self.datamodule = trainer, pl_module, trainer.datamodule
        self.run_dir = Path(self.run_dir_setting or Path(trainer.default_root_dir) / "bond")
        self.datamodule.builder = self.build_iteration
        trainer.reload_dataloaders_every_n_epochs = 1
        self.win_rate = InitialPolicyWinRate(self.run_dir, self.ranker, self._sampler(anchor=False),
                                             self.eval_samples, seed=self.seed * 7_919 + 999_983)
        self.summary = RunSummary(self.run_dir / "summary.json")

    def _sampler(self, anchor: bool):
        def sample(prompt_ids: list[list[int]], num_samples: int, seed: int) -> list[list[list[int]]]:
            options = dict(
                rank=self.trainer.global_rank, world_size=self.trainer.world_size, temperature=self.temperature,
                top_p=self.top_p, max_new_tokens=self.max_new_tokens, batch_size=self.generation_batch_size,
                seed=seed, show_progress=self.show_progress and self.trainer.is_global_zero,
            )
            if anchor:  # generation from the anchor uses the anchor's weights
                with self.module.anchor_model() as model:
                    return sample_on_ranks(model, self.datamodule.tokenizer, prompt_ids, num_samples, **options)
            return sample_on_ranks(self.module.policy, self.datamodule.tokenizer, prompt_ids, num_samples, **options)
        return sample

    def _settings(self, prompts: list) -> dict[str, Any]:
        return {
            "variant": self.variant, "n": self.n, "k": self.k, "temperature": self.temperature,
            "top_p": self.top_p, "max_new_tokens": self.max_new_tokens, "seed": self.seed,
            "generation_batch_size": self.generation_batch_size, "ranker": type(self.ranker).__name__,
            "prompts": prompts_fingerprint(prompts),
        }

    # ------------------------------------------------------------------------------ the stages
    def build_iteration(self, iteration: int) -> list[dict[str, Any]]:
        prompts = self.datamodule.iteration_prompts(iteration)
        artifacts = IterationArtifacts(self.run_dir, iteration, self._settings(prompts))
        if iteration == 0 and self.datamodule.eval_prompts:
            self.win_rate.initial(self.trainer, self.datamodule.eval_prompts)
        trainer = self.trainer
        generations = run_stage(trainer, artifacts, "generations", lambda: self._generate(prompts, iteration),
                                on_every_rank=True)
        rows = run_stage(trainer, artifacts, "train", lambda: self._rows(generations, iteration))
        info = artifacts.info("train")
        self.stats[iteration] = {
            "reward": sum(r["reward"] for r in rows) / len(rows),
            "ties_broken": info.get("ties_broken", 0),
            "kl_to_initial": info.get("kl_to_initial"),
            "seconds": {"generate": artifacts.info("generations").get("seconds", 0.0), "rank": info.get("seconds", 0.0)},
        }
        return [{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids", "reward")} for r in rows]

    def _generate(self, prompts: list, iteration: int) -> tuple[list[dict], dict]:
        prompt_ids = [p.ids for p in prompts]
        policy = self._sampler(anchor=False)(prompt_ids, 1, self.seed * 7_919 + 2 * iteration)
        anchor = self._sampler(anchor=True)(prompt_ids, self.anchor_samples, self.seed * 7_919 + 2 * iteration + 1)
        decode = self.datamodule.tokenizer.batch_decode
        rows = [{
            "prompt": p.text, "prompt_ids": p.ids, "sample_ids": s[0], "anchor_ids": a,
            "sample": decode(s, skip_special_tokens=True)[0], "anchors": decode(a, skip_special_tokens=True),
        } for p, s, a in zip(prompts, policy, anchor)]
        return rows, {}

    def _rows(self, generations: list[dict], iteration: int) -> tuple[list[dict], dict]:
        coin = torch.Generator().manual_seed(self.seed * 7_919 + 1_000_003 + iteration)
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
        kl = self._kl_to_initial(rows)
        if kl is not None:
            info["kl_to_initial"] = kl
        if ties:
            rank_zero_info(f"iteration {iteration}: broke {ties} tie(s) with a seeded coin")
        return rows, info

    @torch.no_grad()
    def _kl_to_initial(self, rows: list[dict]) -> Optional[float]:
        """Monte-Carlo KL(π‖π_initial) = E_y~π[log π(y) − log π_initial(y)] on the policy samples."""
        pad = self.datamodule.tokenizer.pad_token_id
        batch = collate_pairs([{"prompt_ids": r["prompt_ids"], "chosen_ids": r["rejected_ids"],
                                "rejected_ids": r["rejected_ids"]} for r in rows], pad)
        batch = {k: v.to(self.module.device) for k, v in batch.items()}
        policy = self.module.policy
        was_training = policy.training  # the policy's own mode; a frozen initial copy is always eval
        try:
            with self.module.initial_model() as initial:
                if initial is None:
                    return None
                initial.eval()
                initial_logps = model_logprobs(initial, batch).sum
            policy.eval()
            policy_logps = model_logprobs(policy, batch).sum
        finally:
            policy.train(was_training)
        return float((policy_logps - initial_logps).mean())

    # ------------------------------------------------------------------------------ hooks
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        per = self.datamodule.epochs_per_iteration
        if (trainer.current_epoch + 1) % per:
            return
        iteration = trainer.current_epoch // per
        stats = self.stats.get(iteration, {})
        row: dict[str, Any] = {"iteration": iteration + 1, **{k: v for k, v in stats.items() if v is not None}}
        if self.datamodule.eval_prompts:
            row["win_rate_vs_initial"] = self.win_rate.measure(trainer, self.datamodule.eval_prompts,
                                                               self.datamodule.tokenizer)
            pl_module.log("bond/win_rate_vs_initial", row["win_rate_vs_initial"], on_epoch=True, on_step=False)
        for key in ("ties_broken", "kl_to_initial"):
            if stats.get(key) is not None:
                pl_module.log(f"bond/{key}", float(stats[key]), on_epoch=True, on_step=False)
        if self.variant == "bond":  # Best-of-N's own KL to its reference, for comparison
            row["best_of_n_kl"] = math.log(self.n) - (self.n - 1) / self.n
        self.summary.record(row, write=trainer.is_global_zero)
        rank_zero_info(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                  for k, v in row.items() if k != "seconds"))
