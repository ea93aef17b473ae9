"""``LLMJudge``: a local chat model as the preference oracle, asked "A or B?" for every ordered pair.

For prompt n and candidates i, j the judge model reads one pairwise question (the instruction,
response A = i, response B = j) through its chat template, and its next-token log-probabilities
of the two answer tokens give ``d(i, j) = log P("A") - log P("B")``. With ``both_orders`` (the
default) the pair is also asked the other way round and ``M_ij = (d(i, j) - d(j, i)) / 2``, which
cancels the judge's position bias and makes M antisymmetric; without it, ``M_ij = d(i, j)`` and
``M_ji = -d(i, j)`` for i < j (half the cost).

Every judgment can be kept in a :class:`~sppo_lightning.ranking.cache.JudgmentCache` (the self-play
pipeline puts it in the run dir): a resumed run or a repeated evaluation never asks again.
"""

from __future__ import annotations

import hashlib
import warnings
from typing import Any, Optional

import torch
from torch import Tensor
from tqdm.auto import tqdm

from sppo_lightning.errors import ConfigError
from sppo_lightning.ranking.cache import JudgmentCache
from sppo_lightning.ranking.pairwise_question import (
    DEFAULT_TEMPLATE, Question, cached_margins, check_question_settings, pairwise_matrix, render_question,
)
from sppo_lightning.ranking.protocol import PromptView, fingerprint_hash, prompt_view_of, weights_fingerprint

