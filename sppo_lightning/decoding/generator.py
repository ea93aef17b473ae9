"""``LinearAlignmentGenerator``: self-play samples drawn with Linear Alignment (arXiv 2401.11458).

The policy's next-token distribution is steered toward a principle (``linear_alignment.py``)
while sampling; training still sees the plain prompt. A ``Generator`` like ``HFGenerator``: chosen
with a method's ``generator`` key (``SPPO(generator=LinearAlignmentGenerator(...))``).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from torch import nn

from sppo_lightning.data.prompts import Prompt
from sppo_lightning.decoding.linear_alignment import LinearAlignmentSettings, linear_alignment_generate
from sppo_lightning.generation import batch_seed, gather_responses
from sppo_lightning.distributed import DistContext, rank_batches
from sppo_lightning.pipeline.generators import check_sampling


class LinearAlignmentGenerator:
    """K Linear-Alignment samples per prompt under ``principle``, split over ranks by batch.

    Args:
        principle: the text the policy's logits are steered toward.
        alpha: the steering strength (paper: 1-3).
        temperature, top_p, max_new_tokens, batch_size: as for ``HFGenerator``.
    """

    def __init__(self, principle: str, alpha: float = 2.0, temperature: float = 0.7, top_p: float = 0.9,
                 max_new_tokens: int = 512, batch_size: int = 16) -> None:
        self.principle, self.alpha = principle, alpha
        self.temperature, self.top_p, self.max_new_tokens, self.batch_size = temperature, top_p, max_new_tokens, batch_size
        check_sampling(type(self).__name__, temperature, top_p, max_new_tokens, batch_size)

    def fingerprint(self) -> dict[str, Any]:
        # What shapes the samples: the principle and its strength, and the sampling settings.
        return {"class": "LinearAlignmentGenerator", "principle": self.principle, "alpha": self.alpha,
                "temperature": self.temperature, "top_p": self.top_p, "max_new_tokens": self.max_new_tokens,
                "batch_size": self.batch_size}

    def sample(self, model: nn.Module, tokenizer, prompts: Sequence[Prompt], num_samples: int, seed: int,
               ctx: DistContext, batch_offset: int = 0, desc: str = "sampling") -> list[list[list[int]]]:
        if ctx.world_size > 1:
            from sppo_lightning.sharding import is_sharded

            if is_sharded(model):
                from sppo_lightning.errors import ConfigError

                raise ConfigError("LinearAlignmentGenerator does not run under footprint 'fsdp' yet; sample "
                                  "plainly or use footprint full / lora / qlora")
        settings = LinearAlignmentSettings(self.alpha, self.temperature, self.top_p, do_sample=True)
        local: list[list[list[int]]] = [[] for _ in prompts]
        for index, _ in rank_batches(math.ceil(len(prompts) / self.batch_size), ctx.rank, ctx.world_size):
            start = index * self.batch_size
            chunk = prompts[start : start + self.batch_size]
            ids = linear_alignment_generate(
                model, tokenizer, [p.messages for p in chunk for _ in range(num_samples)], self.principle, settings,
                max_new_tokens=self.max_new_tokens, batch_size=len(chunk) * num_samples,
                seed=batch_seed(seed, batch_offset + index),
            )
            for j in range(len(chunk)):
                local[start + j] = ids[j * num_samples : (j + 1) * num_samples]
        return gather_responses(local, ctx.world_size)
