"""Per-sequence log-probabilities of the response tokens."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from sppo_lightning import packing as layout
from sppo_lightning.labels import IGNORE_INDEX


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


def model_logprobs(model: torch.nn.Module, batch: dict[str, Tensor], chunk_tokens: int = 1024,
                   packing: Optional[int] = None) -> SequenceLogps:
    """Run ``model`` on a collated batch (``input_ids``, ``attention_mask``, ``labels``, each
    ``[R, T]``) and return the response log-probs of every row.

    For Hugging Face causal LMs (with or without peft) the LM head runs only at response positions,
    ``chunk_tokens`` at a time and recomputed in backward, so the ``[tokens, vocab]`` logits never
    exist whole and prompt and padding positions cost no head FLOPs. Other models
    take the plain path through full logits; both give the same numbers.

    ``packing``: a token budget per row; the pairs of a ``collate_pairs`` batch (which carries
    ``prompt_lengths``) then run packed
    (``sppo_lightning.packing``: each prompt once, no padding between pairs) and the result is the
    padded batch's, row for row. None: the batch runs as it is.
    """
    # A batch without prompt lengths (not from collate_pairs) has no known pair layout: padded.
    if packing is not None and "prompt_lengths" in batch:
        packed = layout.pack_pairs(batch, packing, _pad_id(batch))
        inputs = {"input_ids": packed.input_ids, "position_ids": packed.position_ids,
                  "attention_mask": layout.attention_masks(packed, _config(model), _compute_dtype(model))}
        where = (packed.target_row, packed.target_col, packed.target_id, packed.target_seq, packed.num_sequences)
    else:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        labels = batch["labels"][:, 1:]
        mask = labels != IGNORE_INDEX
        rows, cols = mask.nonzero(as_tuple=True)
        where = (rows, cols, labels[rows, cols], rows, labels.shape[0])
    parts = _backbone_and_head(model)
    if parts is None:
        logits = model(**inputs, use_cache=False).logits
        return _score(logits, where, None, None, chunk_tokens)
    backbone, head, softcap = parts
    hidden = backbone(**inputs, use_cache=False).last_hidden_state
    return _score(hidden, where, head.weight, softcap, chunk_tokens)


def _score(states: Tensor, where, weight: Optional[Tensor], softcap: Optional[float], chunk_tokens: int) -> SequenceLogps:
    """Log-probs of the targets ``where = (row, col, token, sequence, num_sequences)`` summed per
    sequence: ``states[row, col]`` are hidden states (then ``weight`` is the LM head) or logits."""
    rows, cols, targets, seqs, num_sequences = where
    states = states[rows, cols]
    if weight is None:
        token_logps = _logits_logprobs(states, targets)
    else:
        pieces = []
        for start in range(0, targets.shape[0], chunk_tokens):
            args = (states[start : start + chunk_tokens], targets[start : start + chunk_tokens], weight, softcap)
            if torch.is_grad_enabled() and states.requires_grad:
                pieces.append(checkpoint(_token_logprobs, *args, use_reentrant=False))
            else:
                pieces.append(_token_logprobs(*args))
        token_logps = torch.cat(pieces) if pieces else states.new_zeros(0, dtype=torch.float32)
    total = torch.zeros(num_sequences, dtype=torch.float32, device=states.device).index_add(0, seqs, token_logps)
    n_tokens = torch.bincount(seqs, minlength=num_sequences)
    return SequenceLogps(total, total / n_tokens.clamp(min=1), n_tokens)


def _logits_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    picked = torch.gather(logits, -1, targets.unsqueeze(-1)).squeeze(-1).float()
    return picked - torch.logsumexp(logits.float(), dim=-1)


def _token_logprobs(states: Tensor, targets: Tensor, weight: Tensor, softcap: float | None) -> Tensor:
    logits = (states @ weight.T).float()
    if softcap:  # Gemma-2 style final logit soft-capping
        logits = softcap * torch.tanh(logits / softcap)
    return _logits_logprobs(logits, targets)


def _config(model: torch.nn.Module):
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(inner, "config", None)


def _compute_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype attention scores are in: the floating dtype of the model's (non-quantised) weights."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _pad_id(batch: dict[str, Tensor]) -> int:
    """A padding id for packed rows' ends: what the batch already pads with (any id is fine: padding
    attends only to padding and is never scored)."""
    return int(batch["input_ids"][0, 0])


def _backbone_and_head(model: torch.nn.Module):
    """(backbone, LM head, soft-cap) of a Hugging Face causal LM, peft-wrapped or not; None if the
    model is not one we can split safely (then the plain path runs).

    FSDP-sharded models take the plain path too: calling the backbone and reading the head's
    weight outside the root module's forward would skip the hooks that gather the shards.
    """
    from sppo_lightning.sharding import is_sharded

    if is_sharded(model):
        return None
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    prefix = getattr(inner, "base_model_prefix", None)
    backbone = getattr(inner, prefix, None) if prefix else None
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    config = getattr(inner, "config", None)
    # Exactly nn.Linear: a LoRA-adapted head (peft's lora.Linear) or a scaled one takes the plain path.
    if backbone is None or type(head) is not torch.nn.Linear or head.bias is not None or config is None:
        return None
    if getattr(config, "logit_scale", None):
        return None
    return backbone, head, getattr(config, "final_logit_softcapping", None)
