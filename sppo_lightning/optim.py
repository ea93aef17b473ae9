"""Optimizers and the linear warmup/decay schedule shared by every training module."""

from __future__ import annotations

import math
from typing import Any, Iterable, Literal

import torch
from transformers import get_linear_schedule_with_warmup

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
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(warmup_ratio * total_steps), total_steps)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
