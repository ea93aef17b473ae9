"""Footprints: qlora on CPU with bitsandbytes, lora checkpoints, the memory formula, config errors.

The FSDP runs (2 CPU processes) are in test_fsdp.py.
"""

import re
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM

from sppo_lightning.errors import ConfigError
from sppo_lightning.footprints import resolve_footprint
from sppo_lightning.memory import GIB, LLAMA3_8B, MISTRAL_7B, ModelShape, estimate_memory, memory_table
from sppo_lightning.logprobs import model_logprobs
from sppo_lightning.models import LoraSettings, export_hf, is_checkpointing, is_quantized, load_causal_lm, load_tokenizer
from sppo_lightning.module import PreferenceModule
from tests.helpers import batch_of

FOOTPRINTS_DOC = Path(__file__).resolve().parent.parent / "docs" / "footprints.md"


def fit(module, dm, epochs=6, **kwargs):
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, **({"enable_checkpointing": False} | kwargs))
    trainer.fit(module, datamodule=dm)
    return trainer


@pytest.fixture(scope="module")
def llama64(tmp_path_factory) -> str:
    """A tiny Llama with hidden size 64: bitsandbytes' CPU kernels need rows of at least one
    64-value quantisation block (the session's tiny_llama has 32)."""
    from sppo_lightning.testing import make_tiny_llama

    return str(make_tiny_llama(tmp_path_factory.mktemp("models") / "llama64", hidden_size=64))


@pytest.fixture(scope="module")
def trained_qlora(llama64, tmp_path_factory):
    """A few SPPO steps of the qlora footprint on a tiny model saved to disk; (module, batch, before, trainer)."""
    import json

    from tests.conftest import CHOSEN, PROMPTS, REJECTED

    tiny_llama = llama64
    path = tmp_path_factory.mktemp("qlora") / "pairs.jsonl"
    path.write_text("".join(json.dumps({
        "chosen": [{"role": "user", "content": p}, {"role": "assistant", "content": c}],
        "rejected": [{"role": "user", "content": p}, {"role": "assistant", "content": r}],
        "chosen_probs": 0.8, "chosen_probs_win": 0.6 + 0.05 * i, "chosen_probs_lose": 0.3,
    }) + "\n" for i, (p, c, r) in enumerate(zip(PROMPTS, CHOSEN, REJECTED))))
    module = PreferenceModule(tiny_llama, loss="sppo", eta=10.0, footprint="qlora", lora=LoraSettings(r=8, alpha=16),
                              optimizer="adamw_8bit", lr=2e-2, warmup_ratio=0.0)
    dm, batch = batch_of(str(path), tiny_llama)
    module.configure_model()
    with torch.no_grad():
        before = module.step(batch)[0].mean().item()
    trainer = fit(module, dm, default_root_dir=str(tmp_path_factory.mktemp("qlora_run")))
    return module, batch, before, trainer


def test_qlora_loads_4bit_trains_lora_only_and_the_loss_drops(trained_qlora):
    module, batch, before, _ = trained_qlora
    policy = module.policy
    assert is_quantized(policy)
    assert module.reference is None and module.reference_mode == "adapter"  # never a second copy
    assert is_checkpointing(policy.get_base_model())
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        after = module.step(batch)[0].mean().item()
    assert after < 0.7 * before, (before, after)


def test_qlora_reference_is_the_quantised_base(trained_qlora, llama64):
    tiny_llama = llama64
    module, batch, _, _ = trained_qlora
    base = load_causal_lm(tiny_llama, quantize_4bit=True).eval()
    # Same mode on both sides: in eval mode bitsandbytes' CPU path switches to its bf16 kernel.
    module.policy.eval()
    with torch.no_grad():
        expected = model_logprobs(base, batch).sum
        reference = module.reference_logps(batch)
        policy = model_logprobs(module.policy, batch).sum
    torch.testing.assert_close(reference, expected, rtol=0, atol=1e-4)
    assert (policy - reference).abs().max() > 1e-2  # the adapters moved the policy away from it


