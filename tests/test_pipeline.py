"""The self-play pipeline without a Trainer: each stage on the tiny Llama, a function judge and a
tmp run dir; then a whole SPPO iteration with ``SPPO.build`` in a plain process."""

import json
import warnings

import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM

from sppo_lightning.data.prompts import load_prompts
from sppo_lightning.data.tokenize import collate_pairs
from sppo_lightning.errors import ConfigError, DataError
from sppo_lightning.logprobs import model_logprobs
from sppo_lightning.methods import SPPO
from sppo_lightning.policies import Policies
from sppo_lightning.pipeline import DistContext, HFGenerator, stages
from sppo_lightning.ranking import FunctionJudge, fingerprint_of, weights_fingerprint

QUESTIONS = ["Tell me about the moon.", "What is 2 plus 3?", "Why is the sky blue?", "Name a color.",
             "What is 4 plus 4?"]
SEEN_PROMPTS: list[str] = []


def recording_judge(prompt, response):
    SEEN_PROMPTS.append(prompt)
    return -float(len(response))


def longer(prompt, response):
    return float(len(response))


def boom(prompt, response):
    if "sky" in prompt:
        raise ValueError("boom")
    return 0.0


@pytest.fixture
def prompts(tmp_path, tokenizer):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in QUESTIONS))
    return load_prompts(str(path), tokenizer, 32)[0]


@pytest.fixture(scope="module")
def policy(tiny_llama):
    return AutoModelForCausalLM.from_pretrained(tiny_llama).eval()


class CountingGenerator(HFGenerator):
    def __init__(self, **kwargs):
        super().__init__(show_progress=False, **kwargs)
        self.calls = 0

    def sample(self, *args, **kwargs):
        self.calls += 1
        return super().sample(*args, **kwargs)


def test_generate_stage_is_seeded_and_keeps_token_ids(policy, tokenizer, prompts):
    generator = HFGenerator(max_new_tokens=6, batch_size=2, show_progress=False)
    rows = stages.generate(generator, policy, tokenizer, prompts, 3, seed=7, ctx=DistContext())
    assert [r["prompt_index"] for r in rows] == list(range(len(QUESTIONS)))
    for row, prompt in zip(rows, prompts):
        assert row["prompt_ids"] == prompt.ids and len(row["response_ids"]) == 3
        assert all(1 <= len(ids) <= 6 for ids in row["response_ids"])
        assert row["responses"] == tokenizer.batch_decode(row["response_ids"], skip_special_tokens=True)
    again = stages.generate(generator, policy, tokenizer, prompts, 3, seed=7, ctx=DistContext())
    assert again == rows
    # a shard that starts at batch 1 draws what the whole list draws there
    shard = stages.generate(generator, policy, tokenizer, prompts[2:], 3, seed=7, ctx=DistContext(), batch_offset=1)
    assert shard == rows[2:]


def test_rank_stage_pair_logits_and_prompt_view(tokenizer):
    generations = [{"prompt_index": 0, "prompt": "Hi?", "prompt_messages": [{"role": "user", "content": "Hi?"}],
                    "responses": ["a", "abc", "ab"]}]
    SEEN_PROMPTS.clear()
    (row,) = stages.rank(FunctionJudge(f"{__name__}:recording_judge"), tokenizer, generations)
    m = torch.tensor(row["pairwise_logits"])
    assert torch.equal(m, -m.T) and torch.equal(m.diagonal(), torch.zeros(3))
    assert m[0, 1] == 2.0  # "a" beats "abc" by 2 characters
    assert row["rm_scores"] == pytest.approx([2.0, -2.0, 0.0])  # mean_j(M_ij - M_ji) = 2(r_i - mean r)
    assert set(SEEN_PROMPTS) == {"Hi?"}
    SEEN_PROMPTS.clear()
    stages.rank(FunctionJudge(f"{__name__}:recording_judge", prompt_view="chat"), tokenizer, generations)
    templated = tokenizer.apply_chat_template([{"role": "user", "content": "Hi?"}], tokenize=False,
                                              add_generation_prompt=True)
    assert set(SEEN_PROMPTS) == {templated} and templated != "Hi?"


