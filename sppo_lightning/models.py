"""Loading policies and tokenizers from a hub id or a local folder, LoRA, and HF-format export."""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Union

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
    dropout: float = 0.0  # 0: SPPO's and TRL's DPO trainers train with dropout off
    target_modules: Union[str, list[str]] = "all-linear"
    extra: dict = field(default_factory=dict)  # any other peft.LoraConfig argument


def _load_error(name_or_path: str, what: str, err: Exception) -> LoadError:
    key = "model.model_name_or_path" + (", which also sets data.tokenizer" if what == "tokenizer" else "")
    # A path (a hub id is "name" or "org/name"): a missing one is "no such folder", not the hub's id rules.
    local = name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1
    if local and not Path(name_or_path).expanduser().exists():
        return LoadError(f"could not load the {what} '{name_or_path}' ({key}): no such folder")
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    where = "the local folder" if Path(name_or_path).exists() else "a local folder or the hub"
    return LoadError(f"could not load the {what} '{name_or_path}' ({key}) from {where}: {type(err).__name__}: "
                     f"{reason}")


def load_causal_lm(
    name_or_path: str,
    torch_dtype: str = "float32",
    trust_remote_code: bool = False,
    quantize_4bit: bool = False,
    device: Optional[torch.device] = None,
) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained`` with a clear error when the path or id is wrong.

    ``quantize_4bit`` loads the linear layers in 4-bit nf4 (double quantisation) computing in
    ``torch_dtype``; on a GPU ``device`` they are quantised straight onto it while loading, so the
    full-precision weights never sit in GPU memory. A path to a ``.gguf`` file loads the Hugging
    Face folder converted from it once (``gguf.py``).
    """
    from sppo_lightning.gguf import hf_folder

    name_or_path = hf_folder(name_or_path)
    if torch_dtype not in DTYPES:
        raise ConfigError(f"model.torch_dtype must be one of {sorted(DTYPES)}, got {torch_dtype!r}")
    kwargs: dict = {}
    if quantize_4bit:
        from sppo_lightning.quantization import quantization_config, require_bitsandbytes

        require_bitsandbytes()
        kwargs["quantization_config"] = quantization_config(DTYPES[torch_dtype])
        if device is not None and device.type != "cpu":
            kwargs["device_map"] = {"": device}
    from safetensors import SafetensorError

    try:
        return AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=DTYPES[torch_dtype], trust_remote_code=trust_remote_code, **kwargs
        )
    except torch.OutOfMemoryError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as err:
        # A missing or corrupt config.json or weights file: one line naming the folder and the key.
        raise _load_error(name_or_path, "model", err) from None


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """``AutoTokenizer`` with a pad token (EOS where the model has none) and a chat template. A
    ``.gguf`` file's tokenizer comes from the folder converted from it (``gguf.py``)."""
    from sppo_lightning.gguf import hf_folder

    name_or_path = hf_folder(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise _load_error(name_or_path, "tokenizer", err) from None
    except (ValueError, KeyError, TypeError) as err:
        # A folder with weights but no (or broken) tokenizer files: transformers then tries to build
        # one from a slow tokenizer and fails deep inside with advice about sentencepiece.
        folder = Path(name_or_path).expanduser()
        if folder.is_dir():
            found = sorted(p.name for p in folder.glob("tokenizer*")) or ["none"]
            raise LoadError(f"could not load the tokenizer of '{name_or_path}' (model.model_name_or_path, which also "
                            f"sets data.tokenizer): it needs tokenizer.json or tokenizer_config.json with its "
                            f"vocabulary; tokenizer files found: {', '.join(found)}") from None
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

    check_lora_targets(model, settings.target_modules)
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        task_type="CAUSAL_LM",
        **settings.extra,
    )
    return get_peft_model(model, config)


def check_lora_targets(model: nn.Module, target_modules: Union[str, list[str]]) -> None:
    """Fail in one line, naming the model's linear layers, when no module matches the targets.

    Matches as peft does: one string is a regular expression over full module names
    (``model.layers.0.self_attn.q_proj``), a list holds names or name suffixes.
    """
    import re

    if target_modules == "all-linear":
        return
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Linear4bit"]
    if isinstance(target_modules, str):
        matched = any(re.fullmatch(target_modules, n) for n in names)
        hint = " (one string is a regular expression over full names; a list matches name suffixes)"
    else:
        matched = any(n == t or n.endswith(f".{t}") for n in names for t in target_modules)
        hint = ""
    if not matched:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise ConfigError(f"model.lora.target_modules {target_modules!r} match no layer of this model{hint}; "
                          f"its linear layers are {', '.join(leaves)} (or use 'all-linear')")


