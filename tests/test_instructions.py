"""IFEval / IFBench instruction checks (ranking/instructions.py) and VerifiableInstructionRanker
(ranking/verifiable.py), against if-verifiable's own results and hand values."""

import json
from pathlib import Path

import pytest
import torch
from if_verifiable.api import evaluate_output_for_sample
from if_verifiable.types import IFBenchSample, IFEvalSample

from sppo_lightning.data.prompts import instruction_meta, load_prompts
from sppo_lightning.errors import ConfigError, DataError
from sppo_lightning.pipeline.stages import ranker_prompts
from sppo_lightning.ranking import VerifiableInstructionRanker
from sppo_lightning.ranking.instructions import InstructionChecks
from sppo_lightning.ranking.protocol import fingerprint_hash

DATA = Path(__file__).parent / "data" / "ifeval_prompts.jsonl"
ROWS = [json.loads(line) for line in DATA.read_text().splitlines()]
RESPONSES = ["the sky is blue and wide", "The sky, it is Blue.", "", "Sure here it is:\nthe sky is blue\n**end**",
             "The Moon is Earth's only natural satellite and it orbits us every month or so, give or take a day",
             "dogs are loyal friends"]


def record(row):
    return row["prompt"], instruction_meta(row)


def library_result(row, response):
    """if-verifiable's own per-instruction results for one row (IFEval's or IFBench's registry)."""
    from if_verifiable.ifbench.instructions_registry import INSTRUCTION_DICT as IFBENCH

    ifbench = row["instruction_id_list"][0] in IFBENCH
    sample_type, benchmark = (IFBenchSample, "ifbench") if ifbench else (IFEvalSample, "ifeval")
    meta = instruction_meta(row)
    sample = sample_type(row["key"], row["prompt"], meta["instruction_id_list"], meta["kwargs"])
    return evaluate_output_for_sample(benchmark, sample, response)


@pytest.mark.parametrize("row", [r for r in ROWS if "ratio:stop_words" not in r["instruction_id_list"]],
                         ids=lambda r: str(r["key"]))
@pytest.mark.parametrize("response", RESPONSES, ids=range(len(RESPONSES)))
def test_checks_equal_if_verifiable(row, response):
    checks = InstructionChecks()
    checked = checks.check(*record(row), response)
    results, scores = library_result(row, response)
    if not response.strip():  # IFEval: an empty response follows none of its instructions
        assert checked.strict == checked.loose == [False] * len(row["instruction_id_list"])
        assert results == [] and scores.binary_loose == 0.0
        return
    assert checked.ids == [r.instruction_id for r in results]
    assert checked.strict == [r.strict_pass for r in results]
    assert checked.loose == [r.loose_pass for r in results]


def test_hand_values_strict_and_loose():
    checks = InstructionChecks()
    lowercase_no_comma = record(ROWS[0])
    assert checks.check(*lowercase_no_comma, "the sky is blue and wide").strict == [True, True]
    assert checks.check(*lowercase_no_comma, "The sky, blue").strict == [False, False]
    # Loose forgives a first line ("Sure here it is:") and markdown asterisks; strict does not.
    checked = checks.check(*lowercase_no_comma, "Sure, here it is:\nthe sky is blue")
    assert checked.strict == [False, False] and checked.loose == [True, True]


def test_a_checker_that_cannot_run_here_is_screened_in_one_line():
    checks = InstructionChecks()
    keep, lines = checks.screen([record(r) for r in ROWS])
    # ratio:stop_words needs NLTK's stopwords, which cannot be downloaded offline
    assert keep == [0, 1, 2, 3, 5]
    assert len(lines) == 1 and lines[0].startswith("instruction ratio:stop_words cannot be checked here")
    assert "1 prompt(s) with it dropped" in lines[0] and "stopwords" in lines[0]
    # Scored on the instructions that can be checked, never failing
    checked = checks.check(*record(ROWS[4]), "cats are nice")
    assert checked.ids == ["punctuation:no_comma"] and checked.dropped == ["ratio:stop_words"]


