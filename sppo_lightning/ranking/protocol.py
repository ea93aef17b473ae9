"""A ranker's identity: what its scores depend on (the ``Ranker`` contract is in ``contracts.py``).

A ranker's ``fingerprint()`` goes into the rankings stage's recorded input (``artifacts.py``): a
resumed run whose ranker fingerprints differently (another checkpoint, new weights in the same
folder, another judge function or its edited source, another dtype, device or prompt view)
redoes the rankings and everything made from them, with a warning, instead of reusing scores the
current ranker would not give.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from sppo_lightning.contracts import PROMPT_VIEWS, PromptView, Ranker

__all__ = ["PROMPT_VIEWS", "PromptView", "Ranker", "fingerprint_hash", "fingerprint_of", "prompt_view_of",
           "weights_fingerprint"]

# Files whose bytes make a model's scores: weights, configs, tokenizers.
_MODEL_FILES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".model", ".txt", ".tiktoken")


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


def fingerprint_of(ranker: Ranker) -> dict[str, Any]:
    """``ranker.fingerprint()`` as JSON would give it back (keys sorted, other values as strings)."""
    return json.loads(json.dumps(ranker.fingerprint(), sort_keys=True, default=str))


def fingerprint_hash(fingerprint: dict[str, Any]) -> str:
    """A short hash of a fingerprint, as stages record their input."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def prompt_view_of(ranker: Ranker) -> str:
    """The ranker's ``prompt_view``, checked: one of ``PROMPT_VIEWS``."""
    if ranker.prompt_view not in PROMPT_VIEWS:
        from sppo_lightning.errors import ConfigError

        raise ConfigError(f"ranker {type(ranker).__name__}: prompt_view must be raw, chat or record, "
                          f"got {ranker.prompt_view!r}")
    return ranker.prompt_view
