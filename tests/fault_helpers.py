"""Faults for tests/test_faults.py, named in configs by import path (the CLI runs them for real)."""

import lightning as L

from sppo_lightning.ranking.judges import positive_words


class SilentCheckpoints(L.Callback):
    """Checkpoint writes that fail without a word, as Lightning's cloud_io does on a PermissionError."""

    def on_fit_start(self, trainer, pl_module) -> None:
        trainer.strategy.checkpoint_io.save_checkpoint = lambda *args, **kwargs: None


def judge_that_raises(prompt: str, response: str) -> float:
    """``positive_words``, except that it raises on one prompt (index 20: row 21, line 21 of tiny_prompts.jsonl)."""
    if prompt == "What is 0 plus 7?":
        raise ValueError("boom")
    return positive_words(prompt, response)


def constant(prompt: str, response: str) -> float:
    return 0.0
