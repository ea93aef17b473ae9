"""The memory each footprint needs per device: weights, gradients, optimizer, activations, generation.

``python -m sppo_lightning.memory`` (or ``python -m sppo_lightning.footprints``) prints the table of
``docs/footprints.md`` from ``estimate_memory``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

GIB = 1024**3


@dataclass
class ModelShape:
    """The sizes of a Llama-family decoder that memory depends on."""

    vocab: int
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    tied: bool = False

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        return cls(config.vocab_size, config.hidden_size, config.num_hidden_layers, config.intermediate_size,
                   config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
                   bool(getattr(config, "tie_word_embeddings", False)))

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.hidden // self.heads)

    @property
    def layer_linear_params(self) -> int:
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        return 2 * h * h + 2 * h * kv + 3 * h * i  # q, o; k, v; gate, up, down

    @property
    def linear_params(self) -> int:
        return self.layers * self.layer_linear_params

    @property
    def other_params(self) -> int:
        """Embeddings, LM head and norms: never quantised."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + (2 * self.layers + 1) * self.hidden

    @property
    def params(self) -> int:
        return self.linear_params + self.other_params

    def lora_params(self, r: int) -> int:
        """LoRA A and B on every linear layer of the decoder (``all-linear``)."""
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        per_layer = r * ((h + h) * 2 + (h + kv) * 2 + (h + i) * 3)
        return self.layers * per_layer