def test_qlora_export_dequantises_the_base_then_merges(trained_qlora, llama64, tmp_path):
    tiny_llama = llama64
    module, batch, _, _ = trained_qlora
    tokenizer = load_tokenizer(tiny_llama)
    out = export_hf(module.policy, tokenizer, tmp_path / "merged", adapter_dir=tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not is_quantized(merged) and getattr(merged.config, "quantization_config", None) is None
    assert merged.dtype == torch.bfloat16
    module.policy.eval()
    with torch.no_grad():
        want = model_logprobs(module.policy, batch).sum
        got = model_logprobs(merged.float(), batch).sum
    # bf16 storage of the merged weights is the only difference from the 4-bit + LoRA forward.
    torch.testing.assert_close(got, want, rtol=2e-2, atol=0.5)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Name a color."}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    generated = merged.generate(ids, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] > ids.shape[1]


def test_lora_checkpoints_hold_the_adapters_only_and_load_back(trained_qlora, tmp_path):
    module, batch, _, trainer = trained_qlora
    path = tmp_path / "qlora.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=True)["state_dict"]
    assert state and all("lora_" in k for k in state)
    loaded = PreferenceModule.load_from_checkpoint(path, weights_only=True)
    for name, value in state.items():
        torch.testing.assert_close(loaded.state_dict()[name], value)
    loaded.policy.eval(), module.policy.eval()  # one bitsandbytes kernel on both sides
    with torch.no_grad():
        # Not bit-equal: on CPU, bitsandbytes repacks 4-bit weights for its eval kernel and
        # state_dict() unpacks them in place, re-quantising their scales (a bitsandbytes quirk).
        torch.testing.assert_close(loaded.step(batch)[0], module.step(batch)[0], rtol=3e-2, atol=1e-3)


def test_a_checkpoint_of_other_lora_settings_is_refused(trained_qlora, tmp_path):
    _, _, _, trainer = trained_qlora
    path = tmp_path / "qlora.ckpt"
    trainer.save_checkpoint(path)
    with pytest.raises(Exception, match="has extra .* adapter weight"):
        PreferenceModule.load_from_checkpoint(path, weights_only=True, lora=LoraSettings(r=8, alpha=16, target_modules=["q_proj", "v_proj", "up_proj"]))


def test_qlora_self_play_generates_with_the_4bit_model(llama64, tmp_path):
    from sppo_lightning.callbacks.self_play import SelfPlay
    from sppo_lightning.datamodules import SelfPlayDataModule
    from sppo_lightning.methods import SPPO
    from sppo_lightning.pipeline import HFGenerator
    from sppo_lightning.ranking import FunctionJudge

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(f'{{"prompt": "{q}"}}\n' for q in ("Name a color.", "What is 2 plus 3?", "Why?")))
    seen = []

    class Watch(L.Callback):
        def on_fit_start(self, trainer, pl_module):
            original = pl_module.policy.generate

            def generate(*args, **kwargs):
                seen.append(is_quantized(pl_module.policy))
                return original(*args, **kwargs)

            pl_module.policy.generate = generate

    module = PreferenceModule(llama64, footprint="qlora", loss="sppo", eta=10.0, reference="cached", lr=1e-3)
    method = SPPO(FunctionJudge("sppo_lightning.ranking.judges:shorter"),
                  HFGenerator(max_new_tokens=6, batch_size=3, show_progress=False), num_samples=3, show_progress=False)
    datamodule = SelfPlayDataModule(method, prompts=str(prompts), tokenizer=llama64, batch_size=2, max_prompt_length=32,
                                    run_dir=str(tmp_path / "self_play"))
    callback = SelfPlay()
    # Iteration 1's data is built when the LR schedule is set up, before on_fit_start; iteration 2's after.
    fit(module, datamodule, epochs=2, callbacks=[Watch(), callback], default_root_dir=str(tmp_path),
        reload_dataloaders_every_n_epochs=1)
    assert seen and all(seen)  # every generate call ran on the 4-bit base (+ LoRA), no other copy
    assert module.reference is None
    assert (tmp_path / "self_play" / "iteration_1" / "train.parquet").exists()


