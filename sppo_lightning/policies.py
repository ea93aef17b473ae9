"""``Policies``: the models a self-play method may sample or score, without the module that holds them.

The training modules (``module.py``, ``bond.py``) hand it out (``policies()``) and the methods
(``methods/``) take it: it lives below both, so the model layer does not import the methods.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Mapping, Optional, Sequence

from torch import nn

from sppo_lightning.errors import ConfigError


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


def weights_digest(parts: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
