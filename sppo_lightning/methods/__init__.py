"""Self-play methods: plug-ins of ``SelfPlayDataModule`` chosen by ``class_path``.

* :class:`SPPO` — K samples of π_t per prompt, ranked, win probabilities as targets (``sppo.py``);
* :class:`JBOND` — J-BOND / BOND: policy and anchor samples, best-of-N distillation (``jbond.py``);
* :class:`OnlinePairs` — online best-of-K against worst-of-K pairs at every step (``online.py``).

A method is chosen like a generator or a ranker::

    data:
      class_path: sppo_lightning.datamodules.SelfPlayDataModule
      init_args:
        method:
          class_path: sppo_lightning.methods.SPPO
          init_args: {num_samples: 5, ranker: {...}, generator: {...}}

Each iteration the data module calls ``method.build(iteration, prompts, policies, tokenizer, ctx,
run_dir)`` and serves the rows it returns. A method gets plain arguments: the 0-based iteration
index, the iteration's prompts, a ``Policies`` handle on the models it may sample or score
(``sppo_lightning/policies.py``), a ``DistContext`` and its run folder. It never sees the Trainer
or the LightningModule, so it runs (and is tested) in a plain script. It is built from the shared
stages (``pipeline/stages.py``: ``generate``, ``rank``, ``estimate_pairs``, ``reference_logps``)
and the artifacts runner (``stage_runner.run_sharded_stage``), and returns its rows and statistics
(``IterationData``; the statistics also go in the iteration's manifest, for resume and for people
reading the run folder).

Adding a method is one file with a class that has the members of ``SelfPlayMethod``
(``sppo_lightning/contracts.py``), a config that names it, and its tests.
"""

from sppo_lightning.contracts import IterationData, SelfPlayMethod
from sppo_lightning.methods.jbond import JBOND
from sppo_lightning.methods.online import OnlinePairs
from sppo_lightning.methods.sppo import SPPO

__all__ = ["IterationData", "JBOND", "OnlinePairs", "SPPO", "SelfPlayMethod"]