class LLMJudge:
    """A Hugging Face causal LM as a pairwise judge (hub id or folder; ``trust_remote_code`` off).

    Args:
        path: the judge model.
        template: the question, with ``{prompt}``, ``{a}`` and ``{b}``; sent as the user turn of
            the judge's chat template, with the generation prompt.
        answers: the two answer strings; their first tokens are compared.
        both_orders: ask (i, j) and (j, i) and average (cancels position bias; twice the cost).
        device, torch_dtype: where and in what precision the judge runs.
        quantize_4bit: load the judge in 4-bit nf4 (bitsandbytes), as the ``qlora`` footprint does.
        batch_size: questions per forward (length-sorted); an out-of-memory batch is halved.
        max_length: question tokens kept (from the end, so the answer slot stays).
        prompt_view: ``raw`` prompt text or the policy's ``chat``-templated prompt.
        show_progress: a progress bar over batches.
    """

    def __init__(self, path: str, template: str = DEFAULT_TEMPLATE, answers: tuple[str, str] = ("A", "B"),
                 both_orders: bool = True, device: str = "cpu", torch_dtype: str = "float32",
                 quantize_4bit: bool = False, batch_size: int = 8, max_length: int = 4096,
                 prompt_view: PromptView = "raw", show_progress: bool = True) -> None:
        check_question_settings("LLMJudge", template, tuple(answers))
        if batch_size < 1:
            raise ConfigError(f"LLMJudge: batch_size must be at least 1, got {batch_size}")
        self.path, self.template, self.answers, self.both_orders = path, template, tuple(answers), both_orders
        self.device, self.torch_dtype, self.quantize_4bit = device, torch_dtype, quantize_4bit
        self.batch_size, self.max_length, self.show_progress = batch_size, max_length, show_progress
        self.prompt_view = prompt_view
        prompt_view_of(self)
        self.model: Any = None  # loaded on first use (load)
        self.tokenizer: Any = None
        self.cache: Optional[JudgmentCache] = None
        self.calls = 0  # questions the model answered (cache hits excluded)

    def fingerprint(self) -> dict[str, Any]:
        return {"class": "LLMJudge", "weights": weights_fingerprint(self.path),
                "template": hashlib.sha256(self.template.encode()).hexdigest()[:16], "answers": list(self.answers),
                "both_orders": self.both_orders, "device": self.device, "torch_dtype": self.torch_dtype,
                "quantize_4bit": self.quantize_4bit, "max_length": self.max_length, "prompt_view": self.prompt_view}

    def use_cache(self, cache: Optional[JudgmentCache]) -> None:
        self.cache = cache

    def counts(self) -> dict[str, int]:
        """Questions asked so far (``contracts.QuestionJudge``)."""
        return {"calls": self.calls}

    # ------------------------------------------------------------------------------ loading
    def load(self) -> "LLMJudge":
        if self.model is None:
            from sppo_lightning.models import load_causal_lm, load_tokenizer

            self.tokenizer = load_tokenizer(self.path)
            model = load_causal_lm(self.path, self.torch_dtype, quantize_4bit=self.quantize_4bit,
                                   device=torch.device(self.device))
            self.model = (model if self.quantize_4bit else model.to(torch.device(self.device))).eval()  # type: ignore[arg-type]
            self.answer_ids = self._answer_ids()
        return self

    def _answer_ids(self) -> tuple[int, int]:
        ids = []
        for answer in self.answers:
            tokens = self.tokenizer.encode(answer, add_special_tokens=False)
            if not tokens:
                raise ConfigError(f"LLMJudge: the answer {answer!r} is no token for {self.path}")
            ids.append(tokens[0])
        if ids[0] == ids[1]:
            raise ConfigError(f"LLMJudge: the answers {self.answers!r} start with the same token for {self.path}")
        return ids[0], ids[1]

    def question_ids(self, prompt: str, a: str, b: str) -> list[int]:
        messages = [{"role": "user", "content": render_question(self.template, prompt, a, b)}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids[-self.max_length:]

    # ------------------------------------------------------------------------------ judging
    def pairwise_logits(self, prompts: list[str], candidates: list[list[str]]) -> Tensor:
        """``M[N, K, K]`` (float32): ``M[n, i, j] > 0`` where the judge prefers candidate i to j."""
        return pairwise_matrix(prompts, candidates, self.both_orders, self.margins)

    def margins(self, questions: list[Question]) -> list[float]:
        """``log P(A) - log P(B)`` for each (prompt, a, b), from the cache where it is there."""
        values, computed = cached_margins(fingerprint_hash(self.fingerprint()), questions, self.cache, self._judge)
        self.calls += computed
        return values

    @torch.inference_mode()
    def _judge(self, questions: list[Question], keys: list[str]) -> list[float]:
        """The model's margins, stored in the cache batch by batch (a crash keeps what was judged)."""
        self.load()
        encoded = [self.question_ids(*q) for q in questions]
        order = sorted(range(len(encoded)), key=lambda k: -len(encoded[k]))  # longest first: OOM shows at once
        out = [0.0] * len(encoded)
        batches = range(0, len(order), self.batch_size)
        for start in tqdm(batches, desc="LLM judge", disable=not self.show_progress):
            idx = order[start : start + self.batch_size]
            values = self._forward_halving([encoded[k] for k in idx])
            for k, value in zip(idx, values):
                out[k] = value
            if self.cache is not None:
                self.cache.put_many({keys[k]: v for k, v in zip(idx, values)})
        return out

    def _forward_halving(self, rows: list[list[int]]) -> list[float]:
        from sppo_lightning.generation import _is_out_of_memory

        try:
            return self._forward(rows)
        except (RuntimeError, torch.OutOfMemoryError) as err:
            if not (_is_out_of_memory(err) and len(rows) > 1):
                raise
        half = len(rows) // 2
        warnings.warn(f"LLMJudge: out of memory on {len(rows)} questions; retrying as {half} + {len(rows) - half} "
                      f"(lower batch_size to avoid this)")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return self._forward_halving(rows[:half]) + self._forward_halving(rows[half:])

    def _forward(self, rows: list[list[int]]) -> list[float]:
        """Left-padded batch; the logits of the last position only, with positions counted from
        each row's first real token (so padding changes nothing)."""
        from sppo_lightning.generation import left_pad

        input_ids, mask = left_pad(rows, self.tokenizer.pad_token_id)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        device = next(self.model.parameters()).device
        logits = self.model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                            position_ids=positions.to(device), logits_to_keep=1).logits[:, -1].float()
        logps = torch.log_softmax(logits, -1)
        a, b = self.answer_ids
        return (logps[:, a] - logps[:, b]).cpu().tolist()
