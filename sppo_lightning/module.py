"""``PreferenceModule``: a policy, its frozen reference, and one preference loss of the loss table."""

from __future__ import annotations

import copy
from dataclasses import asdict
from typing import Any, Literal, Optional, Union

import lightning as L
import torch
from torch import Tensor, nn

from sppo_lightning import loss_table
from sppo_lightning.errors import ConfigError, DataError
from sppo_lightning.footprints import Footprint, check_strategy, resolve_footprint
from sppo_lightning.labels import NO_PAIR
from sppo_lightning.logprobs import SequenceLogps, model_logprobs
from sppo_lightning.models import DTYPES, LoraSettings
from sppo_lightning.policies import Policies
from sppo_lightning.optim import make_optimizer
from sppo_lightning.packing import record_resolved, resolve_packing
from sppo_lightning.policy import TrainingRows, load_base, non_finite_loss, restore_checkpoint, trim_checkpoint, wrap_policy
from sppo_lightning.sharding import shard_model

# Every loss of the table, as a type the CLI validates and lists in --help.
LossName = Literal[tuple(loss_table.LOSSES)]  # type: ignore[valid-type]
ReferenceMode = Literal["auto", "copy", "adapter", "cached", "none"]


class PreferenceModule(L.LightningModule):
    """Trains a causal LM on preference pairs with a loss of ``loss_table.LOSSES`` (SPPO, DPO, IPO,
    ORPO, ASFT, SimPO, ...).

    Batches come from ``collate_pairs``: ``[2B, T]`` ids/mask/labels with the B chosen rows first,
    plus optional ``[B]`` columns (win probabilities, cached reference log-probs).

    Args:
        model_name_or_path: Hugging Face causal LM id or local folder.
        loss: a name of ``loss_table.LOSSES``: ``sppo`` | ``sppo_single`` | ``sppo_hard`` | ``dpo`` |
            ``ipo`` | ``orpo`` | ``asft`` | ``simpo``.
        eta: SPPO step size η (``sppo``, ``sppo_single``); the paper uses 1000 (β = 1/η = 1e-3).
        beta: β of ``sppo_hard``/``dpo``/``ipo`` (default 0.1), ASFT's temperature (default 1) and
            SimPO's β (default 2); None: the loss's default.
        lam: λ of ``orpo`` (default 0.1) and ``asft`` (default 1).
        label_smoothing: conservative-DPO ε for ``dpo``.
        ipo_average_logps: IPO on per-token mean log-probs, as TRL and the IPO authors do.
        loss_args: any other setting of the loss, by name (SimPO's ``gamma``, default 1.0); the
            table lists each loss's settings and defaults.
        reference: ``copy`` (frozen copy of the initial policy), ``adapter`` (the LoRA policy with
            adapters disabled: no second copy), ``cached`` (no reference model; every batch must
            carry reference log-probs), ``none`` (reference-free losses), or ``auto`` (none for
            orpo/asft, adapter with LoRA, else copy). A batch that carries reference log-probs
            never runs a reference model, whatever the mode.
        torch_dtype: dtype the weights are loaded in.
        trust_remote_code: allow model code from the hub; off unless asked for.
        footprint: how the policy uses the hardware (``sppo_lightning.footprints``): ``full``,
            ``lora``, ``qlora`` (4-bit nf4 base + LoRA, gradient checkpointing on) or ``fsdp``
            (FSDP2 over every process; needs ``trainer.strategy: ModelParallelStrategy``). None:
            ``lora`` when ``lora`` is set, else ``full``.
        lora: LoRA settings; None trains all weights (``lora``/``qlora`` then use the defaults).
        gradient_checkpointing: recompute activations in backward to save memory.
        optimizer: ``rmsprop`` (SPPO's), ``adamw``, or bitsandbytes' ``adamw_8bit`` /
            ``paged_adamw_8bit`` (QLoRA's; paged needs CUDA and falls back to unpaged on CPU).
        memory_budget_gib: warn at start when the footprint's memory estimate exceeds this;
            default: the device's memory.
        lr, weight_decay: optimizer settings (SPPO: 5e-7, 0).
        warmup_ratio: fraction of the schedule spent in linear warmup; then linear decay to 0.
        schedule_epochs: lay the LR schedule over this many epochs though fewer are trained
            (the SPPO model card's "18 epochs, stop at 1"); None = the trained epochs.
        packing: run each batch's pairs packed (``sppo_lightning.packing``): every prompt once,
            chosen and rejected after it, pairs side by side in rows with no padding between them;
            the same pairs and the same numbers as padded batches, in fewer positions. ``auto``: on
            where the model's attention takes the packed mask (sdpa, eager, flex_attention; sliding
            windows included), else padded with one info line; ``true`` there is an error. The
            resolved value (true/false) is what the run's hparams record.
        packing_tokens: the token budget of one packed row; a pair longer than it gets a row of
            its own. Larger rows mean fewer rows but more attention work per row (dense masks).
        on_non_finite: a NaN/inf loss either ``stop``s the run with an error, after saving the
            weights as they were before that batch to ``<default_root_dir>/last_finite.ckpt``, or
            ``skip``s the batch (no update) and counts it in ``train/skipped_non_finite``.
    """

    def __init__(
        self,
        model_name_or_path: str,
        loss: LossName = "sppo",
        eta: float = 1000.0,
        beta: Optional[float] = None,
        lam: Optional[float] = None,
        label_smoothing: float = 0.0,
        ipo_average_logps: bool = True,
        reference: ReferenceMode = "auto",
        torch_dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        trust_remote_code: bool = False,
        footprint: Optional[Footprint] = None,
        lora: Optional[LoraSettings] = None,
        gradient_checkpointing: bool = False,
        optimizer: Literal["rmsprop", "adamw", "adamw_8bit", "paged_adamw_8bit"] = "rmsprop",
        lr: float = 5e-7,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.1,
        schedule_epochs: Optional[float] = None,
        on_non_finite: Literal["stop", "skip"] = "stop",
        memory_budget_gib: Optional[float] = None,
        loss_args: Optional[dict[str, float]] = None,
        packing: Union[bool, Literal["auto"]] = "auto",
        packing_tokens: int = 2048,
    ) -> None:
        super().__init__()
        self._schedule_span: Optional[tuple[int, int]] = None  # restart_optimizer()
        if isinstance(lora, dict):  # from a checkpoint: hparams hold plain types only
            lora = LoraSettings(**lora)
        footprint = resolve_footprint(footprint, lora is not None)
        if footprint in ("lora", "qlora") and lora is None:
            lora = LoraSettings()
        # Plain types only, so that checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters(ignore=["lora"])
        self.hparams["lora"] = None if lora is None else asdict(lora)
        self.hparams["footprint"] = footprint
        self.lora = lora
        self.footprint = footprint
        self.loss_name = loss
        self.loss_hyperparameters()  # unknown loss, unknown loss_args key or out of bounds: ConfigError now
        self.reference_mode = _resolve_reference(loss, reference, lora is not None)
        if footprint == "qlora" and self.reference_mode == "copy":
            raise ConfigError("model.footprint 'qlora' never holds a second copy of the model: use reference: "
                              "adapter (the 4-bit base with adapters off) or cached")
        # LoRA checkpoints hold the adapters only (the base reloads from model_name_or_path), so the
        # module's own strict check is replaced by one over the trainable weights (on_load_checkpoint).
        self.strict_loading = footprint not in ("lora", "qlora")
        _check_training_settings(self.hparams)
        self.policy: Optional[nn.Module] = None
        self.reference: Optional[nn.Module] = None
        self.skipped_non_finite = 0
        self.pack_budget: Optional[int] = None  # the resolved budget (configure_model); None: padded
        self.training_rows: Optional[TrainingRows] = None  # the batches, for the memory check (the CLI's)

    # ----------------------------------------------------------------------------- models
    def loss_hyperparameters(self) -> dict[str, Any]:
        """The current loss's settings: explicit arguments, then ``loss_args``, then the table's defaults."""
        hp = self.hparams
        explicit = {"eta": hp.eta, "beta": hp.beta, "lam": hp.lam, "label_smoothing": hp.label_smoothing,
                    "ipo_average_logps": hp.ipo_average_logps}
        return loss_table.resolve_hyperparameters(self.loss_name, explicit, hp.get("loss_args"))

    # ----------------------------------------------------------------------------- models
    def configure_model(self) -> None:
        if self.policy is not None:
            return
        base = load_base(self, rows=self.training_rows, reference_copy=self.reference_mode == "copy")
        if self.reference_mode == "copy":
            self.reference = copy.deepcopy(base).eval().requires_grad_(False)
        self.policy = wrap_policy(self, base, self.lora)
        self.pack_budget = resolve_packing(self.hparams.packing, self.hparams.packing_tokens, self.policy)
        record_resolved(self, "packing", self.pack_budget is not None)
        if self.reference is not None and self.footprint == "fsdp":
            shard_model(self.reference, self.device_mesh["data_parallel"], DTYPES[self.hparams.torch_dtype])

    def setup(self, stage: str) -> None:
        check_strategy(self.trainer, self.footprint)

    def train(self, mode: bool = True) -> "PreferenceModule":
        super().train(mode)
        if self.reference is not None:  # Lightning's .train() must not wake the frozen reference
            self.reference.eval()
        return self

    def policies(self) -> Policies:
        """What a self-play method may sample or score: the policy (its reference is π_t's cache or the module's)."""
        return Policies(self.policy, packing=self.pack_budget)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The reference is the initial weights, reloaded from `model_name_or_path` on resume:
        # storing it would double every checkpoint. LoRA checkpoints hold the adapters only.
        trim_checkpoint(checkpoint, self.footprint, self.policy)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        restore_checkpoint(checkpoint, self.footprint, self.policy, {"reference.": self.reference})

    # ----------------------------------------------------------------------------- forward
    def sequence_logps(self, model: nn.Module, batch: dict[str, Tensor]) -> SequenceLogps:
        """Response log-probs of every row of the ``[2B, T]`` batch under ``model`` (packed or not)."""
        return model_logprobs(model, batch, packing=self.pack_budget)

    def reference_logps(self, batch: dict[str, Tensor]) -> Optional[Tensor]:
        """Summed reference log-probs ``[2B]`` (chosen then rejected), or None without a reference."""
        if "reference_chosen_logps" in batch:
            return torch.cat([batch["reference_chosen_logps"], batch["reference_rejected_logps"]])
        if self.reference_mode == "none":
            return None
        if self.reference_mode == "cached":
            raise DataError(
                "model.reference is 'cached' but the batch has no reference_chosen_logps / "
                "reference_rejected_logps columns; add them to the data or use reference: copy"
            )
        with torch.no_grad():
            if self.reference_mode == "adapter":
                with self.policy.disable_adapter():
                    return self.sequence_logps(self.policy, batch).sum
            return self.sequence_logps(self.reference, batch).sum

    def step(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """One concatenated forward of chosen and rejected; returns per-pair losses ``[B]`` and
        the metrics to log (batch means)."""
        policy = self.sequence_logps(self.policy, batch)
        reference = self.reference_logps(batch)
        return loss_table.compute_loss(self.loss_name, self.loss_hyperparameters(), policy, reference, batch)

    # ----------------------------------------------------------------------------- loops
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Optional[Tensor]:
        if NO_PAIR in batch:  # a per-step draw whose prompts all tied: no pair, no update
            return None
        per_pair, metrics = self.step(batch)
        loss = per_pair.mean()
        if not torch.isfinite(loss):
            return non_finite_loss(self, loss, per_pair, batch_idx, self.hparams.on_non_finite)
        self._log("train", loss, metrics, batch)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        per_pair, metrics = self.step(batch)
        self._log("val", per_pair.mean(), metrics, batch)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        per_pair, metrics = self.step(batch)
        self._log("test", per_pair.mean(), metrics, batch)

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        policy = self.sequence_logps(self.policy, batch)
        half = policy.sum.shape[0] // 2
        per_pair, _ = loss_table.compute_loss(self.loss_name, self.loss_hyperparameters(), policy,
                                              self.reference_logps(batch), batch)
        return {
            "policy_chosen_logps": policy.sum[:half],
            "policy_rejected_logps": policy.sum[half:],
            "loss": per_pair,
        }

    def _log(self, stage: str, loss: Tensor, metrics: dict[str, Tensor], batch: dict[str, Tensor]) -> None:
        pairs = batch["input_ids"].shape[0] // 2
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=pairs)
        self.log_dict({f"{stage}/{k}": v for k, v in metrics.items()}, batch_size=pairs)

    def restart_optimizer(self, steps: int, epochs: int) -> None:
        """A fresh optimizer and LR schedule over ``steps`` optimizer steps in ``epochs`` epochs.

        Self-play methods that restart at every iteration (SPPO's official pipeline: a new training
        job per iteration) have the boundary callback call this at each iteration's first batch,
        when its batches are known; Lightning's ``strategy.setup_optimizers`` then calls
        ``configure_optimizers`` again. Until then, and in every other run, the schedule spans the fit."""
        self._schedule_span = (steps, epochs)
        self.trainer.strategy.setup_optimizers(self.trainer)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        total, epochs = self._schedule_span or (int(self.trainer.estimated_stepping_batches), self.trainer.max_epochs)
        if hp.schedule_epochs is not None and epochs:
            total = round(total * hp.schedule_epochs / epochs)
        return make_optimizer(self.policy.parameters(), hp.optimizer, hp.lr, hp.weight_decay, hp.warmup_ratio, total)


def _resolve_reference(loss: str, reference: str, has_lora: bool) -> str:
    if not loss_table.needs_reference(loss):
        if reference not in ("auto", "none"):
            raise ConfigError(
                f"model.reference={reference!r} with the reference-free loss {loss!r}: "
                f"it uses no reference model; set reference: none (or auto)"
            )
        return "none"
    if reference == "auto":
        return "adapter" if has_lora else "copy"
    if reference == "none":
        raise ConfigError(
            f"model.reference='none' but loss {loss!r} needs a reference: use copy, adapter "
            f"(with lora), or cached (with reference log-probs in the data)"
        )
    if reference == "adapter" and not has_lora:
        raise ConfigError("model.reference='adapter' needs model.lora: without LoRA there is no adapter to disable")
    return reference


def _check_training_settings(hp) -> None:
    checks = [
        (hp.lr > 0, f"model.lr must be > 0, got {hp.lr}"),
        (0 <= hp.warmup_ratio < 1, f"model.warmup_ratio must be in [0, 1), got {hp.warmup_ratio}"),
        (hp.schedule_epochs is None or hp.schedule_epochs > 0, "model.schedule_epochs must be > 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
