"""π's weights for a live vLLM engine: named tensors in the Hugging Face checkpoint's names, sent to
the engine in memory (``EngineProcess.load_weights``) instead of an export to disk.

* a plain model: its ``state_dict``;
* a LoRA (peft) model: every LoRA layer's base weight with the active adapter's delta added
  (``get_delta_weight``: exactly what ``merge_and_unload`` computes), under the base model's names;
  with the adapters disabled (the initial policy), the base weights alone. Nothing is copied but
  the merged layers, one at a time;
* QLoRA (a 4-bit base) and FSDP-sharded policies are not streamed (``live_unsupported`` says why):
  they take the per-iteration export.

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
    from sppo_lightning.models import is_quantized
    from sppo_lightning.sharding import is_sharded

    if is_quantized(model):
        return "a 4-bit (QLoRA) policy is merged over its dequantised base in the per-iteration export"
    if is_sharded(model):
        return "an FSDP-sharded policy is gathered in the per-iteration export"
    return None


def _inner(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@torch.no_grad()
def policy_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of the model as an engine loads it: checkpoint names, LoRA merged."""
    from sppo_lightning.models import is_peft

    if not is_peft(model):
        yield from model.state_dict().items()
        return
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    active = model.active_adapter if isinstance(model.active_adapter, str) else model.active_adapter[0]
    layers = {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer)}
    for name, tensor in base.state_dict().items():
        if ".lora_" in name:
            continue
        if ".base_layer." not in name:
            yield name, tensor
            continue
        owner, leaf = name.split(".base_layer.")
        layer = layers[owner]
        if leaf == "weight" and active in layer.lora_A and not layer.disable_adapters and not layer.merged:
            tensor = tensor + layer.get_delta_weight(active).to(tensor.dtype)
        yield f"{owner}.{leaf}", tensor


def engine_folder(model: nn.Module, tokenizer, folder: Path) -> Path:
    """``folder`` with the model's config, generation config and tokenizer (no weights): what a live
    engine starts on."""
    inner = _inner(model)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    inner.config.save_pretrained(folder)
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
