"""The self-play run directory: one folder per iteration, one parquet file per stage.

    <run_dir>/iteration_<t>/generations.parquet   K responses per prompt (text and token ids)
    <run_dir>/iteration_<t>/rankings.parquet      the K×K pair logits and scores per prompt
    <run_dir>/iteration_<t>/train.parquet         chosen/rejected pairs, probabilities, reference log-probs
    <run_dir>/iteration_<t>/manifest.json         what is finished: rows and sha256 of each file

Every file is written to a temporary name and renamed into place, so a crash leaves either the old
state or the new one. A stage counts as finished only when the manifest lists it and the file's
checksum matches; a file that does not match is redone, with a warning. Each file opens with
``datasets.load_dataset("parquet", data_files=...)`` or pandas.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from sppo_lightning.errors import ConfigError


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, value: Any) -> None:
    atomic_write_bytes(path, json.dumps(value, indent=2, sort_keys=True).encode())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class IterationArtifacts:
    """Read and write the stages of one iteration.

    Args:
        root: the run directory. iteration: t.
        settings: what the stages depend on (K, sampling, seed, ranker, prompts). A folder made
            with other settings is refused rather than silently mixed into this run.
    """

    def __init__(self, root: str | Path, iteration: int, settings: dict[str, Any]) -> None:
        self.dir = Path(root) / f"iteration_{iteration}"
        self.manifest_path = self.dir / "manifest.json"
        self.settings = json.loads(json.dumps(settings))  # as it reads back from JSON
        manifest = self._read_manifest()
        if manifest.get("settings", self.settings) != self.settings:
            changed = sorted(k for k in set(manifest["settings"]) | set(self.settings)
                             if manifest["settings"].get(k) != self.settings.get(k))
            raise ConfigError(
                f"{self.dir} was made with other settings ({', '.join(changed)} differ); "
                f"resume with the same settings, or choose another run_dir"
            )

    def _read_manifest(self) -> dict[str, Any]:
        if not self.manifest_path.exists():
            return {}
        try:
            return json.loads(self.manifest_path.read_text())
        except json.JSONDecodeError:
            warnings.warn(f"{self.manifest_path} is corrupt; every stage of this iteration is redone")
            return {}

    def path(self, stage: str) -> Path:
        return self.dir / f"{stage}.parquet"

    def load(self, stage: str) -> Optional[list[dict[str, Any]]]:
        """The stage's rows if it finished intact, else None (a damaged file warns)."""
        entry = self._read_manifest().get("stages", {}).get(stage)
        path = self.path(stage)
        if entry is None or not path.exists():
            return None
        if _sha256(path) != entry["sha256"]:
            warnings.warn(f"{path} does not match its manifest checksum (truncated or edited); redoing {stage}")
            return None
        rows = pq.read_table(path).to_pylist()
        if len(rows) != entry["rows"]:
            warnings.warn(f"{path} has {len(rows)} rows, its manifest says {entry['rows']}; redoing {stage}")
            return None
        return rows

    def save(self, stage: str, rows: list[dict[str, Any]], **info: Any) -> None:
        """Write the stage's rows atomically, then record it in the manifest (also atomically)."""
        path = self.path(stage)
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(rows), sink)
        atomic_write_bytes(path, sink.getvalue().to_pybytes())
        manifest = self._read_manifest()
        manifest["settings"] = self.settings
        manifest.setdefault("stages", {})[stage] = {"rows": len(rows), "sha256": _sha256(path), **info}
        atomic_write_json(self.manifest_path, manifest)

    def stages(self, prefix: str = "") -> list[str]:
        """Names of the finished stages recorded in the manifest, optionally by prefix."""
        return sorted(k for k in self._read_manifest().get("stages", {}) if k.startswith(prefix))

    def remove(self, stage: str) -> None:
        """Forget a stage: its manifest entry first, then its file (a crash in between leaves an
        orphan file that nothing reads)."""
        manifest = self._read_manifest()
        if stage in manifest.get("stages", {}):
            del manifest["stages"][stage]
            atomic_write_json(self.manifest_path, manifest)
        self.path(stage).unlink(missing_ok=True)

    def info(self, stage: str) -> dict[str, Any]:
        return self._read_manifest().get("stages", {}).get(stage, {})


def run_stage(trainer, artifacts: IterationArtifacts, stage: str, compute, on_every_rank: bool = False) -> list[dict]:
    """Read a finished stage back, or make it: ``compute()`` returns ``(rows, info)`` and rank 0 writes.

    ``on_every_rank``: every rank computes (generation: each samples its share, then all gather);
    otherwise rank 0 alone computes (ranking, reference log-probs) and the others read its file.
    Rank 0 decides whether the stage is finished and every rank follows: a rank that looked for
    itself could see the file rank 0 has just written and skip a collective the others are in.
    """
    import time

    rows = artifacts.load(stage) if trainer.is_global_zero else None
    if trainer.strategy.broadcast(rows is not None):
        return rows if rows is not None else artifacts.load(stage)
    if on_every_rank or trainer.is_global_zero:
        start = time.perf_counter()
        rows, info = compute()
        if trainer.is_global_zero:
            artifacts.save(stage, rows, seconds=time.perf_counter() - start, **info)
    trainer.strategy.barrier(f"stage_{stage}")
    return rows if rows is not None else artifacts.load(stage)


class RunSummary:
    """``<run_dir>/summary.json``: one row per finished iteration; a resumed run keeps earlier rows."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.rows: list[dict[str, Any]] = json.loads(self.path.read_text())["iterations"] if self.path.exists() else []

    def record(self, row: dict[str, Any], write: bool = True) -> None:
        """Add (or replace) the row of ``row["iteration"]``; ``write`` on rank 0 only."""
        self.rows = [r for r in self.rows if r["iteration"] != row["iteration"]] + [row]
        if write:
            atomic_write_json(self.path, {"iterations": self.rows})
