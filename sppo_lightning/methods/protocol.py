"""The self-play method protocol: what ``SelfPlayDataModule`` asks of SPPO, J-BOND, online pairs, ...

A method is a plug-in of the data module, chosen by ``class_path`` like a generator or a ranker::

    data:
      class_path: sppo_lightning.datamodules.SelfPlayDataModule
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
(``artifacts.run_sharded_stage``), and returns its rows and statistics (``IterationData``; the
statistics also go in the iteration's manifest, for resume and for people reading the run folder).

Adding a method is one file with a class that has the attributes of :class:`SelfPlayMethod`, and a
config that names it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence, runtime_checkable

from sppo_lightning.data.prompts import Prompt
from sppo_lightning.distributed import DistContext
from sppo_lightning.errors import ConfigError
from sppo_lightning.policies import Policies


@dataclass
class IterationData:
    """What ``build`` returns: the training rows (anything with ``len`` and integer indexing; a
    memory-mapped ``datasets.Dataset``), the iteration's statistics (also in its manifest), and
    the first pairs as a table for loggers."""

    pairs: Any
    stats: dict[str, Any]
    samples: tuple[list[str], list[list[Any]]] = field(default_factory=lambda: ([], []))


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
