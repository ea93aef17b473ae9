"""Kill the quickstart with SIGKILL mid-way, resume with the documented flag, and get the same run:
the same per-step losses and the same final weights as an uninterrupted run with the same seeds."""

import csv
import json
import signal
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tests.helpers import REPO, assert_same_run, losses, run_fit, uninterrupted


def config_with_killing_judge(tmp_path: Path) -> Path:
    """The quickstart (2 iterations), judged by tests.kill_switch:killing_judge, which is the same
    judge but can die at its first call: one config serves the baseline, the killed and the resumed run."""
    data = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    data["trainer"]["max_epochs"] = 2
    data["data"]["init_args"]["method"]["init_args"]["generation_shard_size"] = 16  # 4 shards of one batch
    data["data"]["init_args"]["method"]["init_args"]["ranker"]["init_args"]["function"] = "tests.kill_switch:killing_judge"
    path = tmp_path / "source.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def baseline(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("baseline")
    return uninterrupted(config_with_killing_judge(out), tiny_dir, out)


@pytest.mark.parametrize("where", ["generation", "ranking", "writing_temp", "writing_unrecorded", "training"])
def test_killed_run_resumes_to_the_same_result(tiny_dir, tmp_path, baseline, where):
    config = config_with_killing_judge(tmp_path)
    marker = tmp_path / "killed"
    calls = tmp_path / "generate_calls.jsonl"
    if where == "generation":  # dies in generate, iteration 2's first shard written, its second not
        first = run_fit(config, tiny_dir, tmp_path, "--trainer.callbacks+=tests.kill_switch.KillInGeneration",
                        f"--trainer.callbacks.marker={marker}", f"--trainer.callbacks.log={calls}", check=False)
    elif where == "ranking":  # dies inside the judge, while ranking iteration 1's responses
        first = run_fit(config, tiny_dir, tmp_path, env={"KILL_MARKER": str(marker)}, check=False)
    elif where.startswith("writing"):  # dies writing iteration 2's rankings file
        first = run_fit(config, tiny_dir, tmp_path, "--trainer.callbacks+=tests.kill_switch.KillWhileWriting",
                        f"--trainer.callbacks.marker={marker}", f"--trainer.callbacks.mode={where[8:]}",
                        check=False)
    else:  # dies mid-training of iteration 2 (epoch 1, batch 3)
        first = run_fit(config, tiny_dir, tmp_path, "--trainer.callbacks+=tests.kill_switch.KillSwitch",
                        f"--trainer.callbacks.marker={marker}", check=False)
    assert first.returncode == -signal.SIGKILL and marker.exists()
    generations = tmp_path / "self_play" / "iteration_1" / "generations.parquet"
    assert generations.exists()
    before = generations.stat().st_mtime_ns

    shard = tmp_path / "self_play" / "iteration_2" / "generations.shard_00000.parquet"
    if where == "generation":
        assert shard.exists() and not shard.with_name("generations.shard_00001.parquet").exists()
        calls.unlink()
    resumed_args = ["--trainer.callbacks+=tests.kill_switch.KillInGeneration", f"--trainer.callbacks.marker={marker}",
                    f"--trainer.callbacks.log={calls}"] if where == "generation" else []
    resumed = run_fit(config, tiny_dir, tmp_path, "--ckpt_path", "last", *resumed_args,
                      env={"KILL_MARKER": str(marker)})
    assert resumed.returncode == 0
    if where == "generation":  # resumed from the last written shard: the first one was not redone
        train = [g["prompt_ids"] for g in pq.read_table(
            baseline / "self_play" / "iteration_2" / "generations.parquet").to_pylist()]
        calls_made = [json.loads(line) for line in calls.read_text().splitlines()]
        training_calls = [c for c in calls_made if all(p in train for p in c)]  # the rest: win-rate evaluation
        assert training_calls == [train[16:32], train[32:48], train[48:64]]  # shards 2-4, not shard 1
        assert not shard.exists()  # merged into generations.parquet, then removed
    assert generations.stat().st_mtime_ns == before  # the finished stage was reused, not redone
    assert_same_run(baseline, tmp_path)


