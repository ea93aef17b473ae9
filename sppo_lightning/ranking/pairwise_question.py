"""What the "A or B?" judges share: the question, the ordered pairs they ask, the matrix M they
return, and answering from the judgment cache first.

For prompt n and candidates i, j a judge answers ``d(i, j)``: how much it prefers the answer in
slot A (candidate i) to the one in slot B (candidate j), as a log-odds. With ``both_orders`` every
pair is asked both ways and ``M_ij = (d(i, j) - d(j, i)) / 2`` (the judge's position bias cancels,
and M is antisymmetric); without it, ``M_ij = d(i, j)`` and ``M_ji = -d(i, j)`` for i < j.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from sppo_lightning.errors import ConfigError
from sppo_lightning.ranking.cache import JudgmentCache, judgment_key

# Our own wording, in the spirit of the pairwise prompts AlpacaEval and MT-Bench publish.
DEFAULT_TEMPLATE = (
    "Two AI assistants answered the same instruction. Decide which answer is better: more helpful, "
    "more correct and more to the point. Do not let the order of the answers or their length sway you.\n\n"
    "[Instruction]\n{prompt}\n\n[Answer A]\n{a}\n\n[Answer B]\n{b}\n\n"
    "Which answer is better? Reply with one letter: A or B."
)

Question = tuple[str, str, str]  # (prompt, answer A, answer B)


def check_question_settings(owner: str, template: str, answers: tuple[str, ...]) -> None:
    for field in ("{prompt}", "{a}", "{b}"):
        if field not in template:
            raise ConfigError(f"{owner}: template must contain {field}")
    if len(answers) != 2 or answers[0] == answers[1]:
        raise ConfigError(f"{owner}: answers must be two different strings, got {answers!r}")


def render_question(template: str, prompt: str, a: str, b: str) -> str:
    """The template with ``{prompt}``, ``{a}`` and ``{b}`` filled (braces inside the texts are kept)."""
    return template.format(prompt=prompt, a=a, b=b)


def pairwise_matrix(prompts: list[str], candidates: list[list[str]], both_orders: bool,
                    margins: Callable[[list[Question]], list[float]]) -> Tensor:
    """``M[N, K, K]`` from ``margins`` of every ordered pair asked (see the module docstring)."""
    k = len(candidates[0]) if candidates else 0
    asks = [(n, i, j) for n in range(len(prompts)) for i in range(k) for j in range(k)
            if i != j and (both_orders or i < j)]
    values = margins([(prompts[n], candidates[n][i], candidates[n][j]) for n, i, j in asks])
    d = torch.zeros(len(prompts), k, k)
    for (n, i, j), value in zip(asks, values):
        d[n, i, j] = value
    if both_orders:
        return (d - d.transpose(-1, -2)) / 2
    upper = torch.triu(d, diagonal=1)
    return upper - upper.transpose(-1, -2)


def cached_margins(judge: str, questions: list[Question], cache: Optional[JudgmentCache],
                   compute: Callable[[list[Question], list[str]], list[float]]) -> tuple[list[float], int]:
    """Margins of ``questions``: from ``cache`` where it has them (keyed by the judge's fingerprint
    hash ``judge``), the rest from ``compute(questions, keys)``, which stores them under ``keys`` as
    it goes. Returns the margins and how many were computed. A question asked twice in one call
    (two identical samples) is computed once; with a cache its repeats count as hits, so that
    computed + ``cache.hits`` = ``len(questions)``."""
    keys = [judgment_key(judge, *q) for q in questions]
    known = cache.get_many(keys) if cache is not None else {}
    first: dict[str, int] = {}
    missing = [k for k, key in enumerate(keys) if key not in known]
    for k in missing:
        first.setdefault(keys[k], k)
    todo = list(first.values())
    if cache is not None:
        cache.hits += len(missing) - len(todo)
    if todo:
        values = compute([questions[k] for k in todo], [keys[k] for k in todo])
        known = {**known, **{keys[k]: v for k, v in zip(todo, values)}}
    return [known[key] for key in keys], len(todo)
