"""``PreferenceDataModule``: static preference pairs from a file, a saved dataset or the hub."""

from __future__ import annotations

from functools import partial
from typing import Any, Optional

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from transformers import PreTrainedTokenizerBase

from sppo_lightning.data.rows import load_records, parse_rows
from sppo_lightning.datamodules.shuffle import epoch_sampler
from sppo_lightning.errors import ConfigError, DataError
from sppo_lightning.data.tokenize import TemplateError, collate_pairs, encode_row
from sppo_lightning.models import load_tokenizer


class PreferenceDataModule(L.LightningDataModule):
    """Serves preference pairs as concatenated chosen/rejected batches (see ``collate_pairs``).

    Args:
        train_data: a ``.json``/``.jsonl``/``.parquet`` file, a folder saved with
            ``datasets.save_to_disk``, or a hub dataset name.
        eval_data: the same, for ``validate``/``test``/``predict`` and validation during ``fit``.
        tokenizer: tokenizer id or path; the CLI links it to ``model.model_name_or_path``.
        train_split / eval_split: split names for saved ``DatasetDict`` folders and hub datasets.
        max_length: longest prompt + response, in tokens (SPPO: 1024).
        max_prompt_length: prompt tokens kept (from the end) when a pair is too long (SPPO: 512).
        batch_size: pairs per batch (each pair is two sequences).
        eval_batch_size: pairs per evaluation batch; defaults to ``batch_size``.
        skip_bad_rows: skip invalid rows with a warning that counts them, instead of stopping at
            the first one with an error that names file, row and column.
        num_workers: DataLoader workers.
        shuffle: shuffle the training pairs every epoch (off: file order, e.g. to compare runs).
        shuffle_seed: the order of epoch e is fixed by (shuffle_seed, e), so a resumed run sees
            the same batches as an uninterrupted one.
        trust_remote_code: allow the tokenizer's own code from the hub (off unless asked for).
        group_by_length: with ``shuffle``, batches of pairs of similar length
            (``LengthGroupedShuffle``, seeded: resume stays exact); less padding, and packed rows
            of similar pairs. It changes which pairs share a step, so it is off by default.
    """

    def __init__(
        self,
        train_data: Optional[str] = None,
        eval_data: Optional[str] = None,
        tokenizer: Optional[str] = None,
        train_split: str = "train",
        eval_split: str = "test",
        max_length: int = 1024,
        max_prompt_length: int = 512,
        batch_size: int = 8,
        eval_batch_size: Optional[int] = None,
        skip_bad_rows: bool = False,
        num_workers: int = 0,
        shuffle: bool = True,
        shuffle_seed: int = 0,
        trust_remote_code: bool = False,
        group_by_length: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.train_data, self.eval_data = train_data, eval_data
        self.tokenizer_name = tokenizer
        self.train_split, self.eval_split = train_split, eval_split
        self.max_length, self.max_prompt_length = max_length, max_prompt_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.skip_bad_rows = skip_bad_rows
        self.num_workers = num_workers
        self.shuffle = shuffle
        self.shuffle_seed = shuffle_seed
        self.group_by_length = group_by_length
        self.trust_remote_code = trust_remote_code
        self.tokenizer: Optional[PreTrainedTokenizerBase] = None
        self.train_examples: list[dict[str, Any]] = []
        self.eval_examples: list[dict[str, Any]] = []

    def check_settings(self) -> None:
        """Raise ``ConfigError`` for impossible settings. Called from ``setup``, not ``__init__``:
        LightningCLI turns errors raised while building a data module into a wall of text."""
        if self.max_prompt_length >= self.max_length:
            raise ConfigError(
                f"data.max_prompt_length ({self.max_prompt_length}) must be smaller than "
                f"data.max_length ({self.max_length}), or no response token would fit"
            )
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ConfigError("data.batch_size and data.eval_batch_size must be at least 1")

    def setup(self, stage: str) -> None:
        self.check_settings()
        if self.tokenizer is None:
            if self.tokenizer_name is None:
                raise ConfigError("data.tokenizer is not set (the CLI links it to model.model_name_or_path)")
            self.tokenizer = load_tokenizer(self.tokenizer_name, self.trust_remote_code)
        if stage == "fit":
            if self.train_data is None:
                raise ConfigError("data.train_data is not set; `fit` needs a preference file")
            if not self.train_examples:
                self.train_examples = self.encode(self.train_data, self.train_split)
        if self.eval_data is not None and not self.eval_examples:
            self.eval_examples = self.encode(self.eval_data, self.eval_split)
        elif stage in ("validate", "test", "predict") and self.eval_data is None:
            raise ConfigError(f"data.eval_data is not set; `{stage}` needs a preference file")

    def encode(self, source: str, split: str) -> list[dict[str, Any]]:
        """Load, check and tokenize every row of ``source``."""
        rows, skipped = parse_rows(load_records(source, split), source, self.skip_bad_rows)
        if skipped:
            rank_zero_warn(f"{source}: skipped {len(skipped)} bad row(s); first: {skipped[0]}")
        examples = []
        for i, row in enumerate(rows):
            try:
                examples.append(encode_row(self.tokenizer, row, self.max_length, self.max_prompt_length))
            except TemplateError as err:
                raise DataError(f"{source}: row {i + 1}: {err}") from None
        return examples

    def _loader(self, examples: list[dict[str, Any]], batch_size: int, sampler: Optional[Sampler] = None) -> DataLoader:
        """In order, or in ``sampler``'s order."""
        pad_id = self.tokenizer.pad_token_id
        return DataLoader(
            examples,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=partial(collate_pairs, pad_token_id=pad_id),
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        if self.shuffle:
            # Not the global RNG: its state at an epoch's start differs between a fresh and a resumed run.
            epoch = (lambda: trainer.current_epoch) if trainer is not None else (lambda: 0)
            sampler = epoch_sampler(self.train_examples, self.batch_size, self.shuffle_seed, epoch, self.group_by_length)
        elif trainer is not None and trainer.world_size > 1:
            # Lightning shuffles every distributed training loader it is handed a plain sampler for;
            # a distributed sampler of our own, in file order, keeps the order asked for.
            sampler = DistributedSampler(self.train_examples, shuffle=False, **trainer.distributed_sampler_kwargs)
        else:
            sampler = None
        return self._loader(self.train_examples, self.batch_size, sampler=sampler)

    def val_dataloader(self) -> DataLoader | list:
        # fit without eval data simply runs no validation.
        return self._loader(self.eval_examples, self.eval_batch_size) if self.eval_examples else []

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.eval_examples, self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.eval_examples, self.eval_batch_size)

