"""Self-play split over 2 processes gives the same data as 1 process (prompts sharded, gathered)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

SCRIPT = Path(__file__).with_name("ddp_self_play.py")


def run(model_dir, out_dir, devices, method="sppo"):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(SCRIPT.parent.parent))
    for name in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK"):
        env.pop(name, None)  # a fresh rendezvous on a free port, whatever ran in this process before
    result = subprocess.run([sys.executable, str(SCRIPT), model_dir, str(out_dir), str(devices), method],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


def test_two_processes_make_the_same_iteration_as_one(tiny_llama, tmp_path):
    run(tiny_llama, tmp_path / "one", 1)
    run(tiny_llama, tmp_path / "two", 2)
    for stage in ("generations", "rankings", "train"):
        one = pq.read_table(tmp_path / "one" / "self_play" / "iteration_1" / f"{stage}.parquet").to_pylist()
        two = pq.read_table(tmp_path / "two" / "self_play" / "iteration_1" / f"{stage}.parquet").to_pylist()
        if stage == "train":  # reference log-probs: same weights, same tokens
            for a, b in zip(one, two):
                assert abs(a.pop("reference_chosen_logps") - b.pop("reference_chosen_logps")) < 1e-4
                assert abs(a.pop("reference_rejected_logps") - b.pop("reference_rejected_logps")) < 1e-4
        assert one == two, stage
    summary = json.loads((tmp_path / "two" / "self_play" / "summary.json").read_text())["iterations"]
    assert len(summary) == 1


def test_online_draws_in_memory_on_two_processes_as_on_one(tiny_llama, tmp_path):
    """Per-step draws stay in memory: the ranking (rank 0's) is broadcast, every rank holds the pairs,
    and two processes draw and train what one does (the same 4 prompts a step)."""
    run(tiny_llama, tmp_path / "one", 1, "online")
    run(tiny_llama, tmp_path / "two", 2, "online")

    def steps(name):
        folder = tmp_path / name / "self_play"
        assert not any(p.name.startswith("iteration_") for p in folder.iterdir())  # no folder per step
        lines = [json.loads(line) for line in (folder / "steps.jsonl").read_text().splitlines()]
        return [(line["iteration"], {k: v for k, v in line["stats"].items() if k != "seconds"}) for line in lines]

    one, two = steps("one"), steps("two")
    assert [n for n, _ in one] == [1, 2] and two == one
    assert all(stats["pairs"] + stats["ties_dropped"] == 4 for _, stats in one)