class RaisingRanker:
    prompt_view = "raw"

    def fingerprint(self):
        return {"class": "RaisingRanker"}

    def pairwise_logits(self, prompts, candidates):
        raise RuntimeError("out of luck")


def test_a_judge_that_raises_names_the_rows(tokenizer):
    generations = [{"prompt_index": i, "prompt": p, "prompt_messages": [], "responses": ["a", "b"]}
                   for i, p in enumerate(["Hi", "Why is the sky blue?"])]
    # a function judge names the row; the stage makes it the iteration's row (the shard starts at 8)
    with pytest.raises(DataError, match=rf"judge {__name__}:boom: prompt row 10, candidate 0: raised ValueError: "
                                        r"boom \(the generations are kept"):
        stages.rank(FunctionJudge(f"{__name__}:boom"), tokenizer, generations, first_row=8)
    # any other ranker: the rows of the shard
    with pytest.raises(DataError, match=r"RaisingRanker failed on prompt rows 9-10 of generations.parquet "
                                        r"\(RuntimeError: out of luck\); the generations are kept"):
        stages.rank(RaisingRanker(), tokenizer, generations, first_row=8)


def test_estimate_pairs_hand_case():
    def gen(i, ids):
        return {"prompt_index": i, "prompt": f"p{i}", "prompt_ids": [1], "response_ids": ids,
                "prompt_messages": [{"role": "user", "content": f"p{i}"}], "responses": [str(x[0]) for x in ids]}

    generations = [gen(0, [[5], [6], [7]]), gen(1, [[5], [6], [7]]), gen(2, [[5], [5], [7]])]
    rankings = [{"rm_scores": [0.0, 2.0, -2.0]}, {"rm_scores": [1.0, 1.0, 1.0]}, {"rm_scores": [3.0, 3.0, 0.0]}]
    pairs, ties = stages.estimate_pairs(generations, rankings, iteration=0)
    assert ties == 1 and [p["prompt_index"] for p in pairs] == [0, 2]
    first = pairs[0]
    assert (first["chosen_index"], first["rejected_index"]) == (1, 2)
    sig = lambda x: 1 / (1 + torch.exp(torch.tensor(-x, dtype=torch.float64))).item()  # noqa: E731
    assert first["chosen_probs"] == pytest.approx(sig(4.0))
    assert first["chosen_probs_win"] == pytest.approx((sig(2.0) + 0.5 + sig(4.0)) / 3)
    assert first["chosen_probs_lose"] == pytest.approx((sig(-2.0) + sig(-4.0) + 0.5) / 3)
    assert first["chosen"][-1] == {"role": "assistant", "content": "6"}
    # prompt 2: argmax is response 0 (first of the tie), argmin response 2
    assert (pairs[1]["chosen_ids"], pairs[1]["rejected_ids"]) == ([5], [7])


def test_reference_logps_stage_equals_a_plain_forward(policy, tokenizer):
    pairs = [{"prompt_ids": [1, 40, 41], "chosen_ids": [42, 43, 2], "rejected_ids": [44, 2]},
             {"prompt_ids": [1, 45], "chosen_ids": [46, 2], "rejected_ids": [47, 48, 49, 2]},
             {"prompt_ids": [1, 50, 51, 52], "chosen_ids": [53], "rejected_ids": [54, 55]}]
    stages.reference_logps(policy, pairs, tokenizer.pad_token_id, batch_size=2, ctx=DistContext())
    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    with torch.no_grad():
        expected = model_logprobs(policy, batch).sum
    stored = torch.tensor([p["reference_chosen_logps"] for p in pairs] + [p["reference_rejected_logps"] for p in pairs])
    torch.testing.assert_close(stored, expected, atol=1e-4, rtol=0)


