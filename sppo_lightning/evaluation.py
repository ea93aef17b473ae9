"""Answers for the standard evaluators, written in their own formats.

- **AlpacaEval** reads ``model_outputs.json``: a JSON list of ``{"instruction", "output",
  "generator"}`` (its evaluation set's ``dataset`` column is kept when present).
- **MT-Bench** (FastChat ``llm_judge``) reads ``data/mt_bench/model_answer/<model_id>.jsonl``: one
  line per question, ``{"question_id", "answer_id", "model_id", "choices": [{"index": 0,
  "turns": [...]}], "tstamp"}``, every turn answered with the earlier turns and answers in context.

    sppo-lightning generate runs/quickstart/hf_model alpaca_eval.json model_outputs.json \\
        --format alpaca_eval --name my-sppo-iter3
    sppo-lightning generate runs/quickstart/hf_model question.jsonl my-sppo-iter3.jsonl --format mt_bench
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from sppo_lightning.files import atomic_write_bytes
from sppo_lightning.data.rows import load_records
from sppo_lightning.data.tokenize import encode_prompt, keep_end
from sppo_lightning.errors import ConfigError, DataError
from sppo_lightning.generation import sample_responses


def answer(model, tokenizer, conversations: list[list[dict[str, str]]], *, max_prompt_length: int = 2048,
           max_new_tokens: int = 1024, temperature: float = 0.0, top_p: float = 1.0, batch_size: int = 8,
           seed: int = 0, show_progress: bool = True) -> list[str]:
    """One answer per conversation (each ends with a user turn); greedy when ``temperature`` is 0."""
    bos = tokenizer.bos_token_id
    ids = [keep_end(encode_prompt(tokenizer, c), max_prompt_length, bos) for c in conversations]
    responses = sample_responses(model, tokenizer, ids, 1, temperature=temperature, top_p=top_p,
                                 max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed,
                                 show_progress=show_progress)
    return [tokenizer.decode(r[0], skip_special_tokens=True).strip() for r in responses]


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: expected a non-empty string, got {value!r:.60}")
    return value


def alpaca_eval_outputs(model, tokenizer, source: str, generator: str, column: str = "instruction",
                        **options: Any) -> list[dict[str, Any]]:
    """AlpacaEval ``model_outputs.json`` rows for the instructions in ``source``."""
    records = load_records(source)
    instructions = [_text(r.get(column), f"{source}: row {i + 1}: column '{column}'") for i, r in enumerate(records)]
    outputs = answer(model, tokenizer, [[{"role": "user", "content": x}] for x in instructions], **options)
    rows = []
    for record, instruction, output in zip(records, instructions, outputs):
        row = {"instruction": instruction, "output": output, "generator": generator}
        if "dataset" in record:
            row["dataset"] = record["dataset"]
        rows.append(row)
    return rows


def mt_bench_answers(model, tokenizer, source: str, model_id: str, **options: Any) -> list[dict[str, Any]]:
    """FastChat ``llm_judge`` answer rows for the MT-Bench questions in ``source``, turn by turn."""
    questions = load_records(source)
    for i, q in enumerate(questions):
        if not isinstance(q.get("question_id"), int):
            raise DataError(f"{source}: row {i + 1}: column 'question_id': expected an integer, got {q.get('question_id')!r}")
        turns = q.get("turns")
        if not isinstance(turns, list) or not turns:
            raise DataError(f"{source}: row {i + 1}: column 'turns': expected a non-empty list of questions")
        for t, turn in enumerate(turns):
            _text(turn, f"{source}: row {i + 1}: column 'turns' [{t}]")
    conversations: list[list[dict[str, str]]] = [[] for _ in questions]
    answers: list[list[str]] = [[] for _ in questions]
    for turn in range(max(len(q["turns"]) for q in questions)):
        active = [i for i, q in enumerate(questions) if turn < len(q["turns"])]
        for i in active:
            conversations[i].append({"role": "user", "content": questions[i]["turns"][turn]})
        for i, text in zip(active, answer(model, tokenizer, [conversations[i] for i in active], **options)):
            conversations[i].append({"role": "assistant", "content": text})
            answers[i].append(text)
    return [{"question_id": q["question_id"], "answer_id": uuid.uuid4().hex[:22], "model_id": model_id,
             "choices": [{"index": 0, "turns": a}], "tstamp": time.time()} for q, a in zip(questions, answers)]


def generate_main(argv: list[str]) -> None:
    from sppo_lightning.models import load_causal_lm, load_tokenizer

    parser = argparse.ArgumentParser(
        prog="sppo-lightning generate",
        description="Answer a prompt file with a model, in AlpacaEval's or MT-Bench's format.",
    )
    parser.add_argument("model", help="a Hugging Face model folder (e.g. runs/<run>/hf_model) or hub id")
    parser.add_argument("prompts", help="AlpacaEval: a file with an 'instruction' column; "
                                        "MT-Bench: question.jsonl (question_id, turns)")
    parser.add_argument("out", help="output file: model_outputs.json (AlpacaEval) or <model_id>.jsonl (MT-Bench)")
    parser.add_argument("--format", choices=["alpaca_eval", "mt_bench"], required=True)
    parser.add_argument("--name", default=None, help="generator / model_id written in every row (default: the model folder's name)")
    parser.add_argument("--column", default="instruction", help="AlpacaEval: the instruction column")
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--max-prompt-length", type=int, default=2048)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="auto: bfloat16 on a GPU, float32 on CPU")
    parser.add_argument("--trust-remote-code", action="store_true")
    args = parser.parse_args(argv)
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.max_new_tokens < 1 or args.batch_size < 1:
        raise ConfigError("generate: --temperature must be >= 0, --top-p in (0, 1], --max-new-tokens and "
                          "--batch-size >= 1")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    from sppo_lightning.errors import LoadError

    try:
        model = load_causal_lm(args.model, dtype, args.trust_remote_code).to(device).eval()
        tokenizer = load_tokenizer(args.model, args.trust_remote_code)
    except LoadError as err:  # the loader names the config key; here the model is generate's argument
        raise LoadError(str(err).replace(" (model.model_name_or_path)", " (generate's <model>)")) from None
    name = args.name or Path(args.model.rstrip("/")).name
    options = dict(max_prompt_length=args.max_prompt_length, max_new_tokens=args.max_new_tokens,
                   temperature=args.temperature, top_p=args.top_p, batch_size=args.batch_size, seed=args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.format == "alpaca_eval":
        rows = alpaca_eval_outputs(model, tokenizer, args.prompts, name, args.column, **options)
        atomic_write_bytes(out, json.dumps(rows, indent=2, ensure_ascii=False).encode())
    else:
        rows = mt_bench_answers(model, tokenizer, args.prompts, name, **options)
        atomic_write_bytes(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
    print(f"Wrote {len(rows)} {args.format} answers of '{name}' to {out}")


