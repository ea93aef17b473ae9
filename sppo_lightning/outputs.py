"""Where a run writes, checked before it starts, and checkpoints checked after they are written.

``check_output_locations`` runs before ``fit`` loads any model: every folder the run will write
(the root dir, the logs, the checkpoints, the self-play run dir, the export) must be a writable
folder or creatable as one, else a ``ConfigError`` names the path and its config key. ``Trainer``
writes each local checkpoint whole or not at all and stops when one is missing (Lightning's
``cloud_io`` swallows a ``PermissionError`` on save, and a run that believes it is resumable when
it is not must stop instead).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterator, Optional, Protocol, runtime_checkable

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from sppo_lightning.errors import ConfigError


def check_writable_folder(path: str | os.PathLike, key: str) -> None:
    """``path`` is a folder we can write in, or one we can create: else one line naming it and ``key``."""
    target = Path(path).expanduser().absolute()
    existing = target
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        what = "is a file" if existing == target else f"is under {existing}, which is a file"
        raise ConfigError(f"{key}: {target} {what}, not a folder; choose another path")
    try:  # os.access says yes to root whatever the mode; creating a file is the real test
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".sppo-lightning-write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ConfigError(f"{key}: {target} is not writable ({err.strerror}: {existing}); choose another path "
                          f"or fix its permissions") from None


@runtime_checkable
class WritesFolder(Protocol):
    """A callback that writes into a folder of its own when ``dirpath`` is set (Lightning's
    ``ModelCheckpoint``, our ``HFExport``); None: under ``trainer.default_root_dir``."""

    dirpath: Optional[str]


def output_locations(trainer: L.Trainer, datamodule=None) -> Iterator[tuple[Path, str]]:
    """(folder, config key) of every place the run writes (``datamodule``: the run's, before fit attaches it)."""
    root = Path(trainer.default_root_dir)
    yield root, "trainer.default_root_dir"
    method = getattr(datamodule, "method", None)
    if method is not None:  # a self-play data module: its run folder
        yield Path(datamodule.run_dir_setting or root / method.run_folder), "data.init_args.run_dir"
    for logger in trainer.loggers:
        save_dir: Optional[str] = getattr(logger, "save_dir", None) or getattr(logger, "root_dir", None)
        if save_dir:
            yield Path(save_dir), f"trainer.logger ({type(logger).__name__}).init_args.save_dir"
    for callback in trainer.callbacks:
        if isinstance(callback, WritesFolder) and callback.dirpath:
            yield Path(callback.dirpath), f"trainer.callbacks ({type(callback).__name__}).init_args.dirpath"


def check_output_locations(trainer: L.Trainer, datamodule=None) -> None:
    for path, key in output_locations(trainer, datamodule):
        check_writable_folder(path, key)


def written(path: str | os.PathLike) -> bool:
    """A checkpoint file with bytes in it, or a sharded checkpoint folder with files in it."""
    path = Path(path)
    if path.is_dir():
        return any(p.is_file() and p.stat().st_size > 0 for p in path.rglob("*"))
    return path.is_file() and path.stat().st_size > 0


class Trainer(L.Trainer):
    """Lightning's ``Trainer``, whose ``save_checkpoint`` writes a local checkpoint whole or not at all
    (``checkpoints.save_whole``: verified before it takes its name, a ``TrainingError`` otherwise), and
    whose logging interval never exceeds an epoch's batches (a small data set still logs its loss), and
    whose default progress bar counts epochs from 1 (``sppo_lightning/progress.py``)."""

    def __init__(self, *args, **kwargs) -> None:
        from lightning.pytorch.callbacks import Callback, ProgressBar

        from sppo_lightning.progress import default_progress_bar

        callbacks = kwargs.get("callbacks")
        callbacks = [callbacks] if isinstance(callbacks, Callback) else list(callbacks or [])
        if kwargs.get("enable_progress_bar", True) is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            kwargs["callbacks"] = callbacks + [default_progress_bar()]
        super().__init__(*args, **kwargs)

    @property
    def log_every_n_steps(self) -> int:
        interval = self._log_every_n_steps
        batches = self.num_training_batches
        if interval and batches != float("inf") and 0 < batches < interval:
            if not getattr(self, "_said_log_interval", False):
                self._said_log_interval = True
                rank_zero_info(f"trainer.log_every_n_steps {interval} is more than an epoch's {int(batches)} "
                               f"batch(es): logging every {int(batches)}")
            return int(batches)
        return interval

    @log_every_n_steps.setter
    def log_every_n_steps(self, value: int) -> None:
        self._log_every_n_steps = value

    def save_checkpoint(self, filepath, weights_only: Optional[bool] = None, storage_options=None) -> None:
        if "://" not in str(filepath):  # a local file: written whole beside its name, then renamed (checkpoints.py)
            from sppo_lightning.checkpoints import save_whole

            save_whole(filepath, lambda tmp: super(Trainer, self).save_checkpoint(
                tmp, weights_only=weights_only, storage_options=storage_options), self.is_global_zero,
                lambda: self.strategy.barrier("checkpoint_partial"))
            self.strategy.barrier("save_whole")
        else:
            super().save_checkpoint(filepath, weights_only=weights_only, storage_options=storage_options)
