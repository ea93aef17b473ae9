"""Sampling K responses per prompt from the current policy: batched, left-padded, seeded."""

from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence

import torch
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList
from tqdm.auto import tqdm

from sppo_lightning import seeds
from sppo_lightning.distributed import rank_batches
from sppo_lightning.errors import ConfigError
from sppo_lightning.models import evaluating


def batch_seed(seed: int, batch_index: int) -> int:
    """The seed of one generation batch. Batches are numbered globally, so a prompt gets the same
    samples whichever rank draws its batch, and with any number of ranks."""
    return seeds.indexed(seed, batch_index)


def eos_ids(model: nn.Module, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


class SampledLogprobs(LogitsProcessor):
    """A logits processor that records, for every row, the log-prob of each sampled token under
    the model's raw logits (temperature 1, before temperature and top-p, which ``generate`` applies
    after the processors passed to it), keeping one ``[rows, vocab]`` log-softmax at a time: a step's
    row is gathered when the next step shows the sampled token in ``input_ids`` (``finish`` gathers
    the last). Design note 1: π_t's log-probs come free with its samples."""

    def __init__(self) -> None:
        super().__init__()
        self.previous: Optional[torch.Tensor] = None
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.previous is not None:
            self.steps.append(self.previous.gather(1, input_ids[:, -1:]).squeeze(1))
        self.previous = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def finish(self, sequences: torch.Tensor) -> list[list[float]]:
        """Per row, the sampled tokens' log-probs, step by step (``sequences``: what ``generate`` returned)."""
        if self.previous is not None:
            self.steps.append(self.previous.gather(1, sequences[:, -1:]).squeeze(1))
        self.previous = None
        return torch.stack(self.steps, dim=1).tolist() if self.steps else [[] for _ in range(sequences.shape[0])]


# Settings of a model's own generation config that process the logits before our processor sees them.
_PROCESSING = {"repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0), "bad_words_ids": (None,),
               "suppress_tokens": (None,), "begin_suppress_tokens": (None,), "sequence_bias": (None,),
               "encoder_repetition_penalty": (None, 1.0), "min_length": (None, 0), "min_new_tokens": (None, 0)}


def raw_logits_problem(model: nn.Module) -> Optional[str]:
    """Why the sampler cannot see ``model``'s raw logits (its generation config processes them), or None."""
    config = model.generation_config
    found = [f"{k}={getattr(config, k)!r}" for k, plain in _PROCESSING.items() if getattr(config, k, None) not in plain]
    return f"its generation config processes the logits ({', '.join(found)})" if found else None


def sample_responses(model: nn.Module, tokenizer, prompt_ids: Sequence[list[int]], num_samples: int,
                     **sampling) -> list[list[list[int]]]:
    """``[N][num_samples]`` response token ids (see ``_sample`` for the settings)."""
    return _sample(model, tokenizer, prompt_ids, num_samples, with_logprobs=False, **sampling)[0]


def sample_responses_with_logprobs(model: nn.Module, tokenizer, prompt_ids: Sequence[list[int]], num_samples: int,
                                   **sampling) -> tuple[list[list[list[int]]], list[list[float]]]:
    """The response ids and, for each, the sum of its tokens' log-probs under the sampling model's
    raw logits (``SampledLogprobs``): π_t's reference log-probs without a forward of their own."""
    return _sample(model, tokenizer, prompt_ids, num_samples, with_logprobs=True, **sampling)


@torch.no_grad()
def _sample(
    model: nn.Module,
    tokenizer,
    prompt_ids: Sequence[list[int]],
    num_samples: int,
    *,
    temperature: float = 0.7,
    top_p: float = 0.9,
    max_new_tokens: int = 512,
    batch_size: int = 16,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    show_progress: bool = False,
    retry_oom: bool = True,
    synced: bool = False,
    batch_offset: int = 0,
    desc: str = "sampling",
    with_logprobs: bool = False,
) -> tuple[list[list[list[int]]], list[list[float]]]:
    """Sample ``num_samples`` responses for each prompt with ``model.generate``.

    Args:
        prompt_ids: N templated prompts (token ids, generation prompt included).
        batch_size: prompts per ``generate`` call (each expands to ``batch_size * num_samples`` rows
            with ``num_return_sequences``: one prefill per prompt, not K).
        temperature: 0 decodes greedily (evaluation answers); > 0 samples.
        seed: with the batch index, fixes every sample: the same seed gives the same responses.
        desc: the progress bar's label (sampling for training, or evaluation).
        batch_offset: global index of the first batch, when ``prompt_ids`` is one shard of a longer
            list cut at batch boundaries: every batch keeps the seed it has in the whole list.
        rank / world_size: this process draws batches ``rank, rank + world_size, ...``; the caller
            gathers. Prompts are not reordered, so batches are identical across world sizes.
        retry_oom: a batch that runs out of memory (CUDA or CPU) is retried as two halves, down to
            one prompt, with a warning; the halves draw their own seeds.
        synced: the model is sharded over the ranks (FSDP), so every forward is a collective: all
            ranks run the same number of ``generate`` calls (a rank short of batches repeats one
            and drops its output), each with ``synced_gpus=True`` so that a rank whose sequences
            have finished keeps stepping with the others. ``retry_oom`` is off: a retry on one
            rank alone would leave the others waiting.

        with_logprobs: also the summed raw log-prob of each response (``SampledLogprobs``).

    Returns:
        ``[N][num_samples]`` response token ids, each ending with its EOS when the model stopped
        (no EOS when it hit ``max_new_tokens``), no padding; and ``[N][num_samples]`` summed
        log-probs (empty lists without ``with_logprobs``). Only the rows this rank drew are
        filled; the others are empty lists.
    """
    device = next(model.parameters()).device
    stop = eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(stop))
    results: list[list[list[int]]] = [[] for _ in prompt_ids]
    sums: list[list[float]] = [[] for _ in prompt_ids]
    if with_logprobs and (problem := raw_logits_problem(model)) is not None:
        raise ConfigError(f"sampler log-probs cannot be π's own: {problem}; use reference_logps: forward")
    if temperature > 0:  # vLLM's and the paper's sampling: no top-k cut
        options = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    else:
        options = dict(do_sample=False)
    if synced:
        retry_oom = False
    mine = rank_batches(math.ceil(len(prompt_ids) / batch_size), rank, world_size, lockstep=synced)
    with evaluating(model):
        for index, real in tqdm(mine, desc=desc, disable=not show_progress):
            start = index * batch_size
            chunk = prompt_ids[start : start + batch_size]
            input_ids, attention_mask = left_pad(chunk, pad_id)
            rows, token_logps = _generate_halving(
                model, input_ids.to(device), attention_mask.to(device), batch_seed(seed, batch_offset + start // batch_size),
                retry_oom, dict(options, max_new_tokens=max_new_tokens, num_return_sequences=num_samples,
                                pad_token_id=pad_id, use_cache=True, synced_gpus=synced), with_logprobs,
            )
            if not real:
                continue
            for row, tokens in enumerate(rows):
                kept = _cut_at_eos(tokens, stop)
                results[start + row // num_samples].append(kept)
                if with_logprobs:  # the tokens kept (through the EOS), not the padding after it
                    sums[start + row // num_samples].append(float(sum(token_logps[row][: len(kept)])))
    return results, sums


def left_pad(rows: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, T]`` ids and attention mask, each row right-aligned: every sequence ends at the same
    column, where generation (or the next-token read-out) happens."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, ids in enumerate(rows):
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        attention_mask[row, width - len(ids):] = 1
    return input_ids, attention_mask


def _is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and ("out of memory" in str(err) or "can't allocate memory" in str(err))
    )


def _generate_halving(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, seed: int,
                      retry_oom: bool, options: dict,
                      with_logprobs: bool = False) -> tuple[list[list[int]], list[list[float]]]:
    """New tokens of every returned row (``num_return_sequences`` per prompt, in order), and with
    ``with_logprobs`` each new token's raw log-prob (else empty lists)."""
    device = input_ids.device
    try:
        recorder = SampledLogprobs() if with_logprobs else None
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            extra = {"logits_processor": LogitsProcessorList([recorder])} if recorder is not None else {}
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **options, **extra)
        tokens = out[:, input_ids.shape[1]:].tolist()
        return tokens, recorder.finish(out) if recorder is not None else [[] for _ in tokens]
    except (RuntimeError, torch.OutOfMemoryError) as err:
        if not (retry_oom and _is_out_of_memory(err) and input_ids.shape[0] > 1):
            raise
    half = input_ids.shape[0] // 2
    warnings.warn(f"out of memory generating for {input_ids.shape[0]} prompts; retrying as {half} + "
                  f"{input_ids.shape[0] - half} (lower generation_batch_size to avoid this)")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    # Left padding stays valid for each half: every row still ends at the last column.
    first = _generate_halving(model, input_ids[:half], attention_mask[:half], seed * 2 + 1, retry_oom, options,
                              with_logprobs)
    second = _generate_halving(model, input_ids[half:], attention_mask[half:], seed * 2 + 2, retry_oom, options,
                               with_logprobs)
    return first[0] + second[0], first[1] + second[1]


def _cut_at_eos(tokens: list[int], stop: set[int]) -> list[int]:
    for position, token in enumerate(tokens):
        if token in stop:
            return tokens[: position + 1]
    return tokens


def gather_responses(local: list[list[list[int]]], world_size: int) -> list[list[list[int]]]:
    """Merge every rank's ``sample_responses`` output (each fills its own rows)."""
    if world_size == 1:
        return local
    import torch.distributed as dist

    gathered: list[Optional[list]] = [None] * world_size
    dist.all_gather_object(gathered, local)
    return [next((part[i] for part in gathered if part[i]), []) for i in range(len(local))]


def sample_on_ranks(model: nn.Module, tokenizer, prompt_ids: Sequence[list[int]], num_samples: int, *,
                    rank: int, world_size: int, **sampling) -> list[list[list[int]]]:
    """``sample_responses`` with this rank's share of the batches, gathered: every rank gets all."""
    return _sample_on_ranks(model, tokenizer, prompt_ids, num_samples, rank, world_size, False, sampling)[0]


def sample_on_ranks_with_logprobs(model: nn.Module, tokenizer, prompt_ids: Sequence[list[int]], num_samples: int, *,
                                  rank: int, world_size: int,
                                  **sampling) -> tuple[list[list[list[int]]], list[list[float]]]:
    """``sample_responses_with_logprobs`` with this rank's share of the batches, both gathered."""
    return _sample_on_ranks(model, tokenizer, prompt_ids, num_samples, rank, world_size, True, sampling)


def _sample_on_ranks(model: nn.Module, tokenizer, prompt_ids: Sequence[list[int]], num_samples: int, rank: int,
                     world_size: int, with_logprobs: bool,
                     sampling: dict) -> tuple[list[list[list[int]]], list[list[float]]]:
    from sppo_lightning.sharding import is_sharded

    synced = world_size > 1 and is_sharded(model)
    ids, logps = _sample(model, tokenizer, prompt_ids, num_samples, rank=rank, world_size=world_size, synced=synced,
                         with_logprobs=with_logprobs, **sampling)
    if with_logprobs:  # gathered like the ids (each rank fills its own rows)
        logps = gather_responses(logps, world_size)  # type: ignore[arg-type]
    return gather_responses(ids, world_size), logps
