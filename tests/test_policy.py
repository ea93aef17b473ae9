"""The policy builder (sppo_lightning/policy.py): loading for a footprint, the memory check sized by
the batches it is given, LoRA wrapping, and the trimming and refilling of adapter checkpoints."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from sppo_lightning.datamodules import PreferenceDataModule, PromptDataModule, SelfPlayDataModule
from sppo_lightning.errors import TrainingError
from sppo_lightning.memory import ModelShape, estimate_memory
from sppo_lightning.methods import SPPO
from sppo_lightning.models import LoraSettings, add_lora
from sppo_lightning.module import PreferenceModule
from sppo_lightning.policy import (SizedByRows, TrainingRows, adapter_keys, check_memory, load_base,
                                   restore_checkpoint, rows_of, trim_checkpoint, wrap_policy)
from sppo_lightning.ranking import FunctionJudge


def test_the_rows_of_each_data_module_are_declared_not_probed(tiny_llama):
    sppo = SPPO(FunctionJudge("sppo_lightning.ranking.judges:shorter"))
    self_play = SelfPlayDataModule(sppo, "p.jsonl", tokenizer=tiny_llama, batch_size=3, max_prompt_length=40)
    assert rows_of(self_play) == TrainingRows(3, 40 + sppo.generator.max_new_tokens)
    pairs = PreferenceDataModule("pairs.jsonl", tokenizer=tiny_llama, batch_size=5, max_length=300)
    assert rows_of(pairs) == TrainingRows(5, 300)
    assert rows_of(PromptDataModule("p.jsonl", tokenizer=tiny_llama)) is None  # predict: no training batches
    assert isinstance(PreferenceModule(tiny_llama), SizedByRows)


def test_the_memory_check_sizes_the_batches_it_is_given(tiny_llama):
    """A budget between the estimates of a small and a large batch: only the large one warns."""
    module = PreferenceModule(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    small, large = TrainingRows(1, 16), TrainingRows(64, 4096)

    def estimate(rows):
        return estimate_memory(ModelShape.from_config(model.config), "full", pairs_per_device=rows.rows,
                               seq_len=rows.tokens, optimizer=module.hparams.optimizer, gradient_checkpointing=False,
                               dtype_bytes=4).total

    assert estimate(small) < estimate(large)
    module.hparams["memory_budget_gib"] = (estimate(small) + estimate(large)) / 2
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_memory(module, model, None, False, small)
    with pytest.warns(UserWarning, match="needs about .* per device, more than the"):
        check_memory(module, model, None, False, large)


def test_load_base_and_wrap_policy_give_a_trainable_lora_policy_without_dropout(tiny_llama):
    module = PreferenceModule(tiny_llama, lora={"r": 4, "alpha": 8})
    base = load_base(module, rows=TrainingRows(2, 64))
    assert not any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in base.modules())
    policy = wrap_policy(module, base, module.lora)
    assert policy.training
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_an_adapter_checkpoint_keeps_the_adapters_and_refills_the_frozen_copies(tiny_llama):
    policy = add_lora(AutoModelForCausalLM.from_pretrained(tiny_llama), LoraSettings(r=4))
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama)
    state = {f"policy.{k}": v for k, v in policy.state_dict().items()}
    state.update({f"reference.{k}": v for k, v in reference.state_dict().items()})
    checkpoint = {"state_dict": dict(state)}
    trim_checkpoint(checkpoint, "lora", policy)
    assert set(checkpoint["state_dict"]) == adapter_keys(policy)  # the base and the reference reload
    restore_checkpoint(checkpoint, "lora", policy, {"reference.": reference})
    assert set(checkpoint["state_dict"]) == adapter_keys(policy) | {k for k in state if k.startswith("reference.")}
    del checkpoint["state_dict"][sorted(adapter_keys(policy))[0]]
    with pytest.raises(TrainingError, match="the checkpoint lacks 1 adapter weight"):
        restore_checkpoint(checkpoint, "lora", policy, {"reference.": reference})
    full = {"state_dict": dict(state)}
    trim_checkpoint(full, "full", policy)  # full fine-tuning keeps the policy, drops the reloadable reference
    assert set(full["state_dict"]) == {k for k in state if k.startswith("policy.")}
