"""The ``fsdp`` footprint's FSDP2 sharding: one ``fully_shard`` unit per decoder layer, then the rest."""

from __future__ import annotations

import torch
from torch import nn

from sppo_lightning.errors import ConfigError


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
