"""``FunctionJudge``: a Python function as the preference oracle."""

from __future__ import annotations

import hashlib
import importlib
import inspect
import math
from typing import Any, Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from sppo_lightning.errors import ConfigError, DataError
from sppo_lightning.ranking.estimate import pairwise_from_rewards
from sppo_lightning.ranking.protocol import PromptView, prompt_view_of


def import_function(path: str) -> Callable:
    """Import ``"package.module:function"`` (or ``"package.module.function"``)."""
    module_name, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    if not module_name or not attr:
        raise ConfigError(f"judge function {path!r} must look like 'package.module:function'")
    try:
        function = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"cannot import the judge function {path!r}: {err}") from None
    if not callable(function):
        raise ConfigError(f"the judge {path!r} is not callable")
    return function


class FunctionJudge:
    """Scores each (prompt, response) with ``function(prompt, response) -> float``, higher better.

    The function is named by import path in the config and imported when the judge is built; it
    is the only code this framework runs from a config, and nothing is ever run from data. Pair
    logits are reward differences, ``M_ij = r_i - r_j``, so any ranker-agnostic code (SPPO's
    estimate, win rates) treats it like PairRM.

    Args:
        function: import path, e.g. ``sppo_lightning.ranking.judges:known_words``.
        prompt_view: what the function is given as the prompt: ``raw`` (the user's text) or
            ``chat`` (the policy's chat-templated prompt string).
        show_progress: a progress bar over prompts ("judging").
    """

    def __init__(self, function: str, prompt_view: PromptView = "raw", show_progress: bool = True) -> None:
        self.function_path = function
        self.function = import_function(function)
        self.prompt_view, self.show_progress = prompt_view, show_progress
        prompt_view_of(self)

    def fingerprint(self) -> dict[str, Any]:
        """The function's path and a hash of its source (editing the judge changes its scores)."""
        try:
            code = inspect.getsource(self.function).encode()
        except (OSError, TypeError):  # no source (a builtin, a C function): its compiled code, if any
            code = getattr(getattr(self.function, "__code__", None), "co_code", repr(self.function).encode())
        return {"class": "FunctionJudge", "function": self.function_path,
                "source": hashlib.sha256(code).hexdigest()[:16], "prompt_view": self.prompt_view}

    def rewards(self, prompts: list[str], candidates: list[list[str]]) -> Tensor:
        """``[N, K]`` float64 rewards."""
        out = torch.empty(len(prompts), len(candidates[0]) if candidates else 0, dtype=torch.float64)
        rows = tqdm(zip(prompts, candidates), desc="judging", total=len(prompts), disable=not self.show_progress)
        for n, (prompt, cands) in enumerate(rows):
            for k, response in enumerate(cands):
                try:
                    value = self.function(prompt, response)
                except Exception as err:  # the user's judge: one line naming it, the row and the error
                    raise DataError(f"judge {self.function_path}: prompt row {n + 1}, candidate {k}: raised "
                                    f"{type(err).__name__}: {err}") from err
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise DataError(
                        f"judge {self.function_path}: prompt row {n + 1}, candidate {k}: returned {value!r}, "
                        f"not a finite number"
                    )
                out[n, k] = float(value)
        return out

    def pairwise_logits(self, prompts: list[str], candidates: list[list[str]]) -> Tensor:
        return pairwise_from_rewards(self.rewards(prompts, candidates))
