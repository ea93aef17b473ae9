"""Preference data: row checks (``rows``), tokenization and collation (``tokenize``), data modules."""

from sppo_lightning.data.preference import PreferenceDataModule
from sppo_lightning.data.rows import DataError
from sppo_lightning.data.self_play import SelfPlayDataModule

__all__ = ["DataError", "PreferenceDataModule", "SelfPlayDataModule"]
