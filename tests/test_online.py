"""OnlinePairs (sppo_lightning/methods/online.py): K samples per prompt at every step, best against worst."""

import json
import signal
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from sppo_lightning.data.prompts import load_prompts
from sppo_lightning.data.tokenize import collate_pairs
from sppo_lightning.distributed import DistContext
from sppo_lightning.errors import ConfigError, SettingsMismatch
from sppo_lightning.logprobs import model_logprobs
from sppo_lightning.methods import OnlinePairs
from sppo_lightning.policies import Policies
from sppo_lightning.pipeline import HFGenerator
from sppo_lightning.ranking import FunctionJudge
from tests.helpers import REPO, assert_same_run, run_fit

QUESTIONS = ["Tell me about the moon.", "What is 2 plus 3?", "Why is the sky blue?", "Name a color."]


@pytest.fixture()
def prompts(tmp_path, tokenizer):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in QUESTIONS))
    return load_prompts(str(path), tokenizer, 32)[0]


def online(reference="module", **settings):
    return OnlinePairs(FunctionJudge("sppo_lightning.ranking.judges:shorter"),
                       HFGenerator(max_new_tokens=8, batch_size=2, show_progress=False), reference=reference,
                       **{"num_samples": 4, **settings})


@pytest.mark.parametrize("reference, logps", [("module", "forward"), ("iteration", "forward"), ("iteration", "sampler")])
def test_pairs_are_the_best_and_worst_of_k_samples(tmp_path, tiny_llama, tokenizer, prompts, reference, logps):
    policy = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    data = online(reference, step_folders=True, reference_logps=logps).build(0, prompts, Policies(policy), tokenizer,
                                                                            DistContext(), tmp_path)
    folder = tmp_path / "iteration_1"
    generations = pq.read_table(folder / "generations.parquet").to_pylist()
    assert all(len(g["responses"]) == 4 for g in generations)
    by_prompt = {g["prompt_index"]: g for g in generations}
    train = pq.read_table(folder / "train.parquet").to_pylist()
    assert len(train) == data.stats["pairs"] == len(QUESTIONS) - data.stats["ties_dropped"]
    for row in train:  # the judge prefers shorter: chosen is a shortest response, rejected a longest
        lengths = [len(r) for r in by_prompt[row["prompt_index"]]["responses"]]
        assert len(row["chosen"][-1]["content"]) == min(lengths) and len(row["rejected"][-1]["content"]) == max(lengths)
    served = set(data.pairs.column_names)
    assert ("reference" in data.stats["seconds"]) is (reference == "iteration")  # no "reference 0.0s" line
    if reference == "module":  # the module's reference (the initial policy) scores them: nothing cached
        assert not any(c.startswith("reference_") for c in served)
    else:  # π_t's own log-probs, cached with the pairs
        batch = collate_pairs(train, tokenizer.pad_token_id)
        with torch.no_grad():
            expected = model_logprobs(policy, batch).sum
        stored = torch.tensor([r["reference_chosen_logps"] for r in train] + [r["reference_rejected_logps"] for r in train])
        torch.testing.assert_close(stored, expected, atol=1e-4, rtol=0)
    assert json.loads((folder / "manifest.json").read_text())["stats"]["pairs"] == data.stats["pairs"]


@pytest.mark.parametrize("reference", ["module", "iteration"])
def test_a_step_drawn_in_memory_equals_the_one_in_a_folder_and_writes_one_line(tmp_path, tiny_llama, tokenizer,
                                                                                prompts, reference):
    policy = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    draws = {}
    for folders in (True, False):
        run = tmp_path / f"folders_{folders}"
        draws[folders] = online(reference, step_folders=folders).build(0, prompts, Policies(policy), tokenizer,
                                                                      DistContext(), run)
    kept, memory = draws[True], draws[False]
    assert memory.pairs.column_names == kept.pairs.column_names and memory.pairs.to_list() == kept.pairs.to_list()
    drop = lambda stats: {k: v for k, v in stats.items() if k != "seconds"}  # noqa: E731
    assert drop(memory.stats) == drop(kept.stats) and memory.stats["seconds"].keys() == kept.stats["seconds"].keys()
    run = tmp_path / "folders_False"
    assert sorted(p.name for p in run.iterdir()) == ["steps.jsonl", "steps_settings.json"]  # no iteration_1/
    (line,) = [json.loads(x) for x in (run / "steps.jsonl").read_text().splitlines()]
    assert line["iteration"] == 1 and drop(line["stats"]) == drop(memory.stats)
    assert line["plugins"]["method"] == "OnlinePairs"
    with pytest.raises(SettingsMismatch, match="num_samples differ"):  # the run's settings are checked, as a manifest's
        online(reference, num_samples=3).build(1, prompts, Policies(policy), tokenizer, DistContext(), run)


