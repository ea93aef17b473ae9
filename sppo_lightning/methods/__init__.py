"""Self-play methods: plug-ins of ``SelfPlayDataModule`` chosen by ``class_path`` (``protocol.py``).

* :class:`SPPO` — K samples of π_t per prompt, ranked, win probabilities as targets (``sppo.py``);
* :class:`JBOND` — J-BOND / BOND: policy and anchor samples, best-of-N distillation (``jbond.py``);
* :class:`OnlinePairs` — online best-of-K against worst-of-K pairs at every step (``online.py``).
"""

from sppo_lightning.methods.jbond import JBOND
from sppo_lightning.methods.online import OnlinePairs
from sppo_lightning.methods.protocol import IterationData, SelfPlayMethod
from sppo_lightning.methods.sppo import SPPO

__all__ = ["IterationData", "JBOND", "OnlinePairs", "SPPO", "SelfPlayMethod"]
