"""J-BOND's anchor update: after each optimizer step, θ_anchor ← (1-η)·θ_anchor + η·θ."""

from __future__ import annotations

import lightning as L
import torch


class EMAAnchor(L.Callback):
    """Moves the module's anchor toward the policy after every optimizer step (BOND eq. 18).

    The module says which tensors are paired (``anchor_parameter_pairs()``: all weights, or only
    the LoRA adapters); this callback only decides when and by how much.

    Args:
        eta: the EMA rate η (paper: 0.02 for 7B models).
    """

    def __init__(self, eta: float = 0.02) -> None:
        if not 0.0 < eta <= 1.0:
            raise ValueError(f"EMAAnchor eta must be in (0, 1], got {eta}")
        self.eta = eta
        self._last_step = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step

    @torch.no_grad()
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._last_step:  # accumulating: no optimizer step yet
            return
        self._last_step = trainer.global_step
        for anchor, policy in pl_module.anchor_parameter_pairs():
            anchor.lerp_(policy.to(anchor.dtype), self.eta)
