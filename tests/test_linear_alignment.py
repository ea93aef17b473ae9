import json
import math

import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM

from sppo_lightning.decoding import LinearAlignmentSettings, linear_alignment_generate, linear_alignment_step, nucleus_mask
from sppo_lightning.decoding.linear_alignment import with_principle
from tests.helpers import QUESTIONS, REPO, fit_self_play as fit

PRINCIPLE = "Be positive, kind and helpful; say good things."


@pytest.fixture(scope="module")
def model(tiny_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_dir / "llama").eval()


@pytest.fixture(scope="module")
def tok(tiny_dir):
    from sppo_lightning.models import load_tokenizer

    return load_tokenizer(str(tiny_dir / "llama"))


def softmax(xs):
    e = [math.exp(x) for x in xs]
    return [v / sum(e) for v in e]


def test_step_hand_computed_on_five_tokens():
    z_c = torch.tensor([[2.0, 1.0, 0.0, 0.0, -1.0]])
    z_0 = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0]])
    q, fallback = linear_alignment_step(z_c, z_0, alpha=1.0, temperature=1.0, top_p=0.8)
    # z̃ = 2·z_c − z_0 = [3, 1, −1, 0, −2]; principled p_c = softmax(z_c) = [.592, .218, .080, .080, .030]:
    # mass before each sorted token = [0, .592, .810, ...] < 0.8 keeps tokens 0 and 1 only.
    p = softmax([3, 1, -1, 0, -2])
    pc = softmax([2, 1, 0, 0, -1])
    assert q[0].tolist() == pytest.approx([p[0], p[1], 0, 0, 0], rel=1e-5)
    assert fallback[0].tolist() == pytest.approx([pc[0], pc[1], 0, 0, 0], rel=1e-5)
    # T divides the *combined* logits, and the mask comes from softmax(z_c / T): at T = 0.5 the top
    # principled token alone holds 0.851 ≥ 0.8 of the mass, so only it survives.
    q_t, _ = linear_alignment_step(z_c, z_0, alpha=1.0, temperature=0.5, top_p=0.8)
    p_t = softmax([6, 2, -2, 0, -4])
    assert q_t[0].tolist() == pytest.approx([p_t[0], 0, 0, 0, 0], rel=1e-5)


def test_nucleus_always_keeps_the_top_token_and_can_empty_q():
    assert nucleus_mask(torch.tensor([[0.1, 0.7, 0.2]]), top_p=0.0).tolist() == [[False, True, False]]
    # Large α can put all combined mass outside the principled nucleus: q is 0, the fallback is not.
    q, fallback = linear_alignment_step(torch.tensor([[5.0, 0.0]]), torch.tensor([[100.0, 0.0]]), 2.0, 0.5, 0.8)
    assert q.sum() == 0 and fallback[0, 0] > 0.99


def test_alpha_zero_is_greedy_decoding_with_the_principled_prompt(model, tok):
    ids = linear_alignment_generate(model, tok, ["Tell me about the moon."], PRINCIPLE,
                                    LinearAlignmentSettings(alpha=0.0), max_new_tokens=12)
    prompt = tok.apply_chat_template(with_principle([{"role": "user", "content": "Tell me about the moon."}], PRINCIPLE),
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True, tokenize=True)
    greedy = model.generate(**prompt, do_sample=False, max_new_tokens=12, pad_token_id=tok.pad_token_id)
    expected = greedy[0, prompt["input_ids"].shape[1]:].tolist()
    assert ids[0] == expected[: len(ids[0])] and len(ids[0]) == len(expected)


