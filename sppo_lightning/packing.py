"""Padding-free, prefix-shared layout of a preference batch.

A collated pair batch (``collate_pairs``: ``[2B, T]``, chosen rows first, right-padded) computes
every pair's prompt twice and a great deal of padding. ``pack_pairs`` lays the same pairs out as
``prompt, chosen, rejected`` (the prompt once) and several pairs side by side in a row:

    row 0:  P0 P0 P0 C0 C0 R0 R0 R0 | P2 P2 C2 R2 | pad
    pos  :  0  1  2  3  4  3  4  5  | 0  1  2  2  | 0

Position ids restart for the rejected response at the prompt's length, so RoPE sees each response
where it would stand after the prompt. ``attention_masks`` turns the layout into the mask form the
model's attention reads: a token attends to earlier tokens of its own pair that are prompt or of its
own branch (the rejected response never sees the chosen one, no token sees another pair), within
the model's sliding window where it has one. The result is the padded batch's numbers in fewer
positions; which pairs a step trains on never changes.
"""

from __future__ import annotations

import inspect
import sys
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from sppo_lightning.labels import IGNORE_INDEX

# Attention implementations that take a custom mask, and the form each one reads.
MASK_FORMS = {"sdpa": "bool", "eager": "additive", "flex_attention": "block"}


class PackedPairs(NamedTuple):
    """A pair batch laid out without padding between pairs (``R`` rows of ``L`` tokens).

    ``input_ids``, ``position_ids``, ``pair``, ``branch``: ``[R, L]``; ``pair`` numbers the pairs
    of the row (-1 on the padding at a row's end), ``branch`` is 0 for prompt, 1 chosen, 2 rejected
    (``k + 1`` for response ``k`` of a group of ``K``).
    The ``N`` response tokens to score: ``target_row``, ``target_col`` (the position whose hidden
    state predicts the token: its predecessor in its own sequence, which for a rejected response's
    first token is the prompt's last), ``target_id``, and ``target_seq``, the row of the padded batch
    the token belongs to (chosen ``i``, rejected ``B + i``), each ``[N]``.
    """

    input_ids: Tensor
    position_ids: Tensor
    pair: Tensor
    branch: Tensor
    target_row: Tensor
    target_col: Tensor
    target_id: Tensor
    target_seq: Tensor
    num_sequences: int


def group_lengths(batch: dict[str, Tensor]) -> tuple[list[int], list[list[int]]]:
    """The prompt length of each of the ``G`` groups of a collated batch (``prompt_lengths``) and
    the lengths of each group's ``K = rows / G`` responses (rows ``g, G + g, 2G + g, ...``)."""
    real = batch["attention_mask"].sum(-1).tolist()
    prompts = batch["prompt_lengths"].tolist()
    groups = len(prompts)
    if len(real) % groups:
        raise ValueError(f"a batch of {len(real)} rows cannot hold {groups} prompts' responses evenly")
    per_group = len(real) // groups
    return prompts, [[real[k * groups + g] - prompts[g] for k in range(per_group)] for g in range(groups)]


def lay_out(lengths: list[int], budget: int) -> list[list[int]]:
    """Which pairs share a row: first fit over the pairs longest first, each row at most ``budget``
    tokens; a pair longer than the budget gets a row of its own. Deterministic for given lengths."""
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r, left in enumerate(room):
            if lengths[index] <= left:
                rows[r].append(index)
                room[r] -= lengths[index]
                break
        else:
            rows.append([index])
            room.append(budget - lengths[index])
    return rows


