"""GGUF model paths (gguf.py): one line for what is not a GGUF file, the shipped-model lookup, and
the cached folder found by the file's hash. The conversion of a real GGUF file (SmolLM2) is in
tests_real/, where the package that ships it is installed."""

import subprocess
import sys
from pathlib import Path

import pytest

from sppo_lightning import gguf
from sppo_lightning.errors import ConfigError, LoadError
from sppo_lightning.models import load_causal_lm, load_tokenizer

REPO = Path(__file__).resolve().parents[1]


def test_a_missing_or_foreign_file_is_one_line(tmp_path):
    with pytest.raises(LoadError, match=r"model '.*nowhere.gguf' \(model.model_name_or_path\): no such GGUF file"):
        load_causal_lm(str(tmp_path / "nowhere.gguf"))
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 a zip, not a model")
    with pytest.raises(LoadError, match=r"not a GGUF file \(it starts with b'PK\\x03\\x04'"):
        load_tokenizer(str(fake))


def test_the_converted_folder_is_found_by_the_files_hash(tmp_path, monkeypatch):
    """A second start loads the folder converted before (no conversion), found by the hash; a
    changed file (another hash) is converted again."""
    monkeypatch.setenv("SPPO_LIGHTNING_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + b"\0" * 60)
    converted = []

    def fake_convert(path, folder):  # the real conversion needs a real GGUF file: tests_real/
        converted.append(folder)
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")

    monkeypatch.setattr(gguf, "convert", fake_convert)
    first = gguf.hf_folder(str(model))
    assert gguf.hf_folder(str(model)) == first and len(converted) == 1
    assert Path(first).name == f"m-{gguf.file_hash(model)[:16]}"
    model.write_bytes(b"GGUF" + b"\1" * 60)
    assert gguf.hf_folder(str(model)) != first and len(converted) == 2
    assert gguf.hf_folder("some/hub-id") == "some/hub-id"


def test_shipped_model_lookup_names_the_package():
    with pytest.raises(ConfigError, match="no shipped GGUF model named 'nope'; known: smollm2"):
        gguf.shipped_path("nope")
    result = subprocess.run([sys.executable, "-m", "sppo_lightning.gguf", "nope"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("sppo-lightning: error: no shipped GGUF model")


def test_a_missing_gguf_package_is_one_line(tmp_path, monkeypatch):
    import importlib.util

    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + b"\0" * 60)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ConfigError, match=r"m.gguf is a GGUF file: reading it needs the gguf package \(pip install gguf\)"):
        gguf.hf_folder(str(model))


def test_a_gguf_judge_is_fingerprinted_by_the_files_hash(tmp_path, monkeypatch):
    from sppo_lightning.ranking.protocol import weights_fingerprint

    monkeypatch.setenv("SPPO_LIGHTNING_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "judge.gguf"
    model.write_bytes(b"GGUF" + b"\0" * 60)
    first = weights_fingerprint(str(model))
    model.write_bytes(b"GGUF" + b"\1" * 60)
    assert first["sha256"] != weights_fingerprint(str(model))["sha256"]
