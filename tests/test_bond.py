import json
import math

import lightning as L
import pytest
import torch

from sppo_lightning.bond import BondModule
from sppo_lightning.callbacks.ema_anchor import EMAAnchor
from sppo_lightning.datamodules import SelfPlayDataModule
from sppo_lightning.errors import ConfigError
from sppo_lightning.methods import JBOND
from sppo_lightning.models import LoraSettings
from sppo_lightning.ranking import FunctionJudge
from tests import self_play_setup
from tests.helpers import REPO, CountingJudge, run_fit


def bond_run(ranker, prompts, tokenizer, batch_size, callbacks=(), prompts_per_iteration=None, **settings):
    """(datamodule, trainer options) of a J-BOND run: the method from flat settings (tests/self_play_setup.py)."""
    trainer_options = {k: settings.pop(k) for k in ("max_epochs", "default_root_dir") if k in settings}
    method, boundary, run_dir = self_play_setup.parts(JBOND, ranker, **settings)
    datamodule = SelfPlayDataModule(method, prompts=str(prompts), tokenizer=tokenizer, batch_size=batch_size,
                                    prompts_per_iteration=prompts_per_iteration, run_dir=run_dir)
    return datamodule, self_play_setup.trainer(callbacks=[boundary, *callbacks], **trainer_options)

IDS = torch.tensor([[1, 5, 40, 41, 42, 2]])


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("lora", [None, LoraSettings(r=4, alpha=8)])
def test_ema_update_is_exact_and_the_anchor_is_what_generates(tiny_llama, lora):
    module = BondModule(tiny_llama, lora=lora)
    module.configure_model()
    pairs = module.anchor_parameter_pairs()
    assert pairs and all(a.data_ptr() != p.data_ptr() for a, p in pairs)
    with torch.no_grad():  # the policy moves away from the anchor (as training would)
        for _, p in pairs:
            p.add_(torch.randn_like(p) * 0.1)
    before = [(a.clone(), p.clone()) for a, p in pairs]
    with module.anchor_model() as anchor:
        anchor_logits = logits(anchor)
    assert not torch.allclose(anchor_logits, logits(module.policy), atol=1e-4)

    callback = EMAAnchor(eta=0.25)
    trainer = type("T", (), {"global_step": 1})()
    callback._last_step = 0
    callback.on_train_batch_end(trainer, module, None, None, 0)
    for (a, p), (a0, p0) in zip(pairs, before):
        torch.testing.assert_close(a, 0.75 * a0 + 0.25 * p0)  # θ_a ← (1−η)θ_a + ηθ
        assert torch.equal(p, p0)
    callback.on_train_batch_end(trainer, module, None, None, 1)  # no new optimizer step: no update
    torch.testing.assert_close(pairs[0][0], 0.75 * before[0][0] + 0.25 * before[0][1])
    if lora is not None:
        trainable = [n for n, p in module.policy.named_parameters() if p.requires_grad]
        assert trainable and all(".default." in n for n in trainable)  # the anchor adapter never trains
        assert all(".anchor." in n or ".default." in n for n, _ in module.policy.named_parameters() if "lora_" in n)


def constant(prompt, response):
    return 0.0


