"""Per-sequence log-probabilities of the response tokens."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

IGNORE_INDEX = -100


class SequenceLogps(NamedTuple):
    """Per-sequence response log-probabilities, each of shape ``[B]`` (float32)."""

    sum: Tensor  # Σ log p(y_t | x, y_<t) over response tokens (EOS included)
    mean: Tensor  # sum / n_tokens; 0 where a row has no response token
    n_tokens: Tensor  # number of response tokens per row (int64)


def sequence_logprobs(logits: Tensor, labels: Tensor) -> SequenceLogps:
    """Turn next-token logits into summed and mean log-probs of the labelled tokens.

    Args:
        logits: ``[B, T, V]`` logits of a causal LM; position ``t`` predicts token ``t + 1``.
        labels: ``[B, T]`` the input ids with every prompt and padding position set to ``-100``.
            Only the response (and its EOS) is labelled, so the prompt is masked, and right padding
            of any length adds nothing: the result is invariant to it.

    The log-softmax runs in float32 even for bf16 logits: a sum over hundreds of tokens in bf16
    is off by whole nats, more than SPPO's targets can tolerate.
    """
    logits = logits[:, :-1]
    labels = labels[:, 1:]
    mask = labels != IGNORE_INDEX
    safe_labels = torch.where(mask, labels, 0).unsqueeze(-1)
    # gather-minus-logsumexp avoids materialising a second [B, T, V] tensor of log-probs.
    picked = torch.gather(logits, -1, safe_labels).squeeze(-1).float()
    token_logps = picked - torch.logsumexp(logits.float(), dim=-1)
    token_logps = torch.where(mask, token_logps, 0.0)
    n_tokens = mask.sum(-1)
    total = token_logps.sum(-1)
    return SequenceLogps(total, total / n_tokens.clamp(min=1), n_tokens)


def model_logprobs(model: torch.nn.Module, batch: dict[str, Tensor]) -> SequenceLogps:
    """Run ``model`` on a collated batch (``input_ids``, ``attention_mask``, ``labels``, each
    ``[R, T]``) and return the response log-probs of every row."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return sequence_logprobs(out.logits, batch["labels"])
