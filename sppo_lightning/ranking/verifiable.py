"""``VerifiableInstructionRanker``: responses scored by the checkers of their prompt's instructions.

For prompt files in the IFEval / IFBench format (``key``, ``prompt``, ``instruction_id_list``,
``kwargs``), such as IFBench's test prompts. Each response's reward is what IFEval measures, for
its own prompt's instructions (``ranking/instructions.py``, IFEval's and IFBench's own checkers):

- ``score: fraction`` (default): the fraction of the instructions followed (IFEval's
  instruction-level accuracy, for one response). It separates a response that follows one of two
  instructions from one that follows none, so fewer prompts tie;
- ``score: all``: 1 when every instruction is followed, else 0 (prompt-level accuracy);
- ``mode: loose`` (default) or ``strict``: IFEval's loose check forgives a first or last line
  ("Sure, here is...") and markdown ``*``; strict takes the response as it is.

The pair logits are reward differences, ``M_ij = r_i - r_j`` (``FunctionJudge`` does the same),
so responses that follow the same instructions tie: SPPO drops a prompt whose K responses all tie,
and the win probabilities of the others come from the ties and wins among their K. Two options act
on the known drift of SPPO and DPO towards long answers: ``length_penalty`` subtracts that much per
100 words from every reward (0: off), which also breaks ties towards the shorter answer.

Instructions whose checker cannot run here (NLTK data missing offline, an unknown id) are scored
on the others, and named once on the console with how many prompts of that call they touch. The
prompts are read as JSON rows (``prompt_view: record``): the prompt and its instructions.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any, Literal, Optional, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from sppo_lightning.errors import ConfigError, DataError
from sppo_lightning.ranking.estimate import pairwise_from_rewards
from sppo_lightning.ranking.instructions import InstructionChecks, parse_record


class VerifiableInstructionRanker:
    """Scores each response by the IFEval / IFBench checkers of its prompt's instructions.

    Args:
        score: ``fraction`` of the instructions followed (default), or ``all`` (1 if every one is).
        mode: ``loose`` (IFEval's loose check, default) or ``strict``.
        length_penalty: subtracted from the reward per 100 words of the response (0: none).
        show_progress: a "checking instructions" progress bar over prompts.
    """

    prompt_view = "record"  # the prompt row as JSON: its text and its instructions

    def __init__(self, score: Literal["fraction", "all"] = "fraction", mode: Literal["loose", "strict"] = "loose",
                 length_penalty: float = 0.0, show_progress: bool = True) -> None:
        if score not in ("fraction", "all"):
            raise ConfigError(f"VerifiableInstructionRanker: score must be fraction or all, got {score!r}")
        if mode not in ("loose", "strict"):
            raise ConfigError(f"VerifiableInstructionRanker: mode must be loose or strict, got {mode!r}")
        if not isinstance(length_penalty, (int, float)) or length_penalty < 0:
            raise ConfigError(f"VerifiableInstructionRanker: length_penalty must be a number >= 0, got {length_penalty!r}")
        self.score, self.mode, self.length_penalty = score, mode, float(length_penalty)
        self.show_progress = show_progress
        self.checks = InstructionChecks()
        self._named: set[str] = set()

    def fingerprint(self) -> dict[str, Any]:
        """The settings and the checkers' version (another if-verifiable may check differently)."""
        return {"class": "VerifiableInstructionRanker", "score": self.score, "mode": self.mode,
                "length_penalty": self.length_penalty, "if_verifiable": metadata.version("if-verifiable"),
                "prompt_view": self.prompt_view}

    def screen_prompts(self, prompts: Sequence[tuple[str, Optional[dict[str, Any]]]]) -> tuple[list[int], list[str]]:
        """At start-up: the prompts whose every instruction can be checked here, and one line per
        instruction that cannot (naming it, why, and how many prompts it drops). A prompt without
        instructions is a ``DataError``: the file is not in the IFEval format."""
        if any(meta is None for _, meta in prompts):
            raise DataError("VerifiableInstructionRanker scores prompts by their instructions: the prompt file "
                            "needs IFEval's columns instruction_id_list and kwargs (IFEval / IFBench format)")
        return self.checks.screen([(text, meta) for text, meta in prompts if meta is not None])

    def reward(self, prompt: str, meta: dict[str, Any], response: str) -> float:
        """One response's reward (see the class docstring)."""
        checked = self.checks.check(prompt, meta, response)
        followed = checked.loose if self.mode == "loose" else checked.strict
        if not followed:
            value = 0.0
        elif self.score == "fraction":
            value = sum(followed) / len(followed)
        else:
            value = float(all(followed))
        return value - self.length_penalty * len(response.split()) / 100

    def rewards(self, prompts: list[str], candidates: list[list[str]]) -> Tensor:
        """``[N, K]`` float64 rewards; ``prompts`` are ``prompt_view: record`` rows."""
        out = torch.zeros(len(prompts), len(candidates[0]) if candidates else 0, dtype=torch.float64)
        touched: dict[str, int] = {}
        rows = tqdm(zip(prompts, candidates), total=len(prompts), desc="checking instructions",
                    disable=not self.show_progress)
        for n, (view, responses) in enumerate(rows):
            prompt, meta = parse_record(view)
            for k, response in enumerate(responses):
                out[n, k] = self.reward(prompt, meta, response)
            for instruction in set(meta["instruction_id_list"]) & set(self.checks.unusable):
                touched[instruction] = touched.get(instruction, 0) + 1
        from lightning.pytorch.utilities import rank_zero_warn

        for instruction, count in sorted(touched.items()):
            if instruction not in self._named:  # once per run: the prompts are scored on their other ones
                self._named.add(instruction)
                rank_zero_warn(f"instruction {instruction} cannot be checked here ({self.checks.unusable[instruction]}): "
                               f"{count} prompt(s) of this shard are scored on their other instructions")
        return out

    def pairwise_logits(self, prompts: list[str], candidates: list[list[str]]) -> Tensor:
        return pairwise_from_rewards(self.rewards(prompts, candidates))
