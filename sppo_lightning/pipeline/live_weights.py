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
* an FSDP-sharded policy: gathered one FSDP unit (one decoder layer, then the embeddings, norm and
  head) at a time with FSDP's own ``unshard``, streamed, and resharded before the next; every rank
  takes part in each gather, and the ranks whose engine samples send what they gathered. At most
  one layer's full weights exist at a time, so a 7-8B policy never needs a whole copy anywhere.

The engine starts once on ``engine_folder``: the config and tokenizer without weights
(``load_format: dummy``), then gets the real weights from memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import nn


def _inner(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@torch.no_grad()
def policy_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of the model as an engine loads it: checkpoint names, LoRA merged, a 4-bit
    base dequantised, an FSDP-sharded model gathered unit by unit (every rank must iterate it to its
    end, in step: each unit's gather is a collective)."""
    from sppo_lightning.models import is_peft, is_quantized
    from sppo_lightning.sharding import is_sharded

    sharded = is_sharded(model)
    if not is_peft(model) and not is_quantized(model) and not sharded:
        yield from model.state_dict().items()
        return
    base = _inner(model)
    active = None
    if is_peft(model):
        active = model.active_adapter if isinstance(model.active_adapter, str) else model.active_adapter[0]
    layers = _lora_layers(base)
    if not sharded:
        yield from _walk(base.named_modules(), layers, active)
        return
    from torch.distributed.fsdp import FSDPModule

    units = [name for name, m in base.named_modules() if isinstance(m, FSDPModule)]
    for unit_name in units:
        unit = base.get_submodule(unit_name)
        prefix = f"{unit_name}." if unit_name else ""
        nested = [f"{u}." for u in units if u != unit_name and u.startswith(prefix)]  # units inside this one
        # this unit's own modules, under their names in the whole model
        own = [(prefix + name if name else unit_name, m) for name, m in unit.named_modules()
               if not any(f"{prefix}{name}.".startswith(u) for u in nested)]
        unit.unshard()  # FSDP's own all-gather, as before a forward: its parameters are whole tensors now
        try:
            yield from _walk(own, layers, active)
        finally:
            unit.reshard()


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


def _lora_layers(base: nn.Module) -> dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer)}


def _walk(modules, layers: dict, active: Optional[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """The weights of ``modules`` (``(name, module)`` pairs), module by module, under the checkpoint's
    names: a LoRA layer's base weight with the active adapter's delta added, a 4-bit weight
    dequantised first, the adapters' own weights left out; each module's persistent buffers too,
    as its state dict has them."""
    from sppo_lightning.quantization import dequantize_4bit_weight

    for name, module in modules:
        if "lora_" in name:
            continue
        owner = name.removesuffix(".base_layer")
        prefix = f"{owner}." if owner else ""
        for pname, param in module.named_parameters(recurse=False):
            value = param.detach()
            if pname == "weight" and type(module).__name__ == "Linear4bit":  # bitsandbytes' 4-bit layer
                value = dequantize_4bit_weight(param).to(module.compute_dtype or torch.float32)
            if pname == "weight" and name.endswith(".base_layer"):
                value = _merged(layers.get(owner), active, value)
            yield prefix + pname, value
        for bname, buffer in module.named_buffers(recurse=False):
            if bname not in module._non_persistent_buffers_set:
                yield prefix + bname, buffer.detach()