@pytest.mark.parametrize("tie_rule", ["strict", "coin"])
@pytest.mark.parametrize("variant", ["jbond", "bond"])
def test_bond_rows_rewards_and_ties(tmp_path, tiny_llama, variant, tie_rule):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in ["Hi", "Name a color.", "Why?"]))
    judge = "sppo_lightning.ranking.judges:shorter" if variant == "jbond" else f"{__name__}:constant"
    datamodule, trainer = bond_run(FunctionJudge(judge), prompts, tiny_llama, 3, [EMAAnchor(0.1)], variant=variant,
                                   n=3, quantile_samples=4, max_new_tokens=6, generation_batch_size=2,
                                   run_dir=tmp_path / "bond", max_epochs=1, tie_rule=tie_rule, step_folders=True)
    module = BondModule(tiny_llama, lr=1e-3, lora=LoraSettings(r=4, alpha=8))
    # on-policy: the iteration is one optimizer step's prompts, here all 3
    trainer.fit(module, datamodule=datamodule)
    import pyarrow.parquet as pq

    gens = pq.read_table(tmp_path / "bond" / "iteration_1" / "generations.parquet").to_pylist()
    rows = pq.read_table(tmp_path / "bond" / "iteration_1" / "train.parquet").to_pylist()
    manifest = json.loads((tmp_path / "bond" / "iteration_1" / "manifest.json").read_text())
    train = manifest["stages"]["train"]
    assert len(rows) == 3
    for g, r in zip(gens, rows):
        assert r["rejected_ids"] == g["sample_ids"] and r["chosen_ids"] == g["anchor_ids"][r["best_anchor"]]
        if variant == "jbond":
            assert len(g["anchors"]) == 2
            lengths = [len(a) for a in g["anchors"]]
            if lengths[0] != lengths[1]:  # shorter wins under this judge
                assert r["best_anchor"] == lengths.index(min(lengths))
            elif tie_rule == "strict":
                assert r["best_anchor"] == 0  # a tie for the best anchor goes to the first
            # strict: the policy sample loses only when strictly longer than both anchor samples
            loses_both = all(len(g["sample"]) > n for n in lengths)
            if tie_rule == "strict" or len(set([len(g["sample"]), *lengths])) == 3:
                assert r["reward"] == pytest.approx(-2.7725887 if loses_both else 0.0)
        else:
            assert len(g["anchors"]) == 3 + 4 and r["best_anchor"] < 3
            if tie_rule == "strict":  # every comparison ties: tied references count as beaten, p̂ = 1
                assert r["reward"] == 0.0 and r["best_anchor"] == 0
            else:  # each quantile comparison is a fair coin; (N−1)·log p̂, p̂ ≥ 1/(2k)
                allowed = [2 * torch.log(torch.tensor(x)).item() for x in (1 / 8, .25, .5, .75, 1.0)]
                assert any(r["reward"] == pytest.approx(v) for v in allowed), r["reward"]
    if variant == "bond":  # 2 extra tied maxima of 3, and 4 tied quantile comparisons, per prompt
        assert train["ties"] == 3 * (2 + 4)
        assert train["ties_broken"] == (3 * (1 + 4) if tie_rule == "coin" else 0)  # coins thrown
    assert train["kl_rows"] == 3  # LoRA: the initial policy is adapters-off
    (row,) = json.loads((tmp_path / "bond" / "summary.json").read_text())["iterations"]
    assert (row["ties"], row["ties_broken"]) == (train["ties"], train["ties_broken"])  # counted in the summary
    if variant == "bond":  # Best-of-N's own KL to its reference, N = 3, beside the distilled policy's
        assert row["best_of_n_kl"] == pytest.approx(math.log(3) - 2 / 3)
    else:
        assert "best_of_n_kl" not in row


def test_full_fine_tuning_logs_kl_with_an_initial_copy(tmp_path, tiny_llama):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in ["Hi", "Name a color."]))
    module = BondModule(tiny_llama, lr=1e-2, keep_initial_copy=True)
    modes = []
    record = L.Callback()
    record.on_train_batch_start = lambda trainer, pl_module, batch, i: modes.append(pl_module.policy.training)
    datamodule, trainer = bond_run(FunctionJudge("sppo_lightning.ranking.judges:shorter"), prompts, tiny_llama, 2,
                                   [EMAAnchor(0.5), record], max_new_tokens=6, run_dir=tmp_path / "bond",
                                   max_epochs=2)
    trainer.fit(module, datamodule=datamodule)
    # each step's line in the run's one store (no folder per step): its statistics
    lines = [json.loads(line) for line in (tmp_path / "bond" / "steps.jsonl").read_text().splitlines()]
    assert [line["iteration"] for line in lines] == [1, 2] and not (tmp_path / "bond" / "iteration_1").exists()
    kl = [line["stats"]["kl_to_initial"] for line in lines]
    assert kl[0] == pytest.approx(0.0, abs=1e-4)  # iteration 1 samples from the initial policy itself
    assert kl[1] != pytest.approx(0.0, abs=1e-4)  # after training, the policy has moved
    assert not any(p.requires_grad for p in module.initial.parameters())
    assert modes and all(modes)  # measuring the KL leaves the policy in train mode
    assert not module.initial.training


