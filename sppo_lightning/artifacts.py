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

import errno
import hashlib
import json
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, BinaryIO, Callable, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from sppo_lightning.errors import SettingsMismatch
from sppo_lightning.iteration import iteration_dir

# The stage names this code writes: a stage, or one shard of it. Names read back from a manifest
# are accepted only in this form (a run folder is input: it may come from someone else).
STAGE_NAME = re.compile(r"[a-z][a-z_]*(\.shard_\d{5})?")


def file_mode() -> int:
    """The mode a new file gets under the process's umask (0644 under 0022), as ``open`` gives it."""
    return 0o666 & ~_umask()


def readable_as_umask_says(*paths: str | Path) -> None:
    """Give files written through a private temporary (``mkstemp``'s 0600, or a library's) the mode
    the umask gives new files, so that colleagues on a shared machine read a run as they read HF's files."""
    mode = file_mode()
    for path in paths:
        path = Path(path)
        for file in ([path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]):
            os.chmod(file, mode)


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(f)`` on a temporary file next to ``path``, then rename it into place: a crash
    leaves the old file or the new one, never half of one. ``write`` may stream (no whole copy in memory)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fchmod(f.fileno(), file_mode())  # mkstemp makes it 0600
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            import shutil

            from sppo_lightning.errors import TrainingError

            free = shutil.disk_usage(path.parent).free / 2**20
            raise TrainingError(f"no space left in {path.parent} to write {path.name} ({free:.1f} MiB free); "
                                f"what was finished before is kept: free space, then resume with --ckpt_path "
                                f"last to redo only this file") from None
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path: Path, value: Any) -> None:
    atomic_write_bytes(path, json.dumps(value, indent=2, sort_keys=True).encode())


def folder_whole(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(folder)`` on a temporary folder next to ``path``, then put it in ``path``'s place
    (an earlier folder there is replaced only once the new one is complete): a crash or a full disk
    leaves the old folder or the new one, never a mix. A full disk is one line."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial"))
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    try:
        write(tmp)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not path.exists():
            os.replace(old, path)  # the earlier folder back in place
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            from sppo_lightning.errors import TrainingError

            free = shutil.disk_usage(path.parent).free / 2**20
            raise TrainingError(f"no space left in {path.parent} to write {path.name}/ ({free:.1f} MiB free); "
                                f"what was there before is kept: free space and export again") from None
        raise
    shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
        if _sha256(path) != entry["sha256"]:
            warnings.warn(f"{path} does not match its manifest checksum (truncated or edited); redoing {stage}")
            return False
        rows = pq.read_metadata(path).num_rows
        if rows != entry["rows"]:
            warnings.warn(f"{path} has {rows} rows, its manifest says {entry['rows']}; redoing {stage}")
            return False
        return True

    def rows(self, stage: str) -> list[dict[str, Any]]:
        """The stage's rows, unchecked: for a stage that ``finished`` has just verified."""
        return pq.read_table(self.path(stage)).to_pylist()

    def num_shards(self, stage: str) -> int:
        """How many shards a merged stage holds (one parquet row group each, see ``merge``)."""
        return pq.ParquetFile(self.path(stage)).num_row_groups

    def read_shard(self, stage: str, shard: int) -> list[dict[str, Any]]:
        """The rows of one shard of a merged stage: only that row group is read."""
        return pq.ParquetFile(self.path(stage)).read_row_group(shard).to_pylist()

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

        atomic_write(self.path(stage), write)
        totals: dict[str, Any] = {}
        for entry in entries:
            for key, value in entry.items():
                if key not in ("rows", "sha256") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    totals[key] = totals.get(key, 0) + value
        self._record(stage, sum(e["rows"] for e in entries), **{**totals, **info})
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
        if not target.exists():
            source = pq.ParquetFile(self.path(stage))
            schema = source.schema_arrow
            schema = pa.schema([schema.field(c) for c in columns])

            def write(f: BinaryIO) -> None:
                with pa.ipc.new_stream(f, schema) as writer:
                    for group in range(source.num_row_groups):
                        writer.write_table(source.read_row_group(group, columns=columns))

            atomic_write(target, write)
            for old in self.dir.glob(f"{stage}.*.arrow"):
                if old != target:
                    old.unlink(missing_ok=True)  # made from an earlier, redone version of the stage
        return Dataset.from_file(str(target))

    def save(self, stage: str, rows: list[dict[str, Any]], **info: Any) -> None:
        """Write the stage's rows atomically, then record it in the manifest (also atomically)."""
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(rows), sink)
        atomic_write_bytes(self.path(stage), sink.getvalue().to_pybytes())
        self._record(stage, len(rows), **info)

    def _record(self, stage: str, rows: int, **info: Any) -> None:
        manifest = self._read_manifest()
        manifest["settings"] = self.settings
        manifest.setdefault("stages", {})[stage] = {"rows": rows, "sha256": _sha256(self.path(stage)), **info}
        atomic_write_json(self.manifest_path, manifest)

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
            atomic_write_json(self.manifest_path, manifest)
        for stage in stages:
            self.path(stage).unlink(missing_ok=True)

    def info(self, stage: str) -> dict[str, Any]:
        return self._read_manifest().get("stages", {}).get(stage, {})

    def record_stats(self, stats: dict[str, Any]) -> None:
        """The method's statistics of the iteration, in the manifest: for people and tools reading the
        run folder (the run itself takes them from what ``build`` returns)."""
        manifest = self._read_manifest()
        manifest["settings"] = self.settings
        manifest["stats"] = stats
        atomic_write_json(self.manifest_path, manifest)


