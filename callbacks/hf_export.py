"""Export the trained policy in Hugging Face format when ``fit`` ends."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from sppo_lightning.sharding import is_sharded
from sppo_lightning.models import export_hf, is_peft, load_tokenizer


class HFExport(L.Callback):
    """Save ``pl_module.policy`` (LoRA merged, safetensors) and its tokenizer after ``fit``.

    With LoRA the adapter is saved too, in ``<dirpath>_adapter`` (loads with
    ``PeftModel.from_pretrained``). A QLoRA policy is merged into its base dequantised to bf16. An
    FSDP policy is gathered to rank 0 and written there as one consolidated model.

    Args:
        dirpath: output folder; default ``<trainer.default_root_dir>/hf_model``: one place per run,
            also after a resume (the logger's ``version_<n>`` folders are not). Written beside its
            name and renamed (``files.folder_whole``): an earlier export stays until the new one
            is complete. The result loads with ``AutoModelForCausalLM.from_pretrained`` or vLLM.
    """

    def __init__(self, dirpath: Optional[str] = None) -> None:
        self.dirpath = dirpath

    def target(self, trainer: L.Trainer) -> Path:
        """Where the model is (or will be) written."""
        return Path(self.dirpath or Path(trainer.default_root_dir) / "hf_model")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        sharded = is_sharded(pl_module.policy)
        if not trainer.is_global_zero and not sharded:
            return
        out = self.target(trainer)
        datamodule = getattr(trainer, "datamodule", None)
        tokenizer = getattr(datamodule, "tokenizer", None) or load_tokenizer(
            pl_module.hparams.model_name_or_path, pl_module.hparams.trust_remote_code
        )
        adapter = out.with_name(out.name + "_adapter") if is_peft(pl_module.policy) else None
        # Sharded: a collective, every rank takes part and rank 0 writes.
        export_hf(pl_module.policy, tokenizer if trainer.is_global_zero else None, out, adapter_dir=adapter)
        extra = f" (LoRA adapter in {adapter})" if adapter is not None else ""
        rank_zero_info(f"Exported the policy in Hugging Face format to {out}{extra}")
