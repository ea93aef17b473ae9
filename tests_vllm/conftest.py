"""Fixtures of the vLLM tests: they run in the environment with the ``vllm`` extra (``.ci/run``
builds it) and fail, never skip, where vLLM is missing or broken."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json  # noqa: E402

import pytest  # noqa: E402

from sppo_lightning.testing import make_tiny_llama  # noqa: E402

QUESTIONS = ["Tell me about the moon.", "What is 2 plus 3?", "Why is the sky blue and the water green?",
             "Name a color.", "What is 4 plus 4? Say it with words please, one number only.", "Hi."]


@pytest.fixture(scope="session")
def llama(tmp_path_factory) -> str:
    """The tiny Llama with a head size of 32 (vLLM's CPU attention refuses 8 and 16), warmed up to
    write words, so that responses end at different lengths."""
    return str(make_tiny_llama(tmp_path_factory.mktemp("models") / "llama", hidden_size=64, num_heads=2,
                               num_kv_heads=1, sft_steps=100))


@pytest.fixture(scope="session")
def tokenizer(llama):
    from sppo_lightning.models import load_tokenizer

    return load_tokenizer(llama)


@pytest.fixture(scope="session")
def prompts(tmp_path_factory, tokenizer):
    from sppo_lightning.data.prompts import load_prompts

    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in QUESTIONS))
    return load_prompts(str(path), tokenizer, 64)[0]
