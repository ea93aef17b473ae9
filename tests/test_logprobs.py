import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from sppo_lightning.data.rows import PreferenceRow
from sppo_lightning.data.tokenize import collate_pairs, encode_row
from sppo_lightning.logprobs import sequence_logprobs


def _hand_logits():
    # position 0 predicts token 1 with p = 2/4; position 1 predicts token 2 with p = 3/5
    return torch.tensor([[[0.0, math.log(2), 0.0], [0.0, 0.0, math.log(3)], [5.0, -1.0, 2.0]]])


def test_hand_computed_sum_and_mean():
    out = sequence_logprobs(_hand_logits(), torch.tensor([[-100, 1, 2]]))
    assert out.sum.item() == pytest.approx(math.log(0.5 * 0.6), rel=1e-6)
    assert out.mean.item() == pytest.approx(math.log(0.3) / 2, rel=1e-6)
    assert out.n_tokens.item() == 2


def test_prompt_positions_are_masked():
    logits = _hand_logits()
    labels = torch.tensor([[1, -100, 2]])  # the label at 0 is never predicted; 1 is masked
    before = sequence_logprobs(logits, labels).sum
    logits[0, 0] = torch.tensor([9.0, -9.0, 3.0])  # predicts the masked position: no effect
    assert torch.equal(sequence_logprobs(logits, labels).sum, before)
    assert before.item() == pytest.approx(math.log(0.6), rel=1e-6)


def test_right_padding_invariance_of_the_reduction():
    logits, labels = _hand_logits(), torch.tensor([[-100, 1, 2]])
    padded_logits = torch.cat([logits, torch.randn(1, 4, 3)], dim=1)
    padded_labels = torch.cat([labels, torch.full((1, 4), -100)], dim=1)
    a, b = sequence_logprobs(logits, labels), sequence_logprobs(padded_logits, padded_labels)
    assert torch.allclose(a.sum, b.sum) and torch.allclose(a.mean, b.mean)


def test_bf16_logits_reduce_in_float32():
    out = sequence_logprobs(_hand_logits().to(torch.bfloat16), torch.tensor([[-100, 1, 2]]))
    assert out.sum.dtype == torch.float32


def test_model_logps_do_not_depend_on_batch_padding(tiny_llama, tokenizer):
    """A pair's log-probs are the same alone and right-padded next to a much longer pair."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    prompt = [{"role": "user", "content": "What is 2 plus 3?"}]
    short = encode_row(tokenizer, PreferenceRow(prompt, "5.", "six", {}, {}), 256, 128)
    long = encode_row(tokenizer, PreferenceRow(prompt, "It is five. " * 20, "no " * 30, {}, {}), 256, 128)

    def logps(examples):
        batch = collate_pairs(examples, tokenizer.pad_token_id)
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return sequence_logprobs(logits, batch["labels"])

    alone, padded = logps([short]), logps([short, long])
    # rows: [chosen_short, rejected_short] vs [chosen_short, chosen_long, rejected_short, rejected_long]
    assert torch.allclose(alone.sum, padded.sum[[0, 2]], atol=1e-5)
    # the EOS is counted: n_tokens = response ids including the EOS
    assert alone.n_tokens[0].item() == len(short["chosen_ids"])
    assert tokenizer.eos_token_id in short["chosen_ids"]


@pytest.mark.parametrize("lora", [False, True])
def test_fast_response_only_head_equals_full_logits(tiny_llama, tokenizer, lora):
    from sppo_lightning.logprobs import model_logprobs
    from sppo_lightning.models import LoraSettings, add_lora

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    if lora:
        model = add_lora(model, LoraSettings(r=4, alpha=8))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.1)
    prompt = [{"role": "user", "content": "What is 2 plus 3?"}]
    rows = [encode_row(tokenizer, PreferenceRow(prompt, c, r, {}, {}), 256, 128)
            for c, r in (("5.", "six " * 9), ("It is five. " * 12, "no"))]
    batch = collate_pairs(rows, tokenizer.pad_token_id)
    fast = model_logprobs(model, batch, chunk_tokens=7)  # several chunks
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    full = sequence_logprobs(logits, batch["labels"])
    torch.testing.assert_close(fast.sum, full.sum, atol=1e-4, rtol=1e-5)
    assert torch.equal(fast.n_tokens, full.n_tokens)
    params = [p for p in model.parameters() if p.requires_grad]
    grads_fast = torch.autograd.grad(fast.sum.sum(), params)
    grads_full = torch.autograd.grad(full.sum.sum(), params)
    for a, b in zip(grads_fast, grads_full):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