def enable_checkpointing(model: nn.Module) -> None:
    """Recompute each layer's activations in backward (non-reentrant, so frozen inputs and LoRA work).

    transformers 5 renamed ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable``
    (the old name goes in v6); 4.x has only the old one.
    """
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def is_checkpointing(model: nn.Module) -> bool:
    if hasattr(model, "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability to 0, as the SPPO/DPO trainers do (``disable_dropout=True``)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    config = getattr(model, "config", None)
    for name in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop"):
        if config is not None and isinstance(getattr(config, name, None), float):
            setattr(config, name, 0.0)


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode for the block, then back in the mode it had (sampling and scoring
    from a policy that is training must not leave it in eval mode, nor wake a frozen copy)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def is_peft(model: nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "merge_and_unload")


def is_quantized(model: nn.Module) -> bool:
    return any(type(m).__name__ == "Linear4bit" for m in model.modules())


def export_hf(
    policy: nn.Module,
    tokenizer: Optional[PreTrainedTokenizerBase],
    out_dir: str | Path,
    adapter_dir: Optional[str | Path] = None,
    merged_dtype: torch.dtype = torch.bfloat16,
    adapter: str = "default",
) -> Optional[Path]:
    """Save ``policy`` in Hugging Face format (safetensors), LoRA merged into the base weights.

    - LoRA: merged on a CPU copy, so the training model is left as it was (one model of host memory).
    - 4-bit (QLoRA): the base is dequantised to ``merged_dtype`` (bf16) first, then the adapter is
      merged; merging into the 4-bit weights would round the update away.
    - FSDP-sharded: a collective. Every rank must call it; rank 0 gathers the full weights to CPU
      and writes them; the other ranks return None.

    ``adapter_dir``: also save the LoRA adapter alone (``PeftModel.from_pretrained`` loads it).
    ``adapter``: which LoRA adapter is merged (J-BOND's policy holds ``default`` and ``anchor``).
    """
    from sppo_lightning.quantization import dequantized_model
    from sppo_lightning.sharding import is_sharded

    if is_sharded(policy):
        policy = _gather_to_rank0(policy)
        if policy is None:
            return None
    out_dir = Path(out_dir)
    if adapter_dir is not None and is_peft(policy):
        from sppo_lightning.files import folder_whole

        folder_whole(adapter_dir, lambda folder: policy.save_pretrained(folder, safe_serialization=True))
    model = policy
    if is_peft(policy) and is_quantized(policy):
        from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

        plain = dequantized_model(policy.get_base_model(), merged_dtype)
        merged = get_peft_model(plain, copy.deepcopy(policy.peft_config[adapter]))
        set_peft_model_state_dict(merged, get_peft_model_state_dict(policy, adapter_name=adapter))
        model = merged.merge_and_unload()
    elif is_peft(policy):
        model = copy.deepcopy(policy).to("cpu")
        model.set_adapter(adapter)
        model = model.merge_and_unload(adapter_names=[adapter])
    elif is_quantized(policy):
        model = dequantized_model(policy, merged_dtype)
    from sppo_lightning.files import folder_whole, readable_as_umask_says

    def write(folder: Path) -> None:
        model.save_pretrained(folder, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        readable_as_umask_says(folder)

    folder_whole(out_dir, write)  # beside its name, then renamed: a crash or a full disk keeps the old one
    if adapter_dir is not None and is_peft(policy):
        readable_as_umask_says(adapter_dir)
    return out_dir


def _gather_to_rank0(policy: nn.Module) -> Optional[nn.Module]:
    """An unsharded CPU copy of an FSDP2 policy on rank 0 (None elsewhere); every rank calls it."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    inner = policy.get_base_model() if is_peft(policy) else policy
    config = inner.config.__class__.from_dict(inner.config.to_dict())
    dtype = next(iter(state.values())).dtype
    copy_ = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if is_peft(policy):
        from peft import get_peft_model

        copy_ = get_peft_model(copy_, copy.deepcopy(policy.peft_config["default"]))
    copy_.load_state_dict(state, strict=True)
    return copy_
