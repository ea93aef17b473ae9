"""Self-play methods: plug-ins of ``SelfPlayDataModule`` chosen by ``class_path`` (``protocol.py``).

* :class:`SPPO` — K samples of π_t per prompt, ranked, win probabilities as targets (``sppo.py``);
* :class:`JBOND` — J-BOND / BOND: policy and anchor samples, best-of-N distillation (``jbond.py``);
* :class:`OnlinePairs` — online best-of-K against worst-of-K pairs at every step (``online.py``).

The classes load on first use: the data module imports the protocol, and the methods import the
data module's prompt loading, so an eager import here would be a cycle.
"""

from importlib import import_module

_WHERE = {"SPPO": "sppo", "JBOND": "jbond", "OnlinePairs": "online", "IterationData": "protocol",
          "Policies": "protocol", "SelfPlayMethod": "protocol"}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(import_module(f"sppo_lightning.methods.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
