"""Footprints on CPU: the memory formula's weight term against measured weights, side by side.

    python bench/footprints.py      # about a minute on 2 cores

The same offline Llama (hidden 512, 8 layers, 32k vocabulary, ~60M parameters) is loaded as each
footprint loads it (``full`` in bf16, ``lora`` in bf16 + LoRA r=16, ``qlora``: 4-bit nf4 with double
quantisation + LoRA), and the bytes its parameters and buffers hold are compared with
``estimate_memory(...).weights``. The 4-bit weight ratio against bf16 (``qlora / full``) is the
figure that decides whether a 7B model fits a consumer GPU. Activations, gradients and optimizer
state are device-dependent and are left to a GPU run (see bench/README.md).
"""

from __future__ import annotations

import json
import platform
import tempfile
from pathlib import Path

import torch


def bytes_of(model: torch.nn.Module) -> int:
    """What the parameters and buffers occupy; bitsandbytes' quantisation constants included."""
    total = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    for module in model.modules():  # absmax and code tables of 4-bit weights live in their quant_state
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            for name, value in state.as_dict(packed=True).items():
                if isinstance(value, torch.Tensor):
                    total += value.numel() * value.element_size()
    return total


def main() -> None:
    from transformers import LlamaForCausalLM

    from sppo_lightning.memory import GIB, ModelShape, estimate_memory
    from sppo_lightning.models import LoraSettings, add_lora, load_causal_lm
    from sppo_lightning.testing import llama_config, make_tiny_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = make_tiny_tokenizer()
        config = llama_config(tokenizer, vocab_size=32_000, hidden_size=512, intermediate_size=1536,
                              num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                              max_position_embeddings=2048)
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(Path(tmp) / "model")
        tokenizer.save_pretrained(Path(tmp) / "model")
        shape = ModelShape.from_config(config)
        rows = {}
        for footprint in ("full", "lora", "qlora"):
            model = load_causal_lm(str(Path(tmp) / "model"), "bfloat16", quantize_4bit=footprint == "qlora")
            if footprint != "full":
                model = add_lora(model, LoraSettings(r=16, alpha=32))
            measured = bytes_of(model)
            predicted = estimate_memory(shape, footprint, lora_r=16).weights * GIB
            rows[footprint] = {"measured_MB": round(measured / 2**20, 1), "formula_MB": round(predicted / 2**20, 1),
                               "formula/measured": round(predicted / measured, 3)}
            del model
    rows["qlora/full weights"] = round(rows["qlora"]["measured_MB"] / rows["full"]["measured_MB"], 3)
    print(json.dumps({"parameters": shape.params, "machine": platform.machine(), "torch": torch.__version__,
                      "footprints": rows}, indent=2))


if __name__ == "__main__":
    main()
