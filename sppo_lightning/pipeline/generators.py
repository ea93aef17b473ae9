"""``HFGenerator``: π_t samples K responses per prompt with Hugging Face ``generate``.

A generator (``sppo_lightning.contracts.Generator``) is chosen in the config by ``class_path``;
the pipeline calls ``sample`` and stores token ids, so every generator returns ids, not text. Its
``fingerprint()`` goes into the iteration's settings: a run dir made with another generator is
refused on resume rather than mixed. The others: ``VLLMGenerator`` (``vllm_generator.py``) and
``sppo_lightning.decoding.LinearAlignmentGenerator``.
"""

from __future__ import annotations

from typing import Any, Sequence

from torch import nn

from sppo_lightning.data.prompts import Prompt
from sppo_lightning.errors import ConfigError
from sppo_lightning.generation import sample_on_ranks, sample_on_ranks_with_logprobs
from sppo_lightning.distributed import DistContext


class HFGenerator:
    """Sampling with ``model.generate``: left-padded static batches of ``batch_size`` prompts, K
    sequences each (``num_return_sequences``), split over ranks by batch (``synced_gpus`` under
    FSDP). Sampling as the paper's vLLM runs: temperature, top_p, no top-k.

    Args:
        temperature: > 0 (self-play samples). top_p: nucleus mass.
        max_new_tokens: response tokens at most. batch_size: prompts per ``generate`` call.
        retry_oom: a batch that runs out of memory is retried as two halves (warned).
        show_progress: a progress bar on rank 0.
    """

    def __init__(self, temperature: float = 0.7, top_p: float = 0.9, max_new_tokens: int = 512,
                 batch_size: int = 16, retry_oom: bool = True, show_progress: bool = True) -> None:
        self.temperature, self.top_p, self.max_new_tokens = temperature, top_p, max_new_tokens
        self.batch_size, self.retry_oom, self.show_progress = batch_size, retry_oom, show_progress
        check_sampling(type(self).__name__, temperature, top_p, max_new_tokens, batch_size)

    def fingerprint(self) -> dict[str, Any]:
        return {"class": "HFGenerator", "temperature": self.temperature, "top_p": self.top_p,
                "max_new_tokens": self.max_new_tokens, "batch_size": self.batch_size}

    def sample(self, model: nn.Module, tokenizer, prompts: Sequence[Prompt], num_samples: int, seed: int,
               ctx: DistContext, batch_offset: int = 0, desc: str = "sampling") -> list[list[list[int]]]:
        return sample_on_ranks(model, tokenizer, [p.ids for p in prompts], num_samples,
                               **self._sampling(seed, ctx, batch_offset, desc))

    def sample_with_logprobs(self, model: nn.Module, tokenizer, prompts: Sequence[Prompt], num_samples: int,
                             seed: int, ctx: DistContext, batch_offset: int = 0,
                             desc: str = "sampling") -> tuple[list[list[list[int]]], list[list[float]]]:
        """``sample``'s responses (the same ids for the same seed) and each one's summed log-prob
        under the model's raw logits, recorded while it sampled (``generation.SampledLogprobs``)."""
        return sample_on_ranks_with_logprobs(model, tokenizer, [p.ids for p in prompts], num_samples,
                                             **self._sampling(seed, ctx, batch_offset, desc))

    def _sampling(self, seed: int, ctx: DistContext, batch_offset: int, desc: str) -> dict[str, Any]:
        """The keyword arguments of ``generation.sample_on_ranks`` for these settings on ``ctx``."""
        return dict(rank=ctx.rank, world_size=ctx.world_size, temperature=self.temperature, top_p=self.top_p,
                    max_new_tokens=self.max_new_tokens, batch_size=self.batch_size, seed=seed,
                    retry_oom=self.retry_oom, show_progress=self.show_progress and ctx.is_global_zero,
                    batch_offset=batch_offset, desc=desc)


def check_sampling(owner: str, temperature: float, top_p: float, max_new_tokens: int, batch_size: int) -> None:
    """One-line errors for impossible sampling settings, naming the owner."""
    for name, value, kind in (("temperature", temperature, (int, float)), ("top_p", top_p, (int, float)),
                              ("max_new_tokens", max_new_tokens, int), ("batch_size", batch_size, int)):
        if isinstance(value, bool) or not isinstance(value, kind):
            raise ConfigError(f"{owner}: {name} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    checks = [
        (temperature > 0, f"temperature must be > 0, got {temperature}"),
        (0 < top_p <= 1, f"top_p must be in (0, 1], got {top_p}"),
        (max_new_tokens >= 1, f"max_new_tokens must be at least 1, got {max_new_tokens}"),
        (batch_size >= 1, f"batch sizes must be at least 1, got {batch_size}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"{owner}: {message}")
