"""Export the trained policy in Hugging Face format when ``fit`` ends."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from sppo_lightning.models import export_hf, load_tokenizer


class HFExport(L.Callback):
    """Save ``pl_module.policy`` (LoRA merged, safetensors) and its tokenizer after ``fit``.

    Args:
        dirpath: output folder; default ``<trainer.log_dir or default_root_dir>/hf_model``.
            The result loads with ``AutoModelForCausalLM.from_pretrained`` or vLLM.
    """

    def __init__(self, dirpath: Optional[str] = None) -> None:
        self.dirpath = dirpath

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        out = Path(self.dirpath or Path(trainer.log_dir or trainer.default_root_dir) / "hf_model")
        datamodule = getattr(trainer, "datamodule", None)
        tokenizer = getattr(datamodule, "tokenizer", None) or load_tokenizer(
            pl_module.hparams.model_name_or_path, pl_module.hparams.trust_remote_code
        )
        export_hf(pl_module.policy, tokenizer, out)
        rank_zero_info(f"Exported the policy in Hugging Face format to {out}")