def test_impossible_settings_are_one_line():
    with pytest.raises(ConfigError, match="num_samples .K. must be an integer of at least 2"):
        online(num_samples=1)
    with pytest.raises(ConfigError, match="reference must be module or iteration"):
        online(reference="copy")
    method = online()
    assert method.prompts_per_iteration(4, None, 1, 64) == 4  # one optimizer step's prompts
    with pytest.raises(ConfigError, match="on_policy makes each iteration one optimizer step's prompts"):
        method.prompts_per_iteration(4, 16, 1, 64)


def test_the_online_recipe_raises_the_win_rate(tiny_dir, tmp_path):
    """configs/online.yaml as shipped, through the CLI, on the quickstart's tiny models and judge."""
    run_fit(REPO / "configs" / "online.yaml", tiny_dir, tmp_path)
    summary = json.loads((tmp_path / "online" / "summary.json").read_text())["iterations"]
    assert [r["iteration"] for r in summary] == list(range(1, 33))  # one iteration (a fresh draw) per step
    win_rates = [r["win_rate_vs_initial"] for r in summary if "win_rate_vs_initial" in r]
    assert len(win_rates) == 4 and win_rates[-1] > 0.55 and win_rates[-1] > win_rates[0], win_rates
    assert (tmp_path / "online" / "report.md").exists()


def short_online_config(tmp_path: Path) -> Path:
    data = yaml.safe_load((REPO / "configs" / "online.yaml").read_text())
    data["trainer"]["max_epochs"] = 6
    data["self_play"]["eval_every"] = 3
    path = tmp_path / "online_source.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_killed_online_run_resumes_to_the_same_result(tiny_dir, tmp_path):
    baseline = tmp_path / "baseline"
    baseline.mkdir()
    run_fit(short_online_config(baseline), tiny_dir, baseline)
    killed = tmp_path / "killed"
    killed.mkdir()
    config, marker = short_online_config(killed), killed / "marker"
    first = run_fit(config, tiny_dir, killed, "--trainer.callbacks+=tests.kill_switch.KillSwitch",
                    f"--trainer.callbacks.marker={marker}", "--trainer.callbacks.epoch=4",
                    "--trainer.callbacks.batch=0", check=False)
    assert first.returncode == -signal.SIGKILL and marker.exists()
    run_fit(config, tiny_dir, killed, "--ckpt_path", "last")
    assert_same_run(baseline, killed, steps=6)
    rows = json.loads((killed / "online" / "summary.json").read_text())["iterations"]
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4, 5, 6]



def test_a_step_whose_prompts_all_tie_trains_on_nothing_and_the_run_goes_on(tiny_dir, tmp_path):
    """A real-model step of 8 IFBench prompts whose 4 answers all follow the same instructions tied
    throughout and stopped the run; like GRPO's all-equal groups, such a step has no pair and no update."""
    config = short_online_config(tmp_path)
    data = yaml.safe_load(config.read_text())
    data["data"]["init_args"]["method"]["init_args"]["ranker"]["init_args"]["function"] = "tests.judges:first_step_only"
    data["trainer"]["max_epochs"] = 3
    data["self_play"]["eval_every"] = 2
    config.write_text(yaml.safe_dump(data))
    result = run_fit(config, tiny_dir, tmp_path)
    assert "iteration 2: all 4 prompts tied (their 4 responses scored the same): this step trains on nothing" in \
        result.stderr
    assert "`training_step` returned `None`" not in result.stderr  # Lightning's hint: our line says it
    rows = json.loads((tmp_path / "online" / "summary.json").read_text())["iterations"]
    assert [(r["iteration"], r["pairs"], r["ties_dropped"]) for r in rows] == [(1, 1, 3), (2, 0, 4), (3, 0, 4)]
    assert rows[0]["final_loss"] is not None and rows[1]["final_loss"] is None is rows[2]["final_loss"]
    assert "reference" not in rows[0]["seconds"]
    losses = [json.loads(line) for line in (tmp_path / "online" / "losses.jsonl").read_text().splitlines()]
    assert [(r["step"], r["iteration"]) for r in losses] == [(1, 1)]  # steps 2 and 3 made no update
