"""``SelfPlay``: the iteration boundary of training, for every self-play method.

At setup it connects the data module to the training module's policies and the processes; the
data module then builds each iteration's rows through its method (``sppo_lightning.methods``:
SPPO, J-BOND, online pairs) and holds the result, an ``Iteration`` (``datamodule.current``: pairs,
statistics, samples, epochs). This callback does what happens between iterations with it, the same
for every method:

* the first batch of an iteration: a fresh optimizer and LR schedule when the method restarts it
  (SPPO's official pipeline), through ``strategy.setup_optimizers``; the first pairs to loggers;
* every batch: the loss, to ``<run_dir>/losses.jsonl`` for the report's plot;
* the last epoch of an iteration: the win rate against the initial policy on held-out prompts
  (sampled with the method's generator, judged by its ranker), the statistics logged, a summary
  row (``<run_dir>/summary.json``), the report and its plots.

The CLI adds it to every run (its settings: ``--self_play.eval_samples``, ``--self_play.eval_every``).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Optional

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from sppo_lightning import seeds
from sppo_lightning.artifacts import recorded_stats
from sppo_lightning.callbacks.following import KEYS, HeldOutFollowing
from sppo_lightning.callbacks.win_rate import InitialPolicyWinRate, evaluation_generator, policy_sampler
from sppo_lightning.contracts import EngineGenerator, plugins_of
from sppo_lightning.datamodules.self_play import Iteration, SelfPlayDataModule, SelfPlayModule
from sppo_lightning.distributed import DistContext
from sppo_lightning.errors import ConfigError
from sppo_lightning.files import remove_outward_links
from sppo_lightning.iteration import iteration_dir, iteration_label, iteration_number
from sppo_lightning.loss_record import append_loss, keep_steps_up_to, last_loss, read_losses
from sppo_lightning.module import PreferenceModule
from sppo_lightning.outputs import written
from sppo_lightning.report import PLOTS, format_following, format_row, log_images, write_report
from sppo_lightning.run_summary import RunSummary
from sppo_lightning.step_store import STEPS, recorded_steps


class SelfPlay(L.Callback):
    """The iteration boundary of a ``SelfPlayDataModule`` run (see the module docstring). In a run
    of another data module (a pair run) it only writes the run's summary when fit ends
    (``sppo_lightning/pair_summary.py``: ``<default_root_dir>/summary.json`` and one line).

    Args:
        eval_samples: responses per held-out prompt (``data.eval_prompts``) for the win rate
            against the initial policy.
        eval_every: measure that win rate every this many iterations, and at the last (per-step
            methods have one iteration per optimizer step: every one would be costly).
        instruction_following: also measure IFEval's four numbers (prompt- and instruction-level,
            strict and loose) on the held-out prompts, which must be in the IFEval format: greedy
            answers of the initial policy before its first step and of the policy at every
            measurement (``sppo_lightning/instruction_following.py``).
        instruction_following_tokens: answer tokens at most for that measurement.
    """

    def __init__(self, eval_samples: int = 1, eval_every: int = 1, instruction_following: bool = False,
                 instruction_following_tokens: int = 256) -> None:
        self.eval_samples, self.eval_every = eval_samples, eval_every
        self.instruction_following, self.instruction_following_tokens = instruction_following, instruction_following_tokens
        self.active = False
        self.following: Optional[HeldOutFollowing] = None
        self._train_start: Optional[float] = None  # the first batch of this process's current iteration

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        datamodule = trainer.datamodule
        self.active = stage == "fit" and isinstance(datamodule, SelfPlayDataModule)
        if not self.active:
            return
        if not isinstance(self.instruction_following, bool):
            raise ConfigError(f"self_play.instruction_following must be true or false, got {self.instruction_following!r}")
        for name in ("eval_samples", "eval_every", "instruction_following_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"self_play.{name} must be an integer of at least 1, got {value!r}")
        if not isinstance(pl_module, SelfPlayModule):
            raise ConfigError(f"self-play trains a module that holds policies (sppo_lightning.module.PreferenceModule, "
                              f"sppo_lightning.bond.BondModule), not {type(pl_module).__name__}")
        datamodule.connect(pl_module, DistContext.from_trainer(trainer))
        method = datamodule.method
        if method.caches_reference and isinstance(pl_module, PreferenceModule) and pl_module.reference_mode == "copy":
            rank_zero_warn("self-play caches π_t's log-probs as the reference; set model.reference: cached "
                           "to free the frozen copy of the initial policy it now holds for nothing")
        self.datamodule, self.method, self.run_dir = datamodule, method, datamodule.run_dir
        if trainer.is_global_zero:  # a run folder is input: links out of it are not followed, ever
            for line in remove_outward_links(self.run_dir):
                rank_zero_warn(line)
        trainer.strategy.barrier("outward_links")
        # One evaluation stream for every measurement: paired samples against the initial policy.
        sampler = policy_sampler(evaluation_generator(method.generator), trainer, datamodule.tokenizer)
        self.win_rate = InitialPolicyWinRate(self.run_dir, method.ranker, sampler, self.eval_samples,
                                             seed=seeds.evaluation_stream(method.seed))
        self.summary = RunSummary(self.run_dir / "summary.json")
        self.summary.setup = plugins_of(method)  # written with the first row: what made the rows
        if self.summary.damaged:
            self._rebuild_summary(trainer)

    # ------------------------------------------------------------------------------ hooks
    def _iteration(self, trainer: L.Trainer) -> tuple[Iteration, bool, bool]:
        """The iteration being trained, and whether this epoch is its first and its last."""
        current = self.datamodule.current
        assert current is not None, "Lightning asks for the loader before the epoch's first hook"
        epoch = trainer.current_epoch
        return current, epoch == current.first_epoch, epoch == current.last_epoch

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.active:
            return
        # The initial policy's evaluation answers, before its first step (reused when resuming).
        if trainer.current_epoch == 0 and self.datamodule.eval_prompts and not self.instruction_following:
            self.win_rate.initial(trainer, self.datamodule.eval_prompts)
        if self.instruction_following:
            self._follow_initial(trainer, pl_module)
        if trainer.is_global_zero:  # a resumed run redoes the steps after its checkpoint: drop their rows
            keep_steps_up_to(self.run_dir / "losses.jsonl", trainer.global_step)
        self._finish_interrupted(trainer, pl_module)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        # The first batch of an iteration, not on_train_epoch_start: Lightning skips that hook when a
        # run resumes from an end-of-epoch checkpoint, and the optimizer reset must happen anyway.
        if not self.active:
            return
        current, starts, _ = self._iteration(trainer)
        if not starts or batch_idx != 0:
            return
        self._train_start = time.perf_counter()
        if current.restarts_optimizer:  # the schedule spans the iteration: its batches are known now
            steps = math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches) * current.epochs
            pl_module.restart_optimizer(steps, current.epochs)
        columns, rows = current.samples
        if rows and trainer.is_global_zero:
            for logger in trainer.loggers:
                if hasattr(logger, "log_text"):  # W&B; others get samples.md in the iteration folder
                    logger.log_text(key=f"{self.method.log_prefix}/samples", columns=columns, data=rows)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not self.active or loss is None or not trainer.is_global_zero:
            return  # a skipped non-finite batch has no loss
        current, _, _ = self._iteration(trainer)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        row = {"step": trainer.global_step, "iteration": current.number, "loss": float(loss)}
        gap = trainer.callback_metrics.get("train/target_gap")  # SPPO's gap to its targets, in nats
        if gap is not None:
            row["gap"] = float(gap)
        append_loss(self.run_dir / "losses.jsonl", row)  # for loss.png; survives restarts

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.active:
            return
        current, _, ends = self._iteration(trainer)
        if not ends:
            return
        # training ends here: the evaluation below is timed on its own
        train_seconds = time.perf_counter() - self._train_start if self._train_start is not None else 0.0
        # The iteration's checkpoint first (Lightning's own call after this hook then finds it saved
        # at this step and skips): a kill during the evaluation redoes the evaluation alone.
        for checkpoint in trainer.checkpoint_callbacks:
            checkpoint.on_train_epoch_end(trainer, pl_module)
        # a per-step draw without a pair trained nothing: no loss of its own (not the last step's)
        loss = trainer.callback_metrics.get("train/loss") if current.stats.get("pairs") != 0 else None
        last = trainer.current_epoch + 1 >= (trainer.max_epochs or 0)
        self._finish(trainer, pl_module, current.number, current.stats, float(loss) if loss is not None else None,
                     train_seconds, last, log=True)

    def _rebuild_summary(self, trainer: L.Trainer) -> None:
        """The rows of a damaged ``summary.json`` (kept aside) made again from what is whole: each
        finished iteration's statistics (its manifest, or a step's line in ``steps.jsonl``) and last
        loss (``losses.jsonl``)."""
        losses = read_losses(self.run_dir / "losses.jsonl")
        steps = recorded_steps(self.run_dir)  # per-step draws: one line each, no folder
        index = 0
        while iteration_dir(self.run_dir, index).is_dir() or index in steps:
            stats = steps.get(index) or recorded_stats(self.run_dir, index)
            if stats:
                number = iteration_number(index)
                row, seconds = self._stats_row(number, stats)
                row.update(final_loss=last_loss(losses, number), seconds=seconds)
                self.summary.record(row, write=trainer.is_global_zero)
            index += 1

    def _finish_interrupted(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A run resumed from an iteration's end whose summary has no row for that iteration (killed
        during its evaluation): the evaluation and the row now, with the weights of that checkpoint.
        Its statistics come from the iteration's manifest, its last loss from ``losses.jsonl``."""
        epochs = self.datamodule.epochs_per_iteration
        if trainer.current_epoch == 0 or trainer.current_epoch % epochs:
            return
        index = trainer.current_epoch // epochs - 1
        number = iteration_number(index)
        if any(row["iteration"] == number for row in self.summary.rows):
            return
        rank_zero_info(f"{iteration_label(index)} ended before its evaluation finished: evaluating it now")
        self._finish(trainer, pl_module, number, recorded_stats(self.run_dir, index),
                     last_loss(read_losses(self.run_dir / "losses.jsonl"), number), 0.0,
                     trainer.current_epoch >= (trainer.max_epochs or 0), log=False)

    def _stats_row(self, number: int, method_stats: dict[str, Any]) -> tuple[dict[str, Any], dict[str, float]]:
        """A summary row's start (the iteration and the method's statistics) and its stages' seconds."""
        stats = self.method.summary(method_stats)
        return {"iteration": number, **{k: v for k, v in stats.items() if k != "seconds"}}, dict(stats.get("seconds", {}))

    def _finish(self, trainer: L.Trainer, pl_module: L.LightningModule, number: int, method_stats: dict[str, Any],
                final_loss: Optional[float], train_seconds: float, last: bool, log: bool) -> None:
        """An iteration's end: its statistics, the evaluation, the summary row, the report. ``log``:
        through ``pl_module.log`` (at an epoch's end), else to the loggers directly."""
        row, seconds = self._stats_row(number, method_stats)
        metrics = {key: float(value) for key, value in row.items()
                   if key != "iteration" and isinstance(value, (int, float)) and not isinstance(value, bool)}
        eval_seconds = 0.0
        if self.datamodule.eval_prompts and (number % self.eval_every == 0 or last):
            start = time.perf_counter()
            if self.following is None:
                row["win_rate_vs_initial"] = self.win_rate.measure(trainer, self.datamodule.eval_prompts,
                                                                   self.datamodule.tokenizer)
            else:  # one set of greedy answers: IFEval's numbers, and the win rate against π_0's answers
                row.update(self.following.measure(trainer, pl_module.policy, number))
                metrics.update({f"if_{key}": row[f"if_{key}"] for key in KEYS})
            metrics["win_rate_vs_initial"] = row["win_rate_vs_initial"]
            eval_seconds = time.perf_counter() - start
        prefix = self.method.log_prefix
        if log:
            for key, value in metrics.items():
                pl_module.log(f"{prefix}/{key}", value, on_epoch=True, on_step=False, batch_size=1)
        elif trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({f"{prefix}/{key}": value for key, value in metrics.items()}, step=trainer.global_step)
        row["final_loss"] = final_loss
        row["seconds"] = {**seconds, "train": train_seconds, "evaluate": eval_seconds}
        self.summary.record(row, write=trainer.is_global_zero)
        rank_zero_info(format_row(row))
        if trainer.is_global_zero:
            paths = write_report(self.run_dir, self.summary.rows, self._where(trainer), self.summary.initial,
                                 self.summary.setup)
            log_images(trainer.loggers, paths, trainer.global_step)

    def _follow_initial(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Instruction following of π_0, measured once (``summary.json``'s ``initial``; reused on resume)."""
        if self.following is None:
            self.following = HeldOutFollowing(
                self.run_dir, self.datamodule.eval_prompts, self.method.ranker, self.datamodule.tokenizer,
                self.instruction_following_tokens, evaluation_generator(self.method.generator).batch_size,
                where=str(self.datamodule.eval_source))
            for note in self.following.notes:
                rank_zero_info(note)
        if self.summary.initial or trainer.current_epoch > 0:
            return
        start = time.perf_counter()
        initial = {**self.following.measure(trainer, pl_module.policy, 0), "seconds": time.perf_counter() - start}
        self.summary.record_initial(initial, write=trainer.is_global_zero)
        rank_zero_info("iteration 0 (initial policy) | " + format_following(initial))
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({f"{self.method.log_prefix}/if_{k}": initial[f"if_{k}"] for k in KEYS}, step=0)

    def _where(self, trainer: L.Trainer) -> dict[str, str]:
        from sppo_lightning.callbacks.hf_export import HFExport

        steps = (self.run_dir / STEPS).exists()  # per-step draws: one line a step, no folder
        where = {"per-step draws' statistics": str(self.run_dir / STEPS)} if steps else \
            {"iterations' data (generations, rankings, train pairs)": str(self.run_dir / "iteration_<t>")}
        checkpoint = trainer.checkpoint_callback
        if checkpoint is not None and getattr(checkpoint, "dirpath", None) and written_checkpoints(checkpoint.dirpath):
            where["checkpoints (resume with --ckpt_path last)"] = str(checkpoint.dirpath)
        for callback in trainer.callbacks:
            if isinstance(callback, HFExport):
                where["Hugging Face export (written when fit ends)"] = str(callback.target(trainer))
        return where

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.active and isinstance(self.method.generator, EngineGenerator):
            self.method.generator.close()  # a live engine: the run is over (a killed run's engine exits with its pipe)
        if not self.active and trainer.is_global_zero and hasattr(pl_module, "hparams"):
            # A pair run: its loss, settings and last metrics in <root>/summary.json, and one line.
            from sppo_lightning.pair_summary import pair_summary, write_pair_summary

            summary = pair_summary(dict(pl_module.hparams), dict(trainer.callback_metrics), trainer.global_step,
                                   trainer.current_epoch)
            rank_zero_info(write_pair_summary(trainer.default_root_dir, summary)[1])
            return
        if self.active and self.summary.rows:
            lines = "\n  ".join(format_row(r) for r in self.summary.rows)
            rank_zero_info(f"Self-play summary (also in {self.run_dir / 'summary.json'}):\n  {lines}")
            plots = ", ".join(str(self.run_dir / name) for name in PLOTS)
            where = "".join(f"\n{what}: {place}" for what, place in self._where(trainer).items())
            rank_zero_info(f"Report: {self.run_dir / 'report.md'}\nPlots: {plots}{where}")


def written_checkpoints(folder: str) -> bool:
    """Whether ``folder`` holds a checkpoint on disk: a resume hint never points at nothing."""
    path = Path(folder)
    return path.is_dir() and any(written(p) for p in path.glob("*.ckpt"))
