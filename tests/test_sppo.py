"""methods/sppo.py: its settings checked in one line each, which generators sample π_t from an
export, and π_t's log-probs taken from the sampler. Its iterations end to end are in
test_pipeline.py (Trainer-free) and test_self_play.py."""

import json
import signal

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from sppo_lightning.errors import ConfigError
from sppo_lightning.methods import SPPO
from sppo_lightning.methods.sppo import exports_policy
from sppo_lightning.pipeline import HFGenerator, VLLMGenerator
from sppo_lightning.ranking import FunctionJudge
from tests.helpers import REPO, assert_same_run, run_fit, uninterrupted

JUDGE = FunctionJudge("sppo_lightning.ranking.judges:shorter")


@pytest.mark.parametrize("settings, message", [
    ({"num_samples": 1}, "data.method.num_samples \\(K\\) must be at least 2 to form a pair, got 1"),
    ({"generation_shard_size": 0}, "generation_shard_size must be at least 1, got 0"),
    ({"reference_batch_size": 0}, "batch sizes must be at least 1"),
    ({"num_samples": 2.5}, "num_samples must be an integer, got 2.5"),
])
def test_settings_are_checked_in_one_line(settings, message):
    with pytest.raises(ConfigError, match=message):
        SPPO(JUDGE, **settings)


def test_the_defaults_are_the_official_pipeline_s():
    sppo = SPPO(JUDGE)
    assert (sppo.num_samples, sppo.restarts_optimizer, sppo.caches_reference) == (5, True, True)
    assert isinstance(sppo.generator, HFGenerator)


def test_only_an_engine_that_is_not_live_samples_from_an_export():
    assert not exports_policy(HFGenerator(), policy=None)
    assert exports_policy(VLLMGenerator(live=False), policy=None)



def test_sampler_log_probs_need_a_generator_that_samples_pi_itself():
    from sppo_lightning.decoding import LinearAlignmentGenerator

    with pytest.raises(ConfigError, match="reference_logps must be forward or sampler, got 'both'"):
        SPPO(JUDGE, reference_logps="both")
    with pytest.raises(ConfigError, match="SPPO: reference_logps: sampler needs the generator's own log-probs of π_t, "
                                          "which LinearAlignmentGenerator does not give"):
        SPPO(JUDGE, LinearAlignmentGenerator("Be brief."), reference_logps="sampler")
    with pytest.raises(ConfigError, match="which VLLMGenerator does not give"):
        SPPO(JUDGE, VLLMGenerator(), reference_logps="sampler")


def test_an_iteration_with_the_samplers_log_probs_equals_one_with_the_forward(tmp_path, tiny_llama, tokenizer):
    """The same samples, ranks and pairs; the reference log-probs agree to float rounding, and the
    sampler's are kept with the samples (generations.parquet), so a resume reads the same numbers."""
    from sppo_lightning.data.prompts import load_prompts
    from sppo_lightning.distributed import DistContext
    from sppo_lightning.policies import Policies

    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in ["Hi", "Name a color.", "Why?", "Say yes."]))
    prompts = load_prompts(str(path), tokenizer, 32)[0]
    policy = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    built = {}
    for mode in ("forward", "sampler"):
        sppo = SPPO(JUDGE, HFGenerator(max_new_tokens=8, batch_size=2, show_progress=False), num_samples=3,
                    show_progress=False, reference_logps=mode)
        built[mode] = sppo.build(0, prompts, Policies(policy), tokenizer, DistContext(), tmp_path / mode).pairs.to_list()
    reference = ("reference_chosen_logps", "reference_rejected_logps")
    forward, sampler = built["forward"], built["sampler"]
    assert forward and [{k: v for k, v in r.items() if k not in reference} for r in forward] == \
        [{k: v for k, v in r.items() if k not in reference} for r in sampler]
    difference = torch.tensor([[f[k] - s[k] for k in reference] for f, s in zip(forward, sampler)])
    assert difference.abs().max() < 1e-4
    generations = pq.read_table(tmp_path / "sampler" / "iteration_1" / "generations.parquet").to_pylist()
    assert all(len(g["response_logps"]) == 3 for g in generations)
    manifest = json.loads((tmp_path / "sampler" / "iteration_1" / "manifest.json").read_text())
    assert manifest["settings"]["reference_logps"] == "sampler"
    forward_settings = json.loads((tmp_path / "forward" / "iteration_1" / "manifest.json").read_text())["settings"]
    assert "reference_logps" not in forward_settings  # runs made before the setting resume as they were


def test_a_run_killed_between_sampling_and_training_resumes_exactly_with_the_samplers_log_probs(tiny_dir, tmp_path):
    """The quickstart's 2 iterations with reference_logps: sampler, killed in iteration 1's ranking
    (its samples and their log-probs written): resumed, it equals the uninterrupted run."""
    def config(out):
        data = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
        data["trainer"]["max_epochs"] = 2
        method = data["data"]["init_args"]["method"]["init_args"]
        method["reference_logps"] = "sampler"
        method["ranker"]["init_args"]["function"] = "tests.kill_switch:killing_judge"
        path = out / "source.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    baseline, killed = tmp_path / "baseline", tmp_path / "killed"
    baseline.mkdir(), killed.mkdir()
    uninterrupted(config(baseline), tiny_dir, baseline)
    marker = killed / "marker"
    first = run_fit(config(killed), tiny_dir, killed, env={"KILL_MARKER": str(marker)}, check=False)
    assert first.returncode == -signal.SIGKILL and marker.exists()
    assert (killed / "self_play" / "iteration_1" / "generations.parquet").exists()
    run_fit(config(killed), tiny_dir, killed, "--ckpt_path", "last", env={"KILL_MARKER": str(marker)})
    assert_same_run(baseline, killed)
    rows = json.loads((baseline / "self_play" / "summary.json").read_text())["iterations"]
    assert all(r["seconds"]["reference"] < 1.0 for r in rows)  # no forward over the pairs
