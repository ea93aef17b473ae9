"""The loss table: each entry's needs, defaults and bounds, read by the module and the CLI."""

import math

import pytest
import torch

from sppo_lightning import loss_table
from sppo_lightning.export import _export_reference
from sppo_lightning.errors import ConfigError
from sppo_lightning.logprobs import SequenceLogps
from sppo_lightning.module import LossName, PreferenceModule
from tests.helpers import batch_of


def test_every_entry_is_a_module_loss_and_says_what_it_needs():
    assert set(LossName.__args__) == set(loss_table.LOSSES)
    free = {name for name, e in loss_table.LOSSES.items() if not e.needs_reference}
    assert free == {"orpo", "asft", "simpo"}
    for name in loss_table.LOSSES:
        module = PreferenceModule("unused", loss=name)
        assert module.reference_mode == ("none" if name in free else "copy")
        assert _export_reference({"loss": name}) == ("none" if name in free else "cached")
        assert set(module.loss_hyperparameters()) == set(loss_table.LOSSES[name].hyperparameters)


def test_simpo_defaults_and_loss_args():
    module = PreferenceModule("unused", loss="simpo")
    assert module.loss_hyperparameters() == {"beta": 2.0, "gamma": 1.0}
    tuned = PreferenceModule("unused", loss="simpo", beta=10.0, loss_args={"gamma": 5.4})
    assert tuned.loss_hyperparameters() == {"beta": 10.0, "gamma": 5.4}


@pytest.mark.parametrize("kwargs, message", [
    ({"loss": "simpo", "loss_args": {"gama": 1.0}}, r"model.loss_args.gama: loss 'simpo' has no such setting \(it takes beta, gamma\)"),
    ({"loss": "simpo", "beta": 0.0}, "model.beta must be > 0"),
    ({"loss": "simpo", "loss_args": {"gamma": float("nan")}}, "model.gamma must be finite"),
    ({"loss": "simpo", "reference": "copy"}, "reference-free"),
    ({"loss": "dpo", "loss_args": {"gamma": 1.0}}, "it takes beta, label_smoothing"),
])
def test_bad_loss_settings_name_the_key(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        PreferenceModule("unused", **kwargs)


def test_simpo_step_is_the_formula_on_mean_log_probs(pair_file, tiny_llama):
    module = PreferenceModule(tiny_llama, loss="simpo", loss_args={"gamma": 0.5})
    module.configure_model()
    assert module.reference is None
    _, batch = batch_of(pair_file, tiny_llama)
    per_pair, metrics = module.step(batch)
    policy = module.sequence_logps(module.policy, batch)
    half = policy.mean.shape[0] // 2
    expected = -torch.nn.functional.logsigmoid(2.0 * (policy.mean[:half] - policy.mean[half:]) - 0.5)
    torch.testing.assert_close(per_pair, expected)
    torch.testing.assert_close(metrics["rewards/margins"], (2.0 * (policy.mean[:half] - policy.mean[half:])).mean())


def test_compute_loss_hand_values():
    # two pairs; sums -10/-20 (chosen) and -12/-18 (rejected) over 5 and 4 tokens
    policy = SequenceLogps(sum=torch.tensor([-10.0, -20.0, -12.0, -18.0]),
                           mean=torch.tensor([-2.0, -5.0, -3.0, -4.5]),
                           n_tokens=torch.tensor([5, 4, 4, 4]))
    reference = torch.tensor([-11.0, -20.0, -11.0, -18.0])
    batch = {}
    dpo, _ = loss_table.compute_loss("dpo", {"beta": 0.1, "label_smoothing": 0.0}, policy, reference, batch)
    h = torch.tensor([(-10.0 + 12.0) - (-11.0 + 11.0), 0.0])
    torch.testing.assert_close(dpo, -torch.nn.functional.logsigmoid(0.1 * h))
    simpo, _ = loss_table.compute_loss("simpo", {"beta": 2.0, "gamma": 1.0}, policy, None, batch)
    assert simpo[0].item() == pytest.approx(-math.log(1 / (1 + math.exp(-(2.0 * 1.0 - 1.0)))), rel=1e-6)


def test_sppo_logs_its_gap_to_the_targets_in_nats():
    # Δw = +2 with target η(0.7 − ½) = 20 → 18; Δl = −2 with target −20 → 18: the gap is 18 nats
    policy = SequenceLogps(sum=torch.tensor([-10.0, -20.0]), mean=torch.tensor([-1.0, -2.0]),
                           n_tokens=torch.tensor([10, 10]))
    batch = {"chosen_probs_win": torch.tensor([0.7]), "chosen_probs_lose": torch.tensor([0.3])}
    per_pair, metrics = loss_table.compute_loss("sppo", {"eta": 100.0}, policy, torch.tensor([-12.0, -18.0]), batch)
    assert metrics["target_gap"].item() == pytest.approx(18.0)
    assert per_pair.item() == pytest.approx(0.5 * (18.0**2 + 18.0**2))  # the loss is half the squared gaps
