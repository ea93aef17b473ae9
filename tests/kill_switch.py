"""Crash injection for the resume tests: SIGKILL this process once, at a chosen point.

The marker file makes each kill happen once: the resumed run passes the same point and goes on.
"""

import os
import signal
from pathlib import Path

import lightning as L

from sppo_lightning.ranking.judges import positive_words


def _kill_once(marker: str) -> None:
    path = Path(marker)
    if not path.exists():
        path.write_text("killed")
        os.kill(os.getpid(), signal.SIGKILL)


class KillSwitch(L.Callback):
    """SIGKILL at the start of training batch ``batch`` of epoch ``epoch`` (once)."""

    def __init__(self, marker: str, epoch: int = 1, batch: int = 3) -> None:
        self.marker, self.epoch, self.batch = marker, epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            _kill_once(self.marker)


def killing_judge(prompt: str, response: str) -> float:
    """``positive_words``, but the process dies at its first call of a run with KILL_MARKER unset on disk."""
    marker = os.environ.get("KILL_MARKER")
    if marker:
        _kill_once(marker)
    return positive_words(prompt, response)
