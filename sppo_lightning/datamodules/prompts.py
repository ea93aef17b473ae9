"""``PromptDataModule``: prompts (and optional per-prompt principles) for ``predict``."""

from __future__ import annotations

from typing import Optional

import lightning as L
from torch.utils.data import DataLoader

from sppo_lightning.data.prompts import Prompt, load_prompts
from sppo_lightning.errors import ConfigError
from sppo_lightning.models import load_tokenizer


class PromptDataModule(L.LightningDataModule):
    """Serves prompts for ``sppo-lightning predict`` (batches are lists of ``Prompt``).

    Args:
        prompts: prompt file, saved dataset folder or hub name.
        tokenizer: linked to ``model.model_name_or_path`` by the CLI.
        prompt_column: a string or a list of messages per row.
        principle_column: per-prompt principle for Linear Alignment (rows without one use the
            model's global principle).
        batch_size: prompts per batch.
    """

    def __init__(
        self,
        prompts: str,
        tokenizer: Optional[str] = None,
        prompt_column: str = "prompt",
        principle_column: Optional[str] = "principle",
        split: str = "test",
        max_prompt_length: int = 2048,
        batch_size: int = 8,
        skip_bad_rows: bool = False,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        self.source, self.tokenizer_name = prompts, tokenizer
        self.prompt_column, self.principle_column, self.split = prompt_column, principle_column, split
        self.max_prompt_length, self.batch_size = max_prompt_length, batch_size
        self.skip_bad_rows, self.trust_remote_code = skip_bad_rows, trust_remote_code
        self.prompts: list[Prompt] = []

    def setup(self, stage: str) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"data.batch_size must be at least 1, got {self.batch_size}")
        if self.tokenizer_name is None:
            raise ConfigError("data.tokenizer is not set (the CLI links it to model.model_name_or_path)")
        tokenizer = load_tokenizer(self.tokenizer_name, self.trust_remote_code)
        self.prompts, _, _ = load_prompts(self.source, tokenizer, self.max_prompt_length, self.prompt_column,
                                          self.split, self.skip_bad_rows, self.principle_column)

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.prompts, batch_size=self.batch_size, shuffle=False, collate_fn=list)
