"""The pieces of a self-play run in Python, from one flat dict of settings as the tests write them.

A run is a ``SelfPlayDataModule`` holding a method (``SPPO``, ``JBOND``, ``OnlinePairs``) with its
generator and ranker, a ``SelfPlay`` boundary callback, and a Trainer that reloads its loader every
epoch. ``parts`` sorts flat settings into those places, so each test names only what it varies.
"""

from __future__ import annotations

from typing import Any

import lightning as L

from sppo_lightning.callbacks.self_play import SelfPlay
from sppo_lightning.pipeline import HFGenerator

GENERATOR_KEYS = {"temperature": "temperature", "top_p": "top_p", "max_new_tokens": "max_new_tokens",
                  "generation_batch_size": "batch_size", "retry_oom": "retry_oom"}
BOUNDARY_KEYS = ("eval_samples", "eval_every")


def parts(method_class, ranker, **settings: Any):
    """(method, boundary callback, run_dir) from flat settings: the generator's keys
    (``temperature``, ``max_new_tokens``, ``generation_batch_size``, ...), the boundary's
    (``eval_samples``, ``eval_every``), ``run_dir``, ``generator`` or ``aligned_sampling``
    (``{principle, alpha}``: a ``LinearAlignmentGenerator``), and the method's own."""
    run_dir = settings.pop("run_dir", None)
    boundary = SelfPlay(**{k: settings.pop(k) for k in BOUNDARY_KEYS if k in settings})
    sampling = {GENERATOR_KEYS[k]: settings.pop(k) for k in list(settings) if k in GENERATOR_KEYS}
    show_progress = settings.get("show_progress", False)
    generator = settings.pop("generator", None)
    aligned = settings.pop("aligned_sampling", None)
    if generator is None and aligned is not None:
        from sppo_lightning.decoding.generator import LinearAlignmentGenerator

        sampling.pop("retry_oom", None)
        generator = LinearAlignmentGenerator(aligned["principle"], aligned.get("alpha", 2.0), **sampling)
    elif generator is None:
        defaults = {"temperature": 1.0, "top_p": 1.0} if method_class.__name__ != "SPPO" else {}
        generator = HFGenerator(**{**defaults, **sampling}, show_progress=show_progress)
    if method_class.__name__ != "SPPO":
        settings.pop("show_progress", None)
    method = method_class(ranker, generator=generator, **settings)
    return method, boundary, None if run_dir is None else str(run_dir)


def trainer(**options: Any) -> L.Trainer:
    """A quiet CPU Trainer that asks for a new loader every epoch (every self-play iteration)."""
    defaults = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, reload_dataloaders_every_n_epochs=1)
    return L.Trainer(**{**defaults, **options})
