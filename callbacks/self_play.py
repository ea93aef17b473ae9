"""``SelfPlay``: builds each SPPO iteration's data from the current policy, stage by stage.

At the start of iteration t (one iteration = ``data.epochs_per_iteration`` epochs) the policy π_t:

1. **generates** K responses per prompt (``generation.sample_responses``);
2. the ranker scores all K(K-1) ordered pairs; ``s_i = mean_j(M_ij - M_ji)``;
3. **estimates** ``P̂ = σ(s_i - s_j)``, ``p_win``, and picks chosen = argmax s, rejected = argmin s
   (prompts whose K scores all tie are dropped and counted);
4. computes the **reference log-probs** of chosen and rejected under π_t, once: π_t *is* the
   reference of iteration t, so training runs no reference model;
5. **persists** every stage to ``<run_dir>/iteration_<t>/`` (``sppo_lightning.artifacts``), so a
   restarted run reuses what is finished.

Then the module trains on the pairs with the SPPO loss. At the end of the iteration the policy's
win rate against the initial policy is measured on held-out prompts with the same ranker, and a
summary row is printed and saved to ``<run_dir>/summary.json``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning as L
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from sppo_lightning.artifacts import IterationArtifacts, RunSummary, run_sharded_stage
from sppo_lightning.data.prompts import prompts_fingerprint
from sppo_lightning.data.self_play import SelfPlayDataModule
from sppo_lightning.data.tokenize import collate_pairs
from sppo_lightning.errors import ConfigError, DataError
from sppo_lightning.callbacks.win_rate import InitialPolicyWinRate
from sppo_lightning.decoding.linear_alignment import LinearAlignmentSettings, linear_alignment_generate
from sppo_lightning.generation import batch_seed, gather_responses, sample_on_ranks
from sppo_lightning.ranking import Ranker, scores_from_pairwise, select_pairs, win_probabilities
from sppo_lightning.report import PLOTS, log_images, write_report


# What training reads of train.parquet (the other columns are for people and the official format).
TRAINING_COLUMNS = ["prompt_ids", "chosen_ids", "rejected_ids", "chosen_probs", "chosen_probs_win",
                    "chosen_probs_lose", "reference_chosen_logps", "reference_rejected_logps"]


@dataclass
class AlignedSampling:
    """Sample self-play responses with Linear Alignment: the policy's logits steered by a principle
    (``sppo_lightning.decoding``); the callback's temperature and top_p apply. Training still sees
    the plain prompt."""

    principle: str
    alpha: float = 2.0


class SelfPlay(L.Callback):
    """Drives :class:`~sppo_lightning.data.self_play.SelfPlayDataModule` through the SPPO stages.

    Args:
        ranker: the preference oracle (``PairRMRanker``, ``RewardModelRanker``, ``FunctionJudge``).
        num_samples: K responses per prompt (any K ≥ 2; the paper uses 5).
        temperature, top_p, max_new_tokens: sampling (paper: 0.7, 0.9, 2048).
        generation_batch_size: prompts per ``generate`` call.
        reference_batch_size: pairs per forward when computing the reference log-probs.
        seed: fixes every sample; iteration t and the win-rate evaluation draw their own streams.
        run_dir: where the iterations' data go; default ``<trainer.default_root_dir>/self_play``.
            Keep it to resume a run.
        reset_optimizer: a fresh optimizer and LR schedule every iteration, as the official
            pipeline (a new training job per iteration) does.
        eval_samples: responses per held-out prompt for the win rate against the initial policy.
        log_samples: how many prompts with their chosen/rejected responses to log per iteration.
        show_progress: progress bars for generation and ranking.
        aligned_sampling: sample with Linear Alignment under this principle instead of plain
            sampling (``{principle: ..., alpha: 2.0}``); None samples plainly.
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
    ) -> None:
        self.ranker = ranker
        self.generation_shard_size = generation_shard_size
        self.retry_oom = retry_oom
        self.aligned_sampling = aligned_sampling
        self.num_samples, self.temperature, self.top_p = num_samples, temperature, top_p
        self.max_new_tokens = max_new_tokens
        self.generation_batch_size, self.reference_batch_size = generation_batch_size, reference_batch_size
        self.seed, self.run_dir_setting, self.reset_optimizer = seed, run_dir, reset_optimizer
        self.eval_samples, self.log_samples, self.show_progress = eval_samples, log_samples, show_progress
        self.stats: dict[int, dict[str, Any]] = {}

    # ------------------------------------------------------------------------------ wiring
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        for name, kind in (("num_samples", int), ("temperature", float), ("top_p", float), ("max_new_tokens", int),
                           ("generation_batch_size", int), ("reference_batch_size", int), ("eval_samples", int),
                           ("log_samples", int), ("seed", int), ("generation_shard_size", int)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
                raise ConfigError(f"SelfPlay: {name} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
        checks = [
            (self.num_samples >= 2, f"num_samples (K) must be at least 2 to form a pair, got {self.num_samples}"),
            (self.temperature > 0, f"temperature must be > 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.max_new_tokens >= 1, f"max_new_tokens must be at least 1, got {self.max_new_tokens}"),
            (self.generation_batch_size >= 1 and self.reference_batch_size >= 1, "batch sizes must be at least 1"),
            (self.generation_shard_size >= 1, f"generation_shard_size must be at least 1, got {self.generation_shard_size}"),
            (self.eval_samples >= 1, f"eval_samples must be at least 1, got {self.eval_samples}"),
            (hasattr(self.ranker, "pairwise_logits"), "ranker must have pairwise_logits(prompts, candidates)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"SelfPlay: {message}")
        datamodule = trainer.datamodule
        if not isinstance(datamodule, SelfPlayDataModule):
            raise ConfigError("the SelfPlay callback needs data.class_path: sppo_lightning.data.SelfPlayDataModule")
        if self.aligned_sampling is not None and getattr(pl_module, "footprint", None) == "fsdp":
            raise ConfigError("SelfPlay: aligned_sampling (Linear Alignment) does not run under footprint "
                              "'fsdp' yet; sample plainly or use footprint full / lora / qlora")
        if getattr(pl_module, "reference_mode", None) == "copy":
            rank_zero_warn("self-play caches π_t's log-probs as the reference; set model.reference: cached "
                           "to free the frozen copy of the initial policy it now holds for nothing")
        self.trainer, self.module, self.datamodule = trainer, pl_module, datamodule
        self.run_dir = Path(self.run_dir_setting or Path(trainer.default_root_dir) / "self_play")
        datamodule.builder = self.build_iteration
        # One evaluation stream for every measurement: paired samples against the initial policy.
        self.win_rate = InitialPolicyWinRate(self.run_dir, self.ranker, self._sample, self.eval_samples,
                                             seed=self.seed * 7_919 + 999_983)
        # Each epoch start asks the data module for its loader: the new iteration's pairs.
        trainer.reload_dataloaders_every_n_epochs = 1
        self.summary = RunSummary(self.run_dir / "summary.json")

    def _settings(self, prompts: list) -> dict[str, Any]:
        ranker = {"class": type(self.ranker).__name__}
        for attr in ("path", "function_path"):
            if hasattr(self.ranker, attr):
                ranker[attr] = str(getattr(self.ranker, attr))
        return {
            "num_samples": self.num_samples, "temperature": self.temperature, "top_p": self.top_p,
            "max_new_tokens": self.max_new_tokens, "seed": self.seed, "ranker": ranker,
            "prompts": prompts_fingerprint(prompts), "generation_batch_size": self.generation_batch_size,
            "aligned_sampling": None if self.aligned_sampling is None else vars(self.aligned_sampling),
        }

    # ------------------------------------------------------------------------------ the stages
    def build_iteration(self, iteration: int) -> Sequence[dict[str, Any]]:
        """Make (or reload) iteration t's training pairs. Called by the data module.

        Each stage runs shard by shard (``generation_shard_size`` prompts) and is merged on disk,
        so an iteration holds one shard's rows in memory whatever the number of prompts; the
        training pairs come back memory-mapped from ``train.parquet``'s training columns.
        """
        prompts = self.datamodule.iteration_prompts(iteration)
        artifacts = IterationArtifacts(self.run_dir, iteration, self._settings(prompts))
        if iteration == 0 and self.datamodule.eval_prompts:
            self.win_rate.initial(self.trainer, self.datamodule.eval_prompts)
        trainer = self.trainer
        batch = self.generation_batch_size
        size = math.ceil(self.generation_shard_size / batch) * batch  # shards cut at batch boundaries
        starts = range(0, len(prompts), size)
        run_sharded_stage(
            trainer, artifacts, "generations", len(starts),
            lambda k: self._generate_shard(prompts[starts[k] : starts[k] + size], iteration, starts[k] // batch),
            on_every_rank=True, expect=lambda k: {"first_prompt": starts[k]},
        )
        # The rankings and pairs of shard k are made from the generations of shard k (one row group each).
        shards = artifacts.num_shards("generations")
        source = {"generations": artifacts.checksum("generations")}
        run_sharded_stage(trainer, artifacts, "rankings", shards,
                          lambda k: self._rank(artifacts.read_shard("generations", k),
                                               artifacts.shard_start("generations", k)), source=source)
        source["rankings"] = artifacts.checksum("rankings")
        # Every rank: the reference log-probs are split over the ranks (and are collectives under FSDP).
        run_sharded_stage(trainer, artifacts, "train", shards,
                          lambda k: self._pairs(artifacts.read_shard("generations", k),
                                                artifacts.read_shard("rankings", k), iteration,
                                                first_row=artifacts.shard_start("generations", k)),
                          on_every_rank=True, source=source)
        info = artifacts.info("train")
        if info["rows"] == 0:
            raise DataError(f"iteration {iteration}: all {len(prompts)} prompts tied (every response scored "
                            f"the same); nothing to train on. Raise temperature or num_samples, or check the ranker")
        means = pq.read_table(artifacts.path("train"), columns=["chosen_probs_win", "chosen_probs_lose"])
        self.stats[iteration] = {
            "pairs": info["rows"],
            "ties_dropped": info.get("ties_dropped", 0),
            "prompts_truncated": sum(p.truncated for p in prompts),
            "chosen_p_win": pc.mean(means.column("chosen_probs_win")).as_py(),
            "rejected_p_win": pc.mean(means.column("chosen_probs_lose")).as_py(),
            "seconds": {s: artifacts.info(n).get("seconds", 0.0) for s, n in
                        (("generate", "generations"), ("rank", "rankings"), ("reference", "train"))},
        }
        if trainer.is_global_zero:
            self._write_samples(artifacts.dir, artifacts.read_shard("train", 0)[: self.log_samples])
            pairs = artifacts.memory_mapped("train", TRAINING_COLUMNS)  # rank 0 writes the Arrow file
        trainer.strategy.barrier("train_arrow")
        return pairs if trainer.is_global_zero else artifacts.memory_mapped("train", TRAINING_COLUMNS)

    def _sample(self, prompt_ids: list[list[int]], num_samples: int, seed: int,
                batch_offset: int = 0) -> list[list[list[int]]]:
        """Every rank samples its share of the prompt batches; all ranks get the whole result."""
        return sample_on_ranks(
            self.module.policy, self.datamodule.tokenizer, prompt_ids, num_samples,
            rank=self.trainer.global_rank, world_size=self.trainer.world_size,
            temperature=self.temperature, top_p=self.top_p, max_new_tokens=self.max_new_tokens,
            batch_size=self.generation_batch_size, seed=seed, retry_oom=self.retry_oom,
            show_progress=self.show_progress and self.trainer.is_global_zero, batch_offset=batch_offset,
        )

    def _aligned_sample(self, prompts: list, num_samples: int, seed: int, batch_offset: int = 0) -> list[list[list[int]]]:
        """Linear Alignment sampling, K per prompt, split over ranks by batch like plain sampling."""
        settings = LinearAlignmentSettings(self.aligned_sampling.alpha, self.temperature, self.top_p, do_sample=True)
        rank, world = self.trainer.global_rank, self.trainer.world_size
        local: list[list[list[int]]] = [[] for _ in prompts]
        for index, start in enumerate(range(0, len(prompts), self.generation_batch_size)):
            if index % world != rank:
                continue
            chunk = prompts[start : start + self.generation_batch_size]
            ids = linear_alignment_generate(
                self.module.policy, self.datamodule.tokenizer, [p.messages for p in chunk for _ in range(num_samples)],
                self.aligned_sampling.principle, settings, max_new_tokens=self.max_new_tokens,
                batch_size=len(chunk) * num_samples, seed=batch_seed(seed, batch_offset + index),
            )
            for j in range(len(chunk)):
                local[start + j] = ids[j * num_samples : (j + 1) * num_samples]
        return gather_responses(local, world)

    def _generate_shard(self, prompts: list, iteration: int, batch_offset: int) -> tuple[list[dict[str, Any]], dict]:
        tokenizer = self.datamodule.tokenizer
        seed = self.seed * 7_919 + iteration
        if self.aligned_sampling is not None:
            responses = self._aligned_sample(prompts, self.num_samples, seed, batch_offset)
        else:
            responses = self._sample([p.ids for p in prompts], self.num_samples, seed=seed, batch_offset=batch_offset)
        rows = []
        for prompt, ids in zip(prompts, responses):
            rows.append({
                "prompt_index": prompt.index, "prompt": prompt.text, "prompt_messages": prompt.messages,
                "prompt_ids": prompt.ids, "response_ids": ids,
                "responses": tokenizer.batch_decode(ids, skip_special_tokens=True),
            })
        return rows, {}

    def _rank(self, generations: list[dict[str, Any]], first_row: int = 0) -> tuple[list[dict[str, Any]], dict]:
        try:
            pairwise = self.ranker.pairwise_logits([g["prompt"] for g in generations],
                                                   [g["responses"] for g in generations])
        except DataError as error:  # the ranker counts rows from the shard's first
            if first_row == 0:
                raise
            raise DataError(f"ranking the shard that starts at prompt row {first_row} of generations.parquet "
                            f"(add {first_row} to the row below): {error}") from error
        scores = scores_from_pairwise(pairwise.double())
        return [{"prompt_index": g["prompt_index"], "pairwise_logits": m.tolist(), "rm_scores": s.tolist()}
                for g, m, s in zip(generations, pairwise, scores)], {}

    def _pairs(self, generations: list[dict], rankings: list[dict], iteration: int,
               first_row: int = 0) -> tuple[list[dict], dict]:
        """One shard's pairs with their reference log-probs; ``first_row``: the shard's first row in
        the iteration, so that errors name the row of ``generations.parquet``."""
        pairs, ties = self._estimate(generations, rankings, iteration, first_row)
        self._reference_logps(pairs)
        return pairs, {"ties_dropped": ties}

    def _estimate(self, generations: list[dict], rankings: list[dict], iteration: int,
                  first_row: int = 0) -> tuple[list[dict], int]:
        scores = torch.tensor([r["rm_scores"] for r in rankings], dtype=torch.float64)
        picked = select_pairs(scores, where=f"iteration {iteration} ranking", first_row=first_row)
        probability, _ = win_probabilities(scores)  # the K×K P̂ of every prompt, stored with its pair
        pairs, ties = [], 0
        for n, (gen, rank) in enumerate(zip(generations, rankings)):
            w, l = int(picked.chosen[n]), int(picked.rejected[n])
            if not picked.keep[n] or gen["response_ids"][w] == gen["response_ids"][l]:
                ties += 1  # never train on chosen == rejected
                continue
            conversation = gen["prompt_messages"]
            pairs.append({
                "prompt_index": gen["prompt_index"], "prompt": gen["prompt"], "prompt_ids": gen["prompt_ids"],
                "chosen": conversation + [{"role": "assistant", "content": gen["responses"][w]}],
                "rejected": conversation + [{"role": "assistant", "content": gen["responses"][l]}],
                "chosen_ids": gen["response_ids"][w], "rejected_ids": gen["response_ids"][l],
                "chosen_index": w, "rejected_index": l,
                "chosen_probs": float(picked.chosen_probs[n]),
                "chosen_probs_win": float(picked.chosen_probs_win[n]),
                "chosen_probs_lose": float(picked.chosen_probs_lose[n]),
                "rm_scores": rank["rm_scores"], "probability": probability[n].tolist(),
                **{f"generate_{k}": conversation + [{"role": "assistant", "content": r}]
                   for k, r in enumerate(gen["responses"])},
            })
        if ties:
            rank_zero_info(f"iteration {iteration}: dropped {ties} prompt(s) whose responses all scored the same")
        return pairs, ties

    @torch.no_grad()
    def _reference_logps(self, pairs: list[dict[str, Any]]) -> None:
        """Summed log-probs of chosen and rejected under π_t (eval mode), stored on each pair.

        The batches are split over the ranks and gathered. Every rank runs the same number of
        forwards (a rank short of batches repeats the last one): under FSDP each forward is a
        collective.
        """
        policy = self.module.policy
        rank, world = self.trainer.global_rank, self.trainer.world_size
        starts = list(range(0, len(pairs), self.reference_batch_size))
        local: dict[int, list[float]] = {}
        was_training = policy.training
        policy.eval()
        pad = self.datamodule.tokenizer.pad_token_id
        try:
            for step in range(math.ceil(len(starts) / world)):
                index = step * world + rank
                begin = starts[min(index, len(starts) - 1)]
                batch = collate_pairs(pairs[begin : begin + self.reference_batch_size], pad)
                batch = {k: v.to(self.module.device) for k, v in batch.items()}
                logps = self.module.sequence_logps(policy, batch).sum.cpu().tolist()
                if index < len(starts):
                    local[begin] = logps
        finally:
            policy.train(was_training)
        if world > 1:
            import torch.distributed as dist

            parts: list[Optional[dict]] = [None] * world
            dist.all_gather_object(parts, local)
            local = {k: v for part in parts for k, v in part.items()}
        for begin, logps in local.items():
            chunk = pairs[begin : begin + self.reference_batch_size]
            for k, pair in enumerate(chunk):
                pair["reference_chosen_logps"] = logps[k]
                pair["reference_rejected_logps"] = logps[len(chunk) + k]

    # ------------------------------------------------------------------------------ hooks
    def _iteration_bounds(self, trainer: L.Trainer) -> tuple[int, bool, bool]:
        per = self.datamodule.epochs_per_iteration
        epoch = trainer.current_epoch
        return epoch // per, epoch % per == 0, (epoch + 1) % per == 0

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
        stats = self.stats.get(iteration, {})
        for key in ("chosen_p_win", "rejected_p_win", "ties_dropped", "pairs"):
            if key in stats:
                pl_module.log(f"self_play/{key}", float(stats[key]), on_epoch=True, on_step=False)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None or not trainer.is_global_zero:
            return  # a skipped non-finite batch has no loss
        iteration, _, _ = self._iteration_bounds(trainer)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with (self.run_dir / "losses.jsonl").open("a") as f:  # for loss.png; survives restarts
            f.write(json.dumps({"step": trainer.global_step, "iteration": iteration, "loss": float(loss)}) + "\n")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        iteration, _, ends = self._iteration_bounds(trainer)
        if not ends:
            return
        stats = self.stats.get(iteration, {})
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
        if checkpoint is not None and getattr(checkpoint, "dirpath", None):
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

    def _write_samples(self, folder: Path, pairs: list[dict[str, Any]]) -> None:
        if not self.trainer.is_global_zero or self.log_samples <= 0:
            return
        rows = [[p["prompt"], p["chosen"][-1]["content"], p["rejected"][-1]["content"],
                 round(p["chosen_probs_win"], 3), round(p["chosen_probs_lose"], 3)] for p in pairs[: self.log_samples]]
        columns = ["prompt", "chosen", "rejected", "chosen_p_win", "rejected_p_win"]
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in r) + " |" for r in rows]
        (folder / "samples.md").write_text("\n".join(lines) + "\n")
        for logger in self.trainer.loggers:
            if hasattr(logger, "log_text"):  # W&B; others get samples.md in the iteration folder
                logger.log_text(key="self_play/samples", columns=columns, data=rows)


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
