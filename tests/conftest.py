import os

# No test may reach the network: hub lookups fail at once instead of retrying for half a minute.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One torch thread per test process (and per CLI run it starts): the suite runs two test files at a
# time (pytest-xdist, pyproject's addopts), and the tiny models run faster on one thread than on two
# (the quickstart: 13.8 s of CPU on one thread, 16.9 s on two, the same numbers).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The CLI's help cache (and anything else of ours that caches) in a temporary folder, not ~/.cache.
os.environ["SPPO_LIGHTNING_CACHE"] = __import__("tempfile").mkdtemp(prefix="sppo-lightning-test-cache-")

import json  # noqa: E402

import pytest  # noqa: E402

from sppo_lightning.testing import make_tiny_llama  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    """A tiny random Llama + BPE tokenizer with a chat template, saved to disk once per session."""
    return str(make_tiny_llama(tmp_path_factory.mktemp("models") / "llama"))


@pytest.fixture(scope="session")
def tokenizer(tiny_llama):
    from sppo_lightning.models import load_tokenizer

    return load_tokenizer(tiny_llama)


@pytest.fixture(scope="session")
def tiny_pairrm(tmp_path_factory) -> tuple[str, str]:
    """One tiny random PairRM in both layouts: (llm-blender folder, Hugging Face folder)."""
    from sppo_lightning.testing import make_tiny_pairrm

    blender_dir, hf_dir = make_tiny_pairrm(tmp_path_factory.mktemp("pairrm"))
    return str(blender_dir), str(hf_dir)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The quickstart's models, built exactly as the README does: python -m sppo_lightning.testing <dir>."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("quickstart") / "tiny"
    built = subprocess.run([sys.executable, "-m", "sppo_lightning.testing", str(out)], check=True,
                           capture_output=True, text=True)
    # a line before each model's build, then where it went: the first minutes are never silent
    assert [line[:5] for line in built.stdout.splitlines()] == ["[1/2]", "tiny ", "[2/2]", "tiny "], built.stdout
    return out


PROMPTS = ["What is 2 plus 3?", "Name a color.", "Count to three.", "What is the sky?"]
CHOSEN = ["2 plus 3 is 5.", "Blue.", "one two three.", "The sky is blue."]
REJECTED = ["I do not know.", "Numbers are hard.", "one and so on.", "Red."]


@pytest.fixture()
def pair_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    with path.open("w") as f:
        for i, (p, c, r) in enumerate(zip(PROMPTS, CHOSEN, REJECTED)):
            row = {
                "chosen": [{"role": "user", "content": p}, {"role": "assistant", "content": c}],
                "rejected": [{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                "chosen_probs": 0.8, "chosen_probs_win": 0.6 + 0.05 * i, "chosen_probs_lose": 0.3,
            }
            f.write(json.dumps(row) + "\n")
    return str(path)


def pytest_xdist_auto_num_workers(config):
    """One test file asked for (``pytest -q tests/test_x.py``): run it in this process; ``-n auto``
    would only start workers for one file (``--dist loadfile`` gives each file to one worker)."""
    if len(config.args) == 1 and config.args[0].split("::")[0].endswith(".py"):
        return 0
    return None
