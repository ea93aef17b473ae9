"""Small rule-based judges for ``FunctionJudge``: the quickstart's oracle and test helpers.

A judge is ``function(prompt: str, response: str) -> float`` (higher is better). Name one in a
config as ``sppo_lightning.ranking.judges:<name>``; your own live in any importable module.
"""

from __future__ import annotations

# The tiny model's word list (sppo_lightning.testing trains it on sentences of these words).
WORDS = (
    "the a an is are was be to of and in that it for on with as at by this from or not but what "
    "which who how why when where can could would should will do does did has have had you your "
    "we our they their he she his her i me my yes no one two three four five six seven eight nine "
    "ten plus minus times equals answer question number color sky blue green red sun moon water "
    "cat dog bird tree house city river good bad best better worse help please thank sure sorry "
    "know think say tell give make write explain short long simple because so then than more less"
).split()

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


def no_preference(prompt: str, response: str) -> float:
    """Ties every response (every prompt's pair is dropped): for runs where nothing should train."""
    return 0.0
