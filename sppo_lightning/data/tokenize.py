"""Chat-templating, truncation and collation of preference pairs into one concatenated batch."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from sppo_lightning.data.rows import PreferenceRow
from sppo_lightning.labels import IGNORE_INDEX


class TemplateError(ValueError):
    """The tokenizer's chat template cannot split a conversation into prompt and response."""


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: list[dict[str, str]]) -> list[int]:
    """Token ids of the templated prompt, ending with the generation prompt (assistant header).

    The template text already holds any BOS; tokenizing it with ``add_special_tokens=False`` is
    what avoids the double BOS of the official SPPO scripts, which tokenize the templated text with
    special tokens added.
    """
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_response(
    tokenizer: PreTrainedTokenizerBase, prompt: list[dict[str, str]], response: str
) -> list[int]:
    """Token ids of the response as the template renders it after the generation prompt.

    The response part is ``template(prompt + response)`` minus ``template(prompt, generation
    prompt)``, so it carries the template's end-of-turn tokens. If the template closes the turn
    without the tokenizer's EOS, EOS is appended: the model must learn to stop, and the EOS counts
    in the response log-prob.
    """
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(
        prompt + [{"role": "assistant", "content": response}], tokenize=False
    )
    if not full_text.startswith(prompt_text):
        raise TemplateError(
            "the chat template renders the prompt differently once a response follows it, so the "
            "response cannot be cut off at the generation prompt"
        )
    ids = tokenizer(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def keep_end(ids: list[int], max_tokens: int, bos_token_id: int | None = None) -> list[int]:
    """The last ``max_tokens`` ids; a leading BOS is kept in front (and counts toward the limit)."""
    if len(ids) <= max_tokens:
        return ids
    keep_bos = bos_token_id is not None and ids[:1] == [bos_token_id]
    tail = ids[len(ids) - (max_tokens - keep_bos):]
    return [bos_token_id] + tail if keep_bos else tail


def truncate(
    prompt_ids: list[int],
    chosen_ids: list[int],
    rejected_ids: list[int],
    max_length: int,
    max_prompt_length: int,
    bos_token_id: int | None = None,
) -> tuple[list[int], list[int], list[int]]:
    """TRL/SPPO truncation (``keep_end``): if prompt + longer response exceeds ``max_length``,
    keep the last ``max_prompt_length`` prompt tokens; if still too long, cut both responses to
    what is left. Unlike the reference, a leading BOS survives the prompt cut."""
    longer = max(len(chosen_ids), len(rejected_ids))
    if len(prompt_ids) + longer > max_length:
        prompt_ids = keep_end(prompt_ids, max_prompt_length, bos_token_id)
    if len(prompt_ids) + longer > max_length:
        budget = max_length - len(prompt_ids)
        chosen_ids, rejected_ids = chosen_ids[:budget], rejected_ids[:budget]
    return prompt_ids, chosen_ids, rejected_ids


def encode_row(
    tokenizer: PreTrainedTokenizerBase, row: PreferenceRow, max_length: int, max_prompt_length: int
) -> dict[str, Any]:
    """One row → ``{prompt_ids, chosen_ids, rejected_ids, <probs>, <reference logps>}``."""
    prompt_ids, chosen_ids, rejected_ids = truncate(
        encode_prompt(tokenizer, row.prompt),
        encode_response(tokenizer, row.prompt, row.chosen),
        encode_response(tokenizer, row.prompt, row.rejected),
        max_length,
        max_prompt_length,
        tokenizer.bos_token_id,
    )
    return {
        "prompt_ids": prompt_ids,
        "chosen_ids": chosen_ids,
        "rejected_ids": rejected_ids,
        **row.probs,
        **row.reference,
    }


def collate_pairs(examples: Sequence[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Stack B pairs into one ``[2B, T]`` batch, chosen rows first, right-padded to its own longest.

    Returns ``input_ids``, ``attention_mask`` and ``labels`` (prompt and padding = -100), each
    ``[2B, T]``, ``prompt_lengths`` ``[B]`` (int64), plus a ``[B]`` float64 tensor for every numeric column all examples carry
    (win probabilities, reference log-probs, rewards).
    """
    batch = _padded([(ex["prompt_ids"], ex[side]) for side in ("chosen_ids", "rejected_ids") for ex in examples],
                    pad_token_id)
    # The prompt's length lets a packed layout (sppo_lightning.packing) put each prompt in once.
    prompt_lengths = torch.tensor([len(ex["prompt_ids"]) for ex in examples], dtype=torch.long)
    batch["prompt_lengths"] = prompt_lengths
    # Per-pair numbers (win probabilities, reference log-probs, BOND rewards) ride along.
    for column in examples[0]:
        values = [ex.get(column) for ex in examples]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            batch[column] = torch.tensor(values, dtype=torch.float64)
    return batch


def collate_responses(examples: Sequence[dict[str, Any]], key: str, pad_token_id: int) -> dict[str, torch.Tensor]:
    """One row per example, ``prompt_ids + example[key]``: ``input_ids``, ``attention_mask`` and
    ``labels`` (prompt and padding = -100), each ``[B, T]``. For log-probs of single responses
    (no pair layout: ``model_logprobs`` runs it padded)."""
    return _padded([(ex["prompt_ids"], ex[key]) for ex in examples], pad_token_id)


def _padded(rows: Sequence[tuple[list[int], list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """(prompt ids, response ids) rows → right-padded ``input_ids``, ``attention_mask``, ``labels``."""
    width = max(len(prompt) + len(response) for prompt, response in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (prompt, response) in enumerate(rows):
        n = len(prompt) + len(response)
        input_ids[i, :n] = torch.tensor(prompt + response)
        labels[i, len(prompt) : n] = torch.tensor(response, dtype=torch.long)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
