"""Instruction-following accuracy: IFEval's four numbers on IFEval-format prompts (IFEval, IFBench).

A model answers each prompt greedily (its chat template, ``max_new_tokens`` at most); IFEval's and
IFBench's own checkers (``ranking/instructions.py``) say which instructions each answer follows,
and :func:`accuracy` counts them as IFEval's ``evaluation_lib.generate_report`` does:

- ``prompt_strict`` / ``prompt_loose``: the fraction of prompts whose every instruction is
  followed (prompt-level accuracy);
- ``instruction_strict`` / ``instruction_loose``: followed instructions over all instructions of
  all prompts (instruction-level accuracy).

Prompts with an instruction whose checker cannot run here are left out, each such instruction
named once with how many prompts it drops, so the numbers are over prompts checked in full.

During a self-play run (``self_play.instruction_following: true``) the policy is measured on the
held-out prompts before its first step and after every iteration (``callbacks/self_play.py``). As a
command, on any model folder or GGUF file::

    sppo-lightning ifeval <model> <prompts.jsonl> <out_dir> [--max-new-tokens 256]

writes ``<out_dir>/responses.jsonl`` in IFEval's response format (``prompt``, ``response``) and
``<out_dir>/scores.json`` (the four numbers, and each prompt's results).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from sppo_lightning.data.prompts import Prompt
from sppo_lightning.errors import ConfigError, DataError
from sppo_lightning.ranking.instructions import Checked, InstructionChecks

FOUR = ("prompt_strict", "instruction_strict", "prompt_loose", "instruction_loose")


def accuracy(results: Sequence[Checked]) -> dict[str, float]:
    """IFEval's prompt- and instruction-level accuracy, strict and loose, over ``results``."""
    if not results:
        raise DataError("instruction-following accuracy of no prompts: every prompt was dropped")
    instructions = sum(len(r.ids) for r in results)
    return {
        "prompt_strict": sum(all(r.strict) for r in results) / len(results),
        "instruction_strict": sum(sum(r.strict) for r in results) / instructions,
        "prompt_loose": sum(all(r.loose) for r in results) / len(results),
        "instruction_loose": sum(sum(r.loose) for r in results) / instructions,
    }


@dataclass
class Evaluation:
    """One measurement: the four numbers, the answers and each prompt's results."""

    scores: dict[str, float]
    responses: list[str]
    results: list[Checked]
    words: float  # mean answer length, in words (SPPO and DPO are known to lengthen answers)


class InstructionFollowing:
    """The held-out prompts that can be checked here, and how a policy's answers to them score.

    Args:
        prompts: IFEval-format prompts (``Prompt.meta`` set); the ones with an instruction that
            cannot be checked here are dropped, each such instruction named in ``notes``.
        max_new_tokens: answer tokens at most. batch_size: prompts per ``generate`` call.
    """

    def __init__(self, prompts: Sequence[Prompt], max_new_tokens: int = 256, batch_size: int = 16,
                 where: str = "the evaluation prompts") -> None:
        missing = [p.index for p in prompts if p.meta is None]
        if missing:
            raise ConfigError(f"{where}: instruction following needs IFEval-format prompts (columns "
                              f"instruction_id_list and kwargs); row {missing[0] + 1} has none")
        if max_new_tokens < 1 or batch_size < 1:
            raise ConfigError("instruction following: max_new_tokens and batch_size must be at least 1")
        self.checks = InstructionChecks()
        keep, self.notes = self.checks.screen([(p.text, p.meta) for p in prompts])
        self.prompts = [prompts[i] for i in keep]
        if not self.prompts:
            raise DataError(f"{where}: no prompt can be checked here ({'; '.join(self.notes)})")
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size

    def score(self, responses: Sequence[str]) -> Evaluation:
        """The four numbers of ``responses`` (one per kept prompt, in order)."""
        results = [self.checks.check(p.text, p.meta, r) for p, r in zip(self.prompts, responses)]
        words = sum(len(r.split()) for r in responses) / max(len(responses), 1)
        return Evaluation(accuracy(results), list(responses), results, words)

    def answers(self, model, tokenizer, rank: int = 0, world_size: int = 1, show_progress: bool = True) -> list[str]:
        """Greedy answers of ``model`` to the kept prompts (the same on every rank)."""
        from sppo_lightning.generation import sample_on_ranks
        from sppo_lightning.models import evaluating

        with evaluating(model):
            ids = sample_on_ranks(model, tokenizer, [p.ids for p in self.prompts], 1, rank=rank,
                                  world_size=world_size, temperature=0.0, top_p=1.0,
                                  max_new_tokens=self.max_new_tokens, batch_size=self.batch_size, seed=0,
                                  show_progress=show_progress and rank == 0, desc="evaluating (instructions)")
        return [tokenizer.decode(r[0], skip_special_tokens=True).strip() for r in ids]

    def evaluate(self, model, tokenizer, rank: int = 0, world_size: int = 1) -> Evaluation:
        return self.score(self.answers(model, tokenizer, rank, world_size))


