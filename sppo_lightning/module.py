"""``PreferenceModule``: a policy, its frozen reference, and one preference loss chosen by name."""

from __future__ import annotations

import copy
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal, Optional

import lightning as L
import torch
from torch import Tensor, nn

from sppo_lightning import losses
from sppo_lightning.errors import ConfigError, DataError, TrainingError
from sppo_lightning.logprobs import SequenceLogps, model_logprobs
from sppo_lightning.footprints import (
    Footprint, ModelShape, check_strategy, device_memory_gib, estimate_memory, resolve_footprint, shard_model,
)
from sppo_lightning.models import DTYPES, LoraSettings, add_lora, disable_dropout, enable_checkpointing, load_causal_lm
from sppo_lightning.optim import make_optimizer

LossName = Literal["sppo", "sppo_single", "sppo_hard", "dpo", "ipo", "orpo", "asft"]
ReferenceMode = Literal["auto", "copy", "adapter", "cached", "none"]

REFERENCE_FREE = ("orpo", "asft")
# Defaults of each loss's own hyperparameters, from the papers' and TRL's recipes (algorithms.md §2-3).
DEFAULT_BETA = {"sppo_hard": 0.1, "dpo": 0.1, "ipo": 0.1, "asft": 1.0}
DEFAULT_LAM = {"orpo": 0.1, "asft": 1.0}
PROB_COLUMNS_NEEDED = {
    "sppo": ("chosen_probs_win", "chosen_probs_lose"),
    "sppo_single": ("chosen_probs",),
}