def test_jbond_recipe_raises_the_win_rate(tiny_dir, tmp_path):
    """configs/jbond.yaml through the CLI, on the quickstart's models and rule judge."""
    result = run_fit(REPO / "configs" / "jbond.yaml", tiny_dir, tmp_path)
    summary = json.loads((tmp_path / "bond" / "summary.json").read_text())["iterations"]
    assert len(summary) == 48  # on-policy: one iteration (a fresh draw) per optimizer step
    console = result.stdout + result.stderr  # ties are counted in the summary, and it ends as SPPO's runs do
    assert "tied comparison" not in console and "Self-play summary (also in" in console and "Report: " in console
    assert f"checkpoints (resume with --ckpt_path last): {tmp_path / 'checkpoints'}" in console
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    win_rates = [row["win_rate_vs_initial"] for row in summary if "win_rate_vs_initial" in row]
    assert len(win_rates) == 3  # every 16 iterations
    assert win_rates[-1] > 0.6 and win_rates[-1] > win_rates[0], win_rates
    assert (tmp_path / "hf_model" / "model.safetensors").exists()


def test_jbond_runs_on_the_qlora_footprint(tmp_path):
    """J-BOND on a 4-bit base: policy and anchor are two LoRA adapters on it, the EMA moves the anchor's."""
    from sppo_lightning.models import is_quantized
    from sppo_lightning.testing import make_tiny_llama

    model = str(make_tiny_llama(tmp_path / "llama64", hidden_size=64))  # bitsandbytes' CPU blocks need 64
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in ["Hi", "Name a color.", "Why?"]))
    datamodule, trainer = bond_run(FunctionJudge("sppo_lightning.ranking.judges:shorter"), prompts, model, 2,
                                   [EMAAnchor(0.5)], n=3, max_new_tokens=6, generation_batch_size=2,
                                   run_dir=tmp_path / "bond", max_epochs=1, step_folders=True)
    module = BondModule(model, footprint="qlora", lr=1e-2, lora=LoraSettings(r=4, alpha=8))
    module.configure_model()
    before = [a.detach().clone() for a, _ in module.anchor_parameter_pairs()]
    trainer.fit(module, datamodule=datamodule)
    assert is_quantized(module.policy) and module.anchor is None
    after = [a for a, _ in module.anchor_parameter_pairs()]
    assert any(not torch.equal(a, b) for a, b in zip(after, before))  # the EMA moved the anchor adapter
    assert (tmp_path / "bond" / "iteration_1" / "train.parquet").exists()


def test_bond_refuses_fsdp_in_one_line(tiny_llama):
    with pytest.raises(ConfigError, match="does not support footprint 'fsdp' yet"):
        BondModule(tiny_llama, footprint="fsdp")


# ---------------------------------------------------------------- the shared policy builder on BondModule
def test_bond_lora_checkpoint_holds_both_adapters_only_and_loads_back(tiny_llama):
    module = BondModule(tiny_llama, lora=LoraSettings(r=4, alpha=8))
    module.configure_model()
    with torch.no_grad():  # policy and anchor adapters differ, as after training
        for anchor, policy in module.anchor_parameter_pairs():
            policy.add_(0.1)
            anchor.sub_(0.1)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    keys = set(checkpoint["state_dict"])
    assert keys and all("lora_" in k for k in keys)  # no base weight
    assert any(".anchor." in k for k in keys) and any(".default." in k for k in keys)
    restored = BondModule(tiny_llama, lora=LoraSettings(r=4, alpha=8))
    restored.configure_model()
    restored.on_load_checkpoint(checkpoint)
    restored.load_state_dict(checkpoint["state_dict"], strict=restored.strict_loading)
    for (a, p), (a2, p2) in zip(module.anchor_parameter_pairs(), restored.anchor_parameter_pairs()):
        assert torch.equal(a, a2) and torch.equal(p, p2)
    other = BondModule(tiny_llama, lora=LoraSettings(r=8, alpha=8))
    other.configure_model()
    other.on_load_checkpoint({"state_dict": dict(checkpoint["state_dict"])})  # same names: the key check passes
    with pytest.raises(RuntimeError, match="size mismatch for policy.*lora_A"):  # the rank-4 tensors do not fit rank 8
        other.load_state_dict(checkpoint["state_dict"], strict=False)


def test_bond_warns_when_over_its_memory_budget(tiny_llama):
    module = BondModule(tiny_llama, memory_budget_gib=1e-6)
    with pytest.warns(UserWarning, match=r"footprint 'full' of .* needs about .* more than the 0.0 GiB"):
        module.configure_model()