def pack_pairs(batch: dict[str, Tensor], budget: int, pad_token_id: int = 0) -> PackedPairs:
    """Lay the pairs of a collated batch (``input_ids``, ``attention_mask``, ``labels`` ``[2B, T]``
    and ``prompt_lengths`` ``[B]``) into rows of at most ``budget`` tokens (see the module's doc).

    More generally a batch of ``K * G`` rows and ``G`` prompt lengths is ``G`` prompts with ``K``
    responses each (row ``k * G + g`` is prompt ``g``'s response ``k``): ``K = 1`` packs single
    sequences, ``K = 2`` pairs. Labels mark what is scored, as in the padded batch.
    """
    ids, labels = batch["input_ids"], batch["labels"]
    device = ids.device
    prompts, responses = group_lengths(batch)
    groups = len(prompts)
    totals = [p + sum(r) for p, r in zip(prompts, responses)]
    rows = lay_out(totals, budget)
    width = max(sum(totals[g] for g in row) for row in rows)

    def arange(a, b):
        return torch.arange(a, b, device=device)

    row_ids, row_pos, row_pair, row_branch = [], [], [], []
    targets = []  # (row, cols, ids, labels, sequence) per response
    for r, members in enumerate(rows):
        pieces, pos, pair, branch = [], [], [], []
        start = 0
        for slot, g in enumerate(members):
            p = prompts[g]
            pieces.append(ids[g, :p])
            pos.append(arange(0, p))
            branch.append(torch.zeros(p, dtype=torch.long, device=device))
            end = start + p
            for k, n in enumerate(responses[g]):
                seq = k * groups + g
                pieces.append(ids[seq, p : p + n])
                pos.append(arange(p, p + n))
                branch.append(torch.full((n,), k + 1, dtype=torch.long, device=device))
                # Response token t is predicted by its predecessor in its own sequence: the first
                # one by the prompt's last token, the others by the token just before them here.
                cols = arange(end - 1, end + n - 1)
                if n:
                    cols[0] = start + p - 1
                targets.append((r, cols, ids[seq, p : p + n], labels[seq, p : p + n], seq))
                end += n
            pair.append(torch.full((end - start,), slot, dtype=torch.long, device=device))
            start = end
        pad = width - start
        pieces.append(ids.new_full((pad,), pad_token_id))
        pos.append(torch.zeros(pad, dtype=torch.long, device=device))
        pair.append(torch.full((pad,), -1, dtype=torch.long, device=device))
        branch.append(torch.zeros(pad, dtype=torch.long, device=device))
        row_ids.append(torch.cat(pieces))
        row_pos.append(torch.cat(pos))
        row_pair.append(torch.cat(pair))
        row_branch.append(torch.cat(branch))

    keep = [(r, cols[lab != IGNORE_INDEX], tok[lab != IGNORE_INDEX], seq) for r, cols, tok, lab, seq in targets]
    return PackedPairs(
        input_ids=torch.stack(row_ids),
        position_ids=torch.stack(row_pos),
        pair=torch.stack(row_pair),
        branch=torch.stack(row_branch),
        target_row=torch.cat([torch.full((len(c),), r, dtype=torch.long, device=device) for r, c, _, _ in keep]),
        target_col=torch.cat([c for _, c, _, _ in keep]),
        target_id=torch.cat([t for _, _, t, _ in keep]),
        target_seq=torch.cat([torch.full((len(c),), s, dtype=torch.long, device=device) for _, c, _, s in keep]),
        num_sequences=ids.shape[0],
    )


def allowed(packed: PackedPairs, window: Optional[int] = None) -> Tensor:
    """``[R, 1, L, L]`` booleans: may query ``i`` attend key ``j``. Causal in the row, within one
    pair, to the prompt or to the own branch; with ``window``, only to keys fewer than ``window``
    positions back (the model's own sliding-window rule, on the restarted positions)."""
    pair, branch, pos = packed.pair, packed.branch, packed.position_ids
    length = pair.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=pair.device).tril()
    same_pair = pair[:, :, None] == pair[:, None, :]
    visible = (branch[:, None, :] == 0) | (branch[:, :, None] == branch[:, None, :])
    mask = causal & same_pair & visible
    if window is not None:
        mask &= (pos[:, :, None] - pos[:, None, :]) < window
    return mask.unsqueeze(1)


def block_mask(packed: PackedPairs, window: Optional[int] = None):
    """The same rule as a flex-attention ``BlockMask``: never a dense ``[L, L]`` tensor, and blocks
    that cross pairs are skipped."""
    from torch.nn.attention.flex_attention import create_block_mask

    pair, branch, pos = packed.pair, packed.branch, packed.position_ids

    def mask_mod(b, h, q, k):
        ok = (k <= q) & (pair[b, q] == pair[b, k]) & ((branch[b, k] == 0) | (branch[b, q] == branch[b, k]))
        if window is not None:
            ok = ok & (pos[b, q] - pos[b, k] < window)
        return ok

    rows, length = pair.shape
    return create_block_mask(mask_mod, rows, None, length, length, device=pair.device)


def attention_masks(packed: PackedPairs, config, dtype: torch.dtype):
    """The attention mask(s) to hand the backbone for ``packed``, in the form its attention reads:
    one mask, or ``{"full_attention": ..., "sliding_attention": ...}`` for models that alternate
    full and sliding-window layers (Gemma-2/3, Qwen2/3 with windows)."""
    form = MASK_FORMS[config._attn_implementation]
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    window = getattr(config, "sliding_window", None)

    def one(window_of_this_kind):
        if form == "block":
            return block_mask(packed, window_of_this_kind)
        mask = allowed(packed, window_of_this_kind)
        if form == "additive":  # eager adds the mask to the scores
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
        return mask

    if "sliding_attention" in layer_types and "full_attention" in layer_types:
        return {"full_attention": one(None), "sliding_attention": one(window)}
    if "sliding_attention" in layer_types or (window is not None and not getattr(config, "layer_types", None)):
        return one(window)
    return one(None)


