"""Instruction following on the held-out prompts during a self-play run, for the boundary callback.

With ``self_play.instruction_following: true`` the held-out prompts (``data.eval_prompts``, in
the IFEval format) are answered greedily by the initial policy before its first step and by the
policy at every measurement. Each time: IFEval's four numbers and the mean answer length
(``sppo_lightning/instruction_following.py``), the answers and per-prompt results in
``<run_dir>/instruction_following/iteration_<t>/`` (``iteration_0``: the initial policy), and the
win rate against the initial policy's answers by the run's ranker, from the same greedy answers
(so the measurement samples once, not twice).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import lightning as L

from sppo_lightning.callbacks.win_rate import paired_win_rate, shown_prompts
from sppo_lightning.data.prompts import Prompt
from sppo_lightning.errors import ConfigError
from sppo_lightning.instruction_following import FOUR, InstructionFollowing, write_evaluation
from sppo_lightning.ranking import Ranker

KEYS = (*FOUR, "words")  # the summary's and metrics' if_<key>


class HeldOutFollowing:
    """IFEval's numbers and the greedy win rate against π_0 on ``prompts`` (see the module docstring).

    Args:
        run_dir: the run's folder. prompts: the held-out prompts (IFEval format).
        ranker, tokenizer: the run's ranker (for the win rate) and tokenizer.
        max_new_tokens, batch_size: of the greedy answers. where: the prompt file, for errors.
    """

    def __init__(self, run_dir: Path, prompts: list[Prompt], ranker: Ranker, tokenizer, max_new_tokens: int,
                 batch_size: int, where: str) -> None:
        if not prompts:
            raise ConfigError("self_play.instruction_following needs held-out prompts: set data.eval_prompts to an "
                              "IFEval-format file")
        self.folder = Path(run_dir) / "instruction_following"
        self.evaluator = InstructionFollowing(prompts, max_new_tokens, batch_size, where=where)
        self.notes = self.evaluator.notes
        self.ranker, self.tokenizer = ranker, tokenizer
        self._initial: Optional[list[str]] = None  # π_0's greedy answers

    def measure(self, trainer: L.Trainer, policy, number: int) -> dict[str, Any]:
        """``if_<key>`` for the four numbers and ``words``, and (after π_0) ``win_rate_vs_initial``."""
        evaluation = self.evaluator.evaluate(policy, self.tokenizer, trainer.global_rank, trainer.world_size)
        if trainer.is_global_zero:
            write_evaluation(self.folder / f"iteration_{number}", self.evaluator.prompts, evaluation,
                             f"iteration {number}")
        row: dict[str, Any] = {**{f"if_{k}": v for k, v in evaluation.scores.items()}, "if_words": evaluation.words}
        if number == 0:
            self._initial = evaluation.responses
        else:
            shown = shown_prompts(self.ranker, self.tokenizer, self.evaluator.prompts)
            row["win_rate_vs_initial"] = paired_win_rate(
                self.ranker, shown, [[a, b] for a, b in zip(evaluation.responses, self.initial_answers())])
        return row

    def initial_answers(self) -> list[str]:
        """π_0's greedy answers: measured in this process, or read back from
        ``iteration_0/responses.jsonl`` (checked: one answer per held-out prompt, in order)."""
        if self._initial is None:
            path = self.folder / "iteration_0" / "responses.jsonl"
            try:
                rows = [json.loads(line) for line in path.read_text().splitlines()]
                answers = [r["response"] for r in rows if isinstance(r, dict) and isinstance(r.get("response"), str)]
                ok = len(answers) == len(rows) and [r["prompt"] for r in rows] == [p.text for p in self.evaluator.prompts]
            except (OSError, ValueError, KeyError):
                ok = False
            if not ok:
                raise ConfigError(f"{path}: missing or not the initial policy's answers to these held-out prompts; "
                                  f"start a fresh run (a new --trainer.default_root_dir)")
            self._initial = answers
        return self._initial
