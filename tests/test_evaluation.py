"""`sppo-lightning generate` writes AlpacaEval's and MT-Bench's answer formats (fixtures follow
their documented schemas: AlpacaEval's alpaca_eval.json rows, FastChat's mt_bench question.jsonl)."""

import json
import re
from pathlib import Path

import pytest

from sppo_lightning.cli import main
from sppo_lightning.evaluation import answer
from sppo_lightning.models import load_causal_lm, load_tokenizer

DATA = Path(__file__).with_name("data")


def test_alpaca_eval_model_outputs(tiny_llama, tmp_path):
    out = tmp_path / "model_outputs.json"
    main(["generate", tiny_llama, str(DATA / "alpaca_eval_sample.json"), str(out), "--format", "alpaca_eval",
          "--name", "tiny-sppo", "--max-new-tokens", "6"])
    rows = json.loads(out.read_text())
    source = json.loads((DATA / "alpaca_eval_sample.json").read_text())
    assert isinstance(rows, list) and len(rows) == len(source)
    for row, src in zip(rows, source):
        assert set(row) == {"instruction", "output", "generator", "dataset"}
        assert row["instruction"] == src["instruction"] and row["dataset"] == src["dataset"]
        assert row["generator"] == "tiny-sppo"
        assert isinstance(row["output"], str) and row["output"] != src["output"]


def test_mt_bench_answers_answer_every_turn_in_context(tiny_llama, tmp_path):
    out = tmp_path / "tiny.jsonl"
    main(["generate", tiny_llama, str(DATA / "mt_bench_question.jsonl"), str(out), "--format", "mt_bench",
          "--max-new-tokens", "6"])
    questions = [json.loads(line) for line in (DATA / "mt_bench_question.jsonl").read_text().splitlines()]
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert [a["question_id"] for a in answers] == [q["question_id"] for q in questions]
    for a, q in zip(answers, questions):
        assert set(a) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
        assert a["model_id"] == "llama" and isinstance(a["answer_id"], str) and isinstance(a["tstamp"], float)
        assert len(a["choices"]) == 1 and a["choices"][0]["index"] == 0
        assert len(a["choices"][0]["turns"]) == len(q["turns"])
    # turn 2 was answered after turn 1 and its answer, greedily: the same as asking it that way
    model, tokenizer = load_causal_lm(tiny_llama), load_tokenizer(tiny_llama)
    first = questions[0]
    conversation = [{"role": "user", "content": first["turns"][0]},
                    {"role": "assistant", "content": answers[0]["choices"][0]["turns"][0]},
                    {"role": "user", "content": first["turns"][1]}]
    assert answer(model, tokenizer, [conversation], max_new_tokens=6, show_progress=False) == \
        [answers[0]["choices"][0]["turns"][1]]


def test_greedy_answers_do_not_depend_on_the_batch(tiny_llama):
    model, tokenizer = load_causal_lm(tiny_llama), load_tokenizer(tiny_llama)
    conversations = [[{"role": "user", "content": q}] for q in ("Name a color.", "What is 2 plus 3?", "Why?")]
    together = answer(model, tokenizer, conversations, max_new_tokens=5, batch_size=3, show_progress=False)
    alone = [answer(model, tokenizer, [c], max_new_tokens=5, show_progress=False)[0] for c in conversations]
    assert together == alone


@pytest.mark.parametrize("content, message", [
    ('{"question_id": "81", "turns": ["Hi"]}\n', "column 'question_id': expected an integer"),
    ('{"question_id": 81, "turns": []}\n', "column 'turns': expected a non-empty list"),
    ('{"question_id": 81, "turns": ["Hi", ""]}\n', r"column 'turns' \[1\]: expected a non-empty string"),
])
def test_bad_mt_bench_questions_name_row_and_column(tiny_llama, tmp_path, capsys, content, message):
    bad = tmp_path / "question.jsonl"
    bad.write_text(content)
    with pytest.raises(SystemExit) as exit_:
        main(["generate", tiny_llama, str(bad), str(tmp_path / "out.jsonl"), "--format", "mt_bench"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert re.search(f"question.jsonl: row 1: {message}", err) and not (tmp_path / "out.jsonl").exists()



def test_a_model_folder_that_is_not_there_is_no_such_folder(tmp_path, capsys):
    """The README's old mistake (a version folder that a resume moved): the same line fit gives, not the hub's id rules."""
    missing = "runs/nowhere/lightning_logs/version_0/hf_model"
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", missing, str(DATA / "alpaca_eval_sample.json"), str(tmp_path / "out.json"),
              "--format", "alpaca_eval"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == (f"sppo-lightning: error: could not load the model '{missing}' "
                                               f"(generate's <model>): no such folder")
    assert not (tmp_path / "out.json").exists()
