"""IFEval's four numbers (instruction_following.py): against IFEval's own counting
(``evaluation_lib.generate_report``, written out below from if-verifiable's per-sample results),
by hand, and through ``sppo-lightning ifeval`` on the tiny model."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sppo_lightning.data.prompts import load_prompts
from sppo_lightning.errors import ConfigError, DataError
from sppo_lightning.instruction_following import InstructionFollowing, accuracy
from sppo_lightning.ranking.instructions import Checked
from tests.helpers import ifeval_reference

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data" / "ifeval_prompts.jsonl"
ROWS = [json.loads(line) for line in DATA.read_text().splitlines()]
CHECKABLE = [r for r in ROWS if "ratio:stop_words" not in r["instruction_id_list"]]


def test_accuracy_by_hand():
    results = [Checked(["a", "b"], [True, False], [True, True], []), Checked(["c"], [True], [True], []),
               Checked(["d", "e", "f"], [False, False, False], [True, False, False], [])]
    assert accuracy(results) == {"prompt_strict": 1 / 3, "instruction_strict": 2 / 6,
                                 "prompt_loose": 2 / 3, "instruction_loose": 4 / 6}
    with pytest.raises(DataError, match="no prompts"):
        accuracy([])


RESPONSES = ["the sky is blue and wide", "The sky is blue.", "", "Sure:\nfour five six seven\n**x**",
             "red, green and blue"]


def test_four_numbers_equal_ifevals_reference(tokenizer):
    prompts, _, _ = load_prompts(str(DATA), tokenizer, 64)
    evaluator = InstructionFollowing(prompts)
    assert [p.meta["key"] for p in evaluator.prompts] == [r["key"] for r in CHECKABLE]
    assert len(evaluator.notes) == 1 and "ratio:stop_words" in evaluator.notes[0]
    evaluation = evaluator.score(RESPONSES)
    assert evaluation.scores == pytest.approx(ifeval_reference(CHECKABLE, RESPONSES), abs=0)
    assert evaluation.words == sum(len(r.split()) for r in RESPONSES) / len(RESPONSES)


def test_plain_prompts_are_refused(tokenizer, tmp_path):
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"prompt": "hello"}) + "\n")
    prompts, _, _ = load_prompts(str(plain), tokenizer, 64)
    with pytest.raises(ConfigError, match="needs IFEval-format prompts"):
        InstructionFollowing(prompts)


def test_ifeval_command_writes_responses_and_scores(tiny_llama, tmp_path):
    out = tmp_path / "eval"
    result = subprocess.run([sys.executable, "-m", "sppo_lightning.cli", "ifeval", tiny_llama, str(DATA), str(out),
                             "--max-new-tokens", "8", "--batch-size", "4"], cwd=REPO, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "instruction ratio:stop_words cannot be checked here" in result.stdout
    lines = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in lines] == [r["prompt"] for r in CHECKABLE]
    scores = json.loads((out / "scores.json").read_text())
    reference = ifeval_reference(CHECKABLE, [r["response"] for r in lines])
    assert {k: scores[k] for k in reference} == reference
    assert scores["prompts"] == len(CHECKABLE) and len(scores["per_prompt"]) == len(CHECKABLE)
    assert "prompt strict" in result.stdout.splitlines()[-1]


def test_ifeval_command_bad_input_is_one_line(tmp_path, tiny_llama):
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"prompt": "hello"}) + "\n")
    result = subprocess.run([sys.executable, "-m", "sppo_lightning.cli", "ifeval", tiny_llama, str(plain),
                             str(tmp_path / "o")], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("sppo-lightning: error: ")
    assert "instruction_id_list" in result.stderr


def test_a_self_play_run_measures_instruction_following(tmp_path, tiny_llama):
    """Two SPPO iterations on IFEval-format prompts with the checkers as ranker: π_0 is measured
    before the first step, every iteration after, into the summary, metrics, report and plot; the
    greedy answers are kept, and a resumed boundary reads π_0's back."""
    import lightning as L

    from sppo_lightning.callbacks.following import HeldOutFollowing
    from sppo_lightning.callbacks.self_play import SelfPlay
    from sppo_lightning.datamodules import SelfPlayDataModule
    from sppo_lightning.methods import SPPO
    from sppo_lightning.module import PreferenceModule
    from sppo_lightning.pipeline import HFGenerator
    from sppo_lightning.ranking import VerifiableInstructionRanker

    ranker = VerifiableInstructionRanker(length_penalty=0.5, show_progress=False)  # few all-tied prompts
    method = SPPO(ranker, num_samples=4, generator=HFGenerator(temperature=1.0, top_p=1.0, max_new_tokens=8,
                                                                   batch_size=4, show_progress=False))
    boundary = SelfPlay(instruction_following=True, instruction_following_tokens=8)
    datamodule = SelfPlayDataModule(method, prompts=str(DATA), eval_prompts=str(DATA), tokenizer=tiny_llama,
                                    batch_size=2, max_prompt_length=64, run_dir=str(tmp_path / "run"))
    module = PreferenceModule(tiny_llama, loss="sppo", eta=10.0, reference="cached", lr=1e-3)
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, default_root_dir=tmp_path, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, reload_dataloaders_every_n_epochs=1,
                        logger=L.pytorch.loggers.CSVLogger(tmp_path), callbacks=[boundary])
    trainer.fit(module, datamodule=datamodule)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert set(summary["initial"]) >= {"if_prompt_loose", "if_prompt_strict", "if_instruction_loose",
                                       "if_instruction_strict", "if_words", "seconds"}
    for number, row in [(0, summary["initial"])] + [(r["iteration"], r) for r in summary["iterations"]]:
        folder = tmp_path / "run" / "instruction_following" / f"iteration_{number}"
        responses = [json.loads(line)["response"] for line in (folder / "responses.jsonl").read_text().splitlines()]
        assert {k: row[f"if_{k}"] for k in ("prompt_strict", "prompt_loose")} == \
            {k: v for k, v in ifeval_reference(CHECKABLE, responses).items() if k.startswith("prompt")}
        if number:
            assert 0.0 <= row["win_rate_vs_initial"] <= 1.0
    report = (tmp_path / "run" / "report.md").read_text()
    assert "| 0 (initial) |" in report and "| 2 |" in report.split("Instruction following")[1]
    assert (tmp_path / "run" / "instruction_following.png").exists()
    metrics = next(tmp_path.glob("lightning_logs/version_0/metrics.csv")).read_text()
    assert "self_play/if_prompt_loose" in metrics and "self_play/win_rate_vs_initial" in metrics
    # A resumed run's boundary reads π_0's answers back from the run folder (checked against the prompts).
    again = HeldOutFollowing(tmp_path / "run", datamodule.eval_prompts, ranker, datamodule.tokenizer, 8, 4, "eval")
    first = (tmp_path / "run" / "instruction_following" / "iteration_0" / "responses.jsonl").read_text()
    assert again.initial_answers() == [json.loads(line)["response"] for line in first.splitlines()]
    other = HeldOutFollowing(tmp_path / "elsewhere", datamodule.eval_prompts, ranker, datamodule.tokenizer, 8, 4, "e")
    with pytest.raises(ConfigError, match="not the initial policy's answers"):
        other.initial_answers()
