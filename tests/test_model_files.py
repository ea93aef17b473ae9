"""Model folders with missing or corrupt files: one line naming the folder, never a traceback wall."""

import shutil
import subprocess
import sys

import pytest

from sppo_lightning.errors import SPPOLightningError
from sppo_lightning.models import load_causal_lm, load_tokenizer
from tests.helpers import REPO


def broken(tiny_llama, tmp_path, damage):
    folder = tmp_path / "model"
    shutil.copytree(tiny_llama, folder)
    damage(folder)
    return str(folder)


def remove(*names):
    return lambda folder: [(folder / n).unlink() for n in names if (folder / n).exists()]


def overwrite(name, data: bytes):
    return lambda folder: (folder / name).write_bytes(data)


def truncate(name):
    return lambda folder: (folder / name).write_bytes((folder / name).read_bytes()[:1000])


DAMAGE = {
    "no tokenizer files": remove("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"),
    "no tokenizer.json": remove("tokenizer.json"),
    "tokenizer.json not JSON": overwrite("tokenizer.json", b"{not json"),
    "tokenizer_config.json not JSON": overwrite("tokenizer_config.json", b"\x00\x01"),
    "no config.json": remove("config.json"),
    "config.json not JSON": overwrite("config.json", b"{\"model_type\": "),
    "config.json of an unknown model": overwrite("config.json", b'{"model_type": "no-such-model"}'),
    "no weights": remove("model.safetensors"),
    "truncated weights": truncate("model.safetensors"),
    "weights not safetensors": overwrite("model.safetensors", b"hello"),
}


@pytest.mark.parametrize("what", list(DAMAGE))
def test_a_damaged_model_folder_is_one_line_naming_it(tiny_llama, tmp_path, what):
    folder = broken(tiny_llama, tmp_path, DAMAGE[what])
    for load in (load_tokenizer, load_causal_lm):
        try:
            load(folder)
        except SPPOLightningError as err:
            message = str(err)
            assert folder in message and "\n" not in message, message
        except Exception as err:  # noqa: BLE001 - the test is that nothing else escapes
            pytest.fail(f"{what}: {load.__name__} raised {type(err).__name__}: {str(err)[:300]}")


def test_the_cli_names_the_folder_and_key_of_a_missing_tokenizer(tiny_llama, tmp_path):
    folder = broken(tiny_llama, tmp_path, DAMAGE["no tokenizer files"])
    for command in (["fit", "--config", "configs/tiny_pairs.yaml", "--model.model_name_or_path", folder,
                     "--trainer.default_root_dir", str(tmp_path)],
                    ["generate", folder, "configs/data/tiny_prompts_eval.jsonl", str(tmp_path / "out.json"),
                     "--format", "alpaca_eval"]):
        result = subprocess.run([sys.executable, "-m", "sppo_lightning.cli", *command], cwd=REPO,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 2, result.stderr[-2000:]
        assert "Traceback" not in result.stderr
        (line,) = [line for line in result.stderr.splitlines() if line.startswith("sppo-lightning: error:")]
        assert folder in line and "model.model_name_or_path" in line, line
