import json

import pytest
import torch

from sppo_lightning.artifacts import IterationArtifacts
from sppo_lightning.errors import ConfigError

def load(art, stage):
    """The stage's rows if it finished intact (its checks, as a resumed run makes them), else None."""
    return art.rows(stage) if art.finished(stage) else None


ROWS = [{"prompt": "a", "response_ids": [[1, 2], [3]], "score": 0.5}, {"prompt": "b", "response_ids": [[4], [5]], "score": -1.0}]


def test_roundtrip_and_manifest(tmp_path):
    art = IterationArtifacts(tmp_path, 3, {"k": 2})
    assert load(art, "generations") is None
    art.save("generations", ROWS, seconds=1.5)
    assert load(IterationArtifacts(tmp_path, 3, {"k": 2}), "generations") == ROWS
    manifest = json.loads((tmp_path / "iteration_4" / "manifest.json").read_text())
    assert manifest["stages"]["generations"]["rows"] == 2
    assert manifest["stages"]["generations"]["seconds"] == 1.5
    assert not [p for p in (tmp_path / "iteration_4").iterdir() if p.name.endswith(".tmp")]
    import datasets  # every stage is a plain dataset on disk

    ds = datasets.load_dataset("parquet", data_files=str(art.path("generations")), split="train")
    assert ds[1]["prompt"] == "b"


def test_truncated_file_is_detected_and_redone(tmp_path):
    art = IterationArtifacts(tmp_path, 0, {})
    art.save("rankings", ROWS)
    data = art.path("rankings").read_bytes()
    art.path("rankings").write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="does not match its manifest checksum"):
        assert load(art, "rankings") is None


def test_a_file_without_manifest_entry_is_not_trusted(tmp_path):
    art = IterationArtifacts(tmp_path, 0, {})
    art.path("train").parent.mkdir(parents=True)
    art.path("train").write_bytes(b"half-written")
    assert load(art, "train") is None


def test_other_settings_are_refused(tmp_path):
    IterationArtifacts(tmp_path, 0, {"num_samples": 5, "seed": 0}).save("generations", ROWS)
    with pytest.raises(ConfigError, match=r"iteration_1 was made with other settings \(num_samples differ\)"):
        IterationArtifacts(tmp_path, 0, {"num_samples": 4, "seed": 0})


SHARDS = [
    [{"prompt": "a", "response_ids": [[1, 2], [3]]}, {"prompt": "b", "response_ids": [[4], [5]]}],
    [],  # every prompt of this shard tied: no rows
    [{"prompt": "c", "response_ids": [[], []]}],  # empty responses: a null-typed column in this shard alone
]


def test_merge_streams_shards_into_row_groups_and_sums_their_counts(tmp_path):
    art = IterationArtifacts(tmp_path, 0, {})
    for k, rows in enumerate(SHARDS):
        art.save(f"train.shard_{k:05d}", rows, seconds=1.5, ties_dropped=k, input={"generations": "abc"})
    art.merge("train", [f"train.shard_{k:05d}" for k in range(3)], shards=3)
    assert load(art, "train") == SHARDS[0] + SHARDS[2]
    assert art.num_shards("train") == 2 and art.read_shard("train", 1) == SHARDS[2]
    assert art.shard_start("train", 1) == 2
    entry = art.info("train")
    assert (entry["rows"], entry["seconds"], entry["ties_dropped"], entry["shards"]) == (3, 4.5, 3, 3)
    assert art.stages() == ["train"] and not list(art.dir.glob("*.shard_*"))


def test_a_shard_made_from_other_input_is_redone(tmp_path):
    art = IterationArtifacts(tmp_path, 0, {})
    art.save("rankings.shard_00001", ROWS, input={"generations": "abc", "first_prompt": 4})
    assert art.finished("rankings.shard_00001", {"generations": "abc", "first_prompt": 4})
    with pytest.warns(UserWarning, match=r"made from other input \(first_prompt differ"):
        assert not art.finished("rankings.shard_00001", {"generations": "abc", "first_prompt": 8})


def test_memory_mapped_serves_columns_from_an_arrow_file_made_once(tmp_path):
    art = IterationArtifacts(tmp_path, 0, {})
    art.save("train", ROWS)
    served = art.memory_mapped("train", ["response_ids", "score"])
    (arrow,) = art.dir.glob("train.*.arrow")
    assert [f["filename"] for f in served.cache_files] == [str(arrow)]
    assert [dict(served[i]) for i in range(2)] == [{"response_ids": r["response_ids"], "score": r["score"]} for r in ROWS]
    made = arrow.stat().st_mtime_ns
    art.memory_mapped("train", ["response_ids", "score"])
    assert arrow.stat().st_mtime_ns == made  # reused
    art.save("train", ROWS[:1])  # the stage was redone: a new file, the stale one removed
    assert len(art.memory_mapped("train", ["score"])) == 1
    assert len(list(art.dir.glob("train.*.arrow"))) == 1


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_we_write_get_the_mode_the_umask_gives(tmp_path, tiny_llama, umask, mode):
    import os

    from transformers import AutoModelForCausalLM

    from sppo_lightning.files import atomic_write_json
    from sppo_lightning.models import export_hf

    previous = os.umask(umask)
    try:
        atomic_write_json(tmp_path / "summary.json", {"iterations": []})
        IterationArtifacts(tmp_path, 0, {}).save("train", ROWS)
        export_hf(AutoModelForCausalLM.from_pretrained(tiny_llama), None, tmp_path / "hf_model")
    finally:
        os.umask(previous)
    written = [tmp_path / "summary.json", tmp_path / "iteration_1" / "train.parquet",
               tmp_path / "iteration_1" / "manifest.json", tmp_path / "hf_model" / "model.safetensors"]
    assert {oct(p.stat().st_mode & 0o777) for p in written} == {oct(mode)}


