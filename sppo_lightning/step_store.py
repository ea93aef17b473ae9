"""``StepDraw``: the stages of one per-step draw kept in memory, and ``<run_dir>/steps.jsonl``.

Methods that sample at every optimizer step (the online method, J-BOND) made a run folder per step
(``iteration_<t>/`` with three parquet files, a manifest, an Arrow file), most of a small step's
time. Their draws need no files to resume exactly: a run resumes at a step's end, and the next draw
is made again from the same weights and seed streams. So a step's stages live here, in memory, with
the interface of ``artifacts.IterationArtifacts`` that the stages use (``stage_runner.py``), and one
line per step is appended to the run's one store, ``steps.jsonl`` (its statistics and what made
them; a resumed run may append a step twice: readers take the last line). The settings that every
draw of the run must share are checked against ``steps_settings.json``, as a manifest checks an
iteration's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Optional

from sppo_lightning import files
from sppo_lightning.errors import SettingsMismatch
from sppo_lightning.iteration import iteration_number

STEPS = "steps.jsonl"
SETTINGS = "steps_settings.json"


class StepDraw:
    """One per-step draw's stages in memory (the ``IterationArtifacts`` methods the stages use).

    ``settings``: the method's settings of this draw; all but ``prompts`` (each step draws other
    prompts) must equal the run's first draw's (``steps_settings.json``), or ``SettingsMismatch``."""

    def __init__(self, root: str | Path, iteration: int, settings: dict[str, Any]) -> None:
        self.root, self.iteration = Path(root), iteration
        self.dir = self.root  # where a stage's messages point: the run folder (nothing per step)
        self.settings = json.loads(json.dumps({k: v for k, v in settings.items() if k != "prompts"}))
        self._shards: dict[str, list[list[dict[str, Any]]]] = {}  # stage -> its shards' rows
        self._info: dict[str, dict[str, Any]] = {}
        path = self.root / SETTINGS
        saved = read_json(path)
        if saved is not None and saved != self.settings:
            changed = sorted(k for k in set(saved) | set(self.settings) if saved.get(k) != self.settings.get(k))
            raise SettingsMismatch(f"{self.root} was made with other settings ({', '.join(changed)} differ); "
                                   f"resume with the same settings, or choose another run_dir")

    # ------------------------------------------------------------------ what stage_runner uses
    def finished(self, stage: str, expect: Optional[dict[str, Any]] = None) -> bool:
        return False  # nothing survives a step: a resumed run draws it again

    def save(self, stage: str, rows: list[dict[str, Any]], **info: Any) -> None:
        self._shards[stage] = [list(rows)]
        self._info[stage] = {"rows": len(rows), **info}

    def merge(self, stage: str, parts: list[str], **info: Any) -> None:
        """The shards' rows as one stage (each shard kept as such); numeric entries summed."""
        totals = summed_counts(self._info[part] for part in parts)
        self._shards[stage] = [self._shards[part][0] for part in parts]
        self._info[stage] = {"rows": sum(len(s) for s in self._shards[stage]), **totals, **info}
        self.remove(*parts)

    def stages(self, prefix: str = "") -> list[str]:
        return sorted(k for k in self._info if k.startswith(prefix))

    def remove(self, *stages: str) -> None:
        for stage in stages:
            self._shards.pop(stage, None)
            self._info.pop(stage, None)

    def info(self, stage: str) -> dict[str, Any]:
        return self._info.get(stage, {})

    # ------------------------------------------------------------------ what the methods read
    def checksum(self, stage: str) -> str:
        return f"memory:{self._info[stage]['rows']}"  # nothing is reused, so nothing to compare

    def num_shards(self, stage: str) -> int:
        return len(self._shards[stage])

    def read_shard(self, stage: str, shard: int) -> list[dict[str, Any]]:
        return self._shards[stage][shard]

    def shard_start(self, stage: str, shard: int) -> int:
        return sum(len(s) for s in self._shards[stage][:shard])

    def column(self, stage: str, name: str) -> list[Any]:
        return [row[name] for shard in self._shards[stage] for row in shard]

    def dataset(self, stage: str, columns: list[str]):
        """The stage's ``columns`` as a ``datasets.Dataset`` in memory (what training reads)."""
        from datasets import Dataset

        rows = [row for shard in self._shards[stage] for row in shard]
        return Dataset.from_dict({c: [row[c] for row in rows] for c in columns})

    def record_stats(self, stats: dict[str, Any], plugins: Optional[dict[str, Any]] = None) -> None:
        """The step's line in ``steps.jsonl`` (rank 0): its number, statistics and what made them.
        The run's settings go to ``steps_settings.json`` with its first line."""
        self.root.mkdir(parents=True, exist_ok=True)
        if not (self.root / SETTINGS).exists():
            files.atomic_write_json(self.root / SETTINGS, self.settings)
        files.append_json_line(self.root / STEPS, {"iteration": iteration_number(self.iteration), "stats": stats,
                                                   **({"plugins": plugins} if plugins is not None else {})})


def summed_counts(entries: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The sum of the shards' numeric entries (seconds, counts), ``rows`` and checksums aside: what
    a merged stage records of its shards (here and in ``IterationArtifacts.merge``)."""
    totals: dict[str, Any] = {}
    for entry in entries:
        for key, value in entry.items():
            if key not in ("rows", "sha256") and isinstance(value, (int, float)) and not isinstance(value, bool):
                totals[key] = totals.get(key, 0) + value
    return totals


def read_json(path: Path) -> Optional[dict[str, Any]]:
    """A JSON object from ``path``, or None where there is none (missing, unreadable, not an object)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def recorded_steps(root: str | Path) -> dict[int, dict[str, Any]]:
    """Each recorded step's statistics by its 0-based iteration (the last line of a step wins; torn
    or foreign lines are skipped: the file is input)."""
    path = Path(root) / STEPS
    found: dict[int, dict[str, Any]] = {}
    if not path.is_file() or path.is_symlink():
        return found
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        number, stats = (row.get("iteration"), row.get("stats")) if isinstance(row, dict) else (None, None)
        if isinstance(number, int) and not isinstance(number, bool) and number >= 1 and isinstance(stats, dict):
            found[number - 1] = stats
    return found
