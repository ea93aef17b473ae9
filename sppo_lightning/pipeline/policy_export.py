"""π_t in Hugging Face format, once per iteration: what an inference engine (vLLM) samples from.

    <run_dir>/iteration_<t>/policy/          a merged model (safetensors, config, tokenizer), or
                                             a LoRA adapter on the unchanged base (``lora: request``)
    <run_dir>/iteration_<t>/policy/export.json   what it holds, its checksum, the stop token ids

The folder is written under a temporary name and renamed into place, so it is either complete or
absent; a resumed run reuses it (the checkpoint it resumes from holds the same π_t). It doubles as
the iteration's checkpoint in the format every inference tool reads; ``prune_exports`` keeps the
newest ``keep`` of them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import nn

from sppo_lightning.distributed import DistContext
from sppo_lightning.errors import ConfigError

LORA_MODES = ("auto", "request", "merged")


@dataclass
class PolicyExport:
    """One exported π_t.

    model: the folder (or hub id) the engine loads: the export itself when merged, the LoRA base
        otherwise. adapter: the LoRA adapter folder to apply to every request, or None.
    lora_rank: the adapter's rank (the engine's ``max_lora_rank``). checksum: the export's identity,
        recorded as the input of the generations sampled from it. eos_token_ids: where sampling stops
        (the policy's generation config and the tokenizer's EOS, as the HF generator stops).
    """

    model: str
    adapter: Optional[str]
    lora_rank: Optional[int]
    checksum: str
    eos_token_ids: list[int]

    @property
    def folder(self) -> Path:
        return Path(self.adapter or self.model)


def lora_mode(policy: nn.Module, setting: str) -> str:
    """``merged`` or ``request``: how a LoRA policy reaches the engine (a plain one is always merged).

    ``auto`` hands the adapter on the base (a LoRA request) for LoRA, and a merged copy for QLoRA
    (the 4-bit base dequantised, then the adapter merged: exactly π_t's function, while an engine
    would load the unquantised base) and for an FSDP-sharded policy (gathered, then merged).
    """
    from sppo_lightning.models import is_peft, is_quantized
    from sppo_lightning.sharding import is_sharded

    if setting not in LORA_MODES:
        raise ConfigError(f"lora must be one of {', '.join(LORA_MODES)}, got {setting!r}")
    if not is_peft(policy):
        return "merged"
    if setting == "request" and is_sharded(policy):
        raise ConfigError("lora: request needs an unsharded policy; with footprint fsdp use "
                          "lora: merged (or auto)")
    if setting == "auto":
        return "merged" if is_quantized(policy) or is_sharded(policy) else "request"
    return setting


def export_policy(policy: nn.Module, tokenizer, folder: Path, ctx: Optional[DistContext] = None,
                  lora: str = "auto") -> PolicyExport:
    """Write π_t to ``folder`` (or reuse a complete export there) and describe it, on every rank.

    Rank 0 writes; under FSDP every rank takes part in gathering the weights. ``lora``: see
    :func:`lora_mode`.
    """
    from sppo_lightning.generation import eos_ids
    from sppo_lightning.models import export_hf
    from sppo_lightning.sharding import is_sharded

    ctx = ctx or DistContext()
    folder = Path(folder)
    record = folder / "export.json"
    if ctx.broadcast(record.exists() if ctx.is_global_zero else None):
        ctx.barrier("policy_export")
        return PolicyExport(**json.loads(record.read_text()))
    mode = lora_mode(policy, lora)
    inner = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
    stop = sorted(eos_ids(inner, tokenizer))
    tmp = folder.with_name(f".{folder.name}.tmp")
    if ctx.is_global_zero:
        shutil.rmtree(tmp, ignore_errors=True)  # a run killed while exporting
    if mode == "merged" and (ctx.is_global_zero or is_sharded(policy)):
        export_hf(policy, tokenizer if ctx.is_global_zero else None, tmp)
    if ctx.is_global_zero:
        if mode == "request":
            policy.save_pretrained(tmp, safe_serialization=True)  # the adapter alone
            tokenizer.save_pretrained(tmp)
            config = policy.peft_config["default"]
            base, rank = config.base_model_name_or_path, int(config.r)
            if not base:
                raise ConfigError("the LoRA policy does not name its base model "
                                  "(peft_config.base_model_name_or_path); use lora: merged")
            export = PolicyExport(model=str(base), adapter=str(folder), lora_rank=rank,
                                  checksum=_checksum(tmp, base), eos_token_ids=stop)
        else:
            export = PolicyExport(model=str(folder), adapter=None, lora_rank=None, checksum=_checksum(tmp, None),
                                  eos_token_ids=stop)
        (tmp / "export.json").write_text(json.dumps(asdict(export), indent=2))
        shutil.rmtree(folder, ignore_errors=True)  # a folder without export.json: left half-made by hand
        os.replace(tmp, folder)
    ctx.barrier("policy_export")
    return PolicyExport(**json.loads(record.read_text()))


def _checksum(folder: Path, base: Optional[str]) -> str:
    """sha256 over the export's files (names, sizes, the first and last MiB of each) and the base it
    applies to: as cheap as a resume needs, and different whenever the weights are."""
    from sppo_lightning.ranking.protocol import weights_fingerprint

    identity = {"files": weights_fingerprint(str(folder))["files"], "base": base}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def prune_exports(run_dir: Path, keep: int) -> list[Path]:
    """Remove all but the newest ``keep`` iterations' exports (``keep < 0``: keep all); returns the
    removed folders."""
    if keep < 0:
        return []
    folders = sorted((p for p in Path(run_dir).glob("iteration_*/policy") if p.is_dir()),
                     key=lambda p: int(p.parent.name.split("_")[-1]))
    removed = folders[: max(0, len(folders) - keep)]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


@contextmanager
def offloaded(policy: nn.Module, enabled: bool) -> Iterator[None]:
    """The policy's weights in host memory for the duration (an engine sampling on its GPU needs
    the room), then back. A no-op on CPU, for a sharded policy (FSDP frees unsharded weights
    itself), or when not ``enabled``."""
    from sppo_lightning.sharding import is_sharded

    device = next(policy.parameters()).device
    if not enabled or device.type != "cuda" or is_sharded(policy):
        yield
        return
    policy.to("cpu")
    torch.cuda.empty_cache()
    try:
        yield
    finally:
        policy.to(device)
