"""Sampling K responses per prompt from the current policy: batched, left-padded, seeded."""

from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from sppo_lightning import seeds
from sppo_lightning.distributed import rank_batches
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


@torch.no_grad()
def sample_responses(
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
) -> list[list[list[int]]]:
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

    Returns:
        ``[N][num_samples]`` response token ids, each ending with its EOS when the model stopped
        (no EOS when it hit ``max_new_tokens``), no padding. Only the rows this rank drew are
        filled; the others are empty lists.
    """
    device = next(model.parameters()).device
    stop = eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(stop))
    results: list[list[list[int]]] = [[] for _ in prompt_ids]
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
            rows = _generate_halving(
                model, input_ids.to(device), attention_mask.to(device), batch_seed(seed, batch_offset + start // batch_size),
                retry_oom, dict(options, max_new_tokens=max_new_tokens, num_return_sequences=num_samples,
                                pad_token_id=pad_id, use_cache=True, synced_gpus=synced),
            )
            if not real:
                continue
            for row, tokens in enumerate(rows):
                results[start + row // num_samples].append(_cut_at_eos(tokens, stop))
    return results


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
                      retry_oom: bool, options: dict) -> list[list[int]]:
    """New tokens of every returned row (``num_return_sequences`` per prompt, in order)."""
    device = input_ids.device
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **options)
        return out[:, input_ids.shape[1]:].tolist()
    except (RuntimeError, torch.OutOfMemoryError) as err:
        if not (retry_oom and _is_out_of_memory(err) and input_ids.shape[0] > 1):
            raise
    half = input_ids.shape[0] // 2
    warnings.warn(f"out of memory generating for {input_ids.shape[0]} prompts; retrying as {half} + "
                  f"{input_ids.shape[0] - half} (lower generation_batch_size to avoid this)")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    # Left padding stays valid for each half: every row still ends at the last column.
    return (_generate_halving(model, input_ids[:half], attention_mask[:half], seed * 2 + 1, retry_oom, options)
            + _generate_halving(model, input_ids[half:], attention_mask[half:], seed * 2 + 2, retry_oom, options))


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
    from sppo_lightning.sharding import is_sharded

    synced = world_size > 1 and is_sharded(model)
    local = sample_responses(model, tokenizer, prompt_ids, num_samples, rank=rank, world_size=world_size,
                             synced=synced, **sampling)
    return gather_responses(local, world_size)
