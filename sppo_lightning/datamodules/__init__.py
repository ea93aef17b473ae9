"""The Lightning data modules: ``PreferenceDataModule`` serves pairs from a file (DPO, IPO, ORPO,
SimPO, ASFT, offline SPPO); ``SelfPlayDataModule`` makes each iteration's pairs through a self-play
method; ``PromptDataModule`` serves prompts to ``predict`` (Linear Alignment). Reading and encoding
rows is ``sppo_lightning.data``, below them."""

from sppo_lightning.datamodules.preference import PreferenceDataModule
from sppo_lightning.datamodules.prompts import PromptDataModule
from sppo_lightning.datamodules.self_play import Iteration, SelfPlayDataModule

__all__ = ["Iteration", "PreferenceDataModule", "PromptDataModule", "SelfPlayDataModule"]
