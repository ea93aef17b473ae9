"""Loading policies and tokenizers from a hub id or a local folder, LoRA, and HF-format export."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from sppo_lightning.errors import ConfigError, LoadError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoraSettings:
    """peft LoRA on the policy. ``target_modules="all-linear"`` covers every linear layer but the
    LM head, which is right for Llama/Mistral/Qwen/Gemma alike."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0  # 0 because SPPO/DPO train with dropout off (sppo.md §2)
    target_modules: Union[str, list[str]] = "all-linear"
    extra: dict = field(default_factory=dict)  # any other peft.LoraConfig argument


def _load_error(name_or_path: str, what: str, err: Exception) -> LoadError:
    if name_or_path.startswith(("/", ".", "~")) and not Path(name_or_path).expanduser().exists():
        return LoadError(f"could not load the {what} '{name_or_path}': no such folder")
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    where = "the local folder" if Path(name_or_path).exists() else "a local folder or the hub"
    return LoadError(f"could not load the {what} '{name_or_path}' from {where}: {reason}")


def load_causal_lm(
    name_or_path: str, torch_dtype: str = "float32", trust_remote_code: bool = False
) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained`` with a clear error when the path or id is wrong."""
    if torch_dtype not in DTYPES:
        raise ConfigError(f"model.torch_dtype must be one of {sorted(DTYPES)}, got {torch_dtype!r}")
    try:
        return AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=DTYPES[torch_dtype], trust_remote_code=trust_remote_code
        )
    except OSError as err:
        raise _load_error(name_or_path, "model", err) from None


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """``AutoTokenizer`` with a pad token (EOS where the model has none) and a chat template."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise _load_error(name_or_path, "tokenizer", err) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise ConfigError(
            f"{name_or_path}: the tokenizer has no chat template; use an instruct/chat model's "
            f"tokenizer or set `chat_template` in its tokenizer_config.json"
        )
    return tokenizer


def add_lora(model: PreTrainedModel, settings: LoraSettings) -> nn.Module:
    """Wrap ``model`` in a peft LoRA model; only the adapter weights train."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        task_type="CAUSAL_LM",
        **settings.extra,
    )
    return get_peft_model(model, config)


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability to 0, as the SPPO/DPO trainers do (``disable_dropout=True``)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    config = getattr(model, "config", None)
    for name in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop"):
        if config is not None and isinstance(getattr(config, name, None), float):
            setattr(config, name, 0.0)


def is_peft(model: nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "merge_and_unload")


def export_hf(
    policy: nn.Module, tokenizer: Optional[PreTrainedTokenizerBase], out_dir: str | Path
) -> Path:
    """Save ``policy`` in Hugging Face format (safetensors), LoRA merged into the base weights.

    A LoRA policy is merged on a CPU copy, so the training model is left as it was; the copy costs
    one model of host memory.
    """
    out_dir = Path(out_dir)
    model = policy
    if is_peft(policy):
        model = copy.deepcopy(policy).to("cpu").merge_and_unload()
    model.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir
