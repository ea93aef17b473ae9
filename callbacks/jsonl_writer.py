"""Write ``predict`` outputs (lists of dicts per batch) to a JSON-lines file."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter


class JsonlWriter(BasePredictionWriter):
    """Appends every predicted record as one JSON line, batch by batch (a crash keeps what was done).

    Args:
        path: output file; with several processes each rank writes ``<path>.rank<r>``.
    """

    def __init__(self, path: str) -> None:
        super().__init__(write_interval="batch")
        self.path = Path(path)

    def _file(self, trainer: L.Trainer) -> Path:
        return self.path if trainer.world_size == 1 else self.path.with_name(f"{self.path.name}.rank{trainer.global_rank}")

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._file(trainer).parent.mkdir(parents=True, exist_ok=True)
        self._file(trainer).write_text("")

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx) -> None:
        with self._file(trainer).open("a", encoding="utf-8") as f:
            for record in prediction:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
