"""Hardware footprints: ``full``, ``lora``, ``qlora`` and ``fsdp``, and the memory each one needs.

A footprint decides how the policy is loaded (precision, 4-bit, LoRA), what the reference may be,
how the model is split over processes, and what a checkpoint holds:

==========  ==============================================================================
``full``    every weight trains, one device (or plain DDP replicas)
``lora``    peft LoRA on the frozen base; reference = the base with adapters off
``qlora``   ``lora`` on a base loaded in 4-bit nf4 with double quantisation (bitsandbytes);
            gradient checkpointing on; the reference is never a second copy
``fsdp``    FSDP2 (``fully_shard``) over every process, one unit per decoder layer; with or
            without LoRA. Needs Lightning's ``ModelParallelStrategy``
==========  ==============================================================================

``python -m sppo_lightning.footprints`` prints the README's memory table from ``estimate_memory``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
from torch import nn

from sppo_lightning.errors import ConfigError

Footprint = Literal["full", "lora", "qlora", "fsdp"]
FOOTPRINTS = ("full", "lora", "qlora", "fsdp")
GIB = 1024**3


def resolve_footprint(footprint: Optional[str], has_lora: bool) -> str:
    """None means what the settings already imply: ``lora`` with LoRA settings, else ``full``."""
    if footprint is None:
        return "lora" if has_lora else "full"
    if footprint not in FOOTPRINTS:
        raise ConfigError(f"model.footprint must be one of {', '.join(FOOTPRINTS)}, got {footprint!r}")
    if footprint == "full" and has_lora:
        raise ConfigError("model.footprint 'full' trains every weight, but model.lora is set: "
                          "use footprint: lora (or qlora), or drop model.lora")
    return footprint


# ------------------------------------------------------------------------------------ qlora
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


def dequantized_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A plain (unquantised) copy of a 4-bit causal LM in ``dtype``, LoRA layers left out.

    ``model`` may carry peft LoRA layers (``...q_proj.base_layer``); their base weights are taken.
    """
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    config = model.config.__class__.from_dict(model.config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
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


# ------------------------------------------------------------------------------------ lora
def check_lora_targets(model: nn.Module, target_modules: Any) -> None:
    """Fail in one line, naming the model's linear layers, when no module matches the targets.

    Matches as peft does: one string is a regular expression over full module names
    (``model.layers.0.self_attn.q_proj``), a list holds names or name suffixes.
    """
    import re

    if target_modules == "all-linear":
        return
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Linear4bit"]
    if isinstance(target_modules, str):
        matched = any(re.fullmatch(target_modules, n) for n in names)
        hint = " (one string is a regular expression over full names; a list matches name suffixes)"
    else:
        matched = any(n == t or n.endswith(f".{t}") for n in names for t in target_modules)
        hint = ""
    if not matched:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise ConfigError(f"model.lora.target_modules {target_modules!r} match no layer of this model{hint}; "
                          f"its linear layers are {', '.join(leaves)} (or use 'all-linear')")


# ------------------------------------------------------------------------------------ fsdp
def is_sharded(model: nn.Module) -> bool:
    """True when any part of ``model`` is an FSDP2 (``fully_shard``) unit."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder's layer list of a Hugging Face causal LM (Llama, Mistral, Qwen, Gemma, ...)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(inner, getattr(inner, "base_model_prefix", "model"), None)
    layers = getattr(backbone, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ConfigError(f"footprint 'fsdp' shards decoder layers, but {type(inner).__name__} has no "
                          f"`{inner.base_model_prefix}.layers`")
    return layers


def shard_model(model: nn.Module, mesh, dtype: torch.dtype) -> nn.Module:
    """FSDP2 over ``mesh``: one unit per decoder layer, then the rest (embeddings, norm, head).

    A peft model is sharded *inside* its wrapper (the wrapped causal LM is the root unit), because
    sharding the wrapper breaks ``generate``. Parameters compute in ``dtype`` and gradients are
    reduced in float32.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for layer in decoder_layers(inner):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(inner, mesh=mesh, mp_policy=policy)
    return model


def check_strategy(trainer, footprint: str) -> None:
    """``fsdp`` and ``ModelParallelStrategy`` go together, over at least 2 processes, data-parallel."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    strategy = trainer.strategy
    parallel = isinstance(strategy, ModelParallelStrategy)
    if footprint != "fsdp":
        if parallel:
            raise ConfigError(f"trainer.strategy is ModelParallelStrategy but model.footprint is "
                              f"{footprint!r}: set model.footprint: fsdp")
        return
    if not parallel:
        raise ConfigError(f"model.footprint 'fsdp' needs trainer.strategy: "
                          f"lightning.pytorch.strategies.ModelParallelStrategy (got {type(strategy).__name__})")
    world = trainer.world_size
    if world < 2:
        raise ConfigError("model.footprint 'fsdp' with one device shards nothing: set trainer.devices "
                          "(× num_nodes) to 2 or more, or use footprint full / lora / qlora")
    mesh = strategy.device_mesh
    if "tensor_parallel" in (mesh.mesh_dim_names or ()) and mesh["tensor_parallel"].size() != 1:
        raise ConfigError(f"model.footprint 'fsdp' is data-parallel: set the ModelParallelStrategy's "
                          f"data_parallel_size: {world} and tensor_parallel_size: 1")


# ------------------------------------------------------------------------------------ memory
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


# ------------------------------------------------------------------------------------ README table
MISTRAL_7B = ModelShape(vocab=32000, hidden=4096, layers=32, intermediate=14336, heads=32, kv_heads=8)
LLAMA3_8B = ModelShape(vocab=128256, hidden=4096, layers=32, intermediate=14336, heads=32, kv_heads=8)

# (model, footprint, GPUs, settings): the README's rows; the settings mirror configs/*.yaml.
TABLE_ROWS = [
    ("Mistral-7B", MISTRAL_7B, "qlora", 1, dict(optimizer="paged_adamw_8bit")),
    ("Mistral-7B", MISTRAL_7B, "lora", 1, dict(optimizer="adamw")),
    ("Mistral-7B", MISTRAL_7B, "full", 1, dict(optimizer="rmsprop")),
    ("Llama-3-8B", LLAMA3_8B, "full", 1, dict(optimizer="rmsprop")),
    ("Llama-3-8B", LLAMA3_8B, "fsdp", 8, dict(optimizer="rmsprop", gradient_checkpointing=True)),
]
TABLE_SETTINGS = dict(pairs_per_device=1, seq_len=1024, generation_prompts=8, num_samples=5, generation_len=1024)


def memory_table() -> str:
    """The README's markdown table: GiB per device for 7-8B models, from ``estimate_memory``."""
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
