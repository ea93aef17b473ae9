"""Self-play split over 2 processes gives the same data as 1 process (prompts sharded, gathered)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

SCRIPT = Path(__file__).with_name("ddp_self_play.py")


def run(model_dir, out_dir, devices):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(SCRIPT.parent.parent))
    for name in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK"):
        env.pop(name, None)  # a fresh rendezvous on a free port, whatever ran in this process before
    result = subprocess.run([sys.executable, str(SCRIPT), model_dir, str(out_dir), str(devices)],
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