def run_stage(ctx, artifacts: IterationArtifacts, stage: str, compute, on_every_rank: bool = False,
              expect: Optional[dict[str, Any]] = None) -> None:
    """Make a stage unless it is finished: ``compute()`` returns ``(rows, info)`` and rank 0 writes.

    ``on_every_rank``: every rank computes (generation: each samples its share, then all gather);
    otherwise rank 0 alone computes (ranking, reference log-probs) and the others read its file.
    Rank 0 decides whether the stage is finished and every rank follows: a rank that looked for
    itself could see the file rank 0 has just written and skip a collective the others are in.
    ``expect``: manifest entries the stage must have to count as finished; they are recorded with it.
    ``ctx``: the processes (``pipeline.DistContext``: ``is_global_zero``, ``broadcast``, ``barrier``).
    """
    import time

    done = artifacts.finished(stage, expect) if ctx.is_global_zero else False
    if ctx.broadcast(done):  # rank 0 has just checked the file: every rank reuses it
        _reused(ctx, artifacts, stage)
        return
    if on_every_rank or ctx.is_global_zero:
        start = time.perf_counter()
        rows, info = compute()
        if ctx.is_global_zero:
            artifacts.save(stage, rows, seconds=time.perf_counter() - start, **info,
                           **({"input": expect} if expect else {}))
    ctx.barrier(f"stage_{stage}")  # the others read what rank 0 wrote when they need it


def memory_mapped_on_ranks(ctx, artifacts: IterationArtifacts, stage: str, columns: list[str]):
    """``artifacts.memory_mapped`` on every rank: rank 0 writes the Arrow file, the others open it
    after a barrier (two ranks writing the same file would race)."""
    if ctx.is_global_zero:
        data = artifacts.memory_mapped(stage, columns)
    ctx.barrier(f"arrow_{stage}")
    return data if ctx.is_global_zero else artifacts.memory_mapped(stage, columns)


def _reused(ctx, artifacts: IterationArtifacts, stage: str) -> None:
    """One line per stage or shard a resumed run takes from disk (a redone one is warned with its reason)."""
    if ctx.is_global_zero:
        from lightning.pytorch.utilities import rank_zero_info

        rank_zero_info(f"{artifacts.dir.name}: reusing {stage} ({artifacts.info(stage).get('rows', 0)} rows, "
                       f"finished earlier)")


def run_sharded_stage(ctx, artifacts: IterationArtifacts, stage: str, shards: int,
                      compute_shard: Callable[[int], tuple[list[dict], dict]], on_every_rank: bool = False,
                      source: Optional[dict[str, Any]] = None,
                      expect: Optional[Callable[[int], dict[str, Any]]] = None) -> None:
    """Make ``stage`` shard by shard, so that no more than one shard's rows are in memory.

    ``compute_shard(k)`` returns shard k's ``(rows, info)``; each shard is written as it finishes
    (stage ``<stage>.shard_<k>``), so a killed run redoes only the shard it was in. When all are
    written, rank 0 merges them into ``<stage>.parquet`` (one row group per shard, read back with
    ``read_shard``) and removes them. ``source``: what the stage is made from (checksums of earlier
    stages), recorded with it and with every shard: one made from anything else is redone.
    ``expect(k)``: what else shard k's entry must record (which prompts it holds).
    """
    source = source or {}
    done = artifacts.finished(stage, source) if ctx.is_global_zero else False
    if ctx.broadcast(done):
        _reused(ctx, artifacts, stage)
        if ctx.is_global_zero:  # shards left behind by a run killed between merging and removing
            artifacts.remove(*artifacts.stages(prefix=f"{stage}.shard_"))
        return
    parts = [f"{stage}.shard_{k:05d}" for k in range(shards)]
    for k, part in enumerate(parts):
        run_stage(ctx, artifacts, part, lambda k=k: compute_shard(k), on_every_rank,
                  expect={**source, **(expect(k) if expect else {})} or None)
    if ctx.is_global_zero:
        artifacts.merge(stage, parts, shards=shards, **({"input": source} if source else {}))
    ctx.barrier(f"merge_{stage}")


class RunSummary:
    """``<run_dir>/summary.json``: one row per finished iteration; a resumed run keeps earlier rows."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        saved = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.rows: list[dict[str, Any]] = saved.get("iterations", [])
        # What was measured of the initial policy before its first step (instruction following).
        self.initial: dict[str, Any] = saved.get("initial", {})

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
        atomic_write_json(self.path, {"iterations": self.rows, **({"initial": self.initial} if self.initial else {})})
