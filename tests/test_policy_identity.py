"""Samples know the policy that drew them (sppo_lightning/policy_identity.py): the fingerprint is exact
and order-free, and a run restarted with other weights at an iteration redoes that iteration's samples."""

import copy

import torch
import yaml

from sppo_lightning.policy_identity import device_sums, weights_fingerprint
from tests.helpers import REPO, assert_same_run, run_fit


def on_threads(count, function, *args):
    """``function(*args)`` computed with torch on ``count`` threads (reductions split differently);
    explicit, since the suite itself runs on one thread (tests/conftest.py)."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(count)
        return function(*args)
    finally:
        torch.set_num_threads(threads)


def test_the_fingerprint_names_the_trainable_bits_whatever_the_thread_count():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 8))
    digest = on_threads(2, weights_fingerprint, model)
    assert len(digest) == 16 and int(digest, 16) >= 0
    assert on_threads(1, weights_fingerprint, model) == digest
    assert weights_fingerprint(copy.deepcopy(model)) == digest  # the same weights, the same name
    nudged = copy.deepcopy(model)
    with torch.no_grad():  # one ulp of one weight
        nudged[1].weight[3, 4] = torch.nextafter(nudged[1].weight[3, 4], torch.tensor(1.0))
    assert weights_fingerprint(nudged) != digest
    swapped = copy.deepcopy(model)
    with torch.no_grad():  # the same values in another order: another model
        swapped[0].weight.copy_(swapped[0].weight.flip(0))
    assert weights_fingerprint(swapped) != digest
    frozen = copy.deepcopy(model)
    frozen[0].requires_grad_(False)  # only what trains names a policy (a LoRA adapter, not its base)
    changed_frozen = copy.deepcopy(frozen)
    with torch.no_grad():
        changed_frozen[0].weight.add_(1.0)
    assert weights_fingerprint(changed_frozen) == weights_fingerprint(frozen) != digest
    assert weights_fingerprint(model.bfloat16()) != digest  # every dtype: its bits, as integers


def test_the_on_device_sums_are_exact_and_order_free():
    """What a weight on a GPU contributes (integer reductions where it is), checked on the CPU."""
    torch.manual_seed(0)
    weight = torch.randn(3000, 7)
    sums = on_threads(2, device_sums, weight)
    assert on_threads(1, device_sums, weight) == sums
    nudged = weight.clone()
    nudged[1234, 5] = torch.nextafter(nudged[1234, 5], torch.tensor(9.0))
    assert device_sums(nudged) != sums and device_sums(weight.flip(0)) != sums
    assert device_sums(weight.bfloat16()) != device_sums(weight)


def jbond_config(out, epochs: int = 3, step_folders: bool = False):
    data = yaml.safe_load((REPO / "configs" / "jbond.yaml").read_text())
    data["data"]["init_args"]["method"]["init_args"]["step_folders"] = step_folders
    data["trainer"]["max_epochs"] = epochs
    data["trainer"]["log_every_n_steps"] = 1
    data["self_play"]["eval_every"] = epochs
    data["self_play"]["eval_samples"] = 1
    path = out / "jbond_source.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_restart_with_another_learning_rate_redoes_the_samples_of_other_weights(tiny_dir, tmp_path):
    """configs/jbond.yaml restarted without its checkpoint at another learning rate: iteration 1's
    samples (drawn by the initial policy, which the restart has too) are reused, iteration 2's are
    redone with a warning, and the run equals a fresh one at that learning rate."""
    first, fresh = tmp_path / "first", tmp_path / "fresh"
    first.mkdir(), fresh.mkdir()
    config = jbond_config(tmp_path, step_folders=True)  # drawn in memory (the default), nothing is reused
    run_fit(config, tiny_dir, first)
    again = run_fit(config, tiny_dir, first, "--model.lr", "1e-3").stderr
    assert "iteration_1: reusing generations" in again
    assert "iteration_2/generations.parquet was drawn from other weights than this run's π_t" in " ".join(again.split())
    run_fit(config, tiny_dir, fresh, "--model.lr", "1e-3")
    assert_same_run(fresh, first, steps=3)  # reusing the stale samples, steps 2 and 3 would differ
