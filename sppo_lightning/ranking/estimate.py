"""SPPO's win-probability estimate from a ranker's pair logits (arXiv 2405.00675, §4, and the
official ``compute_prob``/llm-blender ``get_scores_from_cmps``).

``M[N, K, K]`` holds, for prompt n, the logit of "candidate i beats candidate j" (i in the first
slot), with a zero diagonal. From there the estimate follows the official SPPO code exactly:

    s_i      = mean_j (M_ij - M_ji)              (scores_from_pairwise)
    P̂_ij     = σ(s_i - s_j)                      (win_probabilities)
    p_win(i) = mean_j P̂_ij, diagonal included
    chosen = argmax s, rejected = argmin s       (select_pairs; all-tie prompts are dropped)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sppo_lightning.errors import DataError


def scores_from_pairwise(pairwise: Tensor) -> Tensor:
    """``[N, K, K]`` pair logits → ``[N, K]`` scores ``s_i = mean_j(M_ij - M_ji)`` (llm-blender's
    ``get_scores_from_cmps``; the mean runs over all K columns, the zero diagonal included)."""
    return (pairwise - pairwise.transpose(-1, -2)).mean(-1)


def win_probabilities(scores: Tensor) -> tuple[Tensor, Tensor]:
    """SPPO's Bradley-Terry estimate from per-candidate scores.

    Args:
        scores: ``[N, K]`` scores, higher is better.

    Returns:
        pairwise: ``[N, K, K]`` with ``pairwise[n, i, j] = σ(s_i - s_j)`` (diagonal 0.5);
        win_rate: ``[N, K]``, ``win_rate[n, i] = mean_j pairwise[n, i, j]``, the estimate of
        P(y_i ≻ π_t | x). Each row sums to K/2.
    """
    scores = scores.to(torch.float64)
    pairwise = torch.sigmoid(scores.unsqueeze(-1) - scores.unsqueeze(-2))
    return pairwise, pairwise.mean(-1)


@dataclass
class PairSelection:
    """The pair SPPO trains on for each prompt, and which prompts are dropped."""

    chosen: Tensor  # [N] index of argmax s (first on ties, as numpy)
    rejected: Tensor  # [N] index of argmin s
    keep: Tensor  # [N] bool: False where all K scores tie (chosen would equal rejected)
    chosen_probs: Tensor  # [N] P̂[w, l]
    chosen_probs_win: Tensor  # [N] p_win(w)
    chosen_probs_lose: Tensor  # [N] p_win(l)


def select_pairs(scores: Tensor, where: str = "ranker", first_row: int = 0) -> PairSelection:
    """Best and worst candidate per prompt with their win probabilities.

    A NaN or infinite score raises ``DataError`` naming the prompt row: a broken ranker must not
    silently become training targets. ``where`` names the source in that message, and
    ``first_row`` is the row number of ``scores[0]`` there (when scores come in shards).
    """
    bad = ~torch.isfinite(scores)
    if bad.any():
        row = int(bad.any(-1).nonzero()[0])
        raise DataError(f"{where}: prompt row {first_row + row + 1}: the ranker returned a non-finite score "
                        f"{scores[row].tolist()}")
    pairwise, win_rate = win_probabilities(scores)
    chosen, rejected = scores.argmax(-1), scores.argmin(-1)
    rows = torch.arange(scores.shape[0])
    keep = scores.max(-1).values > scores.min(-1).values
    return PairSelection(
        chosen=chosen,
        rejected=rejected,
        keep=keep,
        chosen_probs=pairwise[rows, chosen, rejected],
        chosen_probs_win=win_rate[rows, chosen],
        chosen_probs_lose=win_rate[rows, rejected],
    )


def pairwise_from_rewards(rewards: Tensor) -> Tensor:
    """Pointwise rewards ``[N, K]`` → pair logits ``M_ij = r_i - r_j``, ``[N, K, K]``."""
    return rewards.unsqueeze(-1) - rewards.unsqueeze(-2)
