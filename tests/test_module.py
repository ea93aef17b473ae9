import json

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
import pytest
import torch
from transformers import AutoModelForCausalLM

from sppo_lightning.datamodules import PreferenceDataModule
from sppo_lightning.errors import ConfigError, DataError
from sppo_lightning.models import LoraSettings
from sppo_lightning.module import PreferenceModule
from tests.helpers import batch_of


def count_calls(model):
    """Forward passes through the model's transformer (the LM head may run apart from it)."""
    calls = []
    model.get_decoder().register_forward_hook(lambda *args: calls.append(1))
    return calls


def test_cached_reference_gives_same_loss_and_runs_no_reference(pair_file, tiny_llama):
    module = PreferenceModule(tiny_llama, loss="sppo", eta=10.0, reference="copy")
    module.configure_model()
    _, batch = batch_of(pair_file, tiny_llama)
    with torch.no_grad():  # move the policy away from the reference so the log-ratios are not 0
        for p in module.policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    reference_calls, policy_calls = count_calls(module.reference), count_calls(module.policy)

    live_loss, _ = module.step(batch)
    assert len(reference_calls) == 1 and len(policy_calls) == 1  # chosen+rejected: one forward each

    reference = module.reference_logps(batch)
    half = reference.shape[0] // 2
    cached = dict(batch, reference_chosen_logps=reference[:half], reference_rejected_logps=reference[half:])
    reference_calls.clear()
    cached_loss, _ = module.step(cached)
    assert reference_calls == [], "a batch with cached reference log-probs must not run the reference"
    torch.testing.assert_close(cached_loss, live_loss)
    assert live_loss.abs().sum() > 0


def test_cached_mode_holds_no_reference_and_needs_the_columns(pair_file, tiny_llama):
    module = PreferenceModule(tiny_llama, loss="dpo", reference="cached")
    module.configure_model()
    assert module.reference is None
    _, batch = batch_of(pair_file, tiny_llama)
    with pytest.raises(DataError, match="reference_chosen_logps"):
        module.step(batch)