def test_batch_equals_one_by_one_with_different_principle_lengths(model, tok):
    prompts = ["Tell me about the moon.", [{"role": "system", "content": "You answer."},
                                           {"role": "user", "content": "Why is the cat good?"}], "Hi"]
    principles = [PRINCIPLE, "Be brief.", PRINCIPLE + " Mention the sky and the sun, always, in every answer."]
    for settings in (LinearAlignmentSettings(), LinearAlignmentSettings(alpha=3.0, do_sample=True)):
        batched = linear_alignment_generate(model, tok, prompts, principles, settings, max_new_tokens=16, batch_size=3)
        alone = [linear_alignment_generate(model, tok, [p], [c], settings, max_new_tokens=16, batch_size=3)[0]
                 for p, c in zip(prompts, principles)] if not settings.do_sample else None
        if alone is not None:
            assert batched == alone
        else:  # sampling: seeded, so repeatable
            again = linear_alignment_generate(model, tok, prompts, principles, settings, max_new_tokens=16, batch_size=3)
            assert batched == again
        for response in batched:
            assert tok.eos_token_id not in response[:-1]


def test_the_principle_changes_the_output(model, tok):
    steered = linear_alignment_generate(model, tok, QUESTIONS, PRINCIPLE, LinearAlignmentSettings(alpha=5.0))
    plain = linear_alignment_generate(model, tok, QUESTIONS, PRINCIPLE, LinearAlignmentSettings(alpha=0.0))
    assert steered != plain


def test_predict_through_the_cli(tiny_dir, tmp_path):
    import os
    import subprocess
    import sys

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Hi"}) + "\n" + json.dumps({"prompt": "Name a color.", "principle": "Be brief."}) + "\n")
    out = tmp_path / "out.jsonl"
    script = [str(p) for p in [sys.executable, "-m", "sppo_lightning.cli"]]
    result = subprocess.run(
        script + ["predict", "--config", "configs/linear_alignment.yaml", "--model.model_name_or_path",
                  str(tiny_dir / "llama"), "--data.prompts", str(prompts),
                  "--trainer.callbacks.init_args.path", str(out), "--trainer.default_root_dir", str(tmp_path)],
        cwd=REPO, env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1]
    assert rows[0]["principle"].startswith("Be positive") and rows[1]["principle"] == "Be brief."
    assert all(isinstance(r["response"], str) for r in rows)


def test_aligned_sampling_for_self_play(tmp_path, tiny_llama):
    aligned = {"principle": PRINCIPLE, "alpha": 2.0}  # a LinearAlignmentGenerator (tests/self_play_setup.py)
    fit(tmp_path, tiny_llama, run_dir=tmp_path / "a", aligned_sampling=aligned)
    fit(tmp_path, tiny_llama, run_dir=tmp_path / "b")
    a = pq.read_table(tmp_path / "a" / "iteration_1" / "generations.parquet").to_pylist()
    b = pq.read_table(tmp_path / "b" / "iteration_1" / "generations.parquet").to_pylist()
    assert [g["response_ids"] for g in a] != [g["response_ids"] for g in b]
    assert all(len(g["response_ids"]) == 3 for g in a)
    fit(tmp_path, tiny_llama, run_dir=tmp_path / "c", aligned_sampling=aligned)
    c = pq.read_table(tmp_path / "c" / "iteration_1" / "generations.parquet").to_pylist()
    assert a == c  # seeded


def test_the_generator_key_selects_linear_alignment(tmp_path, tiny_llama):
    """``SPPO(generator=LinearAlignmentGenerator(...))``: the one way to sample with Linear Alignment."""
    from sppo_lightning.decoding import LinearAlignmentGenerator

    generator = LinearAlignmentGenerator(PRINCIPLE, alpha=2.0, max_new_tokens=8, batch_size=4)
    fit(tmp_path, tiny_llama, run_dir=tmp_path / "g", generator=generator)
    fit(tmp_path, tiny_llama, run_dir=tmp_path / "plain")
    g = pq.read_table(tmp_path / "g" / "iteration_1" / "generations.parquet").to_pylist()
    plain = pq.read_table(tmp_path / "plain" / "iteration_1" / "generations.parquet").to_pylist()
    assert [r["response_ids"] for r in g] != [r["response_ids"] for r in plain]
    manifest = json.loads((tmp_path / "g" / "iteration_1" / "manifest.json").read_text())
    assert manifest["settings"]["generator"]["class"] == "LinearAlignmentGenerator"
    assert manifest["settings"]["generator"]["principle"] == PRINCIPLE