class PreferenceModule(L.LightningModule):
    """Trains a causal LM on preference pairs with SPPO, DPO, IPO, ORPO or ASFT.

    Batches come from ``collate_pairs``: ``[2B, T]`` ids/mask/labels with the B chosen rows first,
    plus optional ``[B]`` columns (win probabilities, cached reference log-probs).

    Args:
        model_name_or_path: Hugging Face causal LM id or local folder.
        loss: ``sppo`` | ``sppo_single`` | ``sppo_hard`` | ``dpo`` | ``ipo`` | ``orpo`` | ``asft``.
        eta: SPPO step size η (``sppo``, ``sppo_single``); the paper uses 1000 (β = 1/η = 1e-3).
        beta: β of ``sppo_hard``/``dpo``/``ipo`` (default 0.1) and ASFT's temperature (default 1).
        lam: λ of ``orpo`` (default 0.1) and ``asft`` (default 1).
        label_smoothing: conservative-DPO ε for ``dpo``.
        ipo_average_logps: IPO on per-token mean log-probs, as TRL and the IPO authors do.
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
    ) -> None:
        super().__init__()
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
        self.eta = eta
        self.beta = DEFAULT_BETA.get(loss, 0.1) if beta is None else beta
        self.lam = DEFAULT_LAM.get(loss, 1.0) if lam is None else lam
        self.label_smoothing = label_smoothing
        self.reference_mode = _resolve_reference(loss, reference, lora is not None)
        if footprint == "qlora" and self.reference_mode == "copy":
            raise ConfigError("model.footprint 'qlora' never holds a second copy of the model: use reference: "
                              "adapter (the 4-bit base with adapters off) or cached")
        # LoRA checkpoints hold the adapters only (the base reloads from model_name_or_path), so the
        # module's own strict check is replaced by one over the trainable weights (on_load_checkpoint).
        self.strict_loading = footprint not in ("lora", "qlora")
        _check_hyperparameters(self)
        self.policy: Optional[nn.Module] = None
        self.reference: Optional[nn.Module] = None
        # (optimizer steps, epochs they span) of one LR schedule; set by the SelfPlay callback when
        # it restarts the optimizer every iteration. None: the whole fit is one schedule.
        self.schedule_override: Optional[tuple[int, int]] = None
        self.skipped_non_finite = 0

    # ----------------------------------------------------------------------------- models
    def configure_model(self) -> None:
        if self.policy is not None:
            return
        hp = self.hparams
        device = self.trainer.strategy.root_device if self._trainer is not None else None
        policy = load_causal_lm(hp.model_name_or_path, hp.torch_dtype, hp.trust_remote_code,
                                quantize_4bit=self.footprint == "qlora", device=device)
        disable_dropout(policy)
        self._check_memory(policy, device)
        if self.reference_mode == "copy":
            self.reference = copy.deepcopy(policy).eval().requires_grad_(False)
        if self.lora is not None:
            policy = add_lora(policy, self.lora)
        if hp.gradient_checkpointing or self.footprint == "qlora":
            enable_checkpointing(policy)
        if self.footprint == "fsdp":
            mesh = self.device_mesh["data_parallel"]
            shard_model(policy, mesh, DTYPES[hp.torch_dtype])
            if self.reference is not None:
                shard_model(self.reference, mesh, DTYPES[hp.torch_dtype])
        self.policy = policy.train()  # from_pretrained returns eval mode; Lightning keeps modes as found

    def setup(self, stage: str) -> None:
        check_strategy(self.trainer, self.footprint)

    def _check_memory(self, policy: nn.Module, device: Optional[torch.device]) -> None:
        """Warn, with the numbers, when the footprint's estimate exceeds the device's memory."""
        hp = self.hparams
        budget = hp.memory_budget_gib
        if budget is None and device is not None:
            budget = device_memory_gib(device)
        if budget is None or not hasattr(policy.config, "intermediate_size"):
            return
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        estimate = estimate_memory(
            ModelShape.from_config(policy.config), self.footprint,
            world_size=self.trainer.world_size if self._trainer is not None else 1,
            pairs_per_device=getattr(datamodule, "batch_size", 1),
            seq_len=getattr(datamodule, "max_length", 1024),
            lora_r=self.lora.r if self.lora is not None else 16, optimizer=hp.optimizer,
            gradient_checkpointing=hp.gradient_checkpointing or self.footprint == "qlora",
            reference_copy=self.reference_mode == "copy", dtype_bytes=DTYPES[hp.torch_dtype].itemsize,
        )
        if estimate.total > budget:
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(f"footprint {self.footprint!r} of {hp.model_name_or_path} needs about "
                           f"{estimate.describe()} per device, more than the {budget:.1f} GiB available: "
                           f"expect an out-of-memory error. Lower data.batch_size or data.max_length, or "
                           f"use footprint qlora / fsdp")

    def train(self, mode: bool = True) -> "PreferenceModule":
        super().train(mode)
        if self.reference is not None:  # Lightning's .train() must not wake the frozen reference
            self.reference.eval()
        return self

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The reference is the initial weights, reloaded from `model_name_or_path` on resume:
        # storing it would double every checkpoint.
        # A sharded (distributed) checkpoint is loaded in place, strictly, by the strategy: there
        # the reference stays in (one shard per rank).
        state = checkpoint.get("state_dict")
        if state is None or self.footprint == "fsdp":
            return
        for key in [k for k in state if k.startswith("reference.")]:
            del state[key]
        if self.footprint in ("lora", "qlora"):  # the adapters only: the base is model_name_or_path
            trainable = self._trainable_keys()
            for key in [k for k in state if k not in trainable]:
                del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict")
        if state is None or self.footprint == "fsdp":
            return
        if self.reference is not None:
            state.update({f"reference.{k}": v for k, v in self.reference.state_dict().items()})
        if self.footprint in ("lora", "qlora"):
            saved = {k for k in state if not k.startswith("reference.")}
            trainable = self._trainable_keys()
            for what, keys in (("lacks", trainable - saved), ("has extra", saved - trainable)):
                if keys:
                    raise TrainingError(f"the checkpoint {what} {len(keys)} adapter weight(s) for this model (e.g. "
                                        f"{sorted(keys)[0]}): were model.lora settings changed since it was saved?")

    def _trainable_keys(self) -> set[str]:
        return {f"policy.{n}" for n, p in self.policy.named_parameters() if p.requires_grad}

    # ----------------------------------------------------------------------------- forward
    def sequence_logps(self, model: nn.Module, batch: dict[str, Tensor]) -> SequenceLogps:
        """Response log-probs of every row of the ``[2B, T]`` batch under ``model``."""
        return model_logprobs(model, batch)

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
        return compute_loss(self, policy, reference, batch)

    # ----------------------------------------------------------------------------- loops
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Optional[Tensor]:
        per_pair, metrics = self.step(batch)
        loss = per_pair.mean()
        if not torch.isfinite(loss):
            return self._non_finite(loss, per_pair, batch_idx)
        self._log("train", loss, metrics, batch)
        return loss

    def _non_finite(self, loss: Tensor, per_pair: Tensor, batch_idx: int) -> None:
        bad = (~torch.isfinite(per_pair)).nonzero().flatten().tolist()
        where = f"loss {loss.item()} at step {self.global_step} (epoch {self.current_epoch}, batch {batch_idx}, pairs {bad})"
        if self.hparams.on_non_finite == "skip":
            self.skipped_non_finite += 1
            self.log("train/skipped_non_finite", float(self.skipped_non_finite))
            return None  # Lightning skips backward and the optimizer step
        path = Path(self.trainer.default_root_dir) / "last_finite.ckpt"
        self.trainer.save_checkpoint(path)  # the weights are still those before this batch
        raise TrainingError(f"non-finite {where}; the last good state is saved in {path}. "
                            f"Check the data of that batch, or set model.on_non_finite: skip")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        per_pair, metrics = self.step(batch)
        self._log("val", per_pair.mean(), metrics, batch)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        per_pair, metrics = self.step(batch)
        self._log("test", per_pair.mean(), metrics, batch)

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        policy = self.sequence_logps(self.policy, batch)
        half = policy.sum.shape[0] // 2
        per_pair, _ = compute_loss(self, policy, self.reference_logps(batch), batch)
        return {
            "policy_chosen_logps": policy.sum[:half],
            "policy_rejected_logps": policy.sum[half:],
            "loss": per_pair,
        }

    def _log(self, stage: str, loss: Tensor, metrics: dict[str, Tensor], batch: dict[str, Tensor]) -> None:
        pairs = batch["input_ids"].shape[0] // 2
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=pairs)
        self.log_dict({f"{stage}/{k}": v for k, v in metrics.items()}, batch_size=pairs)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        if self.schedule_override is not None:
            total, epochs = self.schedule_override
        else:
            total, epochs = int(self.trainer.estimated_stepping_batches), self.trainer.max_epochs
        if hp.schedule_epochs is not None and epochs:
            total = round(total * hp.schedule_epochs / epochs)
        return make_optimizer(self.policy.parameters(), hp.optimizer, hp.lr, hp.weight_decay, hp.warmup_ratio, total)


def compute_loss(
    module: PreferenceModule, policy: SequenceLogps, reference_sums: Optional[Tensor], batch: dict[str, Tensor]
) -> tuple[Tensor, dict[str, Tensor]]:
    """Dispatch to the loss named by ``module.loss_name``; returns per-pair losses ``[B]`` and metrics.

    ``policy`` holds ``[2B]`` log-probs (chosen rows first); ``reference_sums`` the ``[2B]``
    summed reference log-probs, or None for the reference-free losses.
    """
    name = module.loss_name
    half = policy.sum.shape[0] // 2
    chosen_mean, rejected_mean = policy.mean[:half], policy.mean[half:]
    metrics = {
        "logps/chosen": policy.sum[:half].detach().mean(),
        "logps/rejected": policy.sum[half:].detach().mean(),
        "logps/chosen_mean": chosen_mean.detach().mean(),
        "logps/rejected_mean": rejected_mean.detach().mean(),
    }
    if name in REFERENCE_FREE:
        if name == "orpo":
            per_pair = losses.orpo_loss(chosen_mean, rejected_mean, module.lam)
        else:
            per_pair = losses.asft_loss(chosen_mean, rejected_mean, module.lam, module.beta)
        metrics["nll"] = -chosen_mean.detach().mean()
        # loss = NLL + λ·alignment term, for ORPO and ASFT alike
        metrics["alignment"] = (per_pair.detach() + chosen_mean.detach()).mean()
        metrics["prob/chosen"] = chosen_mean.detach().exp().mean()
        metrics["prob/rejected"] = rejected_mean.detach().exp().mean()
        metrics["accuracy"] = (chosen_mean > rejected_mean).float().mean()
        return per_pair, metrics

    policy_logps, reference_logps = policy.sum, reference_sums.to(policy.sum.device)
    if name == "ipo" and module.hparams.ipo_average_logps:
        n = policy.n_tokens.clamp(min=1)
        policy_logps, reference_logps = policy.mean, reference_logps / n
    pc, pr = policy_logps[:half], policy_logps[half:]
    rc, rr = reference_logps[:half], reference_logps[half:]
    for column in PROB_COLUMNS_NEEDED.get(name, ()):
        if column not in batch:
            raise DataError(
                f"loss '{name}' needs the column '{column}' (win probabilities), which the data "
                f"does not have; use loss: sppo_hard or dpo for plain preference pairs"
            )
    if name == "sppo":
        pw, pl = batch["chosen_probs_win"], batch["chosen_probs_lose"]
        per_pair = losses.sppo_loss(pc, pr, rc, rr, pw, pl, module.eta)
        metrics["targets/chosen"] = (module.eta * (pw - 0.5)).mean()
        metrics["targets/rejected"] = (module.eta * (pl - 0.5)).mean()
    elif name == "sppo_single":
        p = batch["chosen_probs"]
        per_pair = losses.sppo_single_loss(pc, pr, rc, rr, p, module.eta)
        metrics["targets/chosen"] = (module.eta * (p - 0.5)).mean()
        metrics["targets/rejected"] = (-module.eta * (p - 0.5)).mean()
    elif name == "sppo_hard":
        per_pair = losses.sppo_hard_loss(pc, pr, rc, rr, module.beta)
    elif name == "dpo":
        per_pair = losses.dpo_loss(pc, pr, rc, rr, module.beta, module.label_smoothing)
    else:
        per_pair = losses.ipo_loss(pc, pr, rc, rr, module.beta)
    # Implicit rewards as the official trainer logs them: scale·Δ with scale = β (= 1/η for SPPO).
    scale = 1.0 / module.eta if name in PROB_COLUMNS_NEEDED else module.beta
    chosen_reward = scale * (pc - rc).detach()
    rejected_reward = scale * (pr - rr).detach()
    metrics["rewards/chosen"] = chosen_reward.mean()
    metrics["rewards/rejected"] = rejected_reward.mean()
    metrics["rewards/margins"] = (chosen_reward - rejected_reward).mean()
    metrics["rewards/accuracy"] = (chosen_reward > rejected_reward).float().mean()
    return per_pair, metrics


def _resolve_reference(loss: str, reference: str, has_lora: bool) -> str:
    if loss in REFERENCE_FREE:
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


def _check_hyperparameters(module: PreferenceModule) -> None:
    hp = module.hparams
    checks = [
        (module.eta > 0, f"model.eta must be > 0, got {module.eta}"),
        (module.beta > 0, f"model.beta must be > 0, got {module.beta}"),
        (module.lam >= 0, f"model.lam must be >= 0, got {module.lam}"),
        (0 <= module.label_smoothing < 0.5, f"model.label_smoothing must be in [0, 0.5), got {module.label_smoothing}"),
        (hp.lr > 0, f"model.lr must be > 0, got {hp.lr}"),
        (0 <= hp.warmup_ratio < 1, f"model.warmup_ratio must be in [0, 1), got {hp.warmup_ratio}"),
        (hp.schedule_epochs is None or hp.schedule_epochs > 0, "model.schedule_epochs must be > 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)

