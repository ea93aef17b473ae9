"""J-BOND killed anywhere resumes to the same run: configs/jbond.yaml (6 on-policy iterations) killed
inside the judge and mid-training, resumed with --ckpt_path last: the same per-step losses and
final weights as an uninterrupted run."""

import signal
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO, assert_same_run, run_fit, uninterrupted


def jbond_config(tmp_path: Path) -> Path:
    data = yaml.safe_load((REPO / "configs" / "jbond.yaml").read_text())
    data["trainer"]["max_epochs"] = 6
    data["trainer"]["log_every_n_steps"] = 1
    data["self_play"]["eval_every"] = 3
    callback = data["data"]["init_args"]["method"]["init_args"]
    callback["generation_shard_size"] = 2  # 2 shards of the 4 prompts an iteration draws
    callback["ranker"]["init_args"]["function"] = "tests.kill_switch:killing_judge"
    path = tmp_path / "jbond_source.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def baseline(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("jbond_baseline")
    return uninterrupted(jbond_config(out), tiny_dir, out)


@pytest.mark.parametrize("where", ["ranking", "training"])
def test_killed_jbond_resumes_to_the_same_result(tiny_dir, tmp_path, baseline, where):
    config = jbond_config(tmp_path)
    marker = tmp_path / "killed"
    if where == "ranking":  # dies in the judge's first call: iteration 0's first shard
        first = run_fit(config, tiny_dir, tmp_path, env={"KILL_MARKER": str(marker)}, check=False)
    else:  # dies at the start of iteration 5's training step
        first = run_fit(config, tiny_dir, tmp_path, "--trainer.callbacks+=tests.kill_switch.KillSwitch",
                        f"--trainer.callbacks.marker={marker}", "--trainer.callbacks.epoch=4",
                        "--trainer.callbacks.batch=0", check=False)
    assert first.returncode == -signal.SIGKILL and marker.exists()
    run_fit(config, tiny_dir, tmp_path, "--ckpt_path", "last", env={"KILL_MARKER": str(marker)})
    assert_same_run(baseline, tmp_path, steps=6)


def test_export_of_a_jbond_run_checkpoint_gives_its_policy_and_on_request_its_anchor(baseline, tmp_path):
    import torch
    from safetensors.torch import load_file

    from tests.helpers import run_cli as run
    from tests.helpers import final_weights

    checkpoint = baseline / "checkpoints" / "last.ckpt"
    run("export", checkpoint, tmp_path / "policy")
    policy = load_file(tmp_path / "policy" / "model.safetensors")
    for name, value in final_weights(baseline).items():  # what the run exported when it ended
        assert torch.equal(policy[name], value), name
    assert "Exported the J-BOND anchor" in run("export", checkpoint, tmp_path / "anchor", "--anchor").stdout
    anchor = load_file(tmp_path / "anchor" / "model.safetensors")
    state = torch.load(checkpoint, weights_only=True, map_location="cpu")["state_dict"]
    for name, value in anchor.items():
        if f"anchor.{name}" in state:
            assert torch.equal(value, state[f"anchor.{name}"]), name
    assert any(not torch.equal(anchor[n], policy[n]) for n in anchor)
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    refused = run("export", text, tmp_path / "x", check=False)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1] == (
        f"sppo-lightning: error: {text} is not a checkpoint (not a whole torch archive: torn, or another kind of "
        f"file); export takes a .ckpt written by `sppo-lightning fit` or a sharded checkpoint folder")
