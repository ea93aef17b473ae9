"""A quiet console: our own lines, progress bars and real warnings, not the known third-party noise.

Each filter below names the line it hides and where it comes from. ``--verbose`` (or
``SPPO_LIGHTNING_VERBOSE=1``) on any ``sppo-lightning`` command brings them all back.
"""

from __future__ import annotations

import logging
import os
import warnings

# (module that warns, message pattern, why it is noise for our users)
WARNINGS = [
    ("lightning.pytorch.utilities._pytree", r".*isinstance\(treespec, LeafSpec\)` is deprecated",
     "Lightning 2.6 on torch 2.13 calls a deprecated torch API, every iteration"),
    ("lightning.pytorch.loops.fit_loop", r"Found \d+ module\(s\) in eval mode at the start of training",
     "the frozen reference and anchor are in eval mode on purpose"),
    ("lightning.pytorch.trainer.connectors.data_connector", r".*does not have many workers",
     "a hint to raise num_workers; our loaders read memory-mapped Arrow files"),
    ("lightning.pytorch.utilities.data", r"Total length of .* across ranks is zero",
     "Lightning's check on an iteration's loader before its pairs exist"),
    ("lightning.pytorch.loops.optimization.automatic", r"`training_step` returned `None`",
     "a batch skipped on purpose (a per-step draw whose prompts all tied, on_non_finite: skip), said by our line"),
]

# (logger, message start, source)
LOG_LINES = [
    ("lightning.pytorch.utilities.rank_zero", "💡 Tip:", "Lightning's advertisement for its cloud logger"),
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward",
     "bitsandbytes asks for the optional `kernels` package on every start, 4-bit works without it"),
]


class _DropLines(logging.Filter):
    def __init__(self, start: str) -> None:
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.start)


def verbose_requested(argv: list[str]) -> bool:
    return "--verbose" in argv or os.environ.get("SPPO_LIGHTNING_VERBOSE", "") not in ("", "0")


def quiet() -> None:
    """Install the filters of this module (once per process)."""
    for module, pattern, _ in WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name, start, _ in LOG_LINES:
        logging.getLogger(name).addFilter(_DropLines(start))
