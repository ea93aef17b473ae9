"""Preference losses as pure functions on per-sequence log-probabilities.

Every function takes float tensors of shape ``[B]`` (one entry per preference pair) and returns the
unreduced per-pair loss, shape ``[B]``. The caller reduces (usually ``.mean()``).

Naming: ``policy_*_logps`` / ``reference_*_logps`` are *summed* log-probabilities of the response
tokens (prompt masked, EOS included); ``*_mean_logps`` are the per-token means of the same. Formulas
and their sources: SPPO (arXiv 2405.00675, eq. 4.6, and its official trainer's ``loss_type``
values), DPO (arXiv 2305.18290), IPO (arXiv 2310.12036), ORPO (arXiv 2403.07691), ASFT (arXiv
2409.10571), SimPO (arXiv 2405.14734), BOND / J-BOND (arXiv 2407.14622).

All arithmetic runs in float32, or float64 when an input already is, whatever the model's dtype:
SPPO's targets are tens of nats and bf16 cannot hold their squared error.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# log1mexp is undefined at 0 and -inf beside it; clamp to this distance from 0 so that a response
# the model reproduces with probability ~1 (a memorised or one-token answer) gives a finite loss.
_LOG1MEXP_MAX = -1e-6


def _wide(*tensors: Tensor) -> list[Tensor]:
    """Cast to float32 unless already float64, so that no loss is computed in half precision."""
    return [t.to(torch.promote_types(t.dtype, torch.float32)) for t in tensors]


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, stable at both ends (Mächler 2012).

    Inputs above ``-1e-6`` are clamped there, so the result is finite (about -13.8 at most) and
    never NaN, also for ``x == 0`` or a slightly positive rounding error.
    """
    (x,) = _wide(x)
    x = x.clamp(max=_LOG1MEXP_MAX)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def log_odds(mean_logps: Tensor) -> Tensor:
    """Log-odds of the length-normalised likelihood: ``ℓ̄ - log(1 - exp(ℓ̄))``, shape ``[B]``."""
    (mean_logps,) = _wide(mean_logps)
    return mean_logps - log1mexp(mean_logps)


def sppo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    chosen_win_prob: Tensor,
    rejected_win_prob: Tensor,
    eta: float,
) -> Tensor:
    """Official SPPO loss (``loss_type="sppo"``): each response's log-ratio regressed to its target.

    ``0.5 * ((Δw - η(p_w - ½))² + (Δl - η(p_l - ½))²)`` with ``Δ = policy - reference`` and
    ``p_w, p_l`` the estimated win rates of chosen and rejected against the current policy.
    """
    pc, pr, rc, rr, pw, pl = _wide(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
        reference_rejected_logps, chosen_win_prob, rejected_win_prob,
    )
    return 0.5 * ((pc - rc - eta * (pw - 0.5)) ** 2 + (pr - rr - eta * (pl - 0.5)) ** 2)


def sppo_single_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    pair_prob: Tensor,
    eta: float,
) -> Tensor:
    """SPPO with the pairwise probability only (``loss_type="sppo_single"``).

    ``pair_prob`` is P(chosen ≻ rejected); the rejected target is its mirror ``-η(p - ½)``.
    """
    pc, pr, rc, rr, p = _wide(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
        reference_rejected_logps, pair_prob,
    )
    target = eta * (p - 0.5)
    return 0.5 * ((pc - rc - target) ** 2 + (pr - rr + target) ** 2)


def sppo_hard_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float,
) -> Tensor:
    """TRL's ``sppo_hard``: win probabilities 1 and 0, no ½ factor, ``η = 1/β``.

    ``(Δw - 0.5/β)² + (Δl + 0.5/β)²``; exactly twice the official loss with hard probabilities.
    """
    pc, pr, rc, rr = _wide(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    return (pc - rc - 0.5 / beta) ** 2 + (pr - rr + 0.5 / beta) ** 2


def _dpo_margin(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor) -> Tensor:
    return (pc - pr) - (rc - rr)


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> Tensor:
    """DPO with conservative label smoothing ε: ``-(1-ε)·logσ(βh) - ε·logσ(-βh)``.

    ``h = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)``.
    """
    h = _dpo_margin(*_wide(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    ))
    return -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)


def ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float,
) -> Tensor:
    """IPO: ``(h - 1/(2β))²`` with ``h`` as in :func:`dpo_loss`.

    TRL and the IPO authors feed per-token *mean* log-probs here; the module decides which
    (``PreferenceModule(ipo_average_logps=...)``), this function squares whatever it is given.
    """
    h = _dpo_margin(*_wide(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    ))
    return (h - 1.0 / (2.0 * beta)) ** 2


def orpo_loss(chosen_mean_logps: Tensor, rejected_mean_logps: Tensor, lam: float) -> Tensor:
    """ORPO: ``-ℓ̄w - λ·logσ(odds(ℓ̄w) - odds(ℓ̄l))`` on per-token mean log-probs (reference-free)."""
    lw, ll = _wide(chosen_mean_logps, rejected_mean_logps)
    return -lw - lam * F.logsigmoid(log_odds(lw) - log_odds(ll))


