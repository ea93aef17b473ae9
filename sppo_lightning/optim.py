"""Optimizers and the linear warmup/decay schedule shared by every training module."""

from __future__ import annotations

import math
from typing import Any, Iterable, Literal

import torch
from transformers import get_linear_schedule_with_warmup


def make_optimizer(
    params: Iterable[torch.nn.Parameter],
    name: Literal["rmsprop", "adamw"],
    lr: float,
    weight_decay: float,
    warmup_ratio: float,
    total_steps: int,
) -> dict[str, Any]:
    """RMSprop (SPPO's, torch defaults as HF's ``optim="rmsprop"``) or AdamW, with linear warmup
    over ``ceil(warmup_ratio * total_steps)`` steps (HF Trainer's rounding) then linear decay to 0.
    Returns Lightning's ``configure_optimizers`` dict with a per-step scheduler."""
    params = [p for p in params if p.requires_grad]
    if name == "rmsprop":
        optimizer = torch.optim.RMSprop(params, lr=lr, weight_decay=weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    total_steps = max(1, total_steps)
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(warmup_ratio * total_steps), total_steps)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