def test_sppo_pipeline_builds_and_reuses_an_iteration_without_a_trainer(tmp_path, policy, tokenizer, prompts):
    generator = CountingGenerator(max_new_tokens=6, batch_size=2)
    pipeline = SPPO(FunctionJudge("sppo_lightning.ranking.judges:shorter"), generator, num_samples=3,
                    generation_shard_size=2)
    data = pipeline.build(0, prompts, Policies(policy), tokenizer, DistContext(), tmp_path / "run")
    folder = tmp_path / "run" / "iteration_1"
    assert generator.calls == 3  # shards of 2, 2 and 1 prompts
    train = pq.read_table(folder / "train.parquet").to_pylist()
    assert len(data.pairs) == len(train) == data.stats["pairs"] == len(QUESTIONS) - data.stats["ties_dropped"]
    assert set(data.stats["seconds"]) == {"generate", "rank", "reference"}
    assert (folder / "samples.md").read_text().startswith("| prompt | chosen |")
    again = pipeline.build(0, prompts, Policies(policy), tokenizer, DistContext(), tmp_path / "run")
    assert generator.calls == 3 and [dict(r) for r in again.pairs] == [dict(r) for r in data.pairs]


def test_a_changed_ranker_redoes_the_rankings_not_the_generations(tmp_path, policy, tokenizer, prompts):
    generator = CountingGenerator(max_new_tokens=6, batch_size=2)
    shorter = SPPO(FunctionJudge("sppo_lightning.ranking.judges:shorter"), generator, num_samples=3)
    shorter.build(0, prompts, Policies(policy), tokenizer, DistContext(), tmp_path)
    rankings = tmp_path / "iteration_1" / "rankings.parquet"
    before = pq.read_table(rankings).column("rm_scores").to_pylist()
    longer_ = SPPO(FunctionJudge(f"{__name__}:longer"), generator, num_samples=3)
    with pytest.warns(UserWarning, match="made from other input .*ranker.*redoing rankings"):
        longer_.build(0, prompts, Policies(policy), tokenizer, DistContext(), tmp_path)
    assert generator.calls == 1  # the generations were reused
    after = pq.read_table(rankings).column("rm_scores").to_pylist()
    assert after == [[-x for x in row] for row in before]  # the preference reversed
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same ranker again: everything reused, no warning
        longer_.build(0, prompts, Policies(policy), tokenizer, DistContext(), tmp_path)


def test_fingerprints_change_with_what_changes_the_scores(tmp_path, tiny_llama):
    a = fingerprint_of(FunctionJudge("sppo_lightning.ranking.judges:shorter"))
    assert a == fingerprint_of(FunctionJudge("sppo_lightning.ranking.judges:shorter"))
    assert a != fingerprint_of(FunctionJudge(f"{__name__}:longer"))
    assert a != fingerprint_of(FunctionJudge("sppo_lightning.ranking.judges:shorter", prompt_view="chat"))
    import shutil

    folder = tmp_path / "rm"
    shutil.copytree(tiny_llama, folder)
    before = weights_fingerprint(str(folder))
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # new weights in the same folder, same size
    weights.write_bytes(bytes(data))
    assert weights_fingerprint(str(folder)) != before
    assert weights_fingerprint("org/some-model") == {"hub_id": "org/some-model"}


class NoFingerprint:
    prompt_view = "raw"

    def pairwise_logits(self, prompts, candidates):
        return torch.zeros(len(prompts), len(candidates[0]), len(candidates[0]))


def test_a_ranker_without_fingerprint_is_refused_in_one_line_naming_what_it_lacks():
    # a resumed run could not tell a changed ranker from the one that made the rankings on disk
    with pytest.raises(ConfigError, match=r"SPPO: the ranker NoFingerprint lacks fingerprint; a ranker has "
                                          r"pairwise_logits\(\), fingerprint\(\) and prompt_view"):
        SPPO(NoFingerprint())
    with pytest.raises(ConfigError, match=r"the generator object lacks batch_size, fingerprint, max_new_tokens, "
                                          r"sample, temperature, top_p"):
        SPPO(FunctionJudge("sppo_lightning.ranking.judges:shorter"), generator=object())
