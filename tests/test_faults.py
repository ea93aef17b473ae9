"""Faults that must not pass silently, each through the real CLI on the tiny quickstart."""

import json
from pathlib import Path

from safetensors.torch import load_file

from tests.helpers import quickstart, run_fit


def one_line_error(result) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("sppo-lightning: error:")]
    return line


def test_output_paths_that_cannot_be_folders_stop_before_any_model_loads(tiny_dir, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    for options, key in [
        (["--trainer.callbacks.dirpath"], "trainer.callbacks (HFExport).init_args.dirpath"),  # the last with dirpath
        (["--data.init_args.run_dir"], "data.init_args.run_dir"),
        (["--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir"],
         "trainer.logger (CSVLogger).init_args.save_dir"),
    ]:
        result = run_fit(quickstart(tmp_path), tiny_dir, tmp_path, *options, str(blocker / "sub"), check=False)
        line = one_line_error(result)
        assert key in line and f"{blocker / 'sub'} is under {blocker}, which is a file" in line, line
        assert not (tmp_path / "self_play").exists()  # stopped before anything ran


def test_a_checkpoint_that_is_not_written_stops_the_run(tiny_dir, tmp_path):
    result = run_fit(quickstart(tmp_path), tiny_dir, tmp_path,
                     "--trainer.callbacks+=tests.fault_helpers.SilentCheckpoints", check=False)
    line = one_line_error(result)
    assert "the checkpoint" in line and "was not written" in line and str(tmp_path / "checkpoints") in line
    assert "resume with --ckpt_path last" not in result.stderr + result.stdout


def test_a_deleted_manifest_is_warned_about(tiny_dir, tmp_path):
    config = quickstart(tmp_path)
    run_fit(config, tiny_dir, tmp_path)
    (tmp_path / "self_play" / "iteration_1" / "manifest.json").unlink()
    result = run_fit(config, tiny_dir, tmp_path)
    assert f"{tmp_path / 'self_play' / 'iteration_1'}: manifest.json is missing" in result.stderr


def test_losses_hold_each_step_once_after_a_resume(tiny_dir, tmp_path):
    config = quickstart(tmp_path, epochs=2)
    marker = tmp_path / "killed"
    killed = run_fit(config, tiny_dir, tmp_path, "--trainer.callbacks+=tests.kill_switch.KillSwitch",
                     "--trainer.callbacks.marker", str(marker), check=False)
    assert killed.returncode != 0 and marker.exists()  # died at epoch 1, batch 3
    run_fit(config, tiny_dir, tmp_path, "--ckpt_path", "last")
    steps = [json.loads(line)["step"] for line in (tmp_path / "self_play" / "losses.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 17))  # 64 pairs at most / 8 per batch, 2 iterations: 16 steps, each once


def test_a_run_with_one_step_per_iteration_still_learns(tiny_dir, tmp_path):
    config = quickstart(tmp_path, prompts=["Tell me something good."], judge="sppo_lightning.ranking.judges:shorter")
    result = run_fit(config, tiny_dir, tmp_path)
    assert "the learning-rate schedule has 1 optimizer step(s), fewer than warmup_ratio 0.1 needs" in result.stderr
    initial = load_file(tiny_dir / "llama" / "model.safetensors")
    trained = load_file(tmp_path / "hf_model" / "model.safetensors")
    assert any(not (initial[k] == trained[k]).all() for k in initial)  # the one step had a learning rate


def test_a_judge_that_raises_names_the_row_and_keeps_the_generations(tiny_dir, tmp_path):
    config = quickstart(tmp_path, judge="tests.fault_helpers:judge_that_raises", generation_shard_size=16)
    line = one_line_error(run_fit(config, tiny_dir, tmp_path, check=False))
    assert "judge tests.fault_helpers:judge_that_raises: prompt row 21, candidate 0: raised ValueError: boom" in line
    manifest = json.loads((tmp_path / "self_play" / "iteration_1" / "manifest.json").read_text())
    assert manifest["stages"]["generations"]["rows"] == 64  # kept; the first shard's rankings too
    assert "rankings.shard_00000" in manifest["stages"]


def test_duplicate_prompts_are_counted_and_can_be_dropped(tiny_dir, tmp_path):
    prompts = ["Name a color.", "Tell me a story.", "Name a color.", "Say hi.", "Name a color."]
    config = quickstart(tmp_path, prompts=prompts, judge="sppo_lightning.ranking.judges:shorter")
    result = run_fit(config, tiny_dir, tmp_path)
    assert "prompts.jsonl: 2 prompt(s) repeat an earlier one (first: row 3 repeats row 1)" in result.stderr
    run_dir = tmp_path / "dropped"
    config = quickstart(tmp_path, prompts=prompts, judge="sppo_lightning.ranking.judges:shorter", run_dir=str(run_dir))
    run_fit(config, tiny_dir, tmp_path, "--data.drop_duplicate_prompts", "true")
    generations = json.loads((run_dir / "iteration_1" / "manifest.json").read_text())["stages"]["generations"]
    assert generations["rows"] == 3


def test_all_ties_names_every_setting_that_can_cause_it(tiny_dir, tmp_path):
    config = quickstart(tmp_path, judge="tests.fault_helpers:constant")
    line = one_line_error(run_fit(config, tiny_dir, tmp_path, check=False))
    assert "all 64 prompts tied" in line and all(k in line for k in ("temperature", "num_samples", "max_new_tokens"))


def test_a_run_folder_made_with_other_settings_names_the_one_flag_for_a_fresh_run(tiny_dir, tmp_path):
    """The shipped quickstart run again with another K: refused in one line that ends with the flag to
    add, and that flag alone starts a fresh run (every output follows the root)."""
    from tests.helpers import run_cli as run

    root = tmp_path / "quickstart"
    args = ["fit", "--config", "configs/quickstart.yaml", "--model.model_name_or_path", tiny_dir / "llama",
            "--trainer.max_epochs", "1", "--trainer.default_root_dir", root]
    run(*args)
    other = run(*args, "--data.method.num_samples", "3", check=False)
    line = one_line_error(other)
    assert "iteration_1 was made with other settings (num_samples differ)" in line, line
    assert line.endswith(f"; to start a fresh run instead, add --trainer.default_root_dir {root}-2"), line
    run(*args, "--data.method.num_samples", "3", *line.rsplit(" add ", 1)[1].split())
    fresh = Path(f"{root}-2")
    assert (fresh / "checkpoints" / "last.ckpt").exists() and (fresh / "self_play" / "summary.json").exists()
    settings = json.loads((fresh / "self_play" / "iteration_1" / "manifest.json").read_text())["settings"]
    assert settings["num_samples"] == 3
