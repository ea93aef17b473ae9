"""The self-play run directory: one folder per iteration, one parquet file per stage.

    <run_dir>/iteration_<t>/generations.parquet   K responses per prompt (text and token ids)
    <run_dir>/iteration_<t>/rankings.parquet      the K×K pair logits and scores per prompt
    <run_dir>/iteration_<t>/train.parquet         chosen/rejected pairs, probabilities, reference log-probs
    <run_dir>/iteration_<t>/manifest.json         what is finished: rows and sha256 of each file
    <run_dir>/iteration_<t>/train.<sha>.arrow     train.parquet's training columns, memory-mapped

t counts from 1, as the console, the report and ``summary.json`` do.

A stage is made shard by shard (``<stage>.shard_<k>.parquet``, each recorded as it is written) and
then merged by streaming, one parquet row group per shard, so the next stage reads shard k alone
and no step holds more than one shard's rows.

Every file is written to a temporary name and renamed into place, so a crash leaves either the old
state or the new one. A stage counts as finished only when the manifest lists it and the file's
checksum matches; a file that does not match is redone, with a warning. Each file opens with
``datasets.load_dataset("parquet", data_files=...)`` or pandas.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any, BinaryIO, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from sppo_lightning import files
from sppo_lightning.errors import SettingsMismatch
from sppo_lightning.files import sha256_file
from sppo_lightning.iteration import iteration_dir
from sppo_lightning.step_store import recorded_steps, summed_counts

# The stage names this code writes: a stage, or one shard of it. Names read back from a manifest
# are accepted only in this form (a run folder is input: it may come from someone else).
STAGE_NAME = re.compile(r"[a-z][a-z_]*(\.shard_\d{5})?")


class StageRow(dict):
    """A row read back from a stage file. The run folder is input (it may have been edited, or made
    by other code, with checksums to match): a column the reader needs and the file lacks is one
    line naming the file, the row and the column, never a ``KeyError``."""

    def __init__(self, path: Path, number: int, row: dict[str, Any]) -> None:
        super().__init__(row)
        self.where = (path, number)

    def __missing__(self, key: str) -> Any:
        path, number = self.where
        raise not_written_here(path, key, number)


def not_written_here(path: Path, column: str, row: Optional[int] = None) -> Exception:
    """The one line for a stage file without a column this code writes (``row``: where it was missed)."""
    from sppo_lightning.errors import DataError

    at = f"row {row} has" if row is not None else "has"
    return DataError(f"{path}: {at} no column {column!r}: not a stage file this code wrote (edited, or from other "
                     f"code?); remove {path.parent} to redo the iteration")


class IterationArtifacts:
    """Read and write the stages of one iteration.

    Args:
        root: the run directory. iteration: the 0-based index of the iteration (epoch //
            epochs_per_iteration); its folder, like every count users see, starts at 1.
        settings: what the stages depend on (K, sampling, seed, ranker, prompts). A folder made
            with other settings is refused rather than silently mixed into this run.
    """

    def __init__(self, root: str | Path, iteration: int, settings: dict[str, Any]) -> None:
        self.dir = iteration_dir(root, iteration)
        self.manifest_path = self.dir / "manifest.json"
        self.settings = json.loads(json.dumps(settings))  # as it reads back from JSON
        if not self.manifest_path.exists() and any(self.dir.glob("*.parquet")):
            warnings.warn(f"{self.dir}: manifest.json is missing (deleted, or lost in a crash); the files there "
                          f"cannot be checked, so every stage of this iteration is redone")
        manifest = self._read_manifest()
        if manifest.get("settings", self.settings) != self.settings:
            changed = sorted(k for k in set(manifest["settings"]) | set(self.settings)
                             if manifest["settings"].get(k) != self.settings.get(k))
            raise SettingsMismatch(
                f"{self.dir} was made with other settings ({', '.join(changed)} differ); "
                f"resume with the same settings, or choose another run_dir"
            )

    def _read_manifest(self) -> dict[str, Any]:
        """The manifest as input: a JSON object whose stage names are of the form this code writes
        (``<stage>`` or ``<stage>.shard_<5 digits>``); any other name is dropped with a warning, so
        no path is ever built from it (a crafted name such as ``x/../../victim`` cannot reach a file
        outside the iteration's folder)."""
        if not self.manifest_path.exists():
            return {}
        try:
            manifest = json.loads(self.manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            warnings.warn(f"{self.manifest_path} is corrupt; every stage of this iteration is redone")
            return {}
        if not isinstance(manifest, dict) or not isinstance(manifest.get("stages", {}), dict):
            warnings.warn(f"{self.manifest_path} is not a manifest (not a JSON object with a 'stages' object); "
                          f"every stage of this iteration is redone")
            return {}
        stages = manifest.get("stages", {})
        foreign = [name for name in stages if not (isinstance(name, str) and STAGE_NAME.fullmatch(name))]
        if foreign:
            warnings.warn(f"{self.manifest_path}: stage name {foreign[0]!r} is not one this code writes; ignored "
                          f"({len(foreign)} such name(s))")
            manifest["stages"] = {k: v for k, v in stages.items() if k not in foreign}
        return manifest

    def path(self, stage: str) -> Path:
        if not STAGE_NAME.fullmatch(stage):  # never a path from a name this code did not make
            raise ValueError(f"not a stage name: {stage!r}")
        return self.dir / f"{stage}.parquet"

    def finished(self, stage: str, expect: Optional[dict[str, Any]] = None) -> bool:
        """Whether the stage is recorded in the manifest and its file is intact (checksum and row
        count; a damaged file warns). Reads no rows. ``expect``: manifest entries the stage must
        have (a shard's first row, the input it was made from); one that differs is redone, warned."""
        entry = self._read_manifest().get("stages", {}).get(stage)
        path = self.path(stage)
        if entry is None or not path.exists():
            return False
        differs = [k for k, v in (expect or {}).items() if entry.get("input", {}).get(k) != v]
        if "policy" in differs:
            warnings.warn(f"{path} was drawn from other weights than this run's π_t (fingerprint "
                          f"{entry.get('input', {}).get('policy')}, now {expect['policy']}: a restart without its "
                          f"checkpoint, or with other training settings); redoing {stage}")
            return False
        if differs:
            warnings.warn(f"{path} was made from other input ({', '.join(differs)} differ: another shard size, or "
                          f"a redone earlier stage); redoing {stage}")
            return False
        if sha256_file(path) != entry["sha256"]:
            warnings.warn(f"{path} does not match its manifest checksum (truncated or edited); redoing {stage}")
            return False
        rows = pq.read_metadata(path).num_rows
        if rows != entry["rows"]:
            warnings.warn(f"{path} has {rows} rows, its manifest says {entry['rows']}; redoing {stage}")
            return False
        return True

    def rows(self, stage: str) -> list[dict[str, Any]]:
        """The stage's rows (``StageRow``s), for a stage that ``finished`` has just verified."""
        path = self.path(stage)
        return [StageRow(path, n, row) for n, row in enumerate(pq.read_table(path).to_pylist(), 1)]

    def column(self, stage: str, name: str) -> list[Any]:
        """One column of a finished stage (a stage without it: one line, ``not_written_here``)."""
        if name not in pq.read_schema(self.path(stage)).names:
            raise not_written_here(self.path(stage), name)
        return pq.read_table(self.path(stage), columns=[name]).column(name).to_pylist()

    def num_shards(self, stage: str) -> int:
        """How many shards a merged stage holds (one parquet row group each, see ``merge``)."""
        return pq.ParquetFile(self.path(stage)).num_row_groups

    def read_shard(self, stage: str, shard: int) -> list[dict[str, Any]]:
        """The rows (``StageRow``s) of one shard of a merged stage: only that row group is read."""
        path = self.path(stage)
        first = self.shard_start(stage, shard)
        rows = pq.ParquetFile(path).read_row_group(shard).to_pylist()
        return [StageRow(path, first + n, row) for n, row in enumerate(rows, 1)]

    def shard_start(self, stage: str, shard: int) -> int:
        """The row number, in the whole merged stage, of the first row of ``shard``."""
        metadata = pq.read_metadata(self.path(stage))
        return sum(metadata.row_group(g).num_rows for g in range(shard))

    def merge(self, stage: str, parts: list[str], **info: Any) -> None:
        """Concatenate finished shard stages into ``stage``, one row group per non-empty shard,
        reading one shard at a time; then record it and remove the shards.

        The manifest entry gets ``info`` plus the sum of the shards' numeric entries (seconds,
        counts). Shards whose inferred column types differ (an all-empty list is ``null``-typed)
        are cast to one schema.
        """
        entries = [self.info(part) for part in parts]
        tables = [self.path(part) for part, entry in zip(parts, entries) if entry["rows"] > 0]
        schema = pa.unify_schemas([pq.read_schema(p) for p in tables], promote_options="permissive") if tables \
            else pa.schema([])

        def write(f: BinaryIO) -> None:
            with pq.ParquetWriter(f, schema) as writer:
                for path in tables:
                    table = pq.read_table(path)
                    writer.write_table(table.select(schema.names).cast(schema), row_group_size=table.num_rows)

        files.atomic_write(self.path(stage), write)
        self._record(stage, sum(e["rows"] for e in entries), **{**summed_counts(entries), **info})
        self.remove(*parts)

    def checksum(self, stage: str) -> str:
        """A short checksum of a finished stage's file: what a later stage records as its source."""
        return self.info(stage)["sha256"][:16]

    def memory_mapped(self, stage: str, columns: list[str]):
        """``columns`` of a finished stage as a ``datasets.Dataset`` memory-mapped from an Arrow file
        next to it (``<stage>.<checksum>.arrow``, written once, streamed from the parquet file by row
        group): a training set of any size costs page cache, not process memory."""
        from datasets import Dataset

        target = self.dir / f"{stage}.{self.checksum(stage)}.arrow"
        if target.exists():  # derived, so checked: a damaged or foreign one is made again
            rows = pq.ParquetFile(self.path(stage)).metadata.num_rows
            try:
                data = Dataset.from_file(str(target))
                if data.column_names == list(columns) and len(data) == rows:
                    return data
                problem = f"holds other columns or rows than {self.path(stage).name}"
            except (pa.ArrowInvalid, OSError, ValueError) as err:
                problem = f"is damaged ({type(err).__name__})"
            warnings.warn(f"{target} {problem}; made again from {self.path(stage).name}")
            target.unlink()
        source = pq.ParquetFile(self.path(stage))
        missing = [c for c in columns if c not in source.schema_arrow.names]
        if missing:
            raise not_written_here(self.path(stage), missing[0])
        schema = pa.schema([source.schema_arrow.field(c) for c in columns])

        def write(f: BinaryIO) -> None:
            with pa.ipc.new_stream(f, schema) as writer:
                for group in range(source.num_row_groups):
                    writer.write_table(source.read_row_group(group, columns=columns))

        files.atomic_write(target, write)
        for old in self.dir.glob(f"{stage}.*.arrow"):
            if old != target:
                old.unlink(missing_ok=True)  # made from an earlier, redone version of the stage
        return Dataset.from_file(str(target))

    def save(self, stage: str, rows: list[dict[str, Any]], **info: Any) -> None:
        """Write the stage's rows atomically, then record it in the manifest (also atomically)."""
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(rows), sink)
        files.atomic_write_bytes(self.path(stage), sink.getvalue().to_pybytes())
        self._record(stage, len(rows), **info)

    def _record(self, stage: str, rows: int, **info: Any) -> None:
        manifest = self._read_manifest()
        manifest["settings"] = self.settings
        manifest.setdefault("stages", {})[stage] = {"rows": rows, "sha256": sha256_file(self.path(stage)), **info}
        files.atomic_write_json(self.manifest_path, manifest)

    def stages(self, prefix: str = "") -> list[str]:
        """Names of the finished stages recorded in the manifest, optionally by prefix."""
        return sorted(k for k in self._read_manifest().get("stages", {}) if k.startswith(prefix))

    def remove(self, *stages: str) -> None:
        """Forget stages: their manifest entries first (one manifest write), then their files (a
        crash in between leaves orphan files that nothing reads)."""
        manifest = self._read_manifest()
        recorded = manifest.get("stages", {})
        if any(stage in recorded for stage in stages):
            for stage in stages:
                recorded.pop(stage, None)
            files.atomic_write_json(self.manifest_path, manifest)
        for stage in stages:
            self.path(stage).unlink(missing_ok=True)

    def info(self, stage: str) -> dict[str, Any]:
        return self._read_manifest().get("stages", {}).get(stage, {})

    def record_stats(self, stats: dict[str, Any], plugins: Optional[dict[str, Any]] = None) -> None:
        """The method's statistics of the iteration, in the manifest: for people and tools reading the
        run folder (the run itself takes them from what ``build`` returns); ``plugins``: the method,
        ranker and generator that made them (``contracts.plugins_of``)."""
        manifest = self._read_manifest()
        manifest["settings"] = self.settings
        manifest["stats"] = stats
        if plugins is not None:
            manifest["plugins"] = plugins
        files.atomic_write_json(self.manifest_path, manifest)


def recorded_stats(root: str | Path, iteration: int) -> dict[str, Any]:
    """The statistics ``record_stats`` wrote for the 0-based ``iteration`` ({} if none, or not an
    object). Only for a run resumed after an iteration ended but before its summary row was written
    (killed in its evaluation): a running iteration's statistics come from what ``build`` returned.
    A per-step draw has no folder: its line in ``steps.jsonl`` (``step_store.recorded_steps``)."""
    try:
        manifest = json.loads((iteration_dir(root, iteration) / "manifest.json").read_text())
    except (OSError, ValueError):
        return recorded_steps(root).get(iteration, {})
    stats = manifest.get("stats") if isinstance(manifest, dict) else None
    return stats if isinstance(stats, dict) else {}
