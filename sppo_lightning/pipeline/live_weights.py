"""π's weights for a live vLLM engine: named tensors in the Hugging Face checkpoint's names, sent to
the engine in memory (``EngineProcess.load_weights``) instead of an export to disk.

* a plain model: its ``state_dict``;
* a LoRA (peft) model: every LoRA layer's base weight with the active adapter's delta added
  (``get_delta_weight``: exactly what ``merge_and_unload`` computes), under the base model's names;
  with the adapters disabled (the initial policy), the base weights alone. Nothing is copied but
  the merged layers, one at a time;
* QLoRA (a 4-bit base): each 4-bit weight dequantised (``quantization.dequantize_4bit_weight``),
  the adapter's delta added, one layer at a time: the function the export's merged copy has, the
  engine running it unquantised;
* FSDP-sharded policies are not streamed (``live_unsupported`` says why): they take the export.

The engine starts once on ``engine_folder``: the config and tokenizer without weights
(``load_format: dummy``), then gets the real weights from memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import nn


def live_unsupported(model: nn.Module) -> Optional[str]:
    """Why ``model``'s weights cannot be streamed to a live engine, or None if they can."""
    from sppo_lightning.sharding import is_sharded

    if is_sharded(model):
        return "an FSDP-sharded policy is gathered in the per-iteration export"
    return None


def _inner(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@torch.no_grad()
def policy_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of the model as an engine loads it: checkpoint names, LoRA merged."""
    from sppo_lightning.models import is_peft, is_quantized

    if not is_peft(model) and not is_quantized(model):
        yield from model.state_dict().items()
        return
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model() if is_peft(model) else model
    active = None
    if is_peft(model):
        active = model.active_adapter if isinstance(model.active_adapter, str) else model.active_adapter[0]
    layers = {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer)}
    if is_quantized(model):
        yield from _dequantized(base, layers, active)
        return
    for name, tensor in base.state_dict().items():
        if ".lora_" in name:
            continue
        if ".base_layer." not in name:
            yield name, tensor
            continue
        owner, leaf = name.split(".base_layer.")
        yield f"{owner}.{leaf}", _merged(layers[owner], active, tensor) if leaf == "weight" else tensor


def engine_folder(model: nn.Module, tokenizer, folder: Path) -> Path:
    """``folder`` with the model's config (without a quantisation block: the engine runs the
    weights it is sent, unquantised), generation config and tokenizer (no weights): what a live
    engine starts on."""
    inner = _inner(model)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    from sppo_lightning.quantization import plain_config

    plain_config(inner.config).save_pretrained(folder)
    if getattr(inner, "generation_config", None) is not None:
        inner.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def weights_identity(model: nn.Module) -> str:
    """What the live engine must hold to sample ``model``: its weights' fingerprint and, for a LoRA
    model, which adapter is active and whether adapters are off (J-BOND's anchor and the initial
    policy are the same module in another state)."""
    from sppo_lightning.models import is_peft
    from sppo_lightning.policy_identity import weights_fingerprint

    identity = weights_fingerprint(model)
    if is_peft(model):
        from peft.tuners.lora import LoraLayer

        layer = next((m for m in model.modules() if isinstance(m, LoraLayer)), None)
        identity += f":{model.active_adapter}:{'off' if layer is not None and layer.disable_adapters else 'on'}"
    return identity


def _merged(layer, active: Optional[str], weight: torch.Tensor) -> torch.Tensor:
    if layer is not None and active in layer.lora_A and not layer.disable_adapters and not layer.merged:
        return weight + layer.get_delta_weight(active).to(weight.dtype)
    return weight


def _dequantized(base: nn.Module, layers: dict, active: Optional[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """A 4-bit model's weights in full precision, each LoRA delta added: module by module."""
    import bitsandbytes as bnb

    from sppo_lightning.quantization import dequantize_4bit_weight

    for name, module in base.named_modules():
        if "lora_" in name:
            continue
        owner = name.removesuffix(".base_layer")
        prefix = f"{owner}." if owner else ""
        if isinstance(module, bnb.nn.Linear4bit):
            weight = dequantize_4bit_weight(module.weight).to(module.compute_dtype or torch.float32)
            yield prefix + "weight", _merged(layers.get(owner), active, weight)
            if module.bias is not None:
                yield prefix + "bias", module.bias.detach()
            continue
        for pname, param in module.named_parameters(recurse=False):
            yield prefix + pname, param.detach()
