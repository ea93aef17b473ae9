"""QLoRA's 4-bit base (bitsandbytes nf4): its settings, and turning it back into plain weights for export."""

from __future__ import annotations

import torch
from torch import nn

from sppo_lightning.errors import ConfigError


def require_bitsandbytes() -> None:
    """A one-line error instead of an ImportError deep inside transformers."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError("model.footprint 'qlora' needs bitsandbytes, which is not installed: "
                          "pip install 'bitsandbytes>=0.45' (or use footprint: lora)") from None


def quantization_config(compute_dtype: torch.dtype):
    """4-bit nf4 with double quantisation, the QLoRA paper's setting."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def dequantize_4bit_weight(weight: nn.Parameter) -> torch.Tensor:
    """The full-precision ``[out, in]`` matrix behind a bitsandbytes 4-bit weight.

    On CPU, bitsandbytes ≥ 0.49 repacks a 4-bit weight into an AVX-512 layout after its first
    eval-mode forward; ``dequantize_4bit`` reads that layout as garbage, so it is undone first, on
    a copy of the quantisation state: bitsandbytes' own inverse rewrites the state in place (and
    re-quantises its scales), which would change the live model.
    """
    import copy

    import bitsandbytes.functional as bnbf

    data, state = weight.data, weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        data, state = bnbf._convert_weight_packed_for_cpu_inverse(data.clone(), copy.deepcopy(state))
    return bnbf.dequantize_4bit(data, state)


def plain_config(config):
    """A copy of a model config without its quantisation block (what an unquantised copy is built from)."""
    config = config.__class__.from_dict(config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def dequantized_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A plain (unquantised) copy of a 4-bit causal LM in ``dtype``, LoRA layers left out.

    ``model`` may carry peft LoRA layers (``...q_proj.base_layer``); their base weights are taken.
    """
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_config(plain_config(model.config), dtype=dtype)
    targets = dict(plain.named_parameters())
    filled = set()
    with torch.no_grad():
        for name, module in model.named_modules():
            if "lora_" in name:
                continue
            clean = name.replace(".base_layer", "")
            prefix = f"{clean}." if clean else ""
            if isinstance(module, bnb.nn.Linear4bit):
                targets[prefix + "weight"].copy_(dequantize_4bit_weight(module.weight))
                filled.add(prefix + "weight")
                if module.bias is not None:
                    targets[prefix + "bias"].copy_(module.bias)
                    filled.add(prefix + "bias")
                continue
            for pname, param in module.named_parameters(recurse=False):
                if prefix + pname in targets:
                    targets[prefix + pname].copy_(param)
                    filled.add(prefix + pname)
    missing = sorted(set(targets) - filled)
    # Tied weights appear once in named_parameters; anything else missing is a bug, not a warning.
    if missing:
        raise RuntimeError(f"dequantising left weights unset: {missing[:5]}")
    return plain