def test_lora_reference_is_the_base_model_with_adapters_off(pair_file, tiny_llama):
    module = PreferenceModule(tiny_llama, loss="sppo", eta=10.0, lora=LoraSettings(r=4, alpha=8), lr=1e-2)
    module.configure_model()
    assert module.reference_mode == "adapter" and module.reference is None
    _, batch = batch_of(pair_file, tiny_llama)
    optimizer = torch.optim.AdamW([p for p in module.policy.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):  # LoRA B starts at zero; train it so the adapters change the output
        loss, _ = module.step(batch)
        loss.mean().backward()
        optimizer.step()
        optimizer.zero_grad()

    base = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        expected = base(**inputs).logits
        adapted = module.policy(**inputs).logits
        with module.policy.disable_adapter():
            disabled = module.policy(**inputs).logits
    assert not torch.allclose(adapted, expected, atol=1e-4)
    torch.testing.assert_close(disabled, expected)
    trainable = [n for n, p in module.policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


@pytest.mark.parametrize("loss", ["sppo", "dpo", "asft"])
def test_a_few_optimizer_steps_lower_the_loss(pair_file, tiny_llama, loss):
    module = PreferenceModule(tiny_llama, loss=loss, eta=10.0, lr=1e-2, optimizer="adamw", warmup_ratio=0.0)
    dm, batch = batch_of(pair_file, tiny_llama)
    module.configure_model()
    with torch.no_grad():
        before = module.step(batch)[0].mean().item()
    trainer = L.Trainer(
        max_epochs=8, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, datamodule=dm)
    with torch.no_grad():
        after = module.step(batch)[0].mean().item()
    assert after < 0.8 * before


def test_dropout_is_disabled(tmp_path, tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    model.config.attention_dropout = 0.3
    model.save_pretrained(tmp_path / "dropout_model")
    module = PreferenceModule(str(tmp_path / "dropout_model"), loss="dpo")
    module.configure_model()
    assert module.policy.config.attention_dropout == 0.0
    assert module.reference.config.attention_dropout == 0.0


def test_reference_stays_frozen_and_out_of_checkpoints(pair_file, tiny_llama, tmp_path):
    module = PreferenceModule(tiny_llama, loss="dpo", reference="copy")
    module.configure_model()
    module.train()
    assert not module.reference.training and module.policy.training
    assert not any(p.requires_grad for p in module.reference.parameters())
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["state_dict"] and not any(k.startswith("reference.") for k in checkpoint["state_dict"])
    restored = PreferenceModule(tiny_llama, loss="dpo", reference="copy")
    restored.configure_model()
    restored.on_load_checkpoint(checkpoint)
    restored.load_state_dict(checkpoint["state_dict"], strict=True)


def test_sppo_on_data_without_win_probabilities_is_a_clear_error(tmp_path, tiny_llama):
    path = tmp_path / "plain.jsonl"
    path.write_text(json.dumps({"prompt": "Hi?", "chosen": "Hello.", "rejected": "No."}) + "\n")
    module = PreferenceModule(tiny_llama, loss="sppo")
    module.configure_model()
    _, batch = batch_of(str(path), tiny_llama, batch_size=1)
    with pytest.raises(DataError, match="needs the column 'chosen_probs_win'.*sppo_hard or dpo"):
        module.step(batch)
    module.loss_name = "sppo_hard"  # the same data trains with the hard-probability variant
    assert torch.isfinite(module.step(batch)[0]).all()


def test_ipo_averages_log_probs_per_token(pair_file, tiny_llama):
    module = PreferenceModule(tiny_llama, loss="ipo", beta=0.1, reference="copy")
    module.configure_model()
    _, batch = batch_of(pair_file, tiny_llama)
    per_pair, _ = module.step(batch)
    policy = module.sequence_logps(module.policy, batch)
    reference = module.sequence_logps(module.reference, batch)
    h = policy.mean - reference.mean
    half = h.shape[0] // 2
    torch.testing.assert_close(per_pair, ((h[:half] - h[half:]) - 5.0) ** 2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"loss": "asft", "reference": "copy"}, "reference-free"),
        ({"loss": "dpo", "reference": "none"}, "needs a reference"),
        ({"loss": "dpo", "reference": "adapter"}, "needs model.lora"),
        ({"loss": "sppo", "eta": 0.0}, "model.eta must be > 0"),
        ({"loss": "dpo", "beta": -1.0}, "model.beta must be > 0"),
        ({"loss": "dpo", "label_smoothing": 0.5}, "label_smoothing"),
        ({"loss": "sppo", "warmup_ratio": 1.0}, "warmup_ratio"),
    ],
)
def test_impossible_settings_are_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        PreferenceModule("unused", **kwargs)


def test_loss_defaults_follow_the_recipes():
    assert PreferenceModule("m", loss="orpo").loss_hyperparameters()["lam"] == 0.1
    asft = PreferenceModule("m", loss="asft")
    settings = asft.loss_hyperparameters()
    assert (settings["lam"], settings["beta"], asft.reference_mode) == (1.0, 1.0, "none")
    assert PreferenceModule("m", loss="dpo").loss_hyperparameters()["beta"] == 0.1
    assert PreferenceModule("m", loss="dpo", lora=LoraSettings()).reference_mode == "adapter"


def test_schedule_epochs_stretches_the_lr_schedule(pair_file, tiny_llama):
    def lrs(**kwargs):
        module = PreferenceModule(tiny_llama, loss="dpo", lr=1.0, warmup_ratio=0.5, **kwargs)
        dm, _ = batch_of(pair_file, tiny_llama, batch_size=1)  # 4 steps per epoch
        seen = []
        trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False,
                            callbacks=[_RecordLR(seen)])
        trainer.fit(module, datamodule=dm)
        return seen

    assert lrs() == pytest.approx([0.0, 0.5, 1.0, 0.5])  # warmup 2 of 4 steps, then decay
    # laid over 4 epochs (16 steps, 8 warmup) but stopped after 1: still in warmup
    assert lrs(schedule_epochs=4) == pytest.approx([0.0, 0.125, 0.25, 0.375])


class _RecordLR(L.Callback):
    def __init__(self, seen):
        self.seen = seen

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append(trainer.optimizers[0].param_groups[0]["lr"])


