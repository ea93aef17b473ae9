"""SPPO as a method of SelfPlayDataModule, with the SelfPlay boundary callback, through a real Trainer
on the tiny model."""

import json

import lightning as L
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM

import sppo_lightning.pipeline.generators as generators_module
from sppo_lightning.datamodules import SelfPlayDataModule
from sppo_lightning.data.tokenize import collate_pairs
from sppo_lightning.errors import ConfigError, DataError
from sppo_lightning.logprobs import sequence_logprobs
from sppo_lightning.module import PreferenceModule
from sppo_lightning.methods import SPPO
from sppo_lightning.methods.sppo import TRAINING_COLUMNS
from sppo_lightning.ranking import FunctionJudge
from tests import self_play_setup
from tests.helpers import CountingJudge, QUESTIONS, fit_self_play as fit, write_prompts


def test_two_iterations_write_official_schema_and_summary(tmp_path, tiny_llama):
    fit(tmp_path, tiny_llama, max_epochs=2)
    run_dir = tmp_path / "self_play"
    for t in (0, 1):
        folder = run_dir / f"iteration_{t + 1}"
        for stage in ("generations", "rankings", "train"):
            assert (folder / f"{stage}.parquet").exists()
        generations = pq.read_table(folder / "generations.parquet").to_pylist()
        assert len(generations) == len(QUESTIONS) and all(len(g["responses"]) == 3 for g in generations)
        rankings = pq.read_table(folder / "rankings.parquet").to_pylist()
        assert all(len(r["pairwise_logits"]) == 3 and len(r["rm_scores"]) == 3 for r in rankings)
        train = pq.read_table(folder / "train.parquet")
        official = {"chosen", "rejected", "chosen_probs", "chosen_probs_win", "chosen_probs_lose",
                    "generate_0", "generate_1", "generate_2", "probability", "rm_scores"}
        ours = {"reference_chosen_logps", "reference_rejected_logps", "chosen_ids", "rejected_ids", "prompt_ids"}
        assert official | ours <= set(train.column_names)
        for row in train.to_pylist():
            assert row["chosen"][-1]["role"] == "assistant" and row["chosen"][:-1] == row["rejected"][:-1]
            assert row["chosen_probs_win"] >= 0.5 >= row["chosen_probs_lose"]
            assert row["chosen_ids"] != row["rejected_ids"]
            # the judge prefers shorter: chosen is the shortest of the K responses
            assert len(row["chosen"][-1]["content"]) == min(len(g[-1]["content"]) for g in
                                                            (row[f"generate_{k}"] for k in range(3)))
    summary = json.loads((run_dir / "summary.json").read_text())["iterations"]
    assert [r["iteration"] for r in summary] == [1, 2]
    for row in summary:
        assert 0.0 <= row["win_rate_vs_initial"] <= 1.0
        assert set(row["seconds"]) >= {"generate", "rank", "reference", "train"}
        assert row["final_loss"] is not None and row["pairs"] + row["ties_dropped"] == len(QUESTIONS)
    # iteration 2 sampled from the trained policy, not the initial one
    first = pq.read_table(run_dir / "iteration_1" / "generations.parquet").column("response_ids").to_pylist()
    second = pq.read_table(run_dir / "iteration_2" / "generations.parquet").column("response_ids").to_pylist()
    assert first != second


def test_the_train_time_does_not_include_the_evaluation(tmp_path, tiny_llama):
    # 48 evaluation samples (3 held-out prompts x 16), generated and ranked, against 2 optimizer
    # steps: the evaluation takes longer than the training, so a train time that included it (as it
    # once did) could not be the smaller.
    fit(tmp_path, tiny_llama, eval_samples=16, max_new_tokens=16)
    seconds = json.loads((tmp_path / "self_play" / "summary.json").read_text())["iterations"][0]["seconds"]
    assert 0 < seconds["train"] < seconds["evaluate"], seconds


