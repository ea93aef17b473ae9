"""``SelfPlay``: SPPO's self-play settings, and the iteration boundary of training.

The callback builds the run's :class:`~sppo_lightning.pipeline.SPPOPipeline` from its settings and
hands it to :class:`~sppo_lightning.data.self_play.SelfPlayDataModule`, which builds each
iteration's pairs with it (generate → rank → estimate → reference log-probs → persist; see
``sppo_lightning/pipeline/``). The callback itself only works at the iteration boundary:

* the first batch of an iteration: a fresh optimizer and LR schedule (as the official pipeline,
  a new training job per iteration, has), and the iteration's statistics logged;
* every batch: the loss, to ``<run_dir>/losses.jsonl`` for the report's plot;
* the last epoch of an iteration: the win rate against the initial policy on held-out prompts,
  a summary row (``<run_dir>/summary.json``), the report and its plots.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from sppo_lightning import seeds
from sppo_lightning.artifacts import RunSummary, atomic_write_bytes
from sppo_lightning.callbacks.win_rate import InitialPolicyWinRate, policy_sampler
from sppo_lightning.data.self_play import SelfPlayDataModule
from sppo_lightning.errors import ConfigError
from sppo_lightning.outputs import written
from sppo_lightning.pipeline import TRAINING_COLUMNS, Generator, HFGenerator, SPPOPipeline  # noqa: F401
from sppo_lightning.pipeline.generators import check_sampling
from sppo_lightning.ranking import Ranker
from sppo_lightning.report import PLOTS, log_images, write_report

@dataclass
class AlignedSampling:
    """Sample self-play responses with Linear Alignment: the policy's logits steered by a principle
    (``sppo_lightning.decoding.LinearAlignmentGenerator``); the callback's temperature and top_p
    apply. Training still sees the plain prompt."""

    principle: str
    alpha: float = 2.0


class SelfPlay(L.Callback):
    """SPPO self-play: the pipeline's settings, and the iteration boundary (see the module docstring).

    Args:
        ranker: the preference oracle (``PairRMRanker``, ``RewardModelRanker``, ``FunctionJudge``,
            or any class with ``pairwise_logits`` and ``fingerprint``).
        generator: how π_t samples (``sppo_lightning.pipeline.HFGenerator``,
            ``sppo_lightning.pipeline.VLLMGenerator``, ``sppo_lightning.decoding.LinearAlignmentGenerator``),
            with its own sampling settings; None: an ``HFGenerator`` from the sampling settings below.
            The win rate against the initial policy samples with the generator, except an engine
            generator (vLLM), whose place the HF generator with the settings below takes there.
        num_samples: K responses per prompt (any K ≥ 2; the paper uses 5).
        temperature, top_p, max_new_tokens: sampling (paper: 0.7, 0.9, 2048) when ``generator`` is None.
        generation_batch_size: prompts per ``generate`` call when ``generator`` is None.
        reference_batch_size: pairs per forward when computing the reference log-probs.
        seed: fixes every sample; iteration t and the win-rate evaluation draw their own streams.
        run_dir: where the iterations' data go; default ``<trainer.default_root_dir>/self_play``.
            Keep it to resume a run.
        reset_optimizer: a fresh optimizer and LR schedule every iteration, as the official
            pipeline (a new training job per iteration) does.
        eval_samples: responses per held-out prompt for the win rate against the initial policy.
        log_samples: how many prompts with their chosen/rejected responses to log per iteration.
        show_progress: progress bars for generation and ranking.
        aligned_sampling: shorthand for ``generator: LinearAlignmentGenerator`` with the sampling
            settings above (``{principle: ..., alpha: 2.0}``); None samples plainly.
        retry_oom: a generation batch that runs out of memory is retried as two halves (warned).
        generation_shard_size: prompts per shard (rounded up to whole generation batches). Every
            stage (generate, rank, pairs with reference log-probs) runs shard by shard and writes
            each shard as it finishes: memory holds one shard's rows whatever the number of
            prompts, and a killed run resumes from the last written shard. The shards of a stage
            are merged into its parquet file when it is done. Results do not depend on it.
    """

    def __init__(
        self,
        ranker: Ranker,
        num_samples: int = 5,
        temperature: float = 0.7,
        top_p: float = 0.9,
        max_new_tokens: int = 512,
        generation_batch_size: int = 16,
        reference_batch_size: int = 8,
        seed: int = 0,
        run_dir: Optional[str] = None,
        reset_optimizer: bool = True,
        eval_samples: int = 1,
        log_samples: int = 3,
        show_progress: bool = True,
        aligned_sampling: Optional[AlignedSampling] = None,
        retry_oom: bool = True,
        generation_shard_size: int = 512,
        generator: Optional[Generator] = None,
    ) -> None:
        self.ranker, self.generator = ranker, generator
        self.generation_shard_size = generation_shard_size
        self.retry_oom = retry_oom
        self.aligned_sampling = aligned_sampling
        self.num_samples, self.temperature, self.top_p = num_samples, temperature, top_p
        self.max_new_tokens = max_new_tokens
        self.generation_batch_size, self.reference_batch_size = generation_batch_size, reference_batch_size
        self.seed, self.run_dir_setting, self.reset_optimizer = seed, run_dir, reset_optimizer
        self.eval_samples, self.log_samples, self.show_progress = eval_samples, log_samples, show_progress

    # ------------------------------------------------------------------------------ wiring
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        for name in ("num_samples", "reference_batch_size", "eval_samples", "log_samples", "seed",
                     "generation_shard_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"SelfPlay: {name} must be an integer, got {value!r}")
        check_sampling("SelfPlay", self.temperature, self.top_p, self.max_new_tokens, self.generation_batch_size)
        if self.eval_samples < 1:
            raise ConfigError(f"SelfPlay: eval_samples must be at least 1, got {self.eval_samples}")
        datamodule = trainer.datamodule
        if not isinstance(datamodule, SelfPlayDataModule):
            raise ConfigError("the SelfPlay callback needs data.class_path: sppo_lightning.data.SelfPlayDataModule")
        if getattr(pl_module, "reference_mode", None) == "copy":
            rank_zero_warn("self-play caches π_t's log-probs as the reference; set model.reference: cached "
                           "to free the frozen copy of the initial policy it now holds for nothing")
        self.datamodule = datamodule
        self.run_dir = Path(self.run_dir_setting or Path(trainer.default_root_dir) / "self_play")
        plain = HFGenerator(self.temperature, self.top_p, self.max_new_tokens, self.generation_batch_size,
                            self.retry_oom, self.show_progress)
        self.pipeline = SPPOPipeline(self._generator(plain, pl_module), self.ranker, self.run_dir,
                                     self.num_samples, self.seed, self.generation_shard_size,
                                     self.reference_batch_size, self.log_samples, self.show_progress)
        datamodule.use_pipeline(self.pipeline)
        # One evaluation stream for every measurement: paired samples against the initial policy.
        # An engine generator samples from exports of π_t, made once per iteration; the evaluation
        # samples the policy in memory at other moments, with the HF generator.
        evaluation = plain if self.generator is None or getattr(self.generator, "wants_export", False) \
            else self.generator
        self.win_rate = InitialPolicyWinRate(self.run_dir, self.ranker,
                                             policy_sampler(evaluation, trainer, datamodule.tokenizer),
                                             self.eval_samples, seed=seeds.evaluation_stream(self.seed))
        # Each epoch start asks the data module for its loader: the new iteration's pairs.
        trainer.reload_dataloaders_every_n_epochs = 1
        self.summary = RunSummary(self.run_dir / "summary.json")

    def _generator(self, plain: HFGenerator, pl_module: L.LightningModule) -> Generator:
        if self.generator is not None:
            if self.aligned_sampling is not None and getattr(self.generator, "wants_export", False):
                raise ConfigError(f"SelfPlay: aligned_sampling (Linear Alignment) cannot run on "
                                  f"{type(self.generator).__name__}: it steers the policy's logits with a second, "
                                  f"synchronised stream, which an engine does not expose; drop one of the two")
            if self.aligned_sampling is not None:
                raise ConfigError("SelfPlay: set either generator or aligned_sampling, not both")
            return self.generator
        if self.aligned_sampling is None:
            return plain
        if getattr(pl_module, "footprint", None) == "fsdp":
            raise ConfigError("SelfPlay: aligned_sampling (Linear Alignment) does not run under footprint "
                              "'fsdp' yet; sample plainly or use footprint full / lora / qlora")
        from sppo_lightning.decoding.generator import LinearAlignmentGenerator

        return LinearAlignmentGenerator(self.aligned_sampling.principle, self.aligned_sampling.alpha,
                                        self.temperature, self.top_p, self.max_new_tokens, self.generation_batch_size)

    # ------------------------------------------------------------------------------ hooks
    def _iteration_bounds(self, trainer: L.Trainer) -> tuple[int, bool, bool]:
        per = self.datamodule.epochs_per_iteration
        epoch = trainer.current_epoch
        return epoch // per, epoch % per == 0, (epoch + 1) % per == 0

    def _stats(self, iteration: int) -> dict[str, Any]:
        data = self.datamodule.iteration_data.get(iteration)
        return data.stats if data is not None else {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The initial policy's evaluation answers, before its first step (reused when resuming).
        if trainer.current_epoch == 0 and self.datamodule.eval_prompts:
            self.win_rate.initial(trainer, self.datamodule.eval_prompts)
        if trainer.is_global_zero:  # a resumed run redoes the steps after its checkpoint: drop their rows
            keep_steps_up_to(self.run_dir / "losses.jsonl", trainer.global_step)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        # The first batch of an iteration, not on_train_epoch_start: Lightning skips that hook when a
        # run resumes from an end-of-epoch checkpoint, and the optimizer reset must happen anyway.
        iteration, starts, _ = self._iteration_bounds(trainer)
        if not starts or batch_idx != 0:
            return
        self._train_start = time.perf_counter()
        if self.reset_optimizer:
            steps = math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)
            pl_module.schedule_override = (steps * self.datamodule.epochs_per_iteration,
                                           self.datamodule.epochs_per_iteration)
            trainer.strategy.setup_optimizers(trainer)
        stats = self._stats(iteration)
        for key in ("chosen_p_win", "rejected_p_win", "ties_dropped", "pairs"):
            if key in stats:
                pl_module.log(f"self_play/{key}", float(stats[key]), on_epoch=True, on_step=False, batch_size=1)
        data = self.datamodule.iteration_data.get(iteration)
        if data is not None and data.samples[1] and trainer.is_global_zero:
            for logger in trainer.loggers:
                if hasattr(logger, "log_text"):  # W&B; others get samples.md in the iteration folder
                    logger.log_text(key="self_play/samples", columns=data.samples[0], data=data.samples[1])

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None or not trainer.is_global_zero:
            return  # a skipped non-finite batch has no loss
        iteration, _, _ = self._iteration_bounds(trainer)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        row = {"step": trainer.global_step, "iteration": iteration, "loss": float(loss)}
        gap = trainer.callback_metrics.get("train/target_gap")  # SPPO's gap to its targets, in nats
        if gap is not None:
            row["gap"] = float(gap)
        with (self.run_dir / "losses.jsonl").open("a") as f:  # for loss.png; survives restarts
            f.write(json.dumps(row) + "\n")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        iteration, _, ends = self._iteration_bounds(trainer)
        if not ends:
            return
        stats = self._stats(iteration)
        row: dict[str, Any] = {"iteration": iteration + 1, **{k: v for k, v in stats.items() if k != "seconds"}}
        if self.datamodule.eval_prompts:
            start = time.perf_counter()
            row["win_rate_vs_initial"] = self.win_rate.measure(trainer, self.datamodule.eval_prompts,
                                                               self.datamodule.tokenizer)
            pl_module.log("self_play/win_rate_vs_initial", row["win_rate_vs_initial"], on_epoch=True, on_step=False)
            eval_seconds = time.perf_counter() - start
        else:
            eval_seconds = 0.0
        loss = trainer.callback_metrics.get("train/loss")
        row["final_loss"] = float(loss) if loss is not None else None
        row["seconds"] = {**stats.get("seconds", {}),
                          "train": time.perf_counter() - getattr(self, "_train_start", time.perf_counter()),
                          "evaluate": eval_seconds}
        self.summary.record(row, write=trainer.is_global_zero)
        rank_zero_info(format_row(row))
        if trainer.is_global_zero:
            paths = write_report(self.run_dir, self.summary.rows, self._where(trainer))
            log_images(trainer.loggers, paths, trainer.global_step)

    def _where(self, trainer: L.Trainer) -> dict[str, str]:
        from sppo_lightning.callbacks.hf_export import HFExport

        where = {"iterations' data (generations, rankings, train pairs)": str(self.run_dir / "iteration_<t>")}
        checkpoint = trainer.checkpoint_callback
        if checkpoint is not None and getattr(checkpoint, "dirpath", None) and written_checkpoints(checkpoint.dirpath):
            where["checkpoints (resume with --ckpt_path last)"] = str(checkpoint.dirpath)
        for callback in trainer.callbacks:
            if isinstance(callback, HFExport):
                where["Hugging Face export (written when fit ends)"] = str(callback.target(trainer))
        return where

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.summary.rows:
            lines = [format_row(r) for r in self.summary.rows]
            rank_zero_info("Self-play summary (also in {}):\n  {}".format(self.run_dir / "summary.json",
                                                                          "\n  ".join(lines)))
            plots = ", ".join(str(self.run_dir / name) for name in PLOTS)
            where = "".join(f"\n{what}: {place}" for what, place in self._where(trainer).items())
            rank_zero_info(f"Report: {self.run_dir / 'report.md'}\nPlots: {plots}{where}")


def keep_steps_up_to(path: Path, step: int) -> None:
    """Rewrite the per-step record ``path`` without rows after ``step`` (each step once after resumes)."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    if len(kept) != len(lines):
        atomic_write_bytes(path, "".join(line + "\n" for line in kept).encode())


def written_checkpoints(folder: str) -> bool:
    """Whether ``folder`` holds a checkpoint on disk: a resume hint never points at nothing."""
    path = Path(folder)
    return path.is_dir() and any(written(p) for p in path.glob("*.ckpt"))


def format_row(row: dict[str, Any]) -> str:
    parts = [f"iteration {row['iteration']}"]
    if row.get("win_rate_vs_initial") is not None:
        parts.append(f"win rate vs initial {row['win_rate_vs_initial']:.3f}")
    if "chosen_p_win" in row:
        parts.append(f"p_win chosen {row['chosen_p_win']:.3f} / rejected {row['rejected_p_win']:.3f}")
    truncated = f", prompts truncated {row['prompts_truncated']}" if row.get("prompts_truncated") else ""
    parts.append(f"pairs {row.get('pairs', 0)} (ties dropped {row.get('ties_dropped', 0)}{truncated})")
    if row.get("final_loss") is not None:
        parts.append(f"final loss {row['final_loss']:.4g}")
    seconds = row.get("seconds", {})
    parts.append("time " + ", ".join(f"{k} {v:.1f}s" for k, v in seconds.items()))
    return " | ".join(parts)