class _PoisonedData(L.LightningDataModule):
    """Real batches of the tiny pairs, with a NaN win probability in batch 1."""

    def __init__(self, pair_file, tiny_llama):
        super().__init__()
        self.inner = PreferenceDataModule(train_data=pair_file, tokenizer=tiny_llama, batch_size=2)

    def setup(self, stage):
        self.inner.setup(stage)
        self.inner.train_examples[2]["chosen_probs_win"] = float("nan")  # past row validation

    def train_dataloader(self):
        loader = self.inner.train_dataloader()
        return torch.utils.data.DataLoader(self.inner.train_examples, batch_size=2, collate_fn=loader.collate_fn)


def test_non_finite_loss_stops_after_saving_the_good_state(pair_file, tiny_llama, tmp_path):
    from sppo_lightning.errors import TrainingError

    module = PreferenceModule(tiny_llama, loss="sppo", eta=10.0, lr=1e-2, warmup_ratio=0.0)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(TrainingError, match=r"non-finite loss nan at step 1 \(epoch 0, batch 1, pairs \[0\]\)"):
        trainer.fit(module, datamodule=_PoisonedData(pair_file, tiny_llama))
    saved = torch.load(tmp_path / "last_finite.ckpt", weights_only=True)
    assert saved["global_step"] == 1
    for key, value in saved["state_dict"].items():
        assert torch.isfinite(value).all(), key
        torch.testing.assert_close(value, module.state_dict()[key])  # nothing moved after the bad batch


def test_non_finite_loss_can_skip_the_batch(pair_file, tiny_llama):
    module = PreferenceModule(tiny_llama, loss="sppo", eta=10.0, lr=1e-2, warmup_ratio=0.0, on_non_finite="skip")
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=_PoisonedData(pair_file, tiny_llama))
    assert module.skipped_non_finite == 1  # batch 1 of 2
    assert all(torch.isfinite(p).all() for p in module.policy.parameters())


def test_preference_data_resumes_with_the_same_batch_order(tmp_path, tiny_llama):
    """Fixed pair files: epoch e's order is fixed by (shuffle_seed, e), not by the global RNG, so a
    run resumed from epoch 1's checkpoint trains on the same batches, with the same losses."""
    import random

    from tests.conftest import CHOSEN, PROMPTS, REJECTED

    path = tmp_path / "pairs.jsonl"
    rows = [{"chosen": [{"role": "user", "content": p}, {"role": "assistant", "content": c * (k + 1)}],
             "rejected": [{"role": "user", "content": p}, {"role": "assistant", "content": r}]}
            for k in range(3) for p, c, r in zip(PROMPTS, CHOSEN, REJECTED)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    class Losses(L.Callback):
        def __init__(self):
            self.by_step = {}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.by_step[trainer.global_step] = float(outputs["loss"])

    def run(ckpt_path=None, rng_noise=0):
        L.seed_everything(0)
        torch.manual_seed(rng_noise)  # a resumed process starts with some other RNG state
        random.seed(rng_noise)
        module = PreferenceModule(tiny_llama, loss="dpo", lr=1e-3, optimizer="adamw", warmup_ratio=0.0)
        dm = PreferenceDataModule(train_data=str(path), tokenizer=tiny_llama, batch_size=3)
        losses = Losses()
        checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
        trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=tmp_path, callbacks=[losses, checkpoints])
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
        return losses.by_step

    straight = run()
    resumed = run(ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=4.ckpt"), rng_noise=123)
    assert sorted(resumed) == list(range(5, 13))  # epochs 2 and 3: 4 batches each
    for step, loss in resumed.items():
        assert loss == pytest.approx(straight[step], rel=1e-6), step


def test_gradient_checkpointing_recomputes_to_the_same_loss_and_gradients(pair_file, tiny_llama):
    from sppo_lightning.models import is_checkpointing

    _, batch = batch_of(pair_file, tiny_llama)
    results = []
    for checkpointing in (False, True):
        module = PreferenceModule(tiny_llama, loss="dpo", gradient_checkpointing=checkpointing)
        module.configure_model()
        assert is_checkpointing(module.policy) == checkpointing
        loss = module.step(batch)[0].mean()
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in module.policy.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