def asft_loss(
    chosen_mean_logps: Tensor, rejected_mean_logps: Tensor, lam: float, beta: float = 1.0
) -> Tensor:
    """ASFT (absolute-likelihood aligned SFT, arXiv 2409.10571), reference-free and pointwise.

    ``-ℓ̄w - λ·[logσ(β·odds(ℓ̄w)) + logσ(-β·odds(ℓ̄l))]``. With β = 1 the bracket is
    ``log P̄w + log(1 - P̄l)``: a binary cross-entropy on absolute likelihoods.
    """
    lw, ll = _wide(chosen_mean_logps, rejected_mean_logps)
    return -lw - lam * (F.logsigmoid(beta * log_odds(lw)) + F.logsigmoid(-beta * log_odds(ll)))


def simpo_loss(chosen_mean_logps: Tensor, rejected_mean_logps: Tensor, beta: float, gamma: float) -> Tensor:
    """SimPO (arXiv 2405.14734, eq. 6), reference-free: ``-logσ(β·(ℓ̄w - ℓ̄l) - γ)``.

    ``ℓ̄`` are per-token mean log-probs (the length normalisation is part of the method); ``γ``
    is the target reward margin. The paper tunes β in [2, 10] and γ/β in [0.3, 1.6] per model.
    """
    lw, ll = _wide(chosen_mean_logps, rejected_mean_logps)
    return -F.logsigmoid(beta * (lw - ll) - gamma)


# ------------------------------------------------------------------------------------ BOND
JBOND_LOSS_REWARD = -math.log(16.0)


def jbond_reward(loses_to_both: Tensor) -> Tensor:
    """J-BOND's crude log-quantile (BOND eq. 17): ``-log 16`` where the policy sample lost to both
    anchor samples, else 0. ``[B]`` bool → ``[B]`` float32. At the median, E[r] = log ½ = log p≤."""
    return torch.where(loses_to_both, JBOND_LOSS_REWARD, 0.0).float()


def bond_reward(beaten_or_tied: Tensor, n: int) -> Tensor:
    """BOND's reward ``(N-1)·log p̂≤`` with the Monte-Carlo quantile of k reference samples.

    Args:
        beaten_or_tied: ``[B, k]``, 1 where reference sample j scored ≤ the policy sample.
        n: the N of Best-of-N.

    ``p̂≤`` is clipped at ``1/(2k)`` so that a sample that loses to all k gets a finite reward.
    """
    (beaten_or_tied,) = _wide(beaten_or_tied)
    k = beaten_or_tied.shape[-1]
    return (n - 1) * beaten_or_tied.mean(-1).clamp(min=1.0 / (2 * k)).log()


def best_of_n_kl(n: int) -> float:
    """KL(π_BoN‖π_ref) = log N − (N−1)/N of Best-of-N sampling for continuous rewards (BOND's
    Theorem 1): what BOND's fixed-N distillation is compared with."""
    return math.log(n) - (n - 1) / n


def leave_one_out_baseline(returns: Tensor) -> Tensor:
    """For each sample, the mean return of the *other* samples of the batch, ``[B]``; 0 if B = 1."""
    n = returns.shape[0]
    if n < 2:
        return torch.zeros_like(returns)
    return (returns.sum() - returns) / (n - 1)


def bond_loss(
    forward_logps: Tensor,
    policy_sample_logps: Tensor,
    anchor_sample_logps: Tensor,
    reward: Tensor,
    beta: float = 0.5,
) -> Tensor:
    """Jeffreys-divergence BOND: ``(1-β)·forward KL + β·backward KL``, per prompt ``[B]``.

    Args:
        forward_logps: summed log π(y'_best) of the best anchor/reference sample (forward KL =
            NLL of Best-of-N samples), with grad.
        policy_sample_logps: summed log π(y) of the policy's own sample, with grad.
        anchor_sample_logps: summed log π_anchor(y) of the same sample (no grad needed).
        reward: ``jbond_reward`` or ``bond_reward`` of the policy sample.
        beta: the Jeffreys mix (paper: 0.5).

    The backward-KL term is REINFORCE with the return ``R = reward - (log π(y) - log π_anchor(y))``
    and a leave-one-out baseline; ``R - baseline`` is detached, so its gradient is
    ``-(R - B)·∇log π(y)``.
    """
    fw, pol, anc, r = _wide(forward_logps, policy_sample_logps, anchor_sample_logps, reward)
    returns = r - (pol - anc).detach()
    advantage = (returns - leave_one_out_baseline(returns)).detach()
    return (1.0 - beta) * -fw + beta * -(pol * advantage)


def anchor_kl_surrogate(policy_sample_logps: Tensor, anchor_sample_logps: Tensor) -> Tensor:
    """J-BOND's anchor regulariser ``KL(π‖π_anchor)`` (BOND, arXiv 2407.14622, §5: the ``γ`` term),
    as a per-prompt surrogate ``[B]`` on the policy's own samples y ~ π.

    Its value is ``(log π(y) - log π_anchor(y)).detach() · log π(y)``, whose gradient
    ``(log π(y) - log π_anchor(y))·∇log π(y)`` is, in expectation over y ~ π, the gradient of
    ``KL(π‖π_anchor)`` (the ``+1`` of the exact gradient has zero mean). Report the KL itself as
    ``log π(y) - log π_anchor(y)``, not this value.
    """
    pol, anc = _wide(policy_sample_logps, anchor_sample_logps)
    return (pol - anc).detach() * pol
