"""Linear Alignment (arXiv 2401.11458): inference-time steering of logits by a principle prompt.

At every step the same frozen model reads two contexts, one with the principle in the system
prompt and one without, and the next token comes from

    z̃ = (1+α)·z_c − α·z_0            (fp32; z_c: with the principle, z_0: without)
    p = softmax(z̃ / T)
    p ← p ⊙ nucleus_mask(softmax(z_c / T), top_p)     (the mask comes from the *principled* distribution)
    greedy: argmax p;  sampling: p / Σp, or the masked principled distribution if the mask emptied p

Unlike the official code (batch 1 only, ``top_p`` flag silently ignored) this runs any batch size:
each stream has its own left padding, attention mask, position ids and KV cache, and the chosen
token is appended to both. ``shared/specs/algorithms.md`` §1 has the details.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from sppo_lightning.data.tokenize import encode_prompt
from sppo_lightning.generation import batch_seed, eos_ids
from sppo_lightning.models import evaluating

Messages = list[dict[str, str]]


@dataclass
class LinearAlignmentSettings:
    """Linear Alignment's knobs. Defaults are the paper's scripts: α = 2, T = 0.5, top_p = 0.8, greedy."""

    alpha: float = 2.0
    temperature: float = 0.5
    top_p: float = 0.8
    do_sample: bool = False


def nucleus_mask(probs: Tensor, top_p: float) -> Tensor:
    """``[B, V]`` bool: the smallest set of most likely tokens whose mass reaches ``top_p``
    (a token stays while the mass *before* it is below top_p); the top token always stays."""
    sorted_probs, order = probs.sort(-1, descending=True)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    keep_sorted = mass_before < top_p
    keep_sorted[..., 0] = True
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def linear_alignment_step(
    principled_logits: Tensor, plain_logits: Tensor, alpha: float, temperature: float, top_p: float
) -> tuple[Tensor, Tensor]:
    """One decoding step's distributions from the two streams' ``[B, V]`` next-token logits.

    Returns ``(q, fallback)``: ``q`` is softmax((1+α)z_c − αz_0)/T) masked by the top-p nucleus of
    softmax(z_c/T) (unnormalised); ``fallback`` is that masked principled distribution, for
    sampling when ``q`` sums to 0.
    """
    z_c, z_0 = principled_logits.float(), plain_logits.float()
    combined = torch.softmax(((1 + alpha) * z_c - alpha * z_0) / temperature, dim=-1)
    principled = torch.softmax(z_c / temperature, dim=-1)
    mask = nucleus_mask(principled, top_p)
    return combined * mask, principled * mask


def with_principle(messages: Messages, principle: str) -> Messages:
    """The conversation with the principle in its system prompt: appended to an existing system
    message, as the paper does after the default system text, or as a new one."""
    if messages and messages[0]["role"] == "system":
        system = messages[0]["content"]
        content = f"{system} {principle}" if system else principle
        return [{"role": "system", "content": content}] + messages[1:]
    return [{"role": "system", "content": principle}] + messages


def _encode(tokenizer, messages: Messages, principle: Optional[str]) -> list[int]:
    if principle is None:
        return encode_prompt(tokenizer, messages)
    try:
        return encode_prompt(tokenizer, with_principle(messages, principle))
    except Exception:  # templates without a system role (e.g. Mistral v0.1): lead the first user turn
        first = next(i for i, m in enumerate(messages) if m["role"] == "user")
        changed = [dict(m) for m in messages]
        changed[first]["content"] = f"{principle}\n\n{changed[first]['content']}"
        return encode_prompt(tokenizer, changed)


class _Stream:
    """One context's left-padded ids, mask, positions and KV cache."""

    def __init__(self, rows: list[list[int]], pad_id: int, device: torch.device) -> None:
        width = max(len(r) for r in rows)
        self.ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
        self.mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
        for i, r in enumerate(rows):
            self.ids[i, width - len(r):] = torch.tensor(r, device=device)
            self.mask[i, width - len(r):] = 1
        self.cache = None

    def next_logits(self, model: nn.Module, new_tokens: Optional[Tensor] = None) -> Tensor:
        if new_tokens is None:  # prefill: positions count real tokens only, so left padding is invisible
            ids, positions = self.ids, (self.mask.cumsum(-1) - 1).clamp(min=0)
        else:
            self.mask = torch.cat([self.mask, torch.ones_like(new_tokens)], dim=-1)
            ids, positions = new_tokens, self.mask.sum(-1, keepdim=True) - 1
        out = model(input_ids=ids, attention_mask=self.mask, position_ids=positions,
                    past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        return out.logits[:, -1]


@torch.no_grad()
def linear_alignment_generate(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[Union[str, Messages]],
    principles: Union[str, Sequence[str]],
    settings: Optional[LinearAlignmentSettings] = None,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    seed: int = 0,
    show_progress: bool = False,
) -> list[list[int]]:
    """Decode every prompt with Linear Alignment. Works with any Hugging Face causal LM.

    Args:
        prompts: user strings or conversations (lists of ``{role, content}``).
        principles: one principle for all prompts, or one per prompt.
        settings: α, T, top_p, greedy/sampling (``LinearAlignmentSettings``).
        seed: sampling stream (per batch, as ``generation.sample_responses``).

    Returns:
        ``[N]`` response token ids, each ending with its EOS when the model stopped.
    """
    s = settings or LinearAlignmentSettings()
    conversations = [[{"role": "user", "content": p}] if isinstance(p, str) else list(p) for p in prompts]
    if isinstance(principles, str):
        principles = [principles] * len(conversations)
    if len(principles) != len(conversations):
        raise ValueError(f"{len(principles)} principles for {len(conversations)} prompts")
    device = next(model.parameters()).device
    stop = eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(stop))
    results: list[list[int]] = []
    with evaluating(model):
        for start in tqdm(range(0, len(conversations), batch_size), desc="linear alignment", disable=not show_progress):
            chunk = range(start, min(start + batch_size, len(conversations)))
            principled = _Stream([_encode(tokenizer, conversations[i], principles[i]) for i in chunk], pad_id, device)
            plain = _Stream([_encode(tokenizer, conversations[i], None) for i in chunk], pad_id, device)
            generator = torch.Generator(device=device).manual_seed(batch_seed(seed, start // batch_size))
            z_c, z_0 = principled.next_logits(model), plain.next_logits(model)
            out = [[] for _ in chunk]
            done = torch.zeros(len(chunk), dtype=torch.bool, device=device)
            for _ in range(max_new_tokens):
                q, fallback = linear_alignment_step(z_c, z_0, s.alpha, s.temperature, s.top_p)
                if s.do_sample:
                    empty = q.sum(-1, keepdim=True) <= 0
                    q = torch.where(empty, fallback, q)
                    token = torch.multinomial(q / q.sum(-1, keepdim=True), 1, generator=generator).squeeze(-1)
                else:
                    token = q.argmax(-1)
                token = torch.where(done, torch.full_like(token, pad_id), token)
                for row, t in enumerate(token.tolist()):
                    if not done[row]:
                        out[row].append(t)
                done |= torch.tensor([t in stop for t in token.tolist()], device=device)
                if bool(done.all()):
                    break
                z_c = principled.next_logits(model, token.unsqueeze(-1))
                z_0 = plain.next_logits(model, token.unsqueeze(-1))
            results.extend(out)
    return results
