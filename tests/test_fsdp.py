"""The fsdp footprint on 2 CPU processes (FSDP2 over gloo) against 1 process: the same losses,
the same weights, the same self-play data; killed and resumed from its sharded checkpoint."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from tests.helpers import run_fsdp as run


def losses(out: Path, ranks: int) -> dict[int, float]:
    """Per-step loss of the global batch (the mean over ranks); a resumed step's last record wins."""
    per_rank = []
    for rank in range(ranks):
        rows = [json.loads(line) for line in (out / f"losses_rank{rank}.jsonl").read_text().splitlines()]
        per_rank.append({r["step"]: r["loss"] for r in rows})
    return {step: sum(r[step] for r in per_rank) / ranks for step in per_rank[0]}


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "hf_model" / "model.safetensors")


@pytest.fixture(scope="module")
def trained(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    run("train", tiny_llama, root / "one", 1)
    run("train", tiny_llama, root / "two", 2)
    return root


def test_fsdp_losses_and_exported_weights_match_one_process(trained, tiny_llama):
    one, two = losses(trained / "one", 1), losses(trained / "two", 2)
    assert sorted(one) == sorted(two) == [1, 2, 3, 4]
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5), step
    a, b = weights(trained / "one"), weights(trained / "two")
    assert a.keys() == b.keys()
    for name in a:  # rank 0's consolidated export of the sharded model
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5)
    initial = load_file(Path(tiny_llama) / "model.safetensors")
    assert max((a[k] - initial[k]).abs().max() for k in a) > 1e-3  # it trained


def test_fsdp_killed_mid_epoch_resumes_from_its_sharded_checkpoint(trained, tiny_llama, tmp_path):
    out = tmp_path / "run"
    marker = tmp_path / "killed"
    run("train", tiny_llama, out, 2, "--kill-marker", marker, expect_killed=True)
    checkpoint = out / "checkpoints" / "last.ckpt"
    assert checkpoint.is_dir() and len(list(checkpoint.glob("*.distcp"))) == 2  # one shard per rank
    assert max(losses(out, 2)) == 3  # killed at the start of step 4 (epoch 1, batch 1)
    run("train", tiny_llama, out, 2, "--kill-marker", marker, "--resume")
    resumed, uninterrupted = losses(out, 2), losses(trained / "two", 2)
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in resumed:
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-6), step
    a, b = weights(trained / "two"), weights(out)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6)


def test_lora_under_fsdp_self_plays_the_same_data_as_one_process(tiny_llama, tmp_path):
    run("self_play", tiny_llama, tmp_path / "one", 1)
    run("self_play", tiny_llama, tmp_path / "two", 2)
    for stage in ("generations", "rankings", "train"):
        one = pq.read_table(tmp_path / "one" / "self_play" / "iteration_1" / f"{stage}.parquet").to_pylist()
        two = pq.read_table(tmp_path / "two" / "self_play" / "iteration_1" / f"{stage}.parquet").to_pylist()
        if stage == "train":  # reference log-probs from the sharded model: same weights, same tokens
            for a, b in zip(one, two):
                for key in ("reference_chosen_logps", "reference_rejected_logps"):
                    assert abs(a.pop(key) - b.pop(key)) < 1e-4
        assert one == two, stage
    summary = json.loads((tmp_path / "two" / "self_play" / "summary.json").read_text())["iterations"]
    assert len(summary) == 1 and summary[0]["pairs"] == 6


def test_export_command_consolidates_a_sharded_checkpoint(trained, tmp_path):
    from sppo_lightning.cli import main

    main(["export", str(trained / "two" / "checkpoints" / "last.ckpt"), str(tmp_path / "exported")])
    exported = load_file(tmp_path / "exported" / "model.safetensors")
    expected = weights(trained / "two")
    assert exported.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(exported[name], expected[name], rtol=0, atol=0)


def test_a_live_engine_is_fed_the_sharded_policys_whole_weights(tiny_llama, tmp_path):
    """What VLLMGenerator streams from an FSDP policy (no vLLM needed): every rank gathers unit by
    unit, and the weights equal the unsharded model's, LoRA merged (the vLLM side: tests_vllm)."""
    run("stream", tiny_llama, tmp_path, 2)
    for rank in range(2):
        counts = json.loads((tmp_path / f"stream_rank{rank}.json").read_text())
        assert counts["full"] == counts["lora"] > 0
