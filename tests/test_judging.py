"""`sppo-lightning judge`: two `generate` outputs judged head to head by any ranker, LLM judges
included, through the real CLI entry point."""

import json
from pathlib import Path

import pytest

from sppo_lightning.cli import main

DATA = Path(__file__).with_name("data")


@pytest.fixture
def alpaca_answers(tiny_llama, tmp_path):
    a = tmp_path / "a.json"
    main(["generate", tiny_llama, str(DATA / "alpaca_eval_sample.json"), str(a), "--format", "alpaca_eval",
          "--max-new-tokens", "12", "--temperature", "1.0"])
    rows = json.loads(a.read_text())
    b = tmp_path / "b.json"  # model B answers every instruction with one letter: shorter than A, always
    b.write_text(json.dumps([{**r, "output": "x", "generator": "short"} for r in rows]))
    return a, b, len(rows)


def test_a_function_judge_decides_two_alpaca_eval_files(alpaca_answers, tmp_path, capsys):
    a, b, n = alpaca_answers
    out = tmp_path / "judged.json"
    main(["judge", str(a), str(b), "--ranker",
          "{class_path: sppo_lightning.ranking.FunctionJudge, init_args: {function: "
          "'sppo_lightning.ranking.judges:shorter', show_progress: false}}", "--out", str(out)])
    assert f"win rate 0.000 over {n} items (ties 0)" in capsys.readouterr().out  # B is shorter every time
    items = json.loads(out.read_text())["items"]
    assert len(items) == n and all(item["margin"] < 0 for item in items)
    main(["judge", str(b), str(a), "--ranker", "{class_path: sppo_lightning.ranking.FunctionJudge, "
          "init_args: {function: 'sppo_lightning.ranking.judges:shorter'}}"])
    assert "win rate 1.000" in capsys.readouterr().out


def test_an_llm_judge_with_a_cache_asks_once(alpaca_answers, tiny_llama, tmp_path, capsys):
    a, b, n = alpaca_answers
    ranker = tmp_path / "ranker.yaml"
    ranker.write_text(f"class_path: sppo_lightning.ranking.LLMJudge\ninit_args: {{path: {tiny_llama}, "
                      f"show_progress: false}}\n")
    for _ in range(2):
        main(["judge", str(a), str(b), "--ranker", str(ranker), "--cache-dir", str(tmp_path / "cache")])
    first, second = [line for line in capsys.readouterr().out.splitlines() if "win rate" in line]
    assert f"{2 * n} judge questions asked, 0 from the cache" in first  # both orders
    assert f"0 judge questions asked, {2 * n} from the cache" in second
    assert first.split("win rate")[1][:6] == second.split("win rate")[1][:6]


def test_mt_bench_answers_with_their_questions(tiny_llama, tmp_path, capsys):
    a = tmp_path / "a.jsonl"
    main(["generate", tiny_llama, str(DATA / "mt_bench_question.jsonl"), str(a), "--format", "mt_bench",
          "--max-new-tokens", "6"])
    rows = [json.loads(line) for line in a.read_text().splitlines()]
    b = tmp_path / "b.jsonl"
    b.write_text("".join(json.dumps({**r, "choices": [{"index": 0, "turns": ["y" * 200] * len(r["choices"][0]["turns"])}]})
                         + "\n" for r in rows))
    spec = "{class_path: sppo_lightning.ranking.FunctionJudge, init_args: {function: 'sppo_lightning.ranking.judges:shorter'}}"
    main(["judge", str(a), str(b), "--questions", str(DATA / "mt_bench_question.jsonl"), "--ranker", spec])
    assert f"win rate 1.000 over {len(rows)} items" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:  # without the questions: one line, exit 2
        main(["judge", str(a), str(b), "--ranker", spec])
    assert exit_info.value.code == 2
    assert "need the questions file" in capsys.readouterr().err


def test_a_bad_ranker_block_is_one_line(alpaca_answers, capsys):
    a, b, _ = alpaca_answers
    with pytest.raises(SystemExit) as exit_info:
        main(["judge", str(a), str(b), "--ranker", "{class_path: no.such.Ranker}"])
    assert exit_info.value.code == 2 and "--ranker: cannot import 'no.such.Ranker'" in capsys.readouterr().err
