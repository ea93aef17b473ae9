"""A run folder is input: each of these damages to a finished iteration's folder, then a resume on it,
ends in a finished run (the damaged part rebuilt, with a warning) or in one line naming the file; never
in a traceback, never touching a file outside the folder (a victim file beside it must survive)."""

import hashlib
import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from sppo_lightning.errors import SPPOLightningError
from tests.helpers import fit_self_play as fit


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def _write_manifest(folder: Path, manifest) -> None:
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def garbage_manifest(run: Path, outside: Path) -> None:
    (run / "iteration_1" / "manifest.json").write_bytes(b"\x00\xffnot json")


def list_manifest(run: Path, outside: Path) -> None:
    _write_manifest(run / "iteration_1", [1, 2, 3])


def traversing_stage_name(run: Path, outside: Path) -> None:
    folder = run / "iteration_1"
    manifest = _manifest(folder)
    rel = Path("..", "..", "..", *outside.relative_to("/").parts, "victim")
    manifest["stages"][f"generations.shard_/{rel}"] = {"rows": 1, "sha256": "0" * 64}
    (folder / "generations.shard_").mkdir()
    _write_manifest(folder, manifest)


def rows_not_a_number(run: Path, outside: Path) -> None:
    folder = run / "iteration_1"
    manifest = _manifest(folder)
    manifest["stages"]["rankings"]["rows"] = "many"
    _write_manifest(folder, manifest)


def truncated_rankings(run: Path, outside: Path) -> None:
    path = run / "iteration_1" / "rankings.parquet"
    path.write_bytes(path.read_bytes()[:100])


def column_dropped_with_its_checksum(run: Path, outside: Path) -> None:
    folder = run / "iteration_1"
    path = folder / "rankings.parquet"
    pq.write_table(pq.read_table(path).drop_columns(["rm_scores"]), path)
    manifest = _manifest(folder)
    manifest["stages"]["rankings"]["sha256"] = _sha(path)
    del manifest["stages"]["train"]
    _write_manifest(folder, manifest)


def generations_linked_outside(run: Path, outside: Path) -> None:
    path = run / "iteration_1" / "generations.parquet"
    shutil.copy(path, outside / "generations.parquet")
    path.unlink()
    path.symlink_to(outside / "generations.parquet")


def iteration_folder_linked_outside(run: Path, outside: Path) -> None:
    folder = run / "iteration_1"
    shutil.copytree(folder, outside / "iteration_1")
    shutil.rmtree(folder)
    folder.symlink_to(outside / "iteration_1")


def garbage_summary(run: Path, outside: Path) -> None:
    (run / "summary.json").write_text('{"iterations": [{"iteration": 1, "loss"')


def torn_loss_record(run: Path, outside: Path) -> None:
    with open(run / "losses.jsonl", "a") as f:
        f.write('{"step": 9, "iterat')


def empty_train(run: Path, outside: Path) -> None:
    (run / "iteration_1" / "train.parquet").write_bytes(b"")


def checksum_mismatch(run: Path, outside: Path) -> None:
    folder = run / "iteration_1"
    manifest = _manifest(folder)
    manifest["stages"]["generations"]["sha256"] = "f" * 64
    _write_manifest(folder, manifest)


def truncated_arrow(run: Path, outside: Path) -> None:
    for path in (run / "iteration_1").glob("train.*.arrow"):
        path.write_bytes(path.read_bytes()[:64])


DAMAGES = [garbage_manifest, list_manifest, traversing_stage_name, rows_not_a_number, truncated_rankings,
           column_dropped_with_its_checksum, generations_linked_outside, iteration_folder_linked_outside,
           garbage_summary, torn_loss_record, empty_train, checksum_mismatch, truncated_arrow]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_llama):
    base = tmp_path_factory.mktemp("finished")
    fit(base, tiny_llama, run_dir=base / "run")
    return base / "run"


@pytest.mark.parametrize("damage", DAMAGES, ids=[d.__name__ for d in DAMAGES])
def test_a_damaged_run_folder_is_rebuilt_or_one_line_and_nothing_outside_is_touched(tmp_path, tiny_llama, finished,
                                                                                     damage):
    run, outside = tmp_path / "run", tmp_path / "outside"
    shutil.copytree(finished, run, symlinks=True)
    outside.mkdir()
    (outside / "victim.parquet").write_text("keep me\n")
    damage(run, outside)
    before = {p.relative_to(outside): p.read_bytes() for p in sorted(outside.rglob("*")) if p.is_file()}
    try:
        fit(tmp_path, tiny_llama, run_dir=run)
        outcome = "rebuilt or reused"
    except SPPOLightningError as err:  # one line, naming what is wrong
        assert "\n" not in str(err) and len(str(err)) < 600, str(err)
        outcome = f"one line: {err}"
    print(f"\n{damage.__name__}: {outcome}")
    after = {p.relative_to(outside): p.read_bytes() for p in sorted(outside.rglob("*")) if p.is_file()}
    assert after == before, damage.__name__  # nothing outside read into, written or deleted
    if outcome == "rebuilt or reused":
        summary = json.loads((run / "summary.json").read_text())["iterations"]
        assert [row["iteration"] for row in summary] == [1]
        if damage is garbage_summary:  # rebuilt from the iteration's folder, then measured again
            assert summary[0]["pairs"] > 0 and summary[0]["final_loss"] is not None
