"""The loss table: every preference loss ``PreferenceModule`` trains with, and what it needs.

One entry per loss name. The module, the reference resolution and the CLI read this table and
nothing else, so adding a loss is a function in ``losses.py`` plus one entry here (and a config).

An entry says:

* ``fn(x, h)``: the per-pair loss ``[B]`` from :class:`LossInputs` ``x`` and the resolved
  hyperparameters ``h`` (a dict); it calls the pure function of ``losses.py``;
* ``needs_reference``: whether it reads reference log-probs (a model, an adapter-off policy, or
  cached columns); reference-free losses run no reference at all;
* ``logps``: ``"sum"`` or ``"mean"`` (per-token mean) log-probs, or the name of a boolean
  hyperparameter that picks ``mean`` when true (IPO's ``ipo_average_logps``);
* ``prob_columns``: batch columns it needs (SPPO's win probabilities);
* ``hyperparameters``: its own settings and their defaults (from the papers' and TRL's recipes);
* ``rewards(x, h)``: the implicit rewards of chosen and rejected it logs, as the official trainers
  do, or None; ``metrics(x, h, per_pair)``: any other metrics it logs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

from torch import Tensor

from sppo_lightning import losses
from sppo_lightning.errors import ConfigError, DataError
from sppo_lightning.logprobs import SequenceLogps


@dataclass(frozen=True)
class LossInputs:
    """What a loss entry sees of one batch of B pairs.

    ``chosen`` / ``rejected``: the policy's log-probs ``[B]`` (summed or per-token mean, as the
    entry asks); ``reference_*`` the same for the reference, or None for reference-free losses;
    ``batch``: the collated batch (its ``[B]`` probability columns).
    """

    chosen: Tensor
    rejected: Tensor
    reference_chosen: Optional[Tensor]
    reference_rejected: Optional[Tensor]
    batch: Mapping[str, Tensor]


Hyper = Mapping[str, Any]


@dataclass(frozen=True)
class LossEntry:
    fn: Callable[[LossInputs, Hyper], Tensor]
    needs_reference: bool
    logps: str = "sum"
    prob_columns: tuple[str, ...] = ()
    hyperparameters: Mapping[str, Any] = field(default_factory=dict)
    rewards: Optional[Callable[[LossInputs, Hyper], tuple[Tensor, Tensor]]] = None
    metrics: Optional[Callable[[LossInputs, Hyper, Tensor], dict[str, Tensor]]] = None

    def uses_mean(self, h: Hyper) -> bool:
        return self.logps == "mean" or (self.logps not in ("sum", "mean") and bool(h[self.logps]))


def _log_ratio_rewards(scale: Callable[[Hyper], float]):
    """Rewards ``scale·(policy - reference)``: DPO's β, SPPO's 1/η (the official trainer logs so)."""
    def rewards(x: LossInputs, h: Hyper) -> tuple[Tensor, Tensor]:
        s = scale(h)
        return s * (x.chosen - x.reference_chosen), s * (x.rejected - x.reference_rejected)
    return rewards


def _sppo(x: LossInputs, h: Hyper) -> Tensor:
    return losses.sppo_loss(x.chosen, x.rejected, x.reference_chosen, x.reference_rejected,
                            x.batch["chosen_probs_win"], x.batch["chosen_probs_lose"], h["eta"])


def _sppo_single(x: LossInputs, h: Hyper) -> Tensor:
    return losses.sppo_single_loss(x.chosen, x.rejected, x.reference_chosen, x.reference_rejected,
                                   x.batch["chosen_probs"], h["eta"])


def _target_gap(x: LossInputs, chosen_target: Tensor, rejected_target: Tensor) -> Tensor:
    """Mean |log-ratio − target| in nats: SPPO's loss on a scale one can read (the loss itself is
    half its square, tens of thousands of nats² with η = 1000)."""
    chosen = (x.chosen - x.reference_chosen - chosen_target).abs()
    rejected = (x.rejected - x.reference_rejected - rejected_target).abs()
    return ((chosen + rejected) / 2).detach().mean()


def _sppo_targets(x: LossInputs, h: Hyper, per_pair: Tensor) -> dict[str, Tensor]:
    chosen, rejected = h["eta"] * (x.batch["chosen_probs_win"] - 0.5), h["eta"] * (x.batch["chosen_probs_lose"] - 0.5)
    return {"targets/chosen": chosen.mean(), "targets/rejected": rejected.mean(),
            "target_gap": _target_gap(x, chosen, rejected)}


def _sppo_single_targets(x: LossInputs, h: Hyper, per_pair: Tensor) -> dict[str, Tensor]:
    target = h["eta"] * (x.batch["chosen_probs"] - 0.5)
    return {"targets/chosen": target.mean(), "targets/rejected": (-target).mean(),
            "target_gap": _target_gap(x, target, -target)}


def _nll_metrics(x: LossInputs, h: Hyper, per_pair: Tensor) -> dict[str, Tensor]:
    """ORPO and ASFT: loss = NLL + λ·alignment term, logged apart."""
    chosen, rejected = x.chosen.detach(), x.rejected.detach()
    return {"nll": -chosen.mean(), "alignment": (per_pair.detach() + chosen).mean(),
            "prob/chosen": chosen.exp().mean(), "prob/rejected": rejected.exp().mean(),
            "accuracy": (chosen > rejected).float().mean()}


def _pair(fn: Callable[..., Tensor], *names: str) -> Callable[[LossInputs, Hyper], Tensor]:
    """A loss of (policy chosen, policy rejected, reference chosen, reference rejected, *hyperparameters)."""
    return lambda x, h: fn(x.chosen, x.rejected, x.reference_chosen, x.reference_rejected, *(h[n] for n in names))


LOSSES: dict[str, LossEntry] = {
    # SPPO (arXiv 2405.00675): each log-ratio regressed to η(P(win) - ½); η = 1000 in the paper.
    "sppo": LossEntry(_sppo, True, prob_columns=("chosen_probs_win", "chosen_probs_lose"),
                      hyperparameters={"eta": 1000.0}, rewards=_log_ratio_rewards(lambda h: 1.0 / h["eta"]),
                      metrics=_sppo_targets),
    "sppo_single": LossEntry(_sppo_single, True, prob_columns=("chosen_probs",), hyperparameters={"eta": 1000.0},
                             rewards=_log_ratio_rewards(lambda h: 1.0 / h["eta"]), metrics=_sppo_single_targets),
    # TRL's sppo_hard: win probabilities 1 and 0.
    "sppo_hard": LossEntry(_pair(losses.sppo_hard_loss, "beta"), True, hyperparameters={"beta": 0.1},
                           rewards=_log_ratio_rewards(lambda h: h["beta"])),
    "dpo": LossEntry(_pair(losses.dpo_loss, "beta", "label_smoothing"), True,
                     hyperparameters={"beta": 0.1, "label_smoothing": 0.0},
                     rewards=_log_ratio_rewards(lambda h: h["beta"])),
    # IPO on per-token means by default, as TRL and the IPO authors run it.
    "ipo": LossEntry(_pair(losses.ipo_loss, "beta"), True, logps="ipo_average_logps",
                     hyperparameters={"beta": 0.1, "ipo_average_logps": True},
                     rewards=_log_ratio_rewards(lambda h: h["beta"])),
    "orpo": LossEntry(lambda x, h: losses.orpo_loss(x.chosen, x.rejected, h["lam"]), False, logps="mean",
                      hyperparameters={"lam": 0.1}, metrics=_nll_metrics),
    "asft": LossEntry(lambda x, h: losses.asft_loss(x.chosen, x.rejected, h["lam"], h["beta"]), False, logps="mean",
                      hyperparameters={"lam": 1.0, "beta": 1.0}, metrics=_nll_metrics),
    # SimPO (arXiv 2405.14734): reference-free margin on mean log-probs; β and γ are tuned per model.
    "simpo": LossEntry(lambda x, h: losses.simpo_loss(x.chosen, x.rejected, h["beta"], h["gamma"]), False,
                       logps="mean", hyperparameters={"beta": 2.0, "gamma": 1.0},
                       rewards=lambda x, h: (h["beta"] * x.chosen, h["beta"] * x.rejected)),
}

# Bounds of the hyperparameters, by name, checked for every loss that has them.
BOUNDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "eta": (lambda v: v > 0, "> 0"),
    "beta": (lambda v: v > 0, "> 0"),
    "lam": (lambda v: v >= 0, ">= 0"),
    "gamma": (lambda v: math.isfinite(v), "finite"),
    "label_smoothing": (lambda v: 0 <= v < 0.5, "in [0, 0.5)"),
}


def entry(name: str) -> LossEntry:
    if name not in LOSSES:
        raise ConfigError(f"model.loss must be one of {', '.join(LOSSES)}, got {name!r}")
    return LOSSES[name]


def needs_reference(name: str) -> bool:
    return entry(name).needs_reference


def resolve_hyperparameters(name: str, explicit: Mapping[str, Any], loss_args: Optional[Mapping[str, Any]]) -> dict:
    """The hyperparameters of loss ``name``: an explicit module argument (not None) wins, then
    ``loss_args``, then the table's default. Unknown ``loss_args`` keys and values out of bounds
    are a ``ConfigError`` naming the key."""
    spec = entry(name)
    loss_args = dict(loss_args or {})
    unknown = sorted(set(loss_args) - set(spec.hyperparameters))
    if unknown:
        raise ConfigError(f"model.loss_args.{unknown[0]}: loss {name!r} has no such setting "
                          f"(it takes {', '.join(spec.hyperparameters) or 'none'})")
    resolved = {}
    for key, default in spec.hyperparameters.items():
        value = explicit.get(key)
        resolved[key] = value if value is not None else loss_args.get(key, default)
        check = BOUNDS.get(key)
        if check is not None and not check[0](resolved[key]):
            raise ConfigError(f"model.{key} must be {check[1]}, got {resolved[key]}")
    return resolved


def compute_loss(name: str, h: Hyper, policy: SequenceLogps, reference_sums: Optional[Tensor],
                 batch: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-pair losses ``[B]`` and the metrics to log (batch means) for loss ``name``.

    ``policy`` holds ``[2B]`` log-probs (chosen rows first); ``reference_sums`` the ``[2B]``
    summed reference log-probs, or None for reference-free losses.
    """
    spec = entry(name)
    half = policy.sum.shape[0] // 2
    chosen_mean, rejected_mean = policy.mean[:half], policy.mean[half:]
    metrics = {
        "logps/chosen": policy.sum[:half].detach().mean(),
        "logps/rejected": policy.sum[half:].detach().mean(),
        "logps/chosen_mean": chosen_mean.detach().mean(),
        "logps/rejected_mean": rejected_mean.detach().mean(),
    }
    for column in spec.prob_columns:
        if column not in batch:
            raise DataError(f"loss '{name}' needs the column '{column}' (win probabilities), which the data "
                            f"does not have; use loss: sppo_hard or dpo for plain preference pairs")
    mean = spec.uses_mean(h)
    logps = policy.mean if mean else policy.sum
    reference = None
    if spec.needs_reference:
        reference = reference_sums.to(logps.device)
        if mean:
            reference = reference / policy.n_tokens.clamp(min=1)
    x = LossInputs(logps[:half], logps[half:], None if reference is None else reference[:half],
                   None if reference is None else reference[half:], batch)
    per_pair = spec.fn(x, h)
    if spec.metrics is not None:
        metrics.update(spec.metrics(x, h, per_pair))
    if spec.rewards is not None:
        chosen_reward, rejected_reward = (r.detach() for r in spec.rewards(x, h))
        metrics["rewards/chosen"] = chosen_reward.mean()
        metrics["rewards/rejected"] = rejected_reward.mean()
        metrics["rewards/margins"] = (chosen_reward - rejected_reward).mean()
        metrics["rewards/accuracy"] = (chosen_reward > rejected_reward).float().mean()
    return per_pair, metrics
