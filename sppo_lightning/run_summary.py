"""``<run_dir>/summary.json``: one row per finished iteration, and what was measured of the initial policy."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from sppo_lightning.files import atomic_write_json


class RunSummary:
    """``<run_dir>/summary.json``: one row per finished iteration; a resumed run keeps earlier rows."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        saved = read_summary(self.path)
        self.damaged = bool(saved.get("damaged"))  # kept aside: the caller rebuilds what it can
        self.rows: list[dict[str, Any]] = saved["iterations"]
        # What was measured of the initial policy before its first step (instruction following).
        self.initial: dict[str, Any] = saved["initial"]
        # What made the rows: the method, its ranker and generator (``contracts.plugins_of``).
        self.setup: dict[str, Any] = saved.get("setup", {})

    def record(self, row: dict[str, Any], write: bool = True) -> None:
        """Add (or replace) the row of ``row["iteration"]``; ``write`` on rank 0 only."""
        self.rows = [r for r in self.rows if r["iteration"] != row["iteration"]] + [row]
        if write:
            self._write()

    def record_initial(self, values: dict[str, Any], write: bool = True) -> None:
        self.initial = dict(values)
        if write:
            self._write()

    def _write(self) -> None:
        atomic_write_json(self.path, {**({"setup": self.setup} if self.setup else {}), "iterations": self.rows,
                                      **({"initial": self.initial} if self.initial else {})})


def read_summary(path: Path) -> dict[str, Any]:
    """``{"iterations": [...], "initial": {...}}`` as this code writes it, or empty where there is none.

    The file is input (a run folder may have been edited, cut by a full disk, or come from someone
    else): one that is not such an object, or has a row without an integer ``iteration``, is kept
    as ``summary.json.damaged`` with one warning, and ``damaged`` is set: the run goes on, rebuilding
    the rows it can from each iteration's folder (``SelfPlay``), and nothing is lost."""
    empty: dict[str, Any] = {"iterations": [], "initial": {}}
    if not path.exists():
        return empty
    try:
        saved = json.loads(path.read_text())
        problem = _schema_problem(saved)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        problem = f"not readable as JSON ({type(err).__name__})"
    if problem is None:
        setup = saved.get("setup", {})
        return {"iterations": saved.get("iterations", []), "initial": saved.get("initial", {}),
                "setup": setup if isinstance(setup, dict) else {}}
    kept = path.with_name(path.name + ".damaged")
    os.replace(path, kept)
    warnings.warn(f"{path}: {problem}; kept as {kept.name}, and the summary is rebuilt from the iterations' own "
                  f"folders (their statistics and losses; win rates measured before are in {kept.name})")
    return {**empty, "damaged": True}


def _schema_problem(saved: Any) -> str | None:
    if not isinstance(saved, dict):
        return f"a JSON {type(saved).__name__}, not an object"
    rows, initial = saved.get("iterations", []), saved.get("initial", {})
    if not isinstance(rows, list) or not isinstance(initial, dict):
        return "'iterations' is not a list or 'initial' is not an object"
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict) or isinstance(row.get("iteration"), bool) or not isinstance(row.get("iteration"), int):
            return f"row {n} of 'iterations' has no integer 'iteration'"
    return None
