"""``BondModule``: J-BOND / BOND training of a policy against an EMA anchor (arXiv 2407.14622).

Each batch row pair (built by ``sppo_lightning/methods/jbond.py``) holds, per prompt, the best anchor sample
(forward KL: its NLL) and the policy's own sample with its reward (backward KL: REINFORCE). The
anchor is a second set of weights the ``EMAAnchor`` callback moves toward the policy after every
optimizer step: a frozen copy for full fine-tuning, or, with LoRA, a second adapter on the same
base ("anchor"), so it costs adapter-sized memory and generation from it just switches adapters.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any, Iterator, Literal, Optional, Union

import lightning as L
import torch
from torch import Tensor, nn

from sppo_lightning import losses
from sppo_lightning.errors import ConfigError
from sppo_lightning.footprints import check_strategy, resolve_footprint
from sppo_lightning.logprobs import model_logprobs
from sppo_lightning.policies import Policies
from sppo_lightning.models import LoraSettings
from sppo_lightning.optim import make_optimizer
from sppo_lightning.packing import record_resolved, resolve_packing
from sppo_lightning.policy import TrainingRows, load_base, non_finite_loss, restore_checkpoint, trim_checkpoint, wrap_policy

ANCHOR = "anchor"


class BondModule(L.LightningModule):
    """Jeffreys-divergence Best-of-N distillation.

    Args:
        model_name_or_path: Hugging Face causal LM id or local folder (the initial policy and anchor).
        jeffreys_beta: β of ``(1-β)·forward KL + β·backward KL`` (paper: 0.5).
        gamma: γ, the weight of the anchor regulariser ``KL(π‖π_anchor)`` added to the update
            (estimated on the policy's own samples with the anchor log-probs the reward already
            needs). The paper's main runs use 0 and ablate {0, 0.5, 1, 2}.
        torch_dtype, trust_remote_code, lora, gradient_checkpointing: as for ``PreferenceModule``.
        footprint: ``full``, ``lora`` or ``qlora`` (4-bit base; the policy and the anchor are two
            LoRA adapters on it). ``fsdp`` is not supported here yet. None: from ``lora``.
        optimizer, lr, weight_decay, warmup_ratio: J-BOND used Adam at 3e-6 with warmup.
        keep_initial_copy: full fine-tuning only: hold a frozen copy of the initial policy so that
            KL(π‖π_initial) is logged (LoRA gets it free: the adapters-off base). Costs a model.
        on_non_finite, memory_budget_gib, packing, packing_tokens: as for ``PreferenceModule``
            (packing lays each prompt once before its best-of-N sample and its policy sample).

    The policy is built by the same builder as ``PreferenceModule``'s (``sppo_lightning.policy``):
    with ``lora``/``qlora`` a checkpoint holds the two adapters (policy and EMA anchor) only.
    """

    def __init__(
        self,
        model_name_or_path: str,
        jeffreys_beta: float = 0.5,
        gamma: float = 0.0,
        torch_dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        trust_remote_code: bool = False,
        lora: Optional[LoraSettings] = None,
        footprint: Optional[Literal["full", "lora", "qlora"]] = None,
        gradient_checkpointing: bool = False,
        optimizer: Literal["rmsprop", "adamw", "adamw_8bit", "paged_adamw_8bit"] = "adamw",
        lr: float = 3e-6,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.0,
        keep_initial_copy: bool = False,
        on_non_finite: Literal["stop", "skip"] = "stop",
        memory_budget_gib: Optional[float] = None,
        packing: Union[bool, Literal["auto"]] = "auto",
        packing_tokens: int = 2048,
    ) -> None:
        super().__init__()
        self._schedule_steps: Optional[int] = None  # restart_optimizer()
        if isinstance(lora, dict):
            lora = LoraSettings(**lora)
        footprint = resolve_footprint(footprint, lora is not None)
        if footprint == "fsdp":
            raise ConfigError("BondModule does not support footprint 'fsdp' yet: use full, lora or qlora "
                              "(with DDP over several GPUs)")
        if footprint in ("lora", "qlora") and lora is None:
            lora = LoraSettings()
        if not 0.0 <= jeffreys_beta <= 1.0:
            raise ConfigError(f"model.jeffreys_beta must be in [0, 1], got {jeffreys_beta}")
        if gamma < 0:
            raise ConfigError(f"model.gamma must be >= 0, got {gamma}")
        if lr <= 0:
            raise ConfigError(f"model.lr must be > 0, got {lr}")
        self.save_hyperparameters(ignore=["lora"])
        self.hparams["lora"] = None if lora is None else asdict(lora)
        self.hparams["footprint"] = footprint
        self.lora = lora
        self.footprint = footprint
        self.policy: Optional[nn.Module] = None
        self.anchor: Optional[nn.Module] = None  # full fine-tuning only; LoRA keeps an adapter
        self.initial: Optional[nn.Module] = None  # keep_initial_copy, for KL monitoring
        self.skipped_non_finite = 0
        self.pack_budget: Optional[int] = None  # the resolved packed-row budget (configure_model); None: padded
        self.training_rows: Optional[TrainingRows] = None  # the batches, for the memory check (the CLI's)
        # LoRA checkpoints hold the adapters only; the check over them replaces the strict one.
        self.strict_loading = footprint not in ("lora", "qlora")

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        hp = self.hparams
        base = load_base(self, rows=self.training_rows, reference_copy=self.lora is None)  # full fine-tuning: the anchor is a copy
        if self.lora is None:
            self.anchor = copy.deepcopy(base).eval().requires_grad_(False)
            if hp.keep_initial_copy:
                self.initial = copy.deepcopy(self.anchor)
        policy = wrap_policy(self, base, self.lora)
        if self.lora is not None:
            policy.add_adapter(ANCHOR, policy.peft_config["default"])
            policy.set_adapter("default")  # the policy trains the default adapter only
            with torch.no_grad():
                for anchor_param, policy_param in self.anchor_parameter_pairs(policy):
                    anchor_param.copy_(policy_param)
        self.policy = policy.train()
        self.pack_budget = resolve_packing(hp.packing, hp.packing_tokens, self.policy)
        record_resolved(self, "packing", self.pack_budget is not None)

    def setup(self, stage: str) -> None:
        check_strategy(self.trainer, self.footprint)

    def anchor_parameter_pairs(self, policy: Optional[nn.Module] = None) -> list[tuple[Tensor, Tensor]]:
        """(anchor tensor, policy tensor) pairs the EMA moves: every weight, or the adapters only."""
        policy = policy if policy is not None else self.policy
        if self.lora is None:
            return list(zip(self.anchor.parameters(), policy.parameters()))
        params = dict(policy.named_parameters())
        return [(p, params[name.replace(f".{ANCHOR}.", ".default.")])
                for name, p in params.items() if f".{ANCHOR}." in name]

    @contextmanager
    def anchor_model(self) -> Iterator[nn.Module]:
        """The anchor as a model to run or sample from (LoRA: the policy with the anchor adapter on)."""
        if self.lora is None:
            yield self.anchor
            return
        self.policy.set_adapter(ANCHOR)
        try:
            yield self.policy
        finally:
            self.policy.set_adapter("default")  # also makes the default adapter trainable again

    @contextmanager
    def initial_model(self) -> Iterator[Optional[nn.Module]]:
        """The initial policy, for KL monitoring: LoRA with adapters off; for full fine-tuning the
        copy ``keep_initial_copy`` holds, else None (no KL is logged)."""
        if self.lora is None:
            yield self.initial
            return
        with self.policy.disable_adapter():
            yield self.policy

    def policies(self) -> Policies:
        """What a self-play method may sample or score: the policy, its ``anchor`` and the ``initial`` policy."""
        return Policies(self.policy, {"anchor": self.anchor_model, "initial": self.initial_model},
                        packing=self.pack_budget)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The initial copy reloads from model_name_or_path; the anchor (EMA state) is kept.
        trim_checkpoint(checkpoint, self.footprint, self.policy, reloadable=("initial.",))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        restore_checkpoint(checkpoint, self.footprint, self.policy, {"initial.": self.initial})

    def train(self, mode: bool = True) -> "BondModule":
        super().train(mode)
        for frozen in (self.anchor, self.initial):
            if frozen is not None:
                frozen.eval()
        return self

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Optional[Tensor]:
        half = batch["input_ids"].shape[0] // 2
        sample_rows = {k: batch[k][half:] for k in ("input_ids", "attention_mask", "labels")}
        sample_rows["prompt_lengths"] = batch["prompt_lengths"]
        # The anchor runs first: with LoRA, switching adapters after the policy's forward would
        # flip requires_grad on tensors the backward pass still needs.
        with torch.no_grad(), self.anchor_model() as anchor:
            anchor_sample = model_logprobs(anchor, sample_rows, packing=self.pack_budget).sum
        policy = model_logprobs(self.policy, batch, packing=self.pack_budget)
        forward, sample = policy.sum[:half], policy.sum[half:]
        per_prompt = losses.bond_loss(forward, sample, anchor_sample, batch["reward"], self.hparams.jeffreys_beta)
        gamma = self.hparams.get("gamma", 0.0)
        if gamma:
            per_prompt = per_prompt + gamma * losses.anchor_kl_surrogate(sample, anchor_sample)
        loss = per_prompt.mean()
        if not torch.isfinite(loss):
            return non_finite_loss(self, loss, per_prompt, batch_idx, self.hparams.on_non_finite, rows="prompts")
        pairs = half
        self.log("train/loss", loss, prog_bar=True, batch_size=pairs)
        self.log_dict({
            "bond/forward_nll": -forward.detach().mean(),
            "bond/reward": batch["reward"].float().mean(),
            "bond/log_ratio_to_anchor": (sample.detach() - anchor_sample).mean(),
            "bond/sample_logps": sample.detach().mean(),
        }, batch_size=pairs)
        return loss

    def restart_optimizer(self, steps: int, epochs: int) -> None:
        """A fresh optimizer and LR schedule over ``steps`` optimizer steps (a self-play method that
        restarts at every iteration: see ``PreferenceModule.restart_optimizer``)."""
        self._schedule_steps = steps
        self.trainer.strategy.setup_optimizers(self.trainer)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        # J-BOND is online and never restarts (the paper does not restart Adam): the schedule spans the fit.
        total = self._schedule_steps or int(self.trainer.estimated_stepping_batches)
        return make_optimizer(self.policy.parameters(), hp.optimizer, hp.lr, hp.weight_decay, hp.warmup_ratio, total)
