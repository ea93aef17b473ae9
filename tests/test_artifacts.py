import json

import pytest

from sppo_lightning.artifacts import IterationArtifacts
from sppo_lightning.errors import ConfigError

ROWS = [{"prompt": "a", "response_ids": [[1, 2], [3]], "score": 0.5}, {"prompt": "b", "response_ids": [[4], [5]], "score": -1.0}]


def test_roundtrip_and_manifest(tmp_path):
    art = IterationArtifacts(tmp_path, 3, {"k": 2})
    assert art.load("generations") is None
    art.save("generations", ROWS, seconds=1.5)
    assert IterationArtifacts(tmp_path, 3, {"k": 2}).load("generations") == ROWS
    manifest = json.loads((tmp_path / "iteration_3" / "manifest.json").read_text())
    assert manifest["stages"]["generations"]["rows"] == 2
    assert manifest["stages"]["generations"]["seconds"] == 1.5
    assert not [p for p in (tmp_path / "iteration_3").iterdir() if p.name.endswith(".tmp")]
    import datasets  # every stage is a plain dataset on disk

    ds = datasets.load_dataset("parquet", data_files=str(art.path("generations")), split="train")
    assert ds[1]["prompt"] == "b"


def test_truncated_file_is_detected_and_redone(tmp_path):
    art = IterationArtifacts(tmp_path, 0, {})
    art.save("rankings", ROWS)
    data = art.path("rankings").read_bytes()
    art.path("rankings").write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="does not match its manifest checksum"):
        assert art.load("rankings") is None


def test_a_file_without_manifest_entry_is_not_trusted(tmp_path):
    art = IterationArtifacts(tmp_path, 0, {})
    art.path("train").parent.mkdir(parents=True)
    art.path("train").write_bytes(b"half-written")
    assert art.load("train") is None


def test_other_settings_are_refused(tmp_path):
    IterationArtifacts(tmp_path, 0, {"num_samples": 5, "seed": 0}).save("generations", ROWS)
    with pytest.raises(ConfigError, match=r"iteration_0 was made with other settings \(num_samples differ\)"):
        IterationArtifacts(tmp_path, 0, {"num_samples": 4, "seed": 0})