def write_evaluation(out_dir: Path, prompts: Sequence[Prompt], evaluation: Evaluation, model: str) -> None:
    """``responses.jsonl`` (IFEval's response format) and ``scores.json`` in ``out_dir``."""
    from sppo_lightning.files import atomic_write_bytes, atomic_write_json

    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"prompt": p.text, "response": r}, ensure_ascii=False) + "\n"
             for p, r in zip(prompts, evaluation.responses)]
    atomic_write_bytes(out_dir / "responses.jsonl", "".join(lines).encode())
    per_prompt = [{"key": p.meta.get("key"), "instruction_id_list": c.ids, "follow_strict": c.strict,
                   "follow_loose": c.loose, "not_checked": c.dropped} for p, c in zip(prompts, evaluation.results)]
    atomic_write_json(out_dir / "scores.json", {"model": model, **evaluation.scores, "prompts": len(prompts),
                                                "mean_words": evaluation.words, "per_prompt": per_prompt})


def ifeval_main(argv: list[str]) -> None:
    import torch

    from sppo_lightning.data.prompts import load_prompts
    from sppo_lightning.models import load_causal_lm, load_tokenizer

    parser = argparse.ArgumentParser(
        prog="sppo-lightning ifeval",
        description="Instruction-following accuracy (IFEval's four numbers) of a model on IFEval-format prompts.")
    parser.add_argument("model", help="a Hugging Face model folder (e.g. runs/<run>/hf_model), hub id or .gguf file")
    parser.add_argument("prompts", help="IFEval-format prompts: key, prompt, instruction_id_list, kwargs")
    parser.add_argument("out_dir", help="where responses.jsonl and scores.json go")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--max-prompt-length", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--limit", type=int, default=None, help="the first N prompts only")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    tokenizer = load_tokenizer(args.model)
    prompts, _, _ = load_prompts(args.prompts, tokenizer, args.max_prompt_length)
    prompts = prompts[: args.limit] if args.limit else prompts
    evaluator = InstructionFollowing(prompts, args.max_new_tokens, args.batch_size, where=args.prompts)
    for note in evaluator.notes:
        print(note)
    model = load_causal_lm(args.model, dtype).to(device)
    evaluation = evaluator.evaluate(model, tokenizer)
    write_evaluation(Path(args.out_dir), evaluator.prompts, evaluation, args.model)
    print(f"{len(evaluator.prompts)} prompts | " + format_scores(evaluation.scores) +
          f" | mean answer {evaluation.words:.0f} words | {Path(args.out_dir) / 'scores.json'}")


def format_scores(scores: dict[str, float], prefix: str = "") -> str:
    """``prompt strict 0.120 / loose 0.150, instruction strict 0.180 / loose 0.210``."""
    return (f"{prefix}prompt strict {scores['prompt_strict']:.3f} / loose {scores['prompt_loose']:.3f}, "
            f"instruction strict {scores['instruction_strict']:.3f} / loose {scores['instruction_loose']:.3f}")