def test_unknown_instruction_is_named():
    checks = InstructionChecks()
    row = {"prompt": "x", "instruction_id_list": ["made:up"], "kwargs": [{}]}
    keep, lines = checks.screen([record(row)])
    assert keep == [] and lines == ["instruction made:up cannot be checked here (unknown instruction id): "
                                    "1 prompt(s) with it dropped"]


def test_ranker_rewards_hand_values():
    fraction = VerifiableInstructionRanker(show_progress=False)
    (view,) = ranker_prompts(fraction, None, [{"prompt": ROWS[0]["prompt"], "prompt_messages": [],
                                               "prompt_meta": json.dumps(instruction_meta(ROWS[0]))}])
    candidates = [["the sky is blue", "The sky, blue", "the sky, blue", ""]]
    assert fraction.rewards([view], candidates).tolist() == [[1.0, 0.0, 0.5, 0.0]]
    every = VerifiableInstructionRanker(score="all", show_progress=False)
    assert every.rewards([view], candidates).tolist() == [[1.0, 0.0, 0.0, 0.0]]
    penalised = VerifiableInstructionRanker(length_penalty=1.0, show_progress=False)
    assert penalised.rewards([view], candidates)[0].tolist() == pytest.approx([0.96, -0.03, 0.47, 0.0])
    m = fraction.pairwise_logits([view], candidates)
    assert m.shape == (1, 4, 4) and m[0, 0, 1] == 1.0 and m[0, 1, 0] == -1.0 and m[0, 2, 0] == -0.5


def test_ranker_fingerprint_and_settings():
    a, b = VerifiableInstructionRanker(), VerifiableInstructionRanker(mode="strict")
    assert fingerprint_hash(a.fingerprint()) != fingerprint_hash(b.fingerprint())
    assert a.fingerprint()["if_verifiable"]
    with pytest.raises(ConfigError, match="score must be fraction or all"):
        VerifiableInstructionRanker(score="best")
    with pytest.raises(ConfigError, match="length_penalty"):
        VerifiableInstructionRanker(length_penalty=-1)


def test_ranker_refuses_prompts_without_instructions():
    with pytest.raises(DataError, match="instruction_id_list and kwargs"):
        VerifiableInstructionRanker(show_progress=False).rewards(["plain text"], [["a", "b"]])


