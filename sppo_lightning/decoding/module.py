"""``LinearAlignmentModule``: Linear Alignment decoding as ``sppo-lightning predict``."""

from __future__ import annotations

from typing import Any, Literal, Optional

import lightning as L

from sppo_lightning import seeds
from sppo_lightning.data.prompts import Prompt
from sppo_lightning.decoding.linear_alignment import LinearAlignmentSettings, linear_alignment_generate
from sppo_lightning.errors import ConfigError, DataError
from sppo_lightning.models import load_causal_lm, load_tokenizer


class LinearAlignmentModule(L.LightningModule):
    """Inference only: decodes each prompt with Linear Alignment and returns its record.

    Args:
        model_name_or_path: any Hugging Face causal LM (frozen).
        principle: the global principle; a prompt file's ``principle`` column overrides it per row.
        alpha, temperature, top_p, do_sample: ``LinearAlignmentSettings`` (paper: 2.0, 0.5, 0.8, greedy).
        max_new_tokens: response length limit. seed: sampling stream.
    """

    def __init__(
        self,
        model_name_or_path: str,
        principle: Optional[str] = None,
        alpha: float = 2.0,
        temperature: float = 0.5,
        top_p: float = 0.8,
        do_sample: bool = False,
        max_new_tokens: int = 256,
        seed: int = 0,
        torch_dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        if alpha < 0 or temperature <= 0 or not 0 < top_p <= 1 or max_new_tokens < 1:
            raise ConfigError("model: alpha must be >= 0, temperature > 0, top_p in (0, 1], max_new_tokens >= 1")
        self.save_hyperparameters()
        self.settings = LinearAlignmentSettings(alpha, temperature, top_p, do_sample)
        self.model = None
        self.tokenizer = None

    def configure_model(self) -> None:
        if self.model is None:
            hp = self.hparams
            self.model = load_causal_lm(hp.model_name_or_path, hp.torch_dtype, hp.trust_remote_code).eval()
            self.tokenizer = load_tokenizer(hp.model_name_or_path, hp.trust_remote_code)

    def predict_step(self, batch: list[Prompt], batch_idx: int) -> list[dict[str, Any]]:
        principles = [p.principle or self.hparams.principle for p in batch]
        missing = [p.index for p, principle in zip(batch, principles) if not principle]
        if missing:
            raise DataError(f"prompt row {missing[0] + 1}: no principle: set model.principle or a 'principle' column")
        ids = linear_alignment_generate(
            self.model, self.tokenizer, [p.messages for p in batch], principles, self.settings,
            max_new_tokens=self.hparams.max_new_tokens, batch_size=len(batch),
            seed=seeds.indexed(self.hparams.seed, batch_idx),
        )
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        return [{"index": p.index, "prompt": p.messages, "principle": principle, "response": text}
                for p, principle, text in zip(batch, principles, texts)]
