import pytest
import torch
from transformers import AutoModelForCausalLM

from sppo_lightning.data.tokenize import encode_prompt
from sppo_lightning.generation import sample_responses


@pytest.fixture(scope="module")
def model(tiny_llama):
    return AutoModelForCausalLM.from_pretrained(tiny_llama)


def prompt_ids(tokenizer, n=5):
    questions = ["Tell me about the moon.", "What is 2 plus 3? Please answer with a whole sentence.", "Hi",
                 "Why is the sky blue?", "Name three colors of the river at night."]
    return [encode_prompt(tokenizer, [{"role": "user", "content": q}]) for q in questions[:n]]


def sample(model, tokenizer, ids, **kwargs):
    options = dict(temperature=1.0, top_p=0.95, max_new_tokens=12, batch_size=2, seed=7)
    options.update(kwargs)
    return sample_responses(model, tokenizer, ids, options.pop("k", 3), **options)


def test_shapes_any_k_and_eos_handling(model, tokenizer):
    ids = prompt_ids(tokenizer)
    out = sample(model, tokenizer, ids, k=3)
    assert len(out) == 5 and all(len(r) == 3 for r in out)
    for responses in out:
        for r in responses:
            assert 1 <= len(r) <= 12
            # stops at its first EOS, or ran to max_new_tokens without one; never padding inside
            assert tokenizer.eos_token_id not in r[:-1]
            assert r[-1] == tokenizer.eos_token_id or len(r) == 12
    assert len({tuple(r) for responses in out for r in responses}) > 5  # sampled, not greedy


def test_same_seed_same_responses(model, tokenizer):
    ids = prompt_ids(tokenizer)
    assert sample(model, tokenizer, ids) == sample(model, tokenizer, ids)
    assert sample(model, tokenizer, ids) != sample(model, tokenizer, ids, seed=8)
    # generation must not consume the caller's random stream (training stays reproducible)
    torch.manual_seed(0)
    sample(model, tokenizer, ids)
    after = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(torch.rand(1), after)


def test_ranks_draw_disjoint_batches_that_merge_into_the_single_process_result(model, tokenizer):
    ids = prompt_ids(tokenizer)
    single = sample(model, tokenizer, ids)
    parts = [sample(model, tokenizer, ids, rank=r, world_size=2) for r in range(2)]
    merged = [a or b for a, b in zip(*parts)]
    assert merged == single
    assert sum(bool(r) for r in parts[0]) == 3 and sum(bool(r) for r in parts[1]) == 2  # batches of 2


def test_left_padding_does_not_change_a_prompts_continuation(model, tokenizer):
    """Near-greedy sampling: a short prompt batched with a long one continues as it does alone."""
    ids = prompt_ids(tokenizer)
    alone = sample(model, tokenizer, [ids[2]], k=1, temperature=1e-5, batch_size=1)
    batched = sample(model, tokenizer, [ids[1], ids[2]], k=1, temperature=1e-5, batch_size=2)
    assert batched[1] == alone[0]


def test_policy_mode_is_restored(model, tokenizer):
    model.train()
    sample(model, tokenizer, prompt_ids(tokenizer, 1), k=2)
    assert model.training


def test_out_of_memory_retries_with_half_the_batch(model, tokenizer, monkeypatch):
    """Fault injection on the real model: generate 'runs out of memory' above 2 prompts."""
    real = model.generate
    sizes = []

    def generate(input_ids, **kwargs):
        sizes.append(input_ids.shape[0])
        if input_ids.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(input_ids=input_ids, **kwargs)

    monkeypatch.setattr(model, "generate", generate)
    ids = prompt_ids(tokenizer)
    with pytest.warns(UserWarning, match="out of memory generating for 5 prompts; retrying as 2 \\+ 3"):
        out = sample(model, tokenizer, ids, k=2, batch_size=5)
    assert sizes == [5, 2, 3, 1, 2]  # 5 fails; 2 runs; 3 fails and splits into 1 + 2
    assert len(out) == 5 and all(len(r) == 2 and all(r) for r in out)
    with pytest.raises(torch.OutOfMemoryError):
        sample(model, tokenizer, ids, k=2, batch_size=5, retry_oom=False)


def test_other_errors_are_not_retried(model, tokenizer, monkeypatch):
    calls = []

    def generate(input_ids, **kwargs):
        calls.append(1)
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(model, "generate", generate)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        sample(model, tokenizer, prompt_ids(tokenizer), batch_size=5)
    assert calls == [1]


def test_the_samplers_log_probs_are_the_forward_pass_s_on_the_same_ids(model, tokenizer):
    """Design note 1: π's log-probs recorded while it samples (raw logits, one vocabulary row kept at
    a time) equal a forward pass over the same ids, to float rounding (fp32: under 1e-4 nats)."""
    from sppo_lightning.data.tokenize import collate_responses
    from sppo_lightning.generation import sample_responses_with_logprobs
    from sppo_lightning.logprobs import model_logprobs

    ids = prompt_ids(tokenizer)
    options = dict(temperature=0.7, top_p=0.9, max_new_tokens=12, batch_size=2, seed=7)
    responses, logps = sample_responses_with_logprobs(model, tokenizer, ids, 3, **options)
    assert responses == sample_responses(model, tokenizer, ids, 3, **options)  # recording changes no sample
    rows = [{"prompt_ids": p, "response": r} for p, rs in zip(ids, responses) for r in rs]
    with torch.no_grad():
        forward = model_logprobs(model.eval(), collate_responses(rows, "response", tokenizer.pad_token_id)).sum
    recorded = torch.tensor([x for xs in logps for x in xs])
    assert recorded.shape == forward.shape and (recorded < 0).all()
    torch.testing.assert_close(recorded, forward, atol=1e-4, rtol=0)


def test_sampler_log_probs_refuse_a_model_whose_config_processes_logits(tiny_llama, tokenizer):
    from sppo_lightning.errors import ConfigError
    from sppo_lightning.generation import sample_responses_with_logprobs

    processed = AutoModelForCausalLM.from_pretrained(tiny_llama)
    processed.generation_config.repetition_penalty = 1.3
    with pytest.raises(ConfigError, match=r"generation config processes the logits \(repetition_penalty=1.3\)"):
        sample_responses_with_logprobs(processed, tokenizer, prompt_ids(tokenizer, 1), 2, max_new_tokens=4)
