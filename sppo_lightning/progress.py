"""The progress bar counts epochs from 1, like every other count we show (iteration folders, the
summary, errors): Lightning's own bars read ``Epoch 2/2`` on the third of three epochs."""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar


def epoch_description(current_epoch: int, max_epochs) -> str:
    """``Epoch 3/3`` for the 0-based ``current_epoch`` 2 of 3 (``Epoch 3`` with no epoch limit)."""
    total = f"/{max_epochs}" if max_epochs is not None and max_epochs > 0 else ""
    return f"Epoch {current_epoch + 1}{total}"


class RichBar(RichProgressBar):
    def _get_train_description(self, current_epoch: int) -> str:
        description = epoch_description(current_epoch, self.trainer.max_epochs)
        if len(self.validation_description) > len(description):  # as Lightning pads it (no flicker)
            description = f"{description:{len(self.validation_description)}}"
        return description


class TQDMBar(TQDMProgressBar):
    def on_train_epoch_start(self, trainer, *_) -> None:
        super().on_train_epoch_start(trainer)
        self.train_progress_bar.set_description(epoch_description(trainer.current_epoch, trainer.max_epochs))


def default_progress_bar():
    """What Lightning would add (rich where it is installed, else tqdm), counting from 1."""
    from lightning.pytorch.utilities.imports import _RICH_AVAILABLE

    return RichBar() if _RICH_AVAILABLE else TQDMBar()
