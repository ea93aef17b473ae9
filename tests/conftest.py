import os

# No test may reach the network: hub lookups fail at once instead of retrying for half a minute.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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
    subprocess.run([sys.executable, "-m", "sppo_lightning.testing", str(out)], check=True, capture_output=True)
    return out