def test_reference_logps_are_the_sampling_policy(tmp_path, tiny_llama, tokenizer):
    _, module, _ = fit(tmp_path, tiny_llama)
    assert module.reference is None  # cached mode holds no reference model
    pairs = pq.read_table(tmp_path / "self_play" / "iteration_1" / "train.parquet").to_pylist()
    initial = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    with torch.no_grad():
        logits = initial(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = sequence_logprobs(logits, batch["labels"]).sum
    stored = torch.tensor([p["reference_chosen_logps"] for p in pairs] + [p["reference_rejected_logps"] for p in pairs])
    torch.testing.assert_close(stored, expected, atol=1e-4, rtol=0)


def test_a_restarted_run_reuses_finished_stages(tmp_path, tiny_llama, monkeypatch, caplog):
    fit(tmp_path, tiny_llama)
    folder = tmp_path / "self_play" / "iteration_1"
    before = pq.read_table(folder / "train.parquet").to_pylist()
    (folder / "train.parquet").unlink()  # as if killed while writing the last stage

    calls = []
    real = generators_module.sample_on_ranks
    monkeypatch.setattr(generators_module, "sample_on_ranks", lambda *a, **k: calls.append(1) or real(*a, **k))
    ranker = FunctionJudge("sppo_lightning.ranking.judges:shorter")
    ranked = []
    real_rank = ranker.pairwise_logits
    ranker.pairwise_logits = lambda prompts, cands: ranked.append(1) or real_rank(prompts, cands)
    caplog.clear()
    with caplog.at_level("INFO"):
        fit(tmp_path, tiny_llama, ranker=ranker)
    # Only the end-of-iteration win rate samples and ranks again: generation, ranking and the
    # initial policy's evaluation answers were all reused, each said in one line.
    assert len(calls) == 1 and len(ranked) == 1
    said = [r.getMessage() for r in caplog.records]
    assert "iteration_1: reusing generations (6 rows, finished earlier)" in said
    assert "iteration_1: reusing rankings (6 rows, finished earlier)" in said
    assert not any("reusing train" in line for line in said)  # it was deleted: made again
    assert pq.read_table(folder / "train.parquet").to_pylist() == before


def test_a_stage_file_without_a_column_it_needs_is_one_line_even_with_a_matching_checksum(tmp_path, tiny_llama):
    import hashlib

    fit(tmp_path, tiny_llama)
    folder = tmp_path / "self_play" / "iteration_1"
    rankings = folder / "rankings.parquet"
    pq.write_table(pq.read_table(rankings).drop_columns(["rm_scores"]), rankings)  # crafted, or other code's
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["stages"]["rankings"]["sha256"] = hashlib.sha256(rankings.read_bytes()).hexdigest()
    del manifest["stages"]["train"]  # the pairs are made again from the rankings
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=rf"{rankings}: row 1 has no column 'rm_scores': not a stage file this code "
                                        rf"wrote \(edited, or from other code\?\); remove {folder} to redo"):
        fit(tmp_path, tiny_llama)


def test_same_seed_same_data(tmp_path, tiny_llama):
    fit(tmp_path, tiny_llama, run_dir=tmp_path / "a")
    fit(tmp_path, tiny_llama, run_dir=tmp_path / "b")
    a = pq.read_table(tmp_path / "a" / "iteration_1" / "generations.parquet").to_pylist()
    b = pq.read_table(tmp_path / "b" / "iteration_1" / "generations.parquet").to_pylist()
    assert a == b


def test_shards_change_no_stage_hold_one_shard_and_are_merged(tmp_path, tiny_llama):
    whole_judge, shard_judge = CountingJudge(), CountingJudge()
    fit(tmp_path, tiny_llama, ranker=whole_judge, run_dir=tmp_path / "whole")
    trainer, _, _ = fit(tmp_path, tiny_llama, ranker=shard_judge, run_dir=tmp_path / "shards",
                        generation_shard_size=3)  # rounds up to 4 (a batch): shards of 4 and 2 prompts
    for stage in ("generations", "rankings", "train"):
        whole = pq.read_table(tmp_path / "whole" / "iteration_1" / f"{stage}.parquet").to_pylist()
        shards = pq.read_table(tmp_path / "shards" / "iteration_1" / f"{stage}.parquet").to_pylist()
        assert len(whole) == len(shards) == len(QUESTIONS)
        for a, b in zip(whole, shards):
            for key in ("reference_chosen_logps", "reference_rejected_logps"):  # other batches, other padding
                if key in a:
                    assert a.pop(key) == pytest.approx(b.pop(key), rel=1e-5)
            assert a == b
    # Ranking saw one shard at a time (the 3s are the win-rate evaluation's held-out prompts).
    assert max(whole_judge.sizes) == 6 and sorted(set(shard_judge.sizes)) == [2, 3, 4]
    folder = tmp_path / "shards" / "iteration_1"
    assert not list(folder.glob("*.shard_*"))  # merged, then removed
    manifest = json.loads((folder / "manifest.json").read_text())
    assert [manifest["stages"][s]["shards"] for s in ("generations", "rankings", "train")] == [2, 2, 2]
    assert pq.ParquetFile(folder / "train.parquet").num_row_groups == 2
    assert not [k for k in manifest["stages"] if "shard" in k]
    # Training reads train.parquet's training columns memory-mapped from an Arrow file, not a list.
    served = trainer.datamodule.current.pairs
    (arrow,) = folder.glob("train.*.arrow")
    assert [f["filename"] for f in served.cache_files] == [str(arrow)]
    train = pq.read_table(folder / "train.parquet").to_pylist()
    assert [dict(served[i]) for i in range(len(served))] == [{k: r[k] for k in served.column_names} for r in train]
    assert set(served.column_names) == set(TRAINING_COLUMNS)