class _NaNReward(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            batch["reward"][:] = float("nan")


@pytest.mark.parametrize("mode", ["skip", "stop"])
def test_bond_non_finite_loss_skips_or_stops(tmp_path, tiny_llama, mode):
    from sppo_lightning.errors import TrainingError

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in ["Hi", "Name a color.", "Why?", "Go"]))
    module = BondModule(tiny_llama, lr=1e-2, on_non_finite=mode)
    datamodule, trainer = bond_run(FunctionJudge("sppo_lightning.ranking.judges:shorter"), prompts, tiny_llama, 2,
                                   [_NaNReward()], max_new_tokens=4, run_dir=tmp_path / "bond", max_epochs=1,
                                   default_root_dir=tmp_path)
    if mode == "stop":
        with pytest.raises(TrainingError, match=r"non-finite loss nan at step 0 \(epoch 0, batch 0, prompts \[0, 1\]\)"):
            trainer.fit(module, datamodule=datamodule)
        assert (tmp_path / "last_finite.ckpt").exists()
    else:
        trainer.fit(module, datamodule=datamodule)
        assert module.skipped_non_finite == 1


# ---------------------------------------------------------------- on-policy draws, shards, resume


def fit_bond(tmp_path, tiny_llama, ranker, run_dir, epochs=1, batch_size=2, prompts_per_iteration=None, **options):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in
                               ["Hi", "Name a color.", "Why?", "Say yes.", "Count to two.", "Be kind."]))
    datamodule, trainer = bond_run(ranker, prompts, tiny_llama, batch_size, [EMAAnchor(0.1)], prompts_per_iteration,
                                   max_new_tokens=6, generation_batch_size=2, run_dir=run_dir, max_epochs=epochs,
                                   **options)
    trainer.fit(BondModule(tiny_llama, lr=1e-3), datamodule=datamodule)


def test_on_policy_draws_one_step_of_prompts_per_iteration(tmp_path, tiny_llama):
    import pyarrow.parquet as pq

    fit_bond(tmp_path, tiny_llama, CountingJudge(), tmp_path / "bond", epochs=3, step_folders=True)
    texts = [[g["prompt"] for g in pq.read_table(tmp_path / "bond" / f"iteration_{t + 1}" / "generations.parquet")
              .to_pylist()] for t in range(3)]
    assert texts == [["Hi", "Name a color."], ["Why?", "Say yes."], ["Count to two.", "Be kind."]]
    summary = json.loads((tmp_path / "bond" / "summary.json").read_text())["iterations"]
    assert [r["iteration"] for r in summary] == [1, 2, 3]


def test_several_steps_per_draw_is_an_explicit_warned_option(tmp_path, tiny_llama):
    with pytest.warns(UserWarning, match="on_policy is false: each draw of samples trains 3 optimizer steps"):
        fit_bond(tmp_path, tiny_llama, CountingJudge(), tmp_path / "bond", on_policy=False)
    with pytest.raises(ConfigError, match="on_policy makes each iteration one optimizer step's prompts"):
        fit_bond(tmp_path, tiny_llama, CountingJudge(), tmp_path / "other", prompts_per_iteration=4)


def test_bond_stages_stream_in_shards_and_shards_change_nothing(tmp_path, tiny_llama):
    import pyarrow.parquet as pq

    whole, sharded = CountingJudge(), CountingJudge()
    options = dict(on_policy=False, tie_rule="coin", variant="bond", n=2, quantile_samples=2)
    with pytest.warns(UserWarning, match="on_policy is false"):
        fit_bond(tmp_path, tiny_llama, whole, tmp_path / "whole", **options)
        fit_bond(tmp_path, tiny_llama, sharded, tmp_path / "shards", generation_shard_size=2, **options)
    for stage in ("generations", "train"):
        a = pq.read_table(tmp_path / "whole" / "iteration_1" / f"{stage}.parquet").to_pylist()
        b = pq.read_table(tmp_path / "shards" / "iteration_1" / f"{stage}.parquet").to_pylist()
        assert a == b and len(a) == 6
    # the judge saw one shard at a time (2 prompts; the quantile call has k = 2 rows per prompt)
    assert max(whole.sizes) == 12 and max(sharded.sizes) == 4
    manifest = json.loads((tmp_path / "shards" / "iteration_1" / "manifest.json").read_text())
    assert manifest["stages"]["train"]["shards"] == 3 and not list((tmp_path / "shards").glob("*/*.shard_*"))


