"""``<run_dir>/losses.jsonl``: each optimizer step's loss (and SPPO's target gap), for the report's
plot. Appended as training goes; a resumed run first drops the rows after its checkpoint's step."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from lightning.pytorch.utilities import rank_zero_warn

from sppo_lightning.files import append_json_line, atomic_write_bytes


def read_losses(path: Path) -> list[dict[str, Any]]:
    """The rows of the record (``step``, ``iteration``, ``loss``, ...); unreadable lines skipped."""
    rows = []
    if path.is_file() and not path.is_symlink():
        for line in path.read_text(errors="replace").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("iteration"), int) and isinstance(row.get("loss"), (int, float)):
                rows.append(row)
    return rows


def last_loss(rows: list[dict[str, Any]], iteration: int) -> Optional[float]:
    """The last step's loss of the 1-based ``iteration`` in ``read_losses``' rows (None: no step)."""
    losses = [row["loss"] for row in rows if row["iteration"] == iteration]
    return float(losses[-1]) if losses else None


def append_loss(path: Path, row: dict[str, Any]) -> None:
    """One JSON line (``files.append_json_line``: never through a symlink; ``keep_steps_up_to`` at
    start-up replaced any)."""
    append_json_line(path, row)


def keep_steps_up_to(path: Path, step: int) -> None:
    """Rewrite the per-step record ``path`` without rows after ``step`` (each step once after resumes).

    The record is appended to, so a crash or a full disk can cut its last line: unreadable lines are
    dropped with a warning, never blocking a resume. A symlink there (to a file outside the run, say)
    is not followed: it is removed, named in one warning, and the record starts afresh."""
    if path.is_symlink():
        rank_zero_warn(f"{path} is a symbolic link (to {os.readlink(path)}), not this run's own file; removed, "
                       f"and the loss record starts afresh (nothing is written through it)")
        path.unlink()
        return
    if not path.exists():
        return
    lines = path.read_text(errors="replace").splitlines()
    kept, torn = [], 0
    for line in lines:
        try:
            if int(json.loads(line)["step"]) <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            torn += line.strip() != ""
    if torn:
        rank_zero_warn(f"{path}: dropped {torn} unreadable line(s) (a write cut by a crash or a full disk)")
    if len(kept) != len(lines):
        atomic_write_bytes(path, "".join(line + "\n" for line in kept).encode())
