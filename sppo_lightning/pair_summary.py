"""``<default_root_dir>/summary.json`` of a pair run (a fixed preference file, no self-play): the loss,
its settings and the last metrics, in one place a user finds without reading ``hparams.yaml`` and
``metrics.csv`` (a self-play run's summary is ``<run_dir>/summary.json``, one row per iteration)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from sppo_lightning.files import atomic_write_json


def pair_summary(hparams: dict[str, Any], metrics: dict[str, Any], steps: int, epochs: int) -> dict[str, Any]:
    """The summary of a finished pair run: ``loss``, ``settings`` (the module's JSON-able hparams),
    ``steps`` (optimizer steps), ``epochs`` and ``metrics`` (the last ``train/*`` and ``val/*``
    values; NaN as null)."""
    settings = {k: v for k, v in hparams.items() if not k.startswith("_") and _jsonable(v)}
    last = {}
    for key, value in sorted(metrics.items()):
        if key.startswith(("train/", "val/")):
            number = float(value)
            last[key] = number if math.isfinite(number) else None
    return {"loss": hparams.get("loss"), "settings": settings, "steps": steps, "epochs": epochs, "metrics": last}


def write_pair_summary(root: str | Path, summary: dict[str, Any]) -> tuple[Path, str]:
    """Write ``<root>/summary.json``; return its path and the run's one line for the console."""
    path = Path(root) / "summary.json"
    atomic_write_json(path, summary)
    numbers = " | ".join(f"{k} {v:.4g}" for k, v in summary["metrics"].items()
                         if v is not None and k in ("train/loss", "val/loss"))
    line = f"pair run | loss {summary['loss']} | {summary['steps']} steps, {summary['epochs']} epoch(s)"
    return path, line + (f" | {numbers}" if numbers else "") + f" (summary, with every setting: {path})"


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False
