"""``RewardModelRanker``: any ``AutoModelForSequenceClassification`` reward model."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from sppo_lightning.models import DTYPES
from sppo_lightning.ranking.estimate import pairwise_from_rewards
from sppo_lightning.ranking.protocol import PromptView, prompt_view_of, weights_fingerprint


class RewardModelRanker:
    """Scores each response with a scalar reward model; pair logits are ``M_ij = r_i - r_j``.

    The (prompt, response) pair is rendered with the reward model's chat template when it has
    one, else as ``prompt + "\\n\\n" + response``. Loaded on first use.

    Args:
        path: hub id or local folder of a sequence-classification model with one label.
        device: where it runs. batch_size: texts per forward. max_length: tokens kept per text.
        prompt_view: ``raw`` prompt text, or the policy's ``chat``-templated prompt string.
        show_progress: a progress bar over batches.
    """

    def __init__(
        self,
        path: str,
        device: str = "cpu",
        batch_size: int = 16,
        max_length: int = 2048,
        torch_dtype: str = "float32",
        trust_remote_code: bool = False,
        prompt_view: PromptView = "raw",
        show_progress: bool = True,
    ) -> None:
        self.path, self.device, self.batch_size, self.max_length = path, device, batch_size, max_length
        self.prompt_view, self.show_progress = prompt_view, show_progress
        prompt_view_of(self)
        self.torch_dtype, self.trust_remote_code = torch_dtype, trust_remote_code
        self.model: Any = None  # loaded on first use (load)
        self.tokenizer: Any = None

    def fingerprint(self) -> dict[str, Any]:
        return {"class": "RewardModelRanker", "weights": weights_fingerprint(self.path), "device": self.device,
                "torch_dtype": self.torch_dtype, "max_length": self.max_length, "prompt_view": self.prompt_view}

    def load(self) -> "RewardModelRanker":
        if self.model is None:
            self.tokenizer = AutoTokenizer.from_pretrained(self.path, trust_remote_code=self.trust_remote_code)
            if self.tokenizer.pad_token_id is None:
                self.tokenizer.pad_token = self.tokenizer.eos_token
            self.model = AutoModelForSequenceClassification.from_pretrained(
                self.path, dtype=DTYPES[self.torch_dtype], trust_remote_code=self.trust_remote_code
            ).to(self.device).eval()
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        return self

    def _render(self, prompt: str, response: str) -> str:
        if self.tokenizer.chat_template:
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        return f"{prompt}\n\n{response}"

    @torch.inference_mode()
    def rewards(self, prompts: list[str], candidates: list[list[str]]) -> Tensor:
        """``[N, K]`` float32 rewards."""
        self.load()
        texts = [self._render(p, c) for p, cands in zip(prompts, candidates) for c in cands]
        # Longest first and in length order, so each batch pads to similar lengths.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        rewards = torch.empty(len(texts))
        for start in tqdm(range(0, len(order), self.batch_size), desc="reward model", disable=not self.show_progress):
            idx = order[start : start + self.batch_size]
            enc = self.tokenizer(
                [texts[i] for i in idx], padding=True, truncation=True, max_length=self.max_length,
                return_tensors="pt", add_special_tokens=not self.tokenizer.chat_template,
            ).to(self.device)
            rewards[idx] = self.model(**enc).logits[:, 0].float().cpu()
        return rewards.view(len(prompts), -1)

    def pairwise_logits(self, prompts: list[str], candidates: list[list[str]]) -> Tensor:
        return pairwise_from_rewards(self.rewards(prompts, candidates))
