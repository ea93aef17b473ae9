"""Optimizers and the linear warmup/decay schedule shared by every training module."""

from __future__ import annotations

import math
import warnings
from typing import Any, Iterable, Literal

import torch

from sppo_lightning.errors import ConfigError


def make_optimizer(
    params: Iterable[torch.nn.Parameter],
    name: Literal["rmsprop", "adamw", "adamw_8bit", "paged_adamw_8bit"],
    lr: float,
    weight_decay: float,
    warmup_ratio: float,
    total_steps: int,
) -> dict[str, Any]:
    """RMSprop (SPPO's, torch defaults as HF's ``optim="rmsprop"``), AdamW, or bitsandbytes' 8-bit
    AdamW (``adamw_8bit``; ``paged_adamw_8bit`` pages its states to host memory under CUDA memory
    pressure, the QLoRA paper's optimizer), with linear warmup
    over ``ceil(warmup_ratio * total_steps)`` steps (HF Trainer's rounding) then linear decay to 0.
    Returns Lightning's ``configure_optimizers`` dict with a per-step scheduler."""
    params = [p for p in params if p.requires_grad]
    if name == "rmsprop":
        optimizer = torch.optim.RMSprop(params, lr=lr, weight_decay=weight_decay)
    elif name in ("adamw_8bit", "paged_adamw_8bit"):
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError(f"model.optimizer {name!r} needs bitsandbytes: pip install 'bitsandbytes>=0.45'") from None
        cls = bnb.optim.PagedAdamW8bit if name.startswith("paged") else bnb.optim.AdamW8bit
        optimizer = cls(params, lr=lr, weight_decay=weight_decay)
    elif name == "adamw":
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    else:
        raise ConfigError(f"model.optimizer must be rmsprop, adamw, adamw_8bit or paged_adamw_8bit, got {name!r}")
    total_steps = max(1, total_steps)
    warmup = math.ceil(warmup_ratio * total_steps)
    if warmup >= total_steps and warmup > 0:
        # Warmup would fill the whole schedule and the first step would run at learning rate 0: with
        # one step per iteration, training would change nothing. Keep one step after warmup.
        warnings.warn(f"the learning-rate schedule has {total_steps} optimizer step(s), fewer than warmup_ratio "
                      f"{warmup_ratio} needs ({warmup} warmup step(s) and at least one after): warmup shortened "
                      f"to {total_steps - 1} step(s). Give each iteration more steps (more prompts, a smaller "
                      f"data.batch_size or trainer.accumulate_grad_batches, more data.epochs_per_iteration) "
                      f"or lower model.warmup_ratio")
        warmup = total_steps - 1
    # transformers.optimization imports peft and bitsandbytes (seconds): only when a run builds one.
    from transformers import get_linear_schedule_with_warmup

    scheduler = get_linear_schedule_with_warmup(optimizer, warmup, total_steps)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
