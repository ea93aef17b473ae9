"""Small rule-based judges for ``FunctionJudge``: the quickstart's oracle and test helpers.

A judge is ``function(prompt: str, response: str) -> float`` (higher is better). Name one in a
config as ``sppo_lightning.ranking.judges:<name>``; your own live in any importable module.
"""

from __future__ import annotations

from sppo_lightning.testing import WORDS

_KNOWN = frozenset(WORDS)


def known_words(prompt: str, response: str) -> float:
    """How many of the response's words are plain English words from the tiny model's word list,
    up to 16. A stand-in for a real preference model that a tiny random policy can learn in a few
    SPPO iterations: it prefers text made of words over byte-level noise."""
    words = [w.strip(".,?!").lower() for w in response.split()]
    return float(min(16, sum(w in _KNOWN for w in words)))


POSITIVE = frozenset({"good", "best", "better", "sure", "thank", "help", "please", "yes", "simple"})


def positive_words(prompt: str, response: str) -> float:
    """How many positive words ("good", "sure", "thank", ...) the response uses, up to 8: the
    quickstart's oracle. A warmed-up tiny policy uses one now and then; self-play should make it
    use more, so the win rate against the initial policy climbs iteration by iteration."""
    words = [w.strip(".,?!").lower() for w in response.split()]
    return float(min(8, sum(w in POSITIVE for w in words)))


def shorter(prompt: str, response: str) -> float:
    """Prefers shorter responses (by characters)."""
    return -float(len(response))