@dataclass
class MemoryEstimate:
    """Peak memory per device, in GiB, split into what holds it."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    generation: float  # KV cache and sampling logits of one generate call

    @property
    def total(self) -> float:
        # Generation and training alternate: the optimizer state of the last iteration is still
        # alive while the next one generates, gradients and activations are not.
        return self.weights + self.optimizer + max(self.gradients + self.activations, self.generation)

    def describe(self) -> str:
        return (f"{self.total:.1f} GiB (weights {self.weights:.1f}, gradients {self.gradients:.1f}, "
                f"optimizer {self.optimizer:.1f}, activations {self.activations:.1f}, "
                f"generation {self.generation:.1f})")


OPTIMIZER_STATES = {"rmsprop": 1, "adamw": 2, "adamw_8bit": 2, "paged_adamw_8bit": 2}


def estimate_memory(
    shape: ModelShape,
    footprint: str,
    *,
    world_size: int = 1,
    pairs_per_device: int = 1,
    seq_len: int = 1024,
    lora_r: int = 16,
    optimizer: str = "rmsprop",
    gradient_checkpointing: bool = True,
    reference_copy: bool = False,
    dtype_bytes: int = 2,
    generation_prompts: int = 8,
    num_samples: int = 5,
    generation_len: int = 1024,
) -> MemoryEstimate:
    """Per-device peak memory of one footprint, from the model's shape and the batch.

    Weights: ``dtype_bytes`` per parameter, or 0.5 byte + double-quantised absmax (≈ 0.127 bit)
    per linear parameter in ``qlora``; sharded ``1/world_size`` in ``fsdp`` plus two unsharded
    layers (the one computing, the one prefetched). Gradients and optimizer states follow the
    trainable parameters (LoRA weights, their gradients and states are float32; full training keeps
    states in the weights' dtype); 8-bit optimizers hold 1 byte per state. Activations: the
    rows of a batch (chosen + rejected) × ``seq_len`` tokens; per token and layer,
    ``2·(8h + 6·kv + 4i) + 16h`` bytes (inputs saved for backward in the weights' dtype, float32
    norm statistics), only the layer inputs with gradient checkpointing plus one layer recomputed,
    and the LM head's logits in 1024-token float32 chunks. Generation: the KV cache of
    ``generation_prompts × num_samples`` sequences of ``generation_len`` tokens, plus float32 logits.
    """
    from sppo_lightning.errors import ConfigError
    from sppo_lightning.footprints import FOOTPRINTS

    if footprint not in FOOTPRINTS:
        raise ConfigError(f"unknown footprint {footprint!r}")
    b = dtype_bytes
    h, L = shape.hidden, shape.layers
    shard = world_size if footprint == "fsdp" else 1
    lora = footprint in ("lora", "qlora")

    if footprint == "qlora":
        weights = shape.linear_params * (0.5 + 0.127 / 8) + shape.other_params * b
    else:
        weights = shape.params * b / shard
    if footprint == "fsdp":
        weights += 2 * shape.layer_linear_params * b
    if reference_copy and footprint not in ("lora", "qlora"):
        weights *= 2
    trainable = shape.lora_params(lora_r) if lora else shape.params / shard
    if lora:
        weights += trainable * 4
    grad_bytes = 4 if lora else b
    gradients = trainable * grad_bytes
    state_bytes = 1 if optimizer.endswith("8bit") else (4 if lora else b)
    optimizer_mem = trainable * OPTIMIZER_STATES.get(optimizer, 2) * state_bytes

    tokens = 2 * pairs_per_device * seq_len
    per_token_layer = 2 * (8 * h + 6 * shape.kv_dim + 4 * shape.intermediate) + 16 * h
    if gradient_checkpointing:
        activations = tokens * (L * h * b + per_token_layer)
    else:
        activations = tokens * L * per_token_layer
    head_tokens = tokens if footprint == "fsdp" else min(tokens, 1024)  # fsdp runs the full-logits path
    activations += head_tokens * shape.vocab * 4 * 3

    sequences = generation_prompts * num_samples
    generation = sequences * generation_len * L * 2 * shape.kv_dim * b + sequences * shape.vocab * 4 * 2

    return MemoryEstimate(weights / GIB, gradients / GIB, optimizer_mem / GIB, activations / GIB, generation / GIB)


def device_memory_gib(device: torch.device) -> Optional[float]:
    """Total memory of the device the run trains on (GPU memory, or the host's RAM on CPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / GIB
    try:
        import os

        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    except (ValueError, OSError, AttributeError):
        return None


# ------------------------------------------------------------------- the table of docs/footprints.md
MISTRAL_7B = ModelShape(vocab=32000, hidden=4096, layers=32, intermediate=14336, heads=32, kv_heads=8)
LLAMA3_8B = ModelShape(vocab=128256, hidden=4096, layers=32, intermediate=14336, heads=32, kv_heads=8)

# (model, footprint, GPUs, settings): the table's rows; the settings mirror configs/*.yaml.
TABLE_ROWS = [
    ("Mistral-7B", MISTRAL_7B, "qlora", 1, dict(optimizer="paged_adamw_8bit")),
    ("Mistral-7B", MISTRAL_7B, "lora", 1, dict(optimizer="adamw")),
    ("Mistral-7B", MISTRAL_7B, "full", 1, dict(optimizer="rmsprop")),
    ("Llama-3-8B", LLAMA3_8B, "full", 1, dict(optimizer="rmsprop")),
    ("Llama-3-8B", LLAMA3_8B, "fsdp", 8, dict(optimizer="rmsprop", gradient_checkpointing=True)),
]
TABLE_SETTINGS = dict(pairs_per_device=1, seq_len=1024, generation_prompts=8, num_samples=5, generation_len=1024)


def memory_table() -> str:
    """The markdown table of docs/footprints.md: GiB per device for 7-8B models, from ``estimate_memory``."""
    lines = ["| model | footprint | GPUs | weights | gradients | optimizer | activations | generation | total per GPU |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, shape, footprint, gpus, settings in TABLE_ROWS:
        e = estimate_memory(shape, footprint, world_size=gpus, **TABLE_SETTINGS, **settings)
        cells = [e.weights, e.gradients, e.optimizer, e.activations, e.generation, e.total]
        lines.append(f"| {name} | {footprint} ({settings['optimizer']}) | {gpus} | "
                     + " | ".join(f"{c:.1f}" for c in cells[:-1]) + f" | **{cells[-1]:.1f}** |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(memory_table())