def test_ifeval_format_prompts_keep_their_instructions(tokenizer, tmp_path):
    prompts, _, _ = load_prompts(str(DATA), tokenizer, 64)
    assert [p.meta["key"] for p in prompts] == [r["key"] for r in ROWS]
    assert prompts[1].meta["kwargs"] == [{"keywords": ["blue", "sky"]}]
    assert prompts[5].meta["kwargs"] == [{}]  # None-valued arguments dropped, as IFEval does
    bad = tmp_path / "bad.jsonl"
    bad.write_text(DATA.read_text() + json.dumps({"prompt": "x", "instruction_id_list": "no", "kwargs": []}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl: row 7: column 'instruction_id_list': expected a non-empty list"):
        load_prompts(str(bad), tokenizer, 64)
    bad.write_text(json.dumps({"prompt": "x", "instruction_id_list": ["a:b", "c:d"], "kwargs": [{}]}) + "\n")
    with pytest.raises(DataError, match="must be a list of 2 dicts"):
        load_prompts(str(bad), tokenizer, 64)


def test_sppo_ranks_with_the_checkers(tmp_path, tiny_llama, tokenizer):
    """One SPPO iteration's data on IFEval-format prompts: the instructions are kept with the
    generations, and every ranking equals if-verifiable's own loose fraction per response."""
    import pyarrow.parquet as pq

    from sppo_lightning.distributed import DistContext
    from sppo_lightning.methods import SPPO
    from sppo_lightning.policies import Policies
    from sppo_lightning.models import load_causal_lm
    from sppo_lightning.pipeline import HFGenerator

    prompts, _, _ = load_prompts(str(DATA), tokenizer, 64)
    prompts = [p for p in prompts if "ratio:stop_words" not in p.meta["instruction_id_list"]]
    method = SPPO(VerifiableInstructionRanker(show_progress=False), num_samples=3,
                  generator=HFGenerator(temperature=1.0, top_p=1.0, max_new_tokens=12, batch_size=4,
                                        show_progress=False))
    try:
        method.build(0, prompts, Policies(load_causal_lm(tiny_llama)), tokenizer, DistContext(), tmp_path / "run")
    except DataError as err:  # a random tiny model may tie everywhere: the stages before are still written
        assert "tied" in str(err)
    folder = tmp_path / "run" / "iteration_1"
    generations = pq.read_table(folder / "generations.parquet").to_pylist()
    rankings = pq.read_table(folder / "rankings.parquet").to_pylist()
    by_key = {r["key"]: r for r in ROWS}
    for g, r in zip(generations, rankings):
        meta = json.loads(g["prompt_meta"])
        row = by_key[meta["key"]]
        assert meta["instruction_id_list"] == row["instruction_id_list"]
        expected = [library_result(row, text)[1].partial_loose for text in g["responses"]]
        m = torch.tensor(r["pairwise_logits"], dtype=torch.float64)
        assert torch.allclose(m, torch.tensor([[a - b for b in expected] for a in expected], dtype=torch.float64))


@pytest.mark.parametrize("method_name", ["JBOND", "OnlinePairs"])
def test_jbond_and_online_rank_with_the_checkers(tmp_path, tiny_llama, tokenizer, method_name):
    """The ranker of J-BOND and of the online method too: one iteration built Trainer-free, the
    prompts' instructions reach it (no 'prompt without instructions' error)."""
    from sppo_lightning import methods
    from sppo_lightning.distributed import DistContext
    from sppo_lightning.policies import Policies
    from sppo_lightning.models import load_causal_lm
    from sppo_lightning.pipeline import HFGenerator

    prompts, _, _ = load_prompts(str(DATA), tokenizer, 64)
    generator = HFGenerator(temperature=1.0, top_p=1.0, max_new_tokens=8, batch_size=4, show_progress=False)
    ranker = VerifiableInstructionRanker(length_penalty=0.5, show_progress=False)
    if method_name == "JBOND":
        method = methods.JBOND(ranker, generator=generator, n=2, quantile_samples=2, on_policy=False)
    else:
        method = methods.OnlinePairs(ranker, generator=generator, num_samples=3, on_policy=False)
    import contextlib

    policy, anchor = load_causal_lm(tiny_llama), load_causal_lm(tiny_llama)  # J-BOND samples its anchor too
    policies = Policies(policy, roles={"anchor": lambda: contextlib.nullcontext(anchor)})
    data = method.build(0, prompts[:4], policies, tokenizer, DistContext(), tmp_path / "run")
    assert len(data.pairs) > 0


def test_prompts_the_ranker_cannot_score_are_dropped_at_start_up_in_one_line(tiny_llama, tmp_path):
    from sppo_lightning.datamodules import SelfPlayDataModule
    from sppo_lightning.methods import SPPO

    method = SPPO(VerifiableInstructionRanker(show_progress=False))
    data = SelfPlayDataModule(method, str(DATA), eval_prompts=str(DATA), tokenizer=tiny_llama)
    with pytest.warns(UserWarning) as warned:
        data.setup("fit")
    assert [p.meta["key"] for p in data.prompts] == [r["key"] for r in ROWS if "ratio:stop_words" not in
                                                      r["instruction_id_list"]]
    assert len(data.eval_prompts) == len(data.prompts)
    lines = [str(w.message) for w in warned if "cannot be checked here" in str(w.message)]
    assert len(lines) == 2 and lines[0].startswith(f"{DATA}: instruction ratio:stop_words cannot be checked here")
    assert lines[0].endswith("1 prompt(s) with it dropped")
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"prompt": "Name a color."}) + "\n")
    with pytest.raises(DataError, match="needs IFEval's columns instruction_id_list and kwargs"):
        SelfPlayDataModule(method, str(plain), tokenizer=tiny_llama).setup("fit")