def test_a_kill_during_the_evaluation_redoes_the_evaluation_alone(tiny_dir, tmp_path, baseline):
    """Killed while iteration 1's win rate is measured: its checkpoint was written before the
    evaluation, so the resumed run trains iteration 1 no more; it evaluates it, then goes on."""
    config, marker = config_with_killing_judge(tmp_path), tmp_path / "killed"
    (tmp_path / "never").write_text("the judge never kills here")
    evaluation = ["--trainer.callbacks+=tests.kill_switch.KillInEvaluation", f"--trainer.callbacks.marker={marker}"]
    first = run_fit(config, tiny_dir, tmp_path, *evaluation, env={"KILL_MARKER": str(tmp_path / "never")}, check=False)
    assert first.returncode == -signal.SIGKILL and marker.exists()
    resumed = run_fit(config, tiny_dir, tmp_path, "--ckpt_path", "last", *evaluation,
                      env={"KILL_MARKER": str(tmp_path / "never")})
    console = resumed.stdout + resumed.stderr
    assert "iteration 1 ended before its evaluation finished: evaluating it now" in console
    assert "Restored all states from the checkpoint" in console
    steps_after_resume = {int(row["step"]) for row in csv.DictReader(
        (tmp_path / "lightning_logs" / "version_1" / "metrics.csv").open()) if row.get("train/loss")}
    assert steps_after_resume and min(steps_after_resume) > max(losses(baseline)) // 2  # iteration 2's steps only
    summary = json.loads((tmp_path / "self_play" / "summary.json").read_text())["iterations"]
    expected = json.loads((baseline / "self_play" / "summary.json").read_text())["iterations"]
    assert [r["iteration"] for r in summary] == [1, 2]
    assert [r["win_rate_vs_initial"] for r in summary] == [r["win_rate_vs_initial"] for r in expected]
    assert_same_run(baseline, tmp_path)


def test_a_killed_pair_run_resumes_to_the_same_result(tiny_dir, tmp_path):
    """configs/tiny_pairs.yaml (3 epochs of DPO-style pairs, packed, batches grouped by length)
    killed in its second epoch, resumed with --ckpt_path last: its last.ckpt is the first epoch's,
    and the run ends as the uninterrupted one."""
    config, baseline, killed = REPO / "configs" / "tiny_pairs.yaml", tmp_path / "baseline", tmp_path / "killed"
    baseline.mkdir(), killed.mkdir()
    grouped = ("--data.group_by_length", "true", "--data.batch_size", "2")
    run_fit(config, tiny_dir, baseline, "--trainer.log_every_n_steps", "1", *grouped)
    marker = tmp_path / "marker"
    first = run_fit(config, tiny_dir, killed, "--trainer.log_every_n_steps", "1", *grouped,
                    "--trainer.callbacks+=tests.kill_switch.KillSwitch", f"--trainer.callbacks.marker={marker}",
                    "--trainer.callbacks.epoch=1", "--trainer.callbacks.batch=1", check=False)
    assert first.returncode == -signal.SIGKILL and (killed / "checkpoints" / "last.ckpt").exists()
    run_fit(config, tiny_dir, killed, "--trainer.log_every_n_steps", "1", *grouped, "--ckpt_path", "last")
    assert_same_run(baseline, killed)
    assert yaml.safe_load((baseline / "lightning_logs" / "version_0" / "hparams.yaml").read_text())["packing"] is True


def test_packing_changes_no_step_of_the_quickstart(tiny_dir, tmp_path, baseline):
    """The baseline above runs packed (model.packing auto resolves to true on the tiny Llama's sdpa);
    the same run padded logs the same loss at every step, to 1e-4."""
    assert yaml.safe_load((baseline / "lightning_logs" / "version_0" / "hparams.yaml").read_text())["packing"] is True
    padded = uninterrupted(config_with_killing_judge(tmp_path), tiny_dir, tmp_path, "--model.init_args.packing", "false")
    assert yaml.safe_load((padded / "lightning_logs" / "version_0" / "hparams.yaml").read_text())["packing"] is False
    expected, got = losses(baseline), losses(padded)
    assert set(got) == set(expected) and len(expected) == 8
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-4, abs=1e-4), step
