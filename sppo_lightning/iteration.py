"""Iteration numbers: the loop counts from 0, people count from 1. The conversion lives here alone.

Lightning's epochs and our loops index iterations from 0 (``index``); every folder, file, console
line, summary row and error a user reads numbers them from 1 (``number``).
"""

from __future__ import annotations

from pathlib import Path


def iteration_number(index: int) -> int:
    """The 1-based number users see of the 0-based iteration ``index``."""
    return index + 1


def iteration_dir(root: str | Path, index: int) -> Path:
    """``<root>/iteration_<number>``: the folder of the 0-based iteration ``index``."""
    return Path(root) / f"iteration_{iteration_number(index)}"


def iteration_label(index: int) -> str:
    """``iteration <number>``, as console lines and errors name it."""
    return f"iteration {iteration_number(index)}"