def test_gamma_adds_the_anchor_kl_term_to_the_training_loss(tiny_llama):
    from sppo_lightning import losses
    from sppo_lightning.data.tokenize import collate_pairs
    from sppo_lightning.logprobs import model_logprobs

    rows = [{"prompt_ids": [1, 40, 41], "chosen_ids": [42, 43, 2], "rejected_ids": [44, 2], "reward": 0.0},
            {"prompt_ids": [1, 45], "chosen_ids": [46, 2], "rejected_ids": [47, 48, 2], "reward": -2.77}]
    batch = collate_pairs(rows, 0)
    plain, regularised = BondModule(tiny_llama), BondModule(tiny_llama, gamma=2.0)
    for module in (plain, regularised):
        module.configure_model()
        module.log = module.log_dict = lambda *a, **k: None
    regularised.load_state_dict(plain.state_dict())
    with torch.no_grad():  # the policy moves away from the anchor, as after training
        for p in regularised.policy.parameters():
            p.add_(0.01)
        for p, q in zip(plain.policy.parameters(), regularised.policy.parameters()):
            p.copy_(q)
    half = batch["input_ids"].shape[0] // 2
    sample = {k: batch[k][half:] for k in ("input_ids", "attention_mask", "labels")}
    with torch.no_grad():
        policy = model_logprobs(regularised.policy, sample).sum
        anchor = model_logprobs(regularised.anchor, sample).sum
    expected = 2.0 * losses.anchor_kl_surrogate(policy, anchor).mean()
    difference = regularised.training_step(batch, 0) - plain.training_step(batch, 0)
    torch.testing.assert_close(difference.detach().double(), expected.double(), atol=1e-4, rtol=1e-4)
    assert expected.abs() > 0
    with pytest.raises(ConfigError, match="model.gamma must be >= 0"):
        BondModule(tiny_llama, gamma=-1.0)


def test_jbond_samples_with_any_generator(tmp_path, tiny_llama):
    """Linear Alignment as J-BOND's generator: policy and anchor samples steered by the principle."""
    import pyarrow.parquet as pq

    from sppo_lightning.decoding import LinearAlignmentGenerator

    generator = LinearAlignmentGenerator("Be brief.", alpha=2.0, temperature=1.0, top_p=1.0, max_new_tokens=6,
                                         batch_size=2)
    fit_bond(tmp_path, tiny_llama, CountingJudge(), tmp_path / "aligned", generator=generator, step_folders=True)
    fit_bond(tmp_path, tiny_llama, CountingJudge(), tmp_path / "plain", step_folders=True)
    manifest = json.loads((tmp_path / "aligned" / "iteration_1" / "manifest.json").read_text())
    assert manifest["settings"]["generator"]["class"] == "LinearAlignmentGenerator"
    aligned, plain = (pq.read_table(tmp_path / run / "iteration_1" / "generations.parquet").to_pylist()
                      for run in ("aligned", "plain"))
    assert [g["anchor_ids"] for g in aligned] != [g["anchor_ids"] for g in plain]


def test_export_writes_a_lora_jbond_checkpoints_policy_or_its_anchor(tiny_llama, tmp_path):
    """`sppo-lightning export` of a J-BOND LoRA checkpoint: the policy's adapter merged, or with --anchor
    the anchor's (the two adapters on one base); a PreferenceModule-only flag on it is one line."""
    from transformers import AutoModelForCausalLM

    from tests.helpers import run_cli as run

    module = BondModule(tiny_llama, lora=LoraSettings(r=4, alpha=8))
    module.configure_model()
    with torch.no_grad():
        for anchor, policy in module.anchor_parameter_pairs():
            policy.add_(0.05)
            anchor.sub_(0.05)
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                  "pytorch-lightning_version": L.__version__}
    module.on_save_checkpoint(checkpoint)  # what a fit's checkpoint holds: the two adapters
    path = tmp_path / "jbond_lora.ckpt"
    torch.save(checkpoint, path)
    assert run("export", path, tmp_path / "policy").stdout.strip().endswith(
        f"Exported the policy in Hugging Face format to {tmp_path / 'policy'}")
    assert "Exported the J-BOND anchor" in run("export", path, tmp_path / "anchor", "--anchor").stdout
    module.eval()
    with module.anchor_model() as anchor:
        want_anchor = logits(anchor)
    want_policy = logits(module.policy)
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "policy")), want_policy,
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "anchor")), want_anchor,
                               rtol=1e-4, atol=1e-4)
    assert not torch.allclose(want_policy, want_anchor, atol=1e-3)
