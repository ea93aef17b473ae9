"""``BondSelfPlay``: J-BOND / BOND self-play settings, and the iteration boundary of training.

The callback builds the run's :class:`~sppo_lightning.pipeline.bond.BondPipeline` (the same
generator, ranker and artifact pieces as SPPO's) and hands it to the ``SelfPlayDataModule``,
which builds each iteration's rows with it. At the end of an iteration it measures the win rate
against the initial policy and records a summary row. With ``prompts_per_iteration`` of a few
batches the samples stay close to on-policy.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal, Optional

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from sppo_lightning import seeds
from sppo_lightning.artifacts import RunSummary
from sppo_lightning.callbacks.win_rate import InitialPolicyWinRate, policy_sampler
from sppo_lightning.data.self_play import SelfPlayDataModule
from sppo_lightning.errors import ConfigError
from sppo_lightning.pipeline import HFGenerator
from sppo_lightning.pipeline.bond import BondPipeline
from sppo_lightning.ranking import Ranker


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
        on_policy: every optimizer step trains on samples of the current policy and anchor: an
            iteration is exactly one step's prompts (``data.batch_size`` × accumulation × devices)
            and ``data.prompts_per_iteration`` is set so. ``false`` trains several steps per draw
            (set ``data.prompts_per_iteration``): the later steps are off-policy REINFORCE with no
            correction, and a warning says so.
        tie_rule: ``strict`` (the paper's main text: the policy sample loses only when strictly
            worse than both anchor samples), ``le`` (its appendix: worse or tied), or ``coin``.
        generation_shard_size: prompts per shard of the generate and rank stages.
        eval_every: measure the win rate against the initial policy every this many iterations
            (and at the last); with on-policy iterations of one step, every one would be costly.
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
        on_policy: bool = True,
        tie_rule: Literal["strict", "le", "coin"] = "strict",
        generation_shard_size: int = 512,
        eval_every: int = 1,
    ) -> None:
        self.ranker, self.variant, self.n, self.k = ranker, variant, n, quantile_samples
        self.temperature, self.top_p, self.max_new_tokens = temperature, top_p, max_new_tokens
        self.generation_batch_size, self.seed = generation_batch_size, seed
        self.run_dir_setting, self.eval_samples, self.show_progress = run_dir, eval_samples, show_progress
        self.on_policy, self.tie_rule, self.generation_shard_size = on_policy, tie_rule, generation_shard_size
        self.eval_every = eval_every

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
        if self.eval_every < 1:
            raise ConfigError(f"BondSelfPlay: eval_every must be at least 1, got {self.eval_every}")
        self.datamodule = trainer.datamodule
        self._draw_per_step(trainer)
        self.run_dir = Path(self.run_dir_setting or Path(trainer.default_root_dir) / "bond")
        generator = HFGenerator(self.temperature, self.top_p, self.max_new_tokens, self.generation_batch_size,
                                show_progress=self.show_progress)
        self.pipeline = BondPipeline(generator, self.ranker, self.run_dir, self.variant, self.n, self.k, self.seed,
                                     self.tie_rule, self.generation_shard_size)
        self.datamodule.use_pipeline(self.pipeline)
        trainer.reload_dataloaders_every_n_epochs = 1
        sample = policy_sampler(generator, trainer, self.datamodule.tokenizer)
        self.win_rate = InitialPolicyWinRate(self.run_dir, self.ranker, sample, self.eval_samples,
                                             seed=seeds.evaluation_stream(self.seed))
        self.summary = RunSummary(self.run_dir / "summary.json")

    def _draw_per_step(self, trainer: L.Trainer) -> None:
        """On-policy: one iteration = one optimizer step's prompts, drawn fresh from π and the anchor."""
        data = self.datamodule
        per_step = data.batch_size * trainer.accumulate_grad_batches * trainer.world_size
        if not self.on_policy:
            drawn = data.prompts_per_iteration or len(data.prompts)  # the data module is set up before us
            steps = math.ceil(drawn / per_step) * data.epochs_per_iteration
            rank_zero_warn(f"BondSelfPlay: on_policy is false: each draw of samples trains {steps} optimizer steps "
                           f"of the iteration; every step after the first trains on an older policy's samples "
                           f"(off-policy REINFORCE, no correction). J-BOND is on-policy: set on_policy: true")
            return
        if data.prompts_per_iteration not in (None, per_step) or data.epochs_per_iteration != 1:
            raise ConfigError(f"BondSelfPlay: on_policy makes each iteration one optimizer step's prompts "
                              f"(data.batch_size x accumulate_grad_batches x devices = {per_step}) trained for "
                              f"one epoch; remove data.prompts_per_iteration ({data.prompts_per_iteration}) and "
                              f"data.epochs_per_iteration ({data.epochs_per_iteration}), or set on_policy: false")
        data.prompts_per_iteration = per_step

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The initial policy's evaluation answers, before its first step (reused when resuming).
        if trainer.current_epoch == 0 and self.datamodule.eval_prompts:
            self.win_rate.initial(trainer, self.datamodule.eval_prompts)

    # ------------------------------------------------------------------------------ hooks
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        per = self.datamodule.epochs_per_iteration
        if (trainer.current_epoch + 1) % per:
            return
        iteration = trainer.current_epoch // per
        data = self.datamodule.iteration_data.get(iteration)
        stats = data.stats if data is not None else {}
        row: dict[str, Any] = {"iteration": iteration + 1, **{k: v for k, v in stats.items() if v is not None}}
        last = trainer.current_epoch + 1 >= (trainer.max_epochs or 0)
        if self.datamodule.eval_prompts and ((iteration + 1) % self.eval_every == 0 or last):
            row["win_rate_vs_initial"] = self.win_rate.measure(trainer, self.datamodule.eval_prompts,
                                                               self.datamodule.tokenizer)
            pl_module.log("bond/win_rate_vs_initial", row["win_rate_vs_initial"], on_epoch=True, on_step=False)
        for key in ("ties", "ties_broken", "kl_to_initial"):
            if stats.get(key) is not None:
                pl_module.log(f"bond/{key}", float(stats[key]), on_epoch=True, on_step=False)
        if self.variant == "bond":  # Best-of-N's own KL to its reference, for comparison
            row["best_of_n_kl"] = math.log(self.n) - (self.n - 1) / self.n
        self.summary.record(row, write=trainer.is_global_zero)
        rank_zero_info(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                  for k, v in row.items() if k != "seconds"))