def half_ties(prompt, response):
    return 1.0 if "plus" in prompt else -float(len(response))


def test_tied_prompts_are_dropped_and_counted(tmp_path, tiny_llama):
    ranker = FunctionJudge(f"{__name__}:half_ties")
    fit(tmp_path, tiny_llama, ranker=ranker)
    manifest = json.loads((tmp_path / "self_play" / "iteration_1" / "manifest.json").read_text())
    assert manifest["stages"]["train"]["ties_dropped"] == 2  # the two "plus" prompts
    train = pq.read_table(tmp_path / "self_play" / "iteration_1" / "train.parquet").to_pylist()
    assert len(train) == len(QUESTIONS) - 2 and all("plus" not in r["prompt"] for r in train)


def constant(prompt, response):
    return 0.0


def test_all_ties_is_a_clear_error(tmp_path, tiny_llama):
    with pytest.raises(DataError, match=r"iteration 1: all 6 prompts tied"):
        fit(tmp_path, tiny_llama, ranker=FunctionJudge(f"{__name__}:constant"))


class NaNRanker:
    """NaN for the last prompt (index 5, row 6) only."""

    prompt_view = "raw"

    def fingerprint(self):
        return {"class": "NaNRanker"}

    def pairwise_logits(self, prompts, candidates):
        m = torch.zeros(len(prompts), len(candidates[0]), len(candidates[0]))
        for n, prompt in enumerate(prompts):
            if "dog" in prompt:
                m[n, 0, 1] = float("nan")
        return m


@pytest.mark.parametrize("shard_size", [512, 4])
def test_a_nan_ranker_is_an_error_and_keeps_the_generations(tmp_path, tiny_llama, shard_size):
    with pytest.raises(DataError, match="prompt row 6: the ranker returned a non-finite score"):
        fit(tmp_path, tiny_llama, ranker=NaNRanker(), generation_shard_size=shard_size)
    manifest = json.loads((tmp_path / "self_play" / "iteration_1" / "manifest.json").read_text())
    finished = {"generations", "rankings"} | ({"train.shard_00000"} if shard_size == 4 else set())
    assert set(manifest["stages"]) == finished  # nothing lost, nothing trained on


@pytest.mark.parametrize("options, message", [
    ({"num_samples": 1}, "num_samples .K. must be at least 2"),
    ({"top_p": 0.0}, "top_p"),
    ({"temperature": 0.0}, "temperature"),
])
def test_impossible_settings(tmp_path, tiny_llama, options, message):
    with pytest.raises(ConfigError, match=message):
        fit(tmp_path, tiny_llama, **options)


class RecordLR(L.Callback):
    def __init__(self):
        self.lrs = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_optimizer_and_schedule_restart_every_iteration(tmp_path, tiny_llama):
    record = RecordLR()
    fit(tmp_path, tiny_llama, max_epochs=2, callbacks=[record])
    # 6 pairs at most, 4 per batch: 2 steps per iteration, warmup 1 step, then linear decay.
    assert record.lrs == pytest.approx([0.0, 1e-3, 0.0, 1e-3])


def test_epochs_per_iteration(tmp_path, tiny_llama, monkeypatch):
    calls = []
    real = generators_module.sample_on_ranks
    monkeypatch.setattr(generators_module, "sample_on_ranks",
                        lambda model, tok, ids, k, **kw: calls.append(k) or real(model, tok, ids, k, **kw))
    fit(tmp_path, tiny_llama, max_epochs=4, epochs_per_iteration=2, eval_samples=2)
    folders = sorted(p.name for p in (tmp_path / "self_play").glob("iteration_*"))
    assert folders == ["iteration_1", "iteration_2"]
    summary = json.loads((tmp_path / "self_play" / "summary.json").read_text())["iterations"]
    assert [r["iteration"] for r in summary] == [1, 2]
    assert calls.count(3) == 2  # K samples: once per iteration, not per epoch