def packing_unsupported(model: torch.nn.Module) -> Optional[str]:
    """Why ``model`` cannot run packed batches exactly, or None when it can.

    A Hugging Face causal LM can when its attention takes a custom mask (sdpa, eager, flex), its
    modelling code hands a prepared 4-D mask through unchanged (``masking_utils``), its forward takes
    ``position_ids``, and every kind of layer it has can be given its mask.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(inner, "config", None)
    if config is None or not hasattr(config, "_attn_implementation"):
        return f"{type(inner).__name__} is not a Hugging Face model"
    attention = config._attn_implementation
    if attention not in MASK_FORMS:
        return f"attn_implementation {attention!r} takes no custom attention mask (sdpa, eager and flex_attention do)"
    # The class's own modelling module (FSDP2 wraps the class in a subclass defined elsewhere).
    modules = [sys.modules.get(cls.__module__) for cls in type(inner).__mro__
               if cls.__module__.startswith("transformers.models.")]
    if not any(m is not None and hasattr(m, "create_causal_mask") for m in modules):
        return f"{type(inner).__name__}'s modelling code builds its own attention mask"
    if "position_ids" not in inspect.signature(inner.forward).parameters:
        return f"{type(inner).__name__} takes no position_ids"
    if getattr(config, "attention_chunk_size", None):
        return f"{type(inner).__name__} attends in chunks (attention_chunk_size), which the packed mask does not express"
    kinds = set(getattr(config, "layer_types", None) or [])
    if kinds - {"full_attention", "sliding_attention"}:
        return f"{type(inner).__name__} has layers of kind {sorted(kinds - {'full_attention', 'sliding_attention'})}"
    if len(kinds) > 1:
        backbone = getattr(inner, getattr(inner, "base_model_prefix", ""), None)
        source = inspect.getsource(type(backbone).forward) if backbone is not None else ""
        if "attention_mask, dict)" not in source:  # the models that accept one mask per layer kind
            return f"{type(inner).__name__} alternates full and sliding layers but takes one mask for both"
    if attention == "flex_attention" and all(p.device.type == "cpu" for p in inner.parameters()):
        # torch's CPU flex attention has no backward; its compiled kernels break on recompiles for
        # new lengths, and on AVX2 CPUs give wrong values for short pairs in padded rows (NaN or
        # 0.08 nats off, tests/test_packing.py). On CPU sdpa and eager pack exactly.
        return ("flex_attention on CPU cannot train (torch has no CPU backward for it, and its compiled CPU kernel "
                "gives wrong values on AVX2 CPUs); use sdpa or eager")
    if attention == "sdpa" and getattr(config, "attn_logit_softcapping", None):
        return "sdpa cannot soft-cap attention scores (attn_logit_softcapping); use attn_implementation eager"
    return None


def resolve_packing(setting, tokens: int, model: torch.nn.Module) -> Optional[int]:
    """``model.packing`` (``auto`` | true | false) for ``model``: the token budget per packed row,
    or None where batches run padded. ``auto`` packs where the model can (else one info line says
    why not); ``true`` where it cannot is a ``ConfigError`` naming the reason."""
    from sppo_lightning.errors import ConfigError

    if setting is False:
        return None
    if tokens < 2:
        raise ConfigError(f"model.packing_tokens must be >= 2, got {tokens}")
    why = packing_unsupported(model)
    if why is None:
        return tokens
    if setting is True:
        raise ConfigError(f"model.packing: true, but {why}; set model.packing: auto (padded batches where "
                          f"packing is not exact) or false")
    from lightning.pytorch.utilities import rank_zero_info

    rank_zero_info(f"model.packing auto: padded batches, because {why}")
    return None


def record_resolved(module, key: str, value) -> None:
    """Put a setting's resolved value (``auto`` -> true/false) in ``module``'s hparams: those its
    checkpoints save, and the initial ones that loggers write to ``hparams.yaml`` when the run
    starts (after ``configure_model``)."""
    module.hparams[key] = value
    if getattr(module, "_hparams_initial", None) is not None:
        module._hparams_initial[key] = value
