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

The pieces live in files of their own: ``quantization.py`` (4-bit), ``sharding.py`` (FSDP2) and
``memory.py`` (the estimate; ``python -m sppo_lightning.footprints`` prints the table of docs/footprints.md).
This file resolves the footprint and checks it against the strategy.
"""

from __future__ import annotations

from typing import Literal, Optional

from sppo_lightning.errors import ConfigError

Footprint = Literal["full", "lora", "qlora", "fsdp"]
FOOTPRINTS = ("full", "lora", "qlora", "fsdp")


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
