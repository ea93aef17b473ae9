"""``PairRMRanker``: PairRM (llm-blender) scoring all K(K-1) ordered pairs, batched across prompts.

llm-blender provides the architecture (``CrossCompareReranker`` / ``DebertaV2PairRM``: a DeBERTa
backbone and a two-layer head over the ``<|source|>``, ``<|candidate1|>``, ``<|candidate2|>``
positions). We build the inputs exactly as its collator does with ``batch_size=1`` (the official
SPPO call), then run every ordered pair of every prompt in length-sorted batches instead of one
prompt at a time. The input format follows llm-blender's ``PairRM`` model card and its
``CrossCompareCollator``; the scores match ``Blender.rank(return_scores=True)`` to 1e-4 in fp32
(``tests/test_ranking.py``).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModel, AutoTokenizer

from sppo_lightning.errors import ConfigError, LoadError
from sppo_lightning.models import DTYPES
from sppo_lightning.ranking.protocol import PromptView, prompt_view_of, weights_fingerprint

SOURCE, CANDIDATE1, CANDIDATE2, CANDIDATE = "<|source|>", "<|candidate1|>", "<|candidate2|>", "<|candidate|>"


def import_llm_blender():
    """Import llm-blender 0.0.2, made to work on transformers 5. The one place for its shims.

    1. ``llm_blender`` imports ``transformers.utils.hub.TRANSFORMERS_CACHE``, removed in
       transformers 5: we set it to the hub cache path before the import.
    2. Its collator calls ``tokenizer.batch_encode_plus``, removed in transformers 5: we give
       ``PreTrainedTokenizerBase`` a ``batch_encode_plus`` that forwards to ``__call__``, which
       takes the same arguments.

    Both are no-ops on transformers 4.x, where the names still exist.
    """
    import transformers.utils.hub as hub
    from transformers import PreTrainedTokenizerBase

    if not hasattr(hub, "TRANSFORMERS_CACHE"):
        from huggingface_hub.constants import HF_HUB_CACHE

        hub.TRANSFORMERS_CACHE = HF_HUB_CACHE
    if not hasattr(PreTrainedTokenizerBase, "batch_encode_plus"):
        def batch_encode_plus(self, batch_text_or_text_pairs, **kwargs):
            return self(batch_text_or_text_pairs, **kwargs)

        PreTrainedTokenizerBase.batch_encode_plus = batch_encode_plus
    try:
        import llm_blender
    except ImportError as err:
        raise LoadError(f"PairRMRanker needs the llm-blender package (pip install llm-blender): {err}") from None
    return llm_blender


class PairRMRanker:
    """PairRM as a :class:`~sppo_lightning.ranking.Ranker`.

    Loads either checkpoint layout, found by its ``config.json``:

    * llm-blender's own (``llm-blender/PairRM``): ``RankerConfig`` fields, ``model_name`` naming the
      DeBERTa backbone (hub id or folder; only its config and tokenizer are read), and
      ``model.safetensors`` or ``pytorch_model.bin`` with the whole ranker's weights;
    * the Hugging Face one (``llm-blender/PairRM-hf``): a ``DebertaV2PairRM`` folder.

    Args:
        path: hub id or local folder.
        device: where the ranker runs.
        batch_size: pair sequences per forward pass.
        source_max_length / candidate_max_length: token budgets; default to the checkpoint's
            (PairRM: 1224 / 412). A short prompt leaves its unused budget to the candidates.
        torch_dtype: ``float32`` (bit-comparable with llm-blender), or ``float16``/``bfloat16``
            on GPU for speed.
        show_progress: a progress bar over batches.
        prompt_view: ``raw`` prompt text (default), or the policy's ``chat``-templated prompt
            string, which is what the official SPPO ``rank.py`` gives PairRM.
    """

    def __init__(
        self,
        path: str = "llm-blender/PairRM",
        device: str = "cpu",
        batch_size: int = 32,
        source_max_length: Optional[int] = None,
        candidate_max_length: Optional[int] = None,
        torch_dtype: str = "float32",
        show_progress: bool = True,
        prompt_view: PromptView = "raw",
    ) -> None:
        self.path, self.device, self.batch_size = path, device, batch_size
        self.prompt_view = prompt_view
        prompt_view_of(self)
        self.max_lengths = (source_max_length, candidate_max_length)  # as configured (load fills None)
        self.source_max_length, self.candidate_max_length = source_max_length, candidate_max_length
        self.torch_dtype, self.show_progress = torch_dtype, show_progress
        self.model: Any = None  # DebertaV2PairRM, loaded on first use (load)
        self.tokenizer: Any = None

    @classmethod
    def from_pretrained(cls, path: str, device: str = "cpu", **kwargs) -> "PairRMRanker":
        return cls(path, device, **kwargs).load()

    def fingerprint(self) -> dict[str, Any]:
        return {"class": "PairRMRanker", "weights": weights_fingerprint(self.path), "device": self.device,
                "torch_dtype": self.torch_dtype, "max_lengths": list(self.max_lengths),
                "prompt_view": self.prompt_view}

    # ------------------------------------------------------------------------------- loading
    def load(self) -> "PairRMRanker":
        if self.model is not None:
            return self
        folder = self._local_folder()
        config = json.loads((folder / "config.json").read_text())
        if "ranker_type" in config:
            self._load_blender_layout(folder, config)
        else:
            self._load_hf_layout(folder, config)
        self.source_max_length = self.source_max_length or 1224
        self.candidate_max_length = self.candidate_max_length or 412
        sep = self.tokenizer.sep_token
        if sep is None or len(self.tokenizer(sep)["input_ids"]) < 3:
            raise ConfigError(f"{self.path}: the PairRM tokenizer must add [CLS] ... [SEP] around each text")
        self.model.to(device=self.device, dtype=DTYPES[self.torch_dtype]).eval()  # type: ignore[attr-defined]  # set by _load_*
        return self

    def _local_folder(self) -> Path:
        if os.path.isdir(self.path):
            folder = Path(self.path)
        else:
            from huggingface_hub import snapshot_download

            try:
                folder = Path(snapshot_download(self.path))
            except Exception as err:
                raise LoadError(f"could not load the PairRM checkpoint '{self.path}': not a local folder, "
                                f"and the hub said: {str(err).splitlines()[0] if str(err) else err!r}") from None
        if not (folder / "config.json").exists():
            raise LoadError(f"{folder}: no config.json; not a PairRM checkpoint")
        return folder

    def _load_blender_layout(self, folder: Path, config: dict) -> None:
        import_llm_blender()
        from llm_blender.pair_ranker.config import RankerConfig
        from llm_blender.pair_ranker.ranker import CrossCompareReranker

        with warnings.catch_warnings():  # llm-blender's own config has None for three str fields: noise
            warnings.filterwarnings("ignore", message=r".*object value of non-optional type .* RankerConfig",
                                    category=RuntimeWarning)
            ranker_config = RankerConfig.from_dict(config)
        if ranker_config.ranker_type != "pairranker":
            raise ConfigError(f"{folder}: ranker_type is {ranker_config.ranker_type!r}, not 'pairranker'")
        tokenizer = AutoTokenizer.from_pretrained(ranker_config.model_name)
        # The same four tokens, in the same order, as llm-blender's collator adds: same ids.
        tokenizer.add_tokens([SOURCE, CANDIDATE1, CANDIDATE2, CANDIDATE])
        # The checkpoint holds the backbone's weights too, so its config is enough (no second download).
        backbone = AutoModel.from_config(AutoConfig.from_pretrained(ranker_config.model_name))
        # The checkpoint's embeddings replace these rows: no mean init (and none of its console line).
        backbone.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        backbone.config.out_hidden_state_size = backbone.config.hidden_size
        model = CrossCompareReranker(backbone, ranker_config, tokenizer)
        if (folder / "model.safetensors").exists():
            from safetensors.torch import load_file

            state = load_file(folder / "model.safetensors")
        elif (folder / "pytorch_model.bin").exists():
            state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
        else:
            raise LoadError(f"{folder}: neither model.safetensors nor pytorch_model.bin")
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise LoadError(f"{folder}: weights do not match PairRM (missing {missing[:3]}, unexpected {unexpected[:3]})")
        self.model, self.tokenizer = model, tokenizer
        self.source_max_length = self.source_max_length or ranker_config.source_maxlength
        self.candidate_max_length = self.candidate_max_length or ranker_config.candidate_maxlength

    def _load_hf_layout(self, folder: Path, config: dict) -> None:
        import_llm_blender()
        from llm_blender.pair_ranker.pairrm import DebertaV2PairRM

        self.model = DebertaV2PairRM.from_pretrained(folder)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)

    # ------------------------------------------------------------------------------- scoring
    def _token_id(self, token: str) -> int:
        return int(self.tokenizer.convert_tokens_to_ids(token))

    def encode(self, prompt: str, candidates: list[str]) -> tuple[list[int], list[list[int]]]:
        """Token ids of ``[CLS] <|source|> prompt [SEP]`` and of each ``[CLS] <|candidate|> c [SEP]``,
        truncated as llm-blender's collator does for a batch of one prompt."""
        sep = self.tokenizer.sep_token
        source = self.tokenizer(SOURCE + prompt.replace(sep, " "), truncation=True,
                                max_length=self.source_max_length)["input_ids"]
        budget = self.candidate_max_length + (self.source_max_length - len(source)) // 2
        cands = [
            self.tokenizer(CANDIDATE + c.replace(sep, " "), truncation=True, max_length=budget)["input_ids"]
            for c in candidates
        ]
        return source, cands

    @torch.inference_mode()
    def pairwise_logits(self, prompts: list[str], candidates: list[list[str]]) -> Tensor:
        """``M[N, K, K]`` (float32, CPU): ``M[n, i, j]`` is PairRM's logit with candidate i in the
        first slot and j in the second; positive means i is better. The diagonal is 0."""
        self.load()
        n_cands = len(candidates[0]) if candidates else 0
        cand_id, cand1_id, cand2_id = (self._token_id(t) for t in (CANDIDATE, CANDIDATE1, CANDIDATE2))
        sequences: list[tuple[int, int, int, list[int]]] = []
        for n, (prompt, cands) in enumerate(zip(prompts, candidates)):
            source, encoded = self.encode(prompt, cands)
            left = [[cand1_id if t == cand_id else t for t in c] for c in encoded]
            right = [[cand2_id if t == cand_id else t for t in c] for c in encoded]
            for i in range(n_cands):
                for j in range(n_cands):
                    if i != j:
                        sequences.append((n, i, j, source + left[i] + right[j]))
        # Longest first: padding per batch stays small, and an out-of-memory error shows at once.
        sequences.sort(key=lambda s: -len(s[3]))
        out = torch.zeros(len(prompts), n_cands, n_cands)
        batches = range(0, len(sequences), self.batch_size)
        for start in tqdm(batches, desc="PairRM", disable=not self.show_progress):
            chunk = sequences[start : start + self.batch_size]
            logits = self._forward([s[3] for s in chunk])
            for (n, i, j, _), value in zip(chunk, logits.tolist()):
                out[n, i, j] = value
        return out

    def scores(self, prompts: list[str], candidates: list[list[str]]) -> Tensor:
        """``[N, K]`` scores ``s_i = mean_j(M_ij - M_ji)``, as ``Blender.rank(return_scores=True)``."""
        from sppo_lightning.ranking.estimate import scores_from_pairwise

        return scores_from_pairwise(self.pairwise_logits(prompts, candidates))

    def _forward(self, rows: list[list[int]]) -> Tensor:
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id or 0
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for k, row in enumerate(rows):
            input_ids[k, : len(row)] = torch.tensor(row)
            attention_mask[k, : len(row)] = 1
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        hidden = self.model.pretrained_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        positions = [(input_ids == self._token_id(t)).int().argmax(-1) for t in (SOURCE, CANDIDATE1, CANDIDATE2)]
        rows_idx = torch.arange(len(rows), device=hidden.device)
        h_source, h_left, h_right = (hidden[rows_idx, p] for p in positions)
        head = self.model.head_layer
        left = head(torch.cat([h_source, h_left], dim=-1))
        right = head(torch.cat([h_source, h_right], dim=-1))
        return (left - right).mean(-1).float().cpu()
