"""The ``Ranker`` protocol, and a ranker's identity: what its scores depend on.

A ranker's ``fingerprint()`` goes into the rankings stage's recorded input (``artifacts.py``): a
resumed run whose ranker fingerprints differently (another checkpoint, new weights in the same
folder, another judge function or its edited source, another dtype, device or prompt view)
redoes the rankings and everything made from them, with a warning, instead of reusing scores the
current ranker would not give.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from torch import Tensor

# What a ranker is shown of the prompt: the raw text of the user's prompt (the default), the
# policy's chat-templated prompt string, as the official SPPO ``rank.py`` passes it to PairRM, or
# the prompt row as a JSON object (its text under "prompt", and an IFEval-format file's
# instructions: ``instruction_id_list``, ``kwargs``, ``key``) for rankers that check instructions.
PromptView = Literal["raw", "chat", "record"]
PROMPT_VIEWS = ("raw", "chat", "record")

# Files whose bytes make a model's scores: weights, configs, tokenizers.
_MODEL_FILES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".model", ".txt", ".tiktoken")


@runtime_checkable
class Ranker(Protocol):
    def pairwise_logits(self, prompts: list[str], candidates: list[list[str]]) -> Tensor:
        """``[N, K, K]`` float tensor; ``M[n, i, j] > 0`` means candidate i beats j for prompt n."""
        ...

    def fingerprint(self) -> dict[str, Any]:
        """JSON-able description of everything that changes the scores (class, weights, settings)."""
        ...


def weights_fingerprint(path: str) -> dict[str, Any]:
    """A local model folder's identity from its files: name, size and a sha256 of the first and last
    MiB of each weight, config and tokenizer file (the whole of a multi-GB file would take minutes
    to hash on every resume; a changed checkpoint changes its size or its ends). A ``.gguf`` file:
    its sha256 (remembered per path, size and mtime). A hub id is its own identity."""
    folder = Path(path).expanduser()
    if folder.is_file() and folder.suffix.lower() == ".gguf":  # a GGUF file: its whole hash (remembered)
        from sppo_lightning.gguf import file_hash

        return {"gguf": str(folder.resolve()), "sha256": file_hash(folder)}
    if not folder.is_dir():
        return {"hub_id": path}
    files = {}
    for file in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in _MODEL_FILES):
        size = file.stat().st_size
        digest = hashlib.sha256()
        with file.open("rb") as f:
            digest.update(f.read(1 << 20))
            if size > 2 << 20:
                f.seek(-(1 << 20), 2)
                digest.update(f.read())
        files[str(file.relative_to(folder))] = f"{size}:{digest.hexdigest()[:16]}"
    return {"folder": str(folder.resolve()), "files": files}


def fingerprint_of(ranker: Any) -> dict[str, Any]:
    """``ranker.fingerprint()``, or for a ranker that has none (a user's class) its class and its
    plain public settings, with a warning that other changes go unnoticed."""
    if hasattr(ranker, "fingerprint"):
        return json.loads(json.dumps(ranker.fingerprint(), sort_keys=True, default=str))
    cls = type(ranker)
    settings = {k: v for k, v in vars(ranker).items()
                if not k.startswith("_") and isinstance(v, (str, int, float, bool, type(None)))}
    warnings.warn(f"ranker {cls.__qualname__} has no fingerprint(): a resumed run notices a change of its class "
                  f"or plain settings only; add fingerprint() to say what its scores depend on")
    return {"class": f"{cls.__module__}.{cls.__qualname__}", "settings": settings}


def fingerprint_hash(fingerprint: dict[str, Any]) -> str:
    """A short hash of a fingerprint, as stages record their input."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def prompt_view_of(ranker: Any) -> str:
    view = getattr(ranker, "prompt_view", "raw")
    if view not in PROMPT_VIEWS:
        from sppo_lightning.errors import ConfigError

        raise ConfigError(f"ranker {type(ranker).__name__}: prompt_view must be raw, chat or record, got {view!r}")
    return view