def test_qlora_without_bitsandbytes_is_one_clear_error(tiny_llama, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what `import bitsandbytes` does when absent
    module = PreferenceModule(tiny_llama, footprint="qlora")
    with pytest.raises(ConfigError, match="needs bitsandbytes, which is not installed"):
        module.configure_model()


def test_lora_targets_that_match_nothing_name_the_real_layers(tiny_llama):
    module = PreferenceModule(tiny_llama, lora=LoraSettings(target_modules=["query_key_value"]))
    with pytest.raises(ConfigError, match=r"match no layer of this model; its linear layers are .*q_proj"):
        module.configure_model()


def test_lora_targets_as_one_string_match_like_peft(tiny_llama):
    # peft reads a single string as a regular expression over full module names: "q_proj" alone
    # matches nothing there (peft would fail deep inside get_peft_model), r".*\.q_proj" matches.
    module = PreferenceModule(tiny_llama, lora=LoraSettings(target_modules="q_proj"))
    with pytest.raises(ConfigError, match="one string is a regular expression over full names"):
        module.configure_model()
    module = PreferenceModule(tiny_llama, lora=LoraSettings(target_modules=r".*\.q_proj"))
    module.configure_model()
    assert any(".q_proj.lora_A" in n for n, _ in module.policy.named_parameters())


@pytest.mark.parametrize("kwargs, message", [
    ({"footprint": "full", "lora": LoraSettings()}, "use footprint: lora"),
    ({"footprint": "qlora", "reference": "copy"}, "never holds a second copy"),
    ({"footprint": "tpu"}, "must be one of"),
])
def test_impossible_footprint_settings(tiny_llama, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        PreferenceModule(tiny_llama, **kwargs)


def test_footprint_defaults_follow_the_lora_setting():
    assert resolve_footprint(None, has_lora=True) == "lora"
    assert resolve_footprint(None, has_lora=False) == "full"


def test_fsdp_on_one_device_is_one_clear_error(pair_file, tiny_llama, monkeypatch):
    import torch.distributed as dist
    from lightning.pytorch.strategies import ModelParallelStrategy

    for name in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(name, raising=False)  # the strategy sets them; undone after the test
    dm, _ = batch_of(pair_file, tiny_llama)
    module = PreferenceModule(tiny_llama, footprint="fsdp")
    try:
        with pytest.raises(ConfigError, match="with one device shards nothing"):
            fit(module, dm, epochs=1, strategy=ModelParallelStrategy(), devices=1)
    finally:
        if dist.is_initialized():  # free its port for the multi-process tests that follow
            dist.destroy_process_group()


def test_fsdp_without_the_model_parallel_strategy_is_one_clear_error(pair_file, tiny_llama):
    dm, _ = batch_of(pair_file, tiny_llama)
    with pytest.raises(ConfigError, match="needs trainer.strategy: lightning.pytorch.strategies.ModelParallelStrategy"):
        fit(PreferenceModule(tiny_llama, footprint="fsdp"), dm, epochs=1)


def test_a_model_too_big_for_the_budget_warns_with_the_numbers(pair_file, tiny_llama):
    dm, _ = batch_of(pair_file, tiny_llama)
    module = PreferenceModule(tiny_llama, memory_budget_gib=1e-6)
    with pytest.warns(UserWarning, match=r"needs about .* GiB \(weights .*optimizer .*\) per device, more than the 0.0 GiB"):
        fit(module, dm, epochs=1, max_steps=1)


# ------------------------------------------------------------------------------ memory formula
def test_shapes_count_the_real_parameters(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    shape = ModelShape.from_config(model.config)
    assert shape.params == sum(p.numel() for p in model.parameters())
    from sppo_lightning.models import add_lora

    lora = add_lora(model, LoraSettings(r=4))
    assert shape.lora_params(4) == sum(p.numel() for p in lora.parameters() if p.requires_grad)
    # The published sizes: Mistral-7B 7.24B, Llama-3-8B 8.03B parameters.
    assert round(MISTRAL_7B.params / 1e9, 2) == 7.24 and round(LLAMA3_8B.params / 1e9, 2) == 8.03


def test_memory_formula_by_hand():
    # h=8, 1 layer, i=16, 2 heads, 1 kv head (kv_dim 4), vocab 10, untied.
    shape = ModelShape(vocab=10, hidden=8, layers=1, intermediate=16, heads=2, kv_heads=1)
    assert shape.linear_params == 2 * 64 + 2 * 32 + 3 * 128 == 576
    assert shape.other_params == 160 + 3 * 8 == 184
    e = estimate_memory(shape, "full", pairs_per_device=1, seq_len=4, optimizer="adamw", gradient_checkpointing=False,
                        generation_prompts=1, num_samples=2, generation_len=3)
    assert e.weights * GIB == 760 * 2 and e.gradients * GIB == 760 * 2 and e.optimizer * GIB == 760 * 2 * 2
    per_token_layer = 2 * (64 + 24 + 64) + 128  # 2·(8h + 6kv + 4i) + 16h = 432
    assert e.activations * GIB == 8 * per_token_layer + 8 * 10 * 4 * 3
    assert e.generation * GIB == 2 * 3 * 1 * 2 * 4 * 2 + 2 * 10 * 4 * 2
    assert e.total == pytest.approx(e.weights + e.optimizer + max(e.gradients + e.activations, e.generation))
    q = estimate_memory(shape, "qlora", lora_r=2, optimizer="adamw")
    lora = 2 * (16 * 2 + 12 * 2 + 24 * 3)  # r·((h+h)·2 + (h+kv)·2 + (h+i)·3) = 256
    assert q.weights * GIB == pytest.approx(576 * (0.5 + 0.127 / 8) + 184 * 2 + lora * 4)
    assert q.optimizer * GIB == lora * 2 * 4
    f = estimate_memory(shape, "fsdp", world_size=4, optimizer="rmsprop")
    assert f.weights * GIB == 760 * 2 / 4 + 2 * 576 * 2
    assert f.gradients * GIB == f.optimizer * GIB == 760 / 4 * 2


def test_the_docs_memory_table_is_the_formulas_output():
    text = FOOTPRINTS_DOC.read_text()
    assert memory_table() in text, "regenerate with: python -m sppo_lightning.footprints"


def test_qlora_fits_a_consumer_gpu_and_full_7b_does_not():
    rows = {(name, fp): estimate_memory(shape, fp, world_size=g, **s | dict(pairs_per_device=1, seq_len=1024))
            for name, shape, fp, g, s in [
                ("mistral", MISTRAL_7B, "qlora", 1, dict(optimizer="paged_adamw_8bit")),
                ("mistral", MISTRAL_7B, "full", 1, dict(optimizer="rmsprop")),
                ("llama", LLAMA3_8B, "fsdp", 8, dict(optimizer="rmsprop"))]}
    assert rows["mistral", "qlora"].total < 24 < rows["mistral", "full"].total
    assert rows["llama", "fsdp"].total < 80
    assert re.search(r"\d", rows["llama", "fsdp"].describe())
