"""One builder for the trained policy, used by every training module (``PreferenceModule``,
``BondModule``): load for the footprint, check the memory, add LoRA, checkpointing, FSDP sharding.

A module calls :func:`load_base` (the causal LM, 4-bit for ``qlora``, dropout off, memory checked),
takes any frozen copies it needs of the plain base (a reference, an EMA anchor), then calls
:func:`wrap_policy` (LoRA, activation checkpointing, FSDP2). Checkpoint trimming for the adapter
footprints and the non-finite-loss guard are here too, so both modules behave the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol, runtime_checkable

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from sppo_lightning.errors import TrainingError
from sppo_lightning.memory import ModelShape, device_memory_gib, estimate_memory
from sppo_lightning.models import DTYPES, LoraSettings, add_lora, disable_dropout, enable_checkpointing, load_causal_lm
from sppo_lightning.sharding import shard_model


@dataclass(frozen=True)
class TrainingRows:
    """What a training batch holds, for the memory estimate: ``rows`` (pairs, or prompts) per
    device and ``tokens`` per row at most. The CLI gives it to the module before fit
    (``rows_of``); without it, 1 row of 1024 tokens."""

    rows: int = 1
    tokens: int = 1024


@runtime_checkable
class BatchedData(Protocol):
    """A data module whose batches the memory estimate can size (both training data modules)."""

    batch_size: int

    @property
    def max_length(self) -> int: ...


@runtime_checkable
class SizedByRows(Protocol):
    """A training module whose memory check is given its batches (both training modules)."""

    training_rows: Optional[TrainingRows]


def rows_of(datamodule: object) -> Optional[TrainingRows]:
    """The training rows of ``datamodule`` (None: a data module that does not declare them)."""
    if isinstance(datamodule, BatchedData):
        return TrainingRows(datamodule.batch_size, datamodule.max_length)
    return None


def load_base(module: L.LightningModule, *, reference_copy: bool = False,
              rows: Optional[TrainingRows] = None) -> nn.Module:
    """The causal LM of ``module.hparams`` loaded for ``module.footprint`` (4-bit for ``qlora``,
    straight onto the strategy's device), with dropout off and its memory estimate checked.

    ``module.hparams`` holds ``model_name_or_path``, ``torch_dtype``, ``trust_remote_code``,
    ``optimizer``, ``gradient_checkpointing`` and ``memory_budget_gib``; ``reference_copy``: the
    module will hold a second full copy (counted in the estimate); ``rows``: its batches.
    """
    hp = module.hparams
    device = module.trainer.strategy.root_device if module._trainer is not None else None
    model = load_causal_lm(hp.model_name_or_path, hp.torch_dtype, hp.trust_remote_code,
                           quantize_4bit=module.footprint == "qlora", device=device)
    disable_dropout(model)
    check_memory(module, model, device, reference_copy, rows or TrainingRows())
    return model


def wrap_policy(module: L.LightningModule, model: nn.Module, lora: Optional[LoraSettings]) -> nn.Module:
    """LoRA (when set), activation checkpointing (asked for, or always with ``qlora``) and, for
    ``fsdp``, FSDP2 sharding over the module's data-parallel mesh. Returns the policy in train mode
    (``from_pretrained`` returns eval mode, and Lightning keeps modes as it finds them)."""
    hp = module.hparams
    if lora is not None:
        model = add_lora(model, lora)
    if hp.gradient_checkpointing or module.footprint == "qlora":
        enable_checkpointing(model)
    if module.footprint == "fsdp":
        shard_model(model, module.device_mesh["data_parallel"], DTYPES[hp.torch_dtype])
    return model.train()


def check_memory(module: L.LightningModule, model: nn.Module, device: Optional[torch.device],
                 reference_copy: bool, rows: TrainingRows) -> None:
    """Warn, with the numbers, when the footprint's estimate for batches of ``rows`` exceeds
    ``memory_budget_gib`` (default: the device's memory)."""
    hp = module.hparams
    budget = hp.get("memory_budget_gib")
    if budget is None and device is not None:
        budget = device_memory_gib(device)
    if budget is None or not hasattr(model.config, "intermediate_size"):
        return
    trainer = module._trainer
    lora = getattr(module, "lora", None)
    estimate = estimate_memory(
        ModelShape.from_config(model.config), module.footprint,
        world_size=trainer.world_size if trainer is not None else 1,
        pairs_per_device=rows.rows, seq_len=rows.tokens,
        lora_r=lora.r if lora is not None else 16, optimizer=hp.optimizer,
        gradient_checkpointing=hp.gradient_checkpointing or module.footprint == "qlora",
        reference_copy=reference_copy, dtype_bytes=DTYPES[hp.torch_dtype].itemsize,
    )
    if estimate.total > budget:
        rank_zero_warn(f"footprint {module.footprint!r} of {hp.model_name_or_path} needs about "
                       f"{estimate.describe()} per device, more than the {budget:.1f} GiB available: "
                       f"expect an out-of-memory error. Lower data.batch_size or data.max_length, or "
                       f"use footprint qlora / fsdp")


# ------------------------------------------------------------------------------------ checkpoints
def adapter_keys(policy: nn.Module, prefix: str = "policy.") -> set[str]:
    """State-dict keys of what a LoRA checkpoint keeps: trainable weights and every adapter's
    weights (J-BOND's EMA anchor is a second, frozen adapter)."""
    return {f"{prefix}{n}" for n, p in policy.named_parameters() if p.requires_grad or "lora_" in n}


def trim_checkpoint(checkpoint: dict[str, Any], footprint: str, policy: nn.Module,
                    reloadable: tuple[str, ...] = ("reference.",)) -> None:
    """Drop from a checkpoint what reloads from ``model_name_or_path``: the ``reloadable`` frozen
    copies, and with ``lora``/``qlora`` the base weights (the adapters stay). A sharded (fsdp)
    checkpoint is loaded in place, strictly, by the strategy: it keeps everything."""
    state = checkpoint.get("state_dict")
    if state is None or footprint == "fsdp":
        return
    for key in [k for k in state if k.startswith(reloadable)]:
        del state[key]
    if footprint in ("lora", "qlora"):
        keep = adapter_keys(policy)
        for key in [k for k in state if k.startswith("policy.") and k not in keep]:
            del state[key]


def restore_checkpoint(checkpoint: dict[str, Any], footprint: str, policy: nn.Module,
                       frozen: dict[str, Optional[nn.Module]]) -> None:
    """Refill what :func:`trim_checkpoint` dropped (``frozen``: prefix → the module's own copy)
    and, for adapter checkpoints, check that the adapters saved are the adapters built."""
    state = checkpoint.get("state_dict")
    if state is None or footprint == "fsdp":
        return
    for prefix, model in frozen.items():
        if model is not None and not any(k.startswith(prefix) for k in state):
            state.update({f"{prefix}{k}": v for k, v in model.state_dict().items()})
    if footprint in ("lora", "qlora"):
        saved = {k for k in state if k.startswith("policy.")}
        expected = adapter_keys(policy)
        for what, keys in (("lacks", expected - saved), ("has extra", saved - expected)):
            if keys:
                raise TrainingError(f"the checkpoint {what} {len(keys)} adapter weight(s) for this model (e.g. "
                                    f"{sorted(keys)[0]}): were model.lora settings changed since it was saved?")


# ------------------------------------------------------------------------------------ non-finite
def non_finite_loss(module: L.LightningModule, loss: Tensor, per_item: Tensor, batch_idx: int,
                    mode: str, rows: str = "pairs") -> None:
    """A NaN/inf loss: ``skip`` the batch (Lightning skips backward and the step when
    ``training_step`` returns None) and count it, or ``stop``, saving the weights as they were
    before this batch to ``<default_root_dir>/last_finite.ckpt``. Returns None (to be returned)."""
    bad = (~torch.isfinite(per_item)).nonzero().flatten().tolist()
    where = (f"loss {loss.item()} at step {module.global_step} (epoch {module.current_epoch}, batch {batch_idx}, "
             f"{rows} {bad})")
    if mode == "skip":
        module.skipped_non_finite = getattr(module, "skipped_non_finite", 0) + 1
        module.log("train/skipped_non_finite", float(module.skipped_non_finite))
        return None
    path = Path(module.trainer.default_root_dir) / "last_finite.ckpt"
    module.trainer.save_checkpoint(path)  # the weights are still those before this batch
    raise TrainingError(f"non-finite {where}; the last good state is saved in {path}. "
                        f"Check the data of that batch, or set model.on_non_finite: skip")
