"""Kill the quickstart with SIGKILL mid-way, resume with the documented flag, and get the same run:
the same per-step losses and the same final weights as an uninterrupted run with the same seeds."""

import csv
import signal
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.test_quickstart import REPO, run_fit


def config_with_killing_judge(tmp_path: Path) -> Path:
    """The quickstart (2 iterations), judged by tests.kill_switch:killing_judge, which is the same
    judge but can die at its first call: one config serves the baseline, the killed and the resumed run."""
    data = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    data["trainer"]["max_epochs"] = 2
    data["trainer"]["callbacks"][0]["init_args"]["ranker"]["init_args"]["function"] = "tests.kill_switch:killing_judge"
    path = tmp_path / "source.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def losses(out_dir: Path) -> dict[int, float]:
    """train/loss by global step, over every logger version (a resumed run writes a new one)."""
    steps = {}
    for metrics in sorted(out_dir.glob("lightning_logs/version_*/metrics.csv")):
        for row in csv.DictReader(metrics.open()):
            if row.get("train/loss"):
                steps[int(row["step"])] = float(row["train/loss"])
    return steps


def final_weights(out_dir: Path) -> dict[str, torch.Tensor]:
    (model,) = sorted(out_dir.glob("lightning_logs/version_*/hf_model/model.safetensors"))[-1:]
    return load_file(model)


@pytest.fixture(scope="module")
def baseline(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("baseline")
    marker = out / "never"
    marker.write_text("the baseline never dies")
    run_fit(config_with_killing_judge(out), tiny_dir, out, env={"KILL_MARKER": str(marker)})
    return out


@pytest.mark.parametrize("where", ["ranking", "training"])
def test_killed_run_resumes_to_the_same_result(tiny_dir, tmp_path, baseline, where):
    config = config_with_killing_judge(tmp_path)
    marker = tmp_path / "killed"
    if where == "ranking":  # dies inside the judge, while ranking iteration 1's responses
        first = run_fit(config, tiny_dir, tmp_path, env={"KILL_MARKER": str(marker)}, check=False)
    else:  # dies mid-training of iteration 2 (epoch 1, batch 3)
        first = run_fit(config, tiny_dir, tmp_path, "--trainer.callbacks+=tests.kill_switch.KillSwitch",
                        f"--trainer.callbacks.marker={marker}", check=False)
    assert first.returncode == -signal.SIGKILL and marker.exists()
    generations = tmp_path / "self_play" / "iteration_0" / "generations.parquet"
    assert generations.exists()
    before = generations.stat().st_mtime_ns

    resumed = run_fit(config, tiny_dir, tmp_path, "--ckpt_path", "last",
                      env={"KILL_MARKER": str(marker)})
    assert resumed.returncode == 0
    assert generations.stat().st_mtime_ns == before  # the finished stage was reused, not redone
    expected, got = losses(baseline), losses(tmp_path)
    assert set(got) == set(expected)
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-6), step
    want, have = final_weights(baseline), final_weights(tmp_path)
    for name in want:
        torch.testing.assert_close(have[name], want[name], rtol=1e-5, atol=1e-6)
