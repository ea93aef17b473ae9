"""Crash injection for the resume tests: SIGKILL this process once, at a chosen point.

The marker file makes each kill happen once: the resumed run passes the same point and goes on.
"""

import io
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


def _self_play_run_dir(trainer) -> Path:
    return trainer.datamodule.run_dir


class KillInGeneration(L.Callback):
    """SIGKILL inside ``generate`` once iteration ``iteration``'s first generation shard is written
    and its second is not (once). With ``log``, every ``generate`` call appends its prompts (token
    ids without padding) to that JSON-lines file, so a test can see what a resumed run redid."""

    def __init__(self, marker: str, iteration: int = 1, log: str = "") -> None:
        self.marker, self.iteration, self.calls_log = marker, iteration, log

    def on_fit_start(self, trainer, pl_module) -> None:
        import json

        policy, folder = pl_module.policy, _self_play_run_dir(trainer) / f"iteration_{self.iteration + 1}"
        original = policy.generate

        def generate(*args, **kwargs):
            if self.calls_log:
                ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
                prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
                with open(self.calls_log, "a") as f:
                    f.write(json.dumps(prompts) + "\n")
            if (folder / "generations.shard_00000.parquet").exists() and \
                    not (folder / "generations.shard_00001.parquet").exists():
                _kill_once(self.marker)
            return original(*args, **kwargs)

        policy.generate = generate


class KillWhileWriting(L.Callback):
    """SIGKILL while iteration ``iteration``'s ``stage`` file is being written (once):
    ``temp``: half of its bytes are in the temporary file, the final name does not exist yet;
    ``unrecorded``: the file is complete under its final name, but the manifest does not list it."""

    def __init__(self, marker: str, mode: str = "temp", iteration: int = 1, stage: str = "rankings") -> None:
        self.marker, self.mode, self.iteration, self.stage = marker, mode, iteration, stage

    def on_fit_start(self, trainer, pl_module) -> None:
        import sppo_lightning.files as files

        target = _self_play_run_dir(trainer) / f"iteration_{self.iteration + 1}" / f"{self.stage}.parquet"
        original = files.atomic_write

        def write(path, writer):
            if Path(path) != target or Path(self.marker).exists():
                return original(path, writer)
            if self.mode == "temp":
                buffer = io.BytesIO()
                writer(buffer)
                data = buffer.getvalue()
                (target.parent / f".{target.name}.crash.tmp").write_bytes(data[: len(data) // 2])
            else:
                original(path, writer)
            _kill_once(self.marker)

        files.atomic_write = write


class KillInEngineSampling(L.Callback):
    """SIGKILL once iteration ``iteration``'s first generation shard is written and its second is
    not, while the engine generator (vLLM) that sampled the first is still running (once).
    ``iteration``: 0-based, the first by default (the folder iteration_1)."""

    def __init__(self, marker: str, iteration: int = 0) -> None:
        self.marker, self.iteration = marker, iteration

    def setup(self, trainer, pl_module, stage) -> None:
        # setup, after the data module's: the first iteration samples before on_fit_start
        generator = trainer.datamodule.method.generator
        folder = trainer.datamodule.run_dir / f"iteration_{self.iteration + 1}"
        original = generator.sample

        def sample(*args, **kwargs):
            if (folder / "generations.shard_00000.parquet").exists() and \
                    not (folder / "generations.shard_00001.parquet").exists() and not Path(self.marker).exists():
                assert generator._engine is not None and generator._engine.alive
                _kill_once(self.marker)
            return original(*args, **kwargs)

        generator.sample = sample


class KillInEvaluation(L.Callback):
    """SIGKILL once as the win rate of epoch ``epoch``'s iteration starts to be measured (once)."""

    def __init__(self, marker: str, epoch: int = 0) -> None:
        self.marker, self.epoch = marker, epoch

    def on_fit_start(self, trainer, pl_module) -> None:
        from sppo_lightning.callbacks.self_play import SelfPlay

        (boundary,) = [c for c in trainer.callbacks if isinstance(c, SelfPlay)]
        original = boundary.win_rate.measure

        def measure(*args, **kwargs):
            if trainer.current_epoch == self.epoch:
                _kill_once(self.marker)
            return original(*args, **kwargs)

        boundary.win_rate.measure = measure
