"""``sppo-lightning judge``: the answers of two models, judged head to head by any ranker.

    sppo-lightning judge ours/model_outputs.json base/model_outputs.json \\
        --ranker '{class_path: sppo_lightning.ranking.LLMJudge, init_args: {path: Qwen/Qwen2.5-7B-Instruct}}'
    sppo-lightning judge ours.jsonl base.jsonl --questions question.jsonl --ranker ranker.yaml

A and B are what ``sppo-lightning generate`` writes: AlpacaEval ``model_outputs.json`` rows
(``instruction``, ``output``), matched by instruction, or MT-Bench answer lines (``question_id``,
``choices[0].turns``), matched by question id, with the questions file for their text (a
conversation is judged whole: its turns joined). The ranker is a YAML or JSON ``class_path`` /
``init_args`` block, inline or in a file, the same block as in a training config. Judges that keep
judgments (``LLMJudge``, ``OpenAIJudge``) use ``--cache-dir``, so a repeated comparison asks nothing
again. It prints A's win rate against B (a tie counts a half) and writes every item's margin.
"""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path
from typing import Any

import yaml

from sppo_lightning.contracts import QuestionJudge, Ranker, lacking
from sppo_lightning.data.rows import load_records
from sppo_lightning.errors import ConfigError, DataError
from sppo_lightning.files import atomic_write_bytes


def build_ranker(spec: str) -> Ranker:
    """A ranker from a ``{class_path, init_args}`` block: YAML/JSON text, or the path of a file holding it."""
    text = Path(spec).read_text() if Path(spec).is_file() else spec
    try:
        block = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"--ranker: not YAML or JSON: {' '.join(str(err).split())[:200]}") from None
    if not isinstance(block, dict) or not isinstance(block.get("class_path"), str):
        raise ConfigError("--ranker: expected {class_path: ..., init_args: {...}}, e.g. "
                          "{class_path: sppo_lightning.ranking.FunctionJudge, init_args: {function: pkg.mod:fn}}")
    module_name, _, name = block["class_path"].rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"--ranker: cannot import {block['class_path']!r}: {err}") from None
    try:
        ranker = cls(**(block.get("init_args") or {}))
    except TypeError as err:
        raise ConfigError(f"--ranker: {block['class_path']}: {err}") from None
    missing = lacking(ranker, Ranker)
    if missing:
        raise ConfigError(f"--ranker: {block['class_path']} lacks {', '.join(missing)}: a ranker has "
                          f"pairwise_logits(), fingerprint() and prompt_view")
    return ranker


def _answers(path: str, questions: dict[int, str]) -> dict[Any, tuple[str, str]]:
    """``{key: (prompt, answer)}`` from an AlpacaEval or MT-Bench answer file."""
    records = load_records(path)
    out: dict[Any, tuple[str, str]] = {}
    for i, row in enumerate(records):
        if "instruction" in row and "output" in row:
            out[row["instruction"]] = (row["instruction"], str(row["output"]))
        elif "question_id" in row and "choices" in row:
            qid = row["question_id"]
            if qid not in questions:
                raise DataError(f"{path}: row {i + 1}: question_id {qid!r} is not in --questions (MT-Bench answers "
                                f"need the questions file for their text)")
            turns = row["choices"][0].get("turns") if row["choices"] else None
            if not isinstance(turns, list) or not turns:
                raise DataError(f"{path}: row {i + 1}: column 'choices': expected choices[0].turns, a list of answers")
            out[qid] = (questions[qid], "\n\n".join(str(t) for t in turns))
        else:
            raise DataError(f"{path}: row {i + 1}: neither an AlpacaEval row (instruction, output) nor an MT-Bench "
                            f"answer (question_id, choices)")
    return out


def judge(ranker, a: dict[Any, tuple[str, str]], b: dict[Any, tuple[str, str]]) -> list[dict[str, Any]]:
    """One row per item both files answer: A's and B's answers and the margin ``M_AB − M_BA``."""
    keys = [k for k in a if k in b]
    if not keys:
        raise DataError("the two answer files have no instruction or question in common")
    m = ranker.pairwise_logits([a[k][0] for k in keys], [[a[k][1], b[k][1]] for k in keys]).double()
    margins = (m[:, 0, 1] - m[:, 1, 0]).tolist()
    return [{"key": k, "prompt": a[k][0], "a": a[k][1], "b": b[k][1], "margin": margin}
            for k, margin in zip(keys, margins)]


def win_rate(rows: list[dict[str, Any]]) -> float:
    return sum(1.0 if r["margin"] > 0 else 0.5 if r["margin"] == 0 else 0.0 for r in rows) / len(rows)


def judge_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="sppo-lightning judge",
                                     description="Judge two answer files head to head with any ranker.")
    parser.add_argument("a", help="answers of model A (AlpacaEval model_outputs.json or MT-Bench answer .jsonl)")
    parser.add_argument("b", help="answers of model B, the same format")
    parser.add_argument("--ranker", required=True, help="{class_path, init_args} as YAML/JSON, or a file holding it")
    parser.add_argument("--questions", default=None, help="MT-Bench: question.jsonl (question_id, turns)")
    parser.add_argument("--cache-dir", default=None, help="where a judge keeps its judgments (LLMJudge, OpenAIJudge)")
    parser.add_argument("--out", default=None, help="write every item's margin here (JSON)")
    args = parser.parse_args(argv)
    questions: dict[int, str] = {}
    if args.questions:
        for i, q in enumerate(load_records(args.questions)):
            if not isinstance(q.get("turns"), list):
                raise DataError(f"{args.questions}: row {i + 1}: column 'turns': expected a list of questions")
            questions[q.get("question_id")] = "\n\n".join(str(t) for t in q["turns"])
    ranker = build_ranker(args.ranker)
    if args.cache_dir and isinstance(ranker, QuestionJudge):
        from sppo_lightning.ranking.cache import JudgmentCache

        ranker.use_cache(JudgmentCache(args.cache_dir))
    rows = judge(ranker, _answers(args.a, questions), _answers(args.b, questions))
    rate = win_rate(rows)
    ties = sum(r["margin"] == 0 for r in rows)
    if args.out:
        atomic_write_bytes(Path(args.out), json.dumps({"win_rate_a": rate, "items": rows}, indent=2,
                                                      ensure_ascii=False).encode())
    asked = hits = ""
    if isinstance(ranker, QuestionJudge):
        asked = f", {ranker.counts()['calls']} judge questions asked"
        hits = f", {ranker.cache.hits} from the cache" if ranker.cache is not None else ""
    print(f"A ({args.a}) against B ({args.b}): win rate {rate:.3f} over {len(rows)} items "
          f"(ties {ties}){asked}{hits}")