def test_a_full_disk_mid_stage_is_one_line_and_keeps_what_was_finished(tmp_path):
    import errno

    from sppo_lightning.files import atomic_write
    from sppo_lightning.errors import TrainingError

    art = IterationArtifacts(tmp_path, 0, {})
    art.save("generations.shard_00000", ROWS)
    before = art.path("generations.shard_00000").read_bytes()

    def fills_the_disk(f):
        f.write(b"PAR1 half a shard")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(TrainingError, match=rf"^no space left in {art.dir} to write generations.shard_00001.parquet "
                                            rf"\(.* MiB free\); what was finished before is kept"):
        atomic_write(art.path("generations.shard_00001"), fills_the_disk)
    assert art.path("generations.shard_00000").read_bytes() == before and art.finished("generations.shard_00000")
    assert not art.path("generations.shard_00001").exists() and not list(art.dir.glob(".*.tmp"))
    assert art.stages() == ["generations.shard_00000"]  # the resume redoes shard 1 only


def test_an_export_folder_is_replaced_whole_or_kept_on_a_full_disk(tmp_path, tiny_llama):
    """export_hf writes beside its name and renames (files.folder_whole): an earlier export stays until
    the new one is complete, and a disk that fills mid-export is one line that keeps it."""
    import errno

    from transformers import AutoModelForCausalLM

    from sppo_lightning.errors import TrainingError
    from sppo_lightning.models import export_hf

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    out = tmp_path / "hf_model"
    export_hf(model, None, out)
    before = (out / "model.safetensors").read_bytes()
    real = type(model).save_pretrained

    def fills_the_disk(self, folder, **kwargs):
        real(self, folder, **kwargs)  # most of it written, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    type(model).save_pretrained = fills_the_disk
    try:
        with pytest.raises(TrainingError, match=rf"^no space left in {tmp_path} to write hf_model/ \(.* MiB free\); "
                                                rf"what was there before is kept"):
            export_hf(model, None, out)
    finally:
        type(model).save_pretrained = real
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf_model"]  # no temporary left beside it
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    export_hf(model, None, out)  # replaced, whole
    assert (out / "model.safetensors").read_bytes() != before and sorted(p.name for p in tmp_path.iterdir()) == ["hf_model"]


def test_a_crafted_stage_name_in_the_manifest_touches_nothing_outside(tmp_path):
    """The reproduction of the run-folder trust issue: a manifest names a stage
    'generations.shard_/../../../<dir>/victim' (with an empty folder 'generations.shard_' beside it,
    so that the path would resolve); reusing the merged stage removes its shards by name. The
    victim outside the run folder survives, and the name is dropped with one warning."""
    from sppo_lightning.stage_runner import run_sharded_stage
    from sppo_lightning.distributed import DistContext

    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim.parquet"
    victim.write_bytes(b"precious")
    run = tmp_path / "run"
    art = IterationArtifacts(run, 0, {})
    run_sharded_stage(DistContext(), art, "generations", 2, lambda k: (ROWS, {}))
    (art.dir / "generations.shard_").mkdir()
    manifest = json.loads(art.manifest_path.read_text())
    crafted = "generations.shard_/../../../outside/victim"
    assert (art.dir / f"{crafted}.parquet").resolve() == victim.resolve()  # the path the old code unlinked
    manifest["stages"][crafted] = {"rows": 1, "sha256": "0"}
    art.manifest_path.write_text(json.dumps(manifest))
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = IterationArtifacts(run, 0, {})
        run_sharded_stage(DistContext(), again, "generations", 2, lambda k: (ROWS, {}))
    assert victim.exists() and victim.read_bytes() == b"precious"
    assert any("is not one this code writes; ignored" in str(w.message) for w in caught)
    with pytest.raises(ValueError, match="not a stage name"):
        again.path(crafted)


@pytest.mark.parametrize("text", ["[1, 2]", '{"stages": [1]}', "\\udcff not json"])
def test_a_manifest_that_is_not_one_is_redone_with_one_warning(tmp_path, text):
    art = IterationArtifacts(tmp_path, 0, {})
    art.save("rankings", ROWS)
    art.manifest_path.write_text(text)
    with pytest.warns(UserWarning, match="redone"):
        assert load(IterationArtifacts(tmp_path, 0, {}), "rankings") is None
