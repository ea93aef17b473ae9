"""On-policy draws for methods that sample at every optimizer step (J-BOND, the online method)."""

from __future__ import annotations

import math
from typing import Optional

from lightning.pytorch.utilities import rank_zero_warn

from sppo_lightning.errors import ConfigError


def on_policy_prompts(owner: str, on_policy: bool, per_step: int, configured: Optional[int],
                      epochs_per_iteration: int, total_prompts: int) -> Optional[int]:
    """The prompts of an iteration for a method that samples at every optimizer step.

    ``on_policy``: an iteration is exactly one optimizer step's prompts, trained for one epoch;
    a ``configured`` count or more epochs per iteration are refused (they would make later steps
    off-policy). Off-policy: ``configured`` as it is, with a warning saying how many steps each
    draw trains.
    """
    if not on_policy:
        drawn = configured or total_prompts
        steps = math.ceil(drawn / per_step) * epochs_per_iteration
        rank_zero_warn(f"{owner}: on_policy is false: each draw of samples trains {steps} optimizer steps of the "
                      f"iteration; every step after the first trains on an older policy's samples (off-policy, "
                      f"no correction). Set on_policy: true to sample at every step")
        return configured
    if configured not in (None, per_step) or epochs_per_iteration != 1:
        raise ConfigError(f"{owner}: on_policy makes each iteration one optimizer step's prompts (data.batch_size x "
                          f"accumulate_grad_batches x devices = {per_step}) trained for one epoch; remove "
                          f"data.prompts_per_iteration ({configured}) and data.epochs_per_iteration "
                          f"({epochs_per_iteration}), or set on_policy: false")
    return per_step