def test_self_play_data_module_needs_the_callback_and_reloads(tmp_path, tiny_llama):
    method = SPPO(FunctionJudge("sppo_lightning.ranking.judges:shorter"))
    datamodule = SelfPlayDataModule(method, prompts=write_prompts(tmp_path / "p.jsonl", QUESTIONS), tokenizer=tiny_llama)
    module = PreferenceModule(tiny_llama, reference="cached")
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        reload_dataloaders_every_n_epochs=1)
    with pytest.raises(ConfigError, match="needs the SelfPlay callback"):
        trainer.fit(module, datamodule=datamodule)
    trainer = self_play_setup.trainer(max_epochs=1, callbacks=[self_play_setup.SelfPlay()],
                                      reload_dataloaders_every_n_epochs=0)
    with pytest.raises(ConfigError, match="set trainer.reload_dataloaders_every_n_epochs to 1"):
        trainer.fit(module, datamodule=datamodule)


def test_the_memory_estimate_uses_the_runs_own_lengths_and_batch(tmp_path):
    from sppo_lightning.pipeline import HFGenerator

    method = SPPO(FunctionJudge("sppo_lightning.ranking.judges:shorter"), HFGenerator(max_new_tokens=100))
    datamodule = SelfPlayDataModule(method, prompts="p.jsonl", max_prompt_length=50, batch_size=3)
    assert (datamodule.max_length, datamodule.batch_size) == (150, 3)  # what policy.py's estimate reads


def test_a_torn_last_loss_line_never_blocks_a_resume(tmp_path):
    """losses.jsonl is appended to: a crash mid-write leaves a cut last line, dropped with a warning."""
    from sppo_lightning.loss_record import keep_steps_up_to

    path = tmp_path / "losses.jsonl"
    path.write_text('{"step": 1, "iteration": 1, "loss": 0.5}\n{"step": 2, "iteration": 1, "loss": 0.4}\n{"step": 3, "it')
    with pytest.warns(UserWarning, match=r"dropped 1 unreadable line\(s\)"):
        keep_steps_up_to(path, 2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]


def test_a_loss_record_that_links_outside_is_never_written_through(tmp_path):
    from sppo_lightning.loss_record import keep_steps_up_to

    outside = tmp_path / "outside.txt"
    outside.write_text("not yours\n")
    path = tmp_path / "run" / "losses.jsonl"
    path.parent.mkdir()
    path.symlink_to(outside)
    with pytest.warns(UserWarning, match="is a symbolic link .* removed"):
        keep_steps_up_to(path, 0)
    assert not path.exists() and outside.read_text() == "not yours\n"


def test_links_out_of_the_run_folder_are_removed_at_start_up_and_their_targets_untouched(tmp_path, tiny_llama):
    fit(tmp_path, tiny_llama)
    run_dir = tmp_path / "self_play"
    generations = run_dir / "iteration_1" / "generations.parquet"
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "generations.parquet").write_bytes(generations.read_bytes())
    (outside / "notes.txt").write_text("not yours\n")
    generations.unlink()
    generations.symlink_to(outside / "generations.parquet")
    (run_dir / "losses.jsonl").unlink()
    (run_dir / "losses.jsonl").symlink_to(outside / "notes.txt")
    (run_dir / "iteration_1" / "inside.parquet").symlink_to(run_dir / "iteration_1" / "rankings.parquet")
    before = {p.name: p.read_bytes() for p in outside.iterdir()}
    with pytest.warns(UserWarning) as said:
        fit(tmp_path, tiny_llama)
    lines = [str(w.message) for w in said if "symbolic link" in str(w.message)]
    assert len(lines) == 2 and all("outside the run folder: removed (its target is untouched)" in line for line in lines)
    assert {p.name: p.read_bytes() for p in outside.iterdir()} == before  # nothing outside read into or written
    assert not generations.is_symlink() and generations.exists()  # made again, the run's own
    assert (run_dir / "iteration_1" / "inside.parquet").is_symlink()  # a link inside the folder is left alone


def test_a_damaged_summary_is_rebuilt_from_the_iterations_folders(tmp_path, tiny_llama):
    fit(tmp_path, tiny_llama)
    path = tmp_path / "self_play" / "summary.json"
    (row,) = json.loads(path.read_text())["iterations"]
    path.write_text('{"iterations": [{"iteration": 1, "pai')
    with pytest.warns(UserWarning, match="kept as summary.json.damaged, and the summary is rebuilt"):
        fit(tmp_path, tiny_llama, max_epochs=0)  # set-up alone: no iteration runs
    (rebuilt,) = json.loads(path.read_text())["iterations"]
    assert {k: rebuilt[k] for k in ("iteration", "pairs", "ties_dropped", "chosen_p_win", "final_loss")} == \
        {k: row[k] for k in ("iteration", "pairs", "ties_dropped", "chosen_p_win", "final_loss")}
    assert "win_rate_vs_initial" not in rebuilt  # measured before, kept in summary.json.damaged
    assert (path.parent / "summary.json.damaged").read_text().startswith('{"iterations": [{"iteration": 1')
