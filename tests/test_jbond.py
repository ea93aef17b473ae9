"""methods/jbond.py: the KL to the initial policy on the policy's own samples (numbers against a
plain forward of each sequence). J-BOND's end-to-end runs are in test_bond.py."""

import contextlib

import torch

from sppo_lightning.methods.jbond import kl_to_initial
from sppo_lightning.policies import Policies
from sppo_lightning.models import load_causal_lm

ROWS = [{"prompt_ids": [1, 5, 7], "chosen_ids": [40, 41], "rejected_ids": [9, 10, 11, 2]},
        {"prompt_ids": [1, 6], "chosen_ids": [50], "rejected_ids": [12, 2]},
        {"prompt_ids": [1, 8, 8, 8], "chosen_ids": [3, 3, 3, 3], "rejected_ids": [13]}]


def response_logp(model, prompt, response):
    """log π(response | prompt) by one plain forward of prompt + response."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logps = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
    return sum(float(logps[len(prompt) - 1 + i, token]) for i, token in enumerate(response))


def test_kl_to_initial_is_the_mean_log_ratio_of_the_samples_one_row_each(tiny_llama):
    torch.manual_seed(0)
    policy, initial = load_causal_lm(tiny_llama), load_causal_lm(tiny_llama)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    rows_seen = []
    for model in (policy, initial):
        model.model.register_forward_hook(lambda m, args, kwargs, out: rows_seen.append(kwargs["input_ids"].shape[0]),
                                          with_kwargs=True)

    @contextlib.contextmanager
    def initial_role():
        yield initial

    kl = kl_to_initial(Policies(policy, roles={"initial": initial_role}), ROWS, 0, torch.device("cpu"))
    expected = sum(response_logp(policy, r["prompt_ids"], r["rejected_ids"])
                   - response_logp(initial, r["prompt_ids"], r["rejected_ids"]) for r in ROWS) / len(ROWS)
    assert abs(kl - expected) < 1e-4 and abs(expected) > 1e-3
    # one forward of each model, one row per sample (the fake pair of a sample with itself sent 2 each)
    assert rows_seen[:2] == [len(ROWS), len(ROWS)]


def test_kl_to_initial_is_none_without_an_initial_model(tiny_llama):
    assert kl_to_initial(Policies(load_causal_lm(tiny_llama)), ROWS, 0, torch.device("cpu")) is None
