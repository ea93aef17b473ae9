"""Every seed the framework derives, from one place: the same run seed gives the same samples,
orders and coins, on any number of processes and after any resume.

Two mixes, kept from the first release so that earlier runs reproduce:

* a **stream** of the run seed (``seed · 7919 + offset``): one per iteration's sampling, one for the
  evaluation against the initial policy, BOND's coins;
* an **index** within a stream (``seed · 1000003 + index``, modulo 2^63 - 1): generation batch k,
  training epoch e's order, prediction batch b.
"""

from __future__ import annotations

_STREAM = 7_919
_INDEX = 1_000_003
_EVALUATION = 999_983  # far from any iteration number
_COINS = 1_000_003


def indexed(seed: int, index: int) -> int:
    """The seed of item ``index`` (a generation batch, an epoch) of the stream ``seed``."""
    return (seed * _INDEX + index) % (2**63 - 1)


def iteration_stream(seed: int, iteration: int) -> int:
    """Self-play sampling of iteration t (SPPO; BOND uses 2t and 2t + 1 for policy and anchor)."""
    return seed * _STREAM + iteration


def evaluation_stream(seed: int) -> int:
    """The win rate against the initial policy: one stream for every measurement (paired samples)."""
    return seed * _STREAM + _EVALUATION


def coin_stream(seed: int, iteration: int) -> int:
    """BOND's seeded tie-breaking coins of iteration t."""
    return seed * _STREAM + _COINS + iteration
