"""Reading and encoding data, without Lightning: prompt files (``prompts``), preference rows and
their checks (``rows``), tokenization and collation (``tokenize``). The data modules that serve
them are ``sppo_lightning.datamodules``."""

from sppo_lightning.data.rows import DataError

__all__ = ["DataError"]
