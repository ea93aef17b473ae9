"""The self-play method protocol: what ``SelfPlayDataModule`` asks of SPPO, J-BOND, online pairs, ...

A method is a plug-in of the data module, chosen by ``class_path`` like a generator or a ranker::

    data:
      class_path: sppo_lightning.data.SelfPlayDataModule
      init_args:
        method:
          class_path: sppo_lightning.methods.SPPO
          init_args: {num_samples: 5, ranker: {...}, generator: {...}}

Each iteration the data module calls ``method.build(iteration, prompts, policies, tokenizer, ctx,
run_dir)`` and serves the rows it returns. A method gets plain arguments: the 0-based iteration
index, the iteration's prompts, a :class:`Policies` handle on the models it may sample or score,
a ``DistContext`` and its run folder. It never sees the Trainer or the LightningModule, so it runs
(and is tested) in a plain script. It is built from the shared stages (``pipeline/stages.py``:
``generate``, ``rank``, ``estimate_pairs``, ``reference_logps``) and the artifacts runner
(``artifacts.run_sharded_stage``), and records its statistics in the iteration's manifest, where
the boundary callback (``callbacks/self_play.py``) reads them.

Adding a method is one file with a class that has the attributes of :class:`SelfPlayMethod`, and a
config that names it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Mapping, Optional, Protocol, Sequence, runtime_checkable

from torch import nn

from sppo_lightning.distributed import DistContext
from sppo_lightning.errors import ConfigError

if TYPE_CHECKING:  # sppo_lightning.data imports this module (the data module's method type)
    from sppo_lightning.data.prompts import Prompt


@dataclass
class IterationData:
    """What ``build`` returns: the training rows (anything with ``len`` and integer indexing; a
    memory-mapped ``datasets.Dataset``), the iteration's statistics (also in its manifest), and
    the first pairs as a table for loggers."""

    pairs: Any
    stats: dict[str, Any]
    samples: tuple[list[str], list[list[Any]]] = field(default_factory=lambda: ([], []))


@dataclass
class Policies:
    """The models a method may sample or score, without the module that holds them.

    ``policy``: π as it is now (sampled, and scored for reference log-probs). ``roles``: other
    policies by name, each a function that opens a context in which the model is usable (a LoRA
    anchor swapped in, adapters disabled for the initial policy) and yields it, or None where the
    module has no such model. Modules say what they hold in ``policies()``: ``PreferenceModule``
    holds the policy alone; ``BondModule`` adds ``anchor`` and ``initial``. ``identity``: the
    fingerprint of the weights the iteration began with (π_t and its roles), which the data module
    keeps in its checkpoint state; methods record it with the samples drawn (``drawn_from``).
    ``packing``: the module's packed-row token budget (``model.packing``), which scoring stages pass
    to ``model_logprobs`` so that they score as training does; None: padded batches.
    """

    policy: nn.Module
    roles: Mapping[str, Callable[[], ContextManager[Optional[nn.Module]]]] = field(default_factory=dict)
    identity: Optional[str] = None
    packing: Optional[int] = None

    def fingerprint(self) -> str:
        """The fingerprint of the weights as they are now: the policy's and every role's
        (``policy_identity.weights_fingerprint``), e.g. ``3548d3f012509ecb``."""
        from sppo_lightning.policy_identity import weights_fingerprint

        parts = [weights_fingerprint(self.policy)]
        for name in sorted(self.roles):
            with self.roles[name]() as model:
                parts.append(f"{name}={weights_fingerprint(model)}" if model is not None else name)
        return parts[0] if len(parts) == 1 else weights_digest(parts)

    def drawn_from(self) -> dict[str, str]:
        """What samples of this iteration are recorded as drawn from: ``{"policy": identity}`` (the
        fingerprint now where no identity was given: a plain script, at the iteration's start)."""
        return {"policy": self.identity or self.fingerprint()}

    def role(self, name: str) -> ContextManager[Optional[nn.Module]]:
        """A context yielding the model of ``name`` (see the class docstring)."""
        if name not in self.roles:
            raise ConfigError(f"this method samples the {name!r} policy, which the model does not hold (it has "
                              f"{', '.join(['policy', *self.roles]) }); use model.class_path "
                              f"sppo_lightning.bond.BondModule, which holds an anchor and the initial policy")
        return self.roles[name]()

    def optional_role(self, name: str) -> ContextManager[Optional[nn.Module]]:
        """Like :meth:`role`, but a context yielding None where the module has no such model."""
        return self.roles[name]() if name in self.roles else contextlib.nullcontext(None)

    @classmethod
    def of(cls, module: Any) -> "Policies":
        """The handle of a training module: its ``policies()``, or a bare model's self."""
        if hasattr(module, "policies"):
            return module.policies()
        return cls(module if getattr(module, "policy", None) is None else module.policy)


def weights_digest(parts: Sequence[str]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


@runtime_checkable
class SelfPlayMethod(Protocol):
    """What the data module and the boundary callback need of a method.

    Attributes:
        generator: how π samples (a ``Generator``); the win rate against the initial policy samples
            with it too.
        ranker: the preference oracle (a ``Ranker``); the win rate is judged by it.
        seed: the method's sampling seed (the evaluation draws its own stream from it).
        run_folder: the run folder's default name under ``trainer.default_root_dir``.
        log_prefix: the prefix of the statistics the boundary logs (``self_play/``, ``bond/``).
        restarts_optimizer: a fresh optimizer and LR schedule at every iteration (SPPO's
            official pipeline, a new training job per iteration), or one for the whole run.
    """

    generator: Any
    ranker: Any
    seed: int
    run_folder: str
    log_prefix: str
    restarts_optimizer: bool

    def prompts_per_iteration(self, per_step: int, configured: Optional[int], epochs_per_iteration: int,
                              total: int) -> Optional[int]:
        """How many prompts an iteration draws, given one optimizer step's prompts (``per_step``),
        the data module's ``prompts_per_iteration`` (``configured``; None: all ``total`` prompts):
        on-policy methods draw one step's worth; others return ``configured``."""
        ...

    def build(self, iteration: int, prompts: Sequence[Prompt], policies: Policies, tokenizer, ctx: DistContext,
              run_dir: Path) -> IterationData:
        """Iteration ``iteration`` (0-based)'s training rows on ``prompts``, made (or reloaded from
        ``run_dir``) with ``policies``."""
        ...

    def summary(self, stats: dict[str, Any]) -> dict[str, Any]:
        """The statistics of an iteration to put in its summary row (``summary.json``)."""
        ...


def on_policy_prompts(owner: str, on_policy: bool, per_step: int, configured: Optional[int],
                      epochs_per_iteration: int, total_prompts: int) -> Optional[int]:
    """The prompts of an iteration for a method that samples at every optimizer step.

    ``on_policy``: an iteration is exactly one optimizer step's prompts, trained for one epoch;
    a ``configured`` count or more epochs per iteration are refused (they would make later steps
    off-policy). Off-policy: ``configured`` as it is, with a warning saying how many steps each
    draw trains.
    """
    import math

    from lightning.pytorch.utilities import rank_zero_warn

    if not on_policy:
        drawn = configured or total_prompts
        steps = math.ceil(drawn / per_step) * epochs_per_iteration
        rank_zero_warn(f"{owner}: on_policy is false: each draw of samples trains {steps} optimizer steps of the "
                      f"iteration; every step after the first trains on an older policy's samples (off-policy, "
                      f"no correction). Set on_policy: true to sample at every step")
        return configured
    if configured not in (None, per_step) or epochs_per_iteration != 1:
        raise ConfigError(f"{owner}: on_policy makes each iteration one optimizer step's prompts (data.batch_size x "
                          f"accumulate_grad_batches x devices = {per_step}) trained for one epoch; remove "
                          f"data.prompts_per_iteration ({configured}) and data.epochs_per_iteration "
                          f"({epochs_per_iteration}), or set on_policy: false")
    return per_step
