"""The self-play stages, one function each, over plain arguments: no Trainer, no callback.

Each takes what it needs and returns rows (lists of dicts, one per prompt) for ``artifacts.py``
to write. One SPPO iteration passes through them in this order:

1. :func:`generate` — π_t samples K responses per prompt (a ``Generator``);
2. :func:`rank` — the ranker's ``[K, K]`` pair logits and scores per prompt;
3. :func:`estimate_pairs` — P̂, p_win, and the best/worst pair in the official schema;
4. :func:`reference_logps` — the pairs' summed log-probs under π_t, split over the ranks.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Optional, Sequence

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from tqdm.auto import tqdm

from sppo_lightning.data.prompts import Prompt
from sppo_lightning.data.tokenize import collate_pairs
from sppo_lightning.errors import DataError
from sppo_lightning.iteration import iteration_label
from sppo_lightning.logprobs import model_logprobs
from sppo_lightning.models import evaluating
from sppo_lightning.distributed import DistContext, rank_batches
from sppo_lightning.ranking.estimate import scores_from_pairwise, select_pairs, win_probabilities
from sppo_lightning.ranking.protocol import prompt_view_of


def generate(generator, policy: nn.Module, tokenizer, prompts: Sequence[Prompt], num_samples: int, seed: int,
             ctx: DistContext, batch_offset: int = 0, with_logprobs: bool = False) -> list[dict[str, Any]]:
    """One row per prompt: the prompt (text, messages, ids) and its K responses (ids and text);
    ``with_logprobs`` (a ``LogprobSampler``): also each response's summed log-prob under the sampling
    policy (``response_logps``), kept with the samples so that a resume reads the same numbers."""
    logps: Sequence[Optional[list[float]]]
    if with_logprobs:
        responses, logps = generator.sample_with_logprobs(policy, tokenizer, prompts, num_samples, seed, ctx,
                                                          batch_offset=batch_offset)
    else:
        responses = generator.sample(policy, tokenizer, prompts, num_samples, seed, ctx, batch_offset=batch_offset)
        logps = [None] * len(prompts)
    return [{**prompt_fields(prompt), "response_ids": ids, **({"response_logps": lp} if lp is not None else {}),
             "responses": tokenizer.batch_decode(ids, skip_special_tokens=True)}
            for prompt, ids, lp in zip(prompts, responses, logps)]


def prompt_fields(prompt: Prompt) -> dict[str, Any]:
    """What every generations row keeps of its prompt: index, text, messages, token ids, and for
    an IFEval-format prompt its instructions (``prompt_meta``, a JSON string)."""
    fields = {"prompt_index": prompt.index, "prompt": prompt.text, "prompt_messages": prompt.messages,
              "prompt_ids": prompt.ids}
    if prompt.meta is not None:
        fields["prompt_meta"] = json.dumps(prompt.meta, sort_keys=True)
    return fields


def ranker_prompts(ranker, tokenizer, generations: Sequence[dict[str, Any]]) -> list[str]:
    """What the ranker is shown of each generations row's prompt: the raw text, the policy's
    chat-templated prompt string (``prompt_view: chat``, as the official ``rank.py`` gives PairRM), or
    the prompt row as a JSON object (``record``: ``{"prompt": text, "instruction_id_list": ..., ...}``)."""
    view = prompt_view_of(ranker)
    if view == "raw":
        return [g["prompt"] for g in generations]
    if view == "chat":
        return [tokenizer.apply_chat_template(g["prompt_messages"], tokenize=False, add_generation_prompt=True)
                for g in generations]
    return [json.dumps({**json.loads(g.get("prompt_meta") or "{}"), "prompt": g["prompt"]}, sort_keys=True)
            for g in generations]


def rank(ranker, tokenizer, generations: Sequence[dict[str, Any]], first_row: int = 0) -> list[dict[str, Any]]:
    """One row per prompt: ``pairwise_logits`` ``[K][K]`` and the scores ``s_i = mean_j(M_ij - M_ji)``.
    ``first_row``: the row of ``generations[0]`` in the iteration, for error messages."""
    try:
        pairwise = ranker.pairwise_logits(ranker_prompts(ranker, tokenizer, generations),
                                          [g["responses"] for g in generations])
    except DataError as error:  # the ranker counts rows from the shard's first: name the iteration's row
        message = re.sub(r"prompt row (\d+)", lambda m: f"prompt row {first_row + int(m.group(1))}", str(error))
        raise DataError(f"{message} (the generations are kept: a resumed run ranks again from this shard)") from error
    except Exception as error:  # a judge that raises: name the rows, keep what is written
        last = first_row + len(generations) - 1
        raise DataError(f"the ranker {type(ranker).__name__} failed on prompt rows {first_row + 1}-{last + 1} of "
                        f"generations.parquet ({type(error).__name__}: {error}); the generations are kept, "
                        f"and a resumed run ranks again from this shard") from error
    scores = scores_from_pairwise(pairwise.double())
    return [{"prompt_index": g["prompt_index"], "pairwise_logits": m.tolist(), "rm_scores": s.tolist()}
            for g, m, s in zip(generations, pairwise, scores)]


def estimate_pairs(generations: Sequence[dict], rankings: Sequence[dict], iteration: int,
                   first_row: int = 0, quiet: bool = False) -> tuple[list[dict[str, Any]], int]:
    """SPPO's pairs in the official ``train.parquet`` schema (``iteration``: the 0-based index), and
    how many prompts were dropped because their K responses tied (or chosen and rejected are the
    same tokens); ``quiet``: count them without a console line (per-step methods sum them)."""
    scores = torch.tensor([r["rm_scores"] for r in rankings], dtype=torch.float64)
    picked = select_pairs(scores, where=f"{iteration_label(iteration)} ranking", first_row=first_row)
    probability, _ = win_probabilities(scores)  # the K×K P̂ of every prompt, stored with its pair
    pairs, ties = [], 0
    for n, (gen, ranked) in enumerate(zip(generations, rankings)):
        w, l = int(picked.chosen[n]), int(picked.rejected[n])
        if not picked.keep[n] or gen["response_ids"][w] == gen["response_ids"][l]:
            ties += 1  # never train on chosen == rejected
            continue
        conversation = gen["prompt_messages"]
        pairs.append({
            "prompt_index": gen["prompt_index"], "prompt": gen["prompt"], "prompt_ids": gen["prompt_ids"],
            "chosen": conversation + [{"role": "assistant", "content": gen["responses"][w]}],
            "rejected": conversation + [{"role": "assistant", "content": gen["responses"][l]}],
            "chosen_ids": gen["response_ids"][w], "rejected_ids": gen["response_ids"][l],
            "chosen_index": w, "rejected_index": l,
            "chosen_probs": float(picked.chosen_probs[n]),
            "chosen_probs_win": float(picked.chosen_probs_win[n]),
            "chosen_probs_lose": float(picked.chosen_probs_lose[n]),
            "rm_scores": ranked["rm_scores"], "probability": probability[n].tolist(),
            **{f"generate_{k}": conversation + [{"role": "assistant", "content": r}]
               for k, r in enumerate(gen["responses"])},
        })
    if ties and not quiet:
        rank_zero_info(f"{iteration_label(iteration)}: dropped {ties} prompt(s) whose responses all scored the same")
    return pairs, ties


@torch.no_grad()
def reference_logps(policy: nn.Module, pairs: list[dict[str, Any]], pad_token_id: int, batch_size: int,
                    ctx: DistContext, show_progress: bool = False, packing: Optional[int] = None) -> None:
    """Summed log-probs of chosen and rejected under ``policy`` (eval mode), stored on each pair as
    ``reference_chosen_logps`` / ``reference_rejected_logps``.

    The batches are split over the ranks and gathered. Every rank runs the same number of
    forwards (a rank short of batches repeats the last one): under FSDP each forward is a
    collective. ``packing``: the module's packed-row budget (``Policies.packing``), None: padded.
    """
    local: dict[int, list[float]] = {}
    with evaluating(policy):
        mine = rank_batches(math.ceil(len(pairs) / batch_size), ctx.rank, ctx.world_size, lockstep=True)
        for index, real in tqdm(mine, desc="reference log-probs", disable=not (show_progress and ctx.is_global_zero)):
            begin = index * batch_size
            batch = collate_pairs(pairs[begin : begin + batch_size], pad_token_id)
            batch = {k: v.to(ctx.device) for k, v in batch.items()}
            logps = model_logprobs(policy, batch, packing=packing).sum.cpu().tolist()
            if real:
                local[begin] = logps
    if ctx.world_size > 1:
        local = {k: v for part in ctx.all_gather_object(local) for k, v in part.items()}
    for begin, logps in local.items():
        chunk = pairs[begin : begin + batch_size]
        for k, pair in enumerate(chunk):
            pair["reference_chosen_logps"] = logps[k]
            pair["reference_rejected_logps"] = logps[len(chunk) + k]


def sampler_reference_logps(pairs: list[dict[str, Any]], generations: Sequence[dict[str, Any]]) -> None:
    """π_t's log-probs of each pair's chosen and rejected as the sampler recorded them
    (``response_logps`` of the generations rows), stored as ``reference_chosen_logps`` /
    ``reference_rejected_logps``: the reference stage without its forward (design note 1)."""
    by_prompt = {g["prompt_index"]: g for g in generations}
    for pair in pairs:
        recorded = by_prompt[pair["prompt_index"]]["response_logps"]
        pair["reference_chosen_logps"] = float(recorded[pair["chosen_index"]])
        pair["reference_rejected_logps"] = float(recorded[pair["rejected_index"]])


def pair_statistics(artifacts, prompts: Sequence[Prompt], iteration: int, num_samples: int,
                    allow_empty: bool = False, reference: bool = True) -> dict[str, Any]:
    """The statistics of an iteration's best/worst pairs (``train``, ``rankings`` and ``generations``
    of ``artifacts``): counts, mean P(win) of chosen and rejected, seconds per stage, an LLM judge's
    counts. No pair at all (every prompt tied) is a ``DataError`` naming what can cause it, unless
    ``allow_empty`` (a per-step draw: one step of a few prompts can tie throughout, as GRPO's
    all-equal groups do; that step trains on nothing and the run goes on). ``reference``: the
    ``train`` stage computed π_t's log-probs, timed as ``reference`` (else no such time is shown)."""
    info = artifacts.info("train")
    seconds = {s: artifacts.info(n).get("seconds", 0.0) for s, n in
               (("generate", "generations"), ("rank", "rankings"), ("reference", "train")) if reference or s != "reference"}
    if info["rows"] == 0 and allow_empty:
        rank_zero_info(f"{iteration_label(iteration)}: all {len(prompts)} prompts tied (their {num_samples} "
                       f"responses scored the same): this step trains on nothing")
        return {"pairs": 0, "ties_dropped": info.get("ties_dropped", 0),
                "prompts_truncated": sum(p.truncated for p in prompts), "seconds": seconds}
    if info["rows"] == 0:
        raise DataError(f"{iteration_label(iteration)}: all {len(prompts)} prompts tied (their {num_samples} "
                        f"responses scored the same); nothing to train on. Raise the generator's temperature or "
                        f"max_new_tokens, or num_samples, or check the ranker")
    chosen, rejected = artifacts.column("train", "chosen_probs_win"), artifacts.column("train", "chosen_probs_lose")
    stats = {
        "pairs": info["rows"],
        "ties_dropped": info.get("ties_dropped", 0),
        "prompts_truncated": sum(p.truncated for p in prompts),
        "chosen_p_win": sum(chosen) / len(chosen),
        "rejected_p_win": sum(rejected) / len(rejected),
        "seconds": seconds,
    }
    judge = {k: v for k, v in artifacts.info("rankings").items()
             if k in ("judge_calls", "cache_hits", "judged_by_logprobs", "judged_by_verdict")}
    if judge:  # an LLM judge: its questions, cache hits, and how its margins were read
        stats["judge"] = judge
    return stats


def samples_table(pairs: Sequence[dict[str, Any]], count: int) -> tuple[list[str], list[list[Any]]]:
    """The first ``count`` pairs as (columns, rows) for ``samples.md`` and loggers' tables."""
    columns = ["prompt", "chosen", "rejected", "chosen_p_win", "rejected_p_win"]
    rows = [[p["prompt"], p["chosen"][-1]["content"], p["rejected"][-1]["content"],
             round(p["chosen_probs_win"], 3), round(p["chosen_probs_lose"], 3)] for p in pairs[:count]]
    return columns, rows


def markdown_table(columns: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"
