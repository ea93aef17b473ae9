"""LLMJudge on the tiny Llama: shapes, antisymmetry, the sign convention on a hand-built judge,
batching, the judgment cache, fingerprints, and a self-play iteration judged by it."""

import json

import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM

from sppo_lightning.models import load_tokenizer
from sppo_lightning.ranking import LLMJudge, fingerprint_of
from sppo_lightning.ranking.cache import JudgmentCache

PROMPTS = ["Name a color.", "What is 2 plus 3?"]
CANDIDATES = [["Blue.", "It is red, I think.", "Green"], ["5", "five", "It is 5."]]


def judge(path, **kwargs):
    return LLMJudge(path, show_progress=False, **kwargs)


@pytest.fixture(scope="module")
def always_a(tiny_llama, tmp_path_factory):
    """A judge model that answers "A" whatever it reads: every layer's output is zeroed, so the
    last position's hidden state is the (fixed) last token's embedding v, and the head's "A" row is
    the "B" row plus v: log P(A) - log P(B) = |norm(v)|² > 0 for every question."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    tokenizer = load_tokenizer(tiny_llama)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        question = judge(tiny_llama)
        question.tokenizer = tokenizer
        last = question.question_ids("p", "a", "b")[-1]
        v = model.model.norm(model.model.embed_tokens.weight[last])
        a, b = (tokenizer.encode(x, add_special_tokens=False)[0] for x in ("A", "B"))
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.clone())
        model.lm_head.weight[a] = model.lm_head.weight[b] + v
    out = tmp_path_factory.mktemp("always_a")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out), float(v.pow(2).sum())


def test_shape_zero_diagonal_and_antisymmetry(tiny_llama):
    m = judge(tiny_llama).pairwise_logits(PROMPTS, CANDIDATES)
    assert m.shape == (2, 3, 3)
    assert torch.equal(m.diagonal(dim1=-2, dim2=-1), torch.zeros(2, 3))
    torch.testing.assert_close(m, -m.transpose(-1, -2))
    assert m.abs().sum() > 0


def test_a_judge_that_always_says_a(always_a):
    path, margin = always_a
    one_order = judge(path, both_orders=False).pairwise_logits(PROMPTS, CANDIDATES)
    # i in slot A wins by the hand-computed margin; j > i only ever sat in slot B
    assert one_order[0, 0, 1].item() == pytest.approx(margin, rel=1e-3)
    assert (one_order[:, 0, 1] > 0).all() and (one_order[:, 1, 0] < 0).all()
    # both orders cancel the position bias exactly: nothing is preferred
    both = judge(path).pairwise_logits(PROMPTS, CANDIDATES)
    torch.testing.assert_close(both, torch.zeros_like(both), atol=1e-5, rtol=0)


def test_batches_and_padding_change_no_judgment(tiny_llama):
    one = judge(tiny_llama, batch_size=1).pairwise_logits(PROMPTS, CANDIDATES)
    many = judge(tiny_llama, batch_size=16).pairwise_logits(PROMPTS, CANDIDATES)
    torch.testing.assert_close(one, many, atol=1e-4, rtol=0)


def test_the_cache_answers_a_rerun_and_counts_hits(tiny_llama, tmp_path):
    first = judge(tiny_llama)
    first.use_cache(JudgmentCache(tmp_path))
    m = first.pairwise_logits(PROMPTS, CANDIDATES)
    assert first.calls == 12 and first.cache.hits == 0  # 2 prompts x 6 ordered pairs
    again = judge(tiny_llama)  # a new process would open the same folder
    again.use_cache(JudgmentCache(tmp_path))
    torch.testing.assert_close(again.pairwise_logits(PROMPTS, CANDIDATES), m)
    assert again.calls == 0 and again.cache.hits == 12 and again.model is None  # never even loaded
    other = judge(tiny_llama, template="Which is better, A or B?\n{prompt}\nA: {a}\nB: {b}")
    other.use_cache(JudgmentCache(tmp_path))
    other.pairwise_logits(PROMPTS, CANDIDATES)
    assert other.calls == 12  # another template is another judge


def test_questions_asked_plus_cache_hits_count_every_question_judged(tiny_llama, tmp_path):
    """Identical samples repeat a question: asked once, and the repeats (and every later time) are hits."""
    repeated = [["same answer", "same answer", "other"], ["x", "y", "x"]]  # 12 ordered pairs, some alike
    first = judge(tiny_llama)
    first.use_cache(JudgmentCache(tmp_path))
    m = first.pairwise_logits(PROMPTS, repeated)
    assert 0 < first.calls < 12 and first.calls + first.cache.hits == 12
    again = judge(tiny_llama)
    again.use_cache(JudgmentCache(tmp_path))
    torch.testing.assert_close(again.pairwise_logits(PROMPTS, repeated), m)
    assert again.calls == 0 and again.cache.hits == 12


def test_the_fingerprint_follows_template_model_and_orders(tiny_llama, tmp_path):
    base = fingerprint_of(judge(tiny_llama))
    assert base == fingerprint_of(judge(tiny_llama))
    assert base != fingerprint_of(judge(tiny_llama, template="{prompt} {a} {b} A or B?"))
    assert base != fingerprint_of(judge(tiny_llama, both_orders=False))
    assert base != fingerprint_of(judge(str(tmp_path)))


def test_bad_settings_are_one_line(tiny_llama):
    from sppo_lightning.errors import ConfigError

    with pytest.raises(ConfigError, match="template must contain {b}"):
        LLMJudge(tiny_llama, template="{prompt} {a}")
    with pytest.raises(ConfigError, match="two different strings"):
        LLMJudge(tiny_llama, answers=("A", "A"))


def test_a_self_play_iteration_judged_by_the_llm_judge(tmp_path, tiny_llama):
    from tests.helpers import QUESTIONS, fit_self_play as fit

    ranker = judge(tiny_llama)
    fit(tmp_path, tiny_llama, ranker=ranker)
    folder = tmp_path / "self_play" / "iteration_1"
    rankings = pq.read_table(folder / "rankings.parquet").to_pylist()
    assert len(rankings) == len(QUESTIONS)
    m = torch.tensor([r["pairwise_logits"] for r in rankings])
    torch.testing.assert_close(m, -m.transpose(-1, -2))
    info = json.loads((folder / "manifest.json").read_text())["stages"]["rankings"]
    assert info["judge_calls"] == len(QUESTIONS) * 6 and info["cache_hits"] == 0
    assert list((tmp_path / "self_play" / "judgments").glob("judgments.*.jsonl"))
    report = (tmp_path / "self_play" / "report.md").read_text()
    assert "| judge questions asked | answered from the cache |" in report
    assert f"| 1 | {len(QUESTIONS) * 6} | 0 |" in report


def test_another_template_redoes_the_rankings_in_the_same_run_dir(tmp_path, tiny_llama, tokenizer):
    from sppo_lightning.data.prompts import load_prompts
    from sppo_lightning.methods import SPPO
    from sppo_lightning.policies import Policies
    from sppo_lightning.pipeline import DistContext, HFGenerator

    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    prompts = load_prompts(str(path), tokenizer, 32)[0]
    policy = AutoModelForCausalLM.from_pretrained(tiny_llama)
    generator = HFGenerator(max_new_tokens=4, show_progress=False)
    first = judge(tiny_llama)
    SPPO(first, generator, num_samples=3).build(0, prompts, Policies(policy), tokenizer, DistContext(), tmp_path / "run")
    assert first.calls == 12
    same = judge(tiny_llama)  # a resumed run: the rankings are reused, nothing is asked
    SPPO(same, generator, num_samples=3).build(0, prompts, Policies(policy), tokenizer, DistContext(), tmp_path / "run")
    assert same.calls == 0
    other = judge(tiny_llama, template="{prompt}\nA: {a}\nB: {b}\nBetter, A or B?")
    with pytest.warns(UserWarning, match="redoing rankings"):
        SPPO(other, generator, num_samples=3).build(0, prompts, Policies(policy), tokenizer, DistContext(), tmp_path / "run")
    assert other.calls == 12


def llm_judge_config(tiny_dir, out):
    """configs/llm_judge.yaml as shipped, the judge pointed at the tiny Llama of the test's models."""
    import yaml

    from tests.helpers import REPO

    data = yaml.safe_load((REPO / "configs" / "llm_judge.yaml").read_text())
    data["data"]["init_args"]["method"]["init_args"]["ranker"]["init_args"]["path"] = str(tiny_dir / "llama")
    data["trainer"]["log_every_n_steps"] = 1
    config = out / "llm_judge.yaml"
    config.write_text(yaml.safe_dump(data))
    return config


@pytest.fixture(scope="module")
def judged_run(tiny_dir, tmp_path_factory):
    from tests.helpers import run_fit

    out = tmp_path_factory.mktemp("llm_judge")
    run_fit(llm_judge_config(tiny_dir, out), tiny_dir, out)
    return out


def test_the_llm_judge_recipe_runs_through_the_cli(judged_run):
    tmp_path = judged_run
    summary = json.loads((tmp_path / "self_play" / "summary.json").read_text())["iterations"]
    assert len(summary) == 1 and 0.0 <= summary[0]["win_rate_vs_initial"] <= 1.0
    judge_counts = summary[0]["judge"]
    # 64 prompts, 5 x 4 ordered pairs each: every one asked, or answered by the cache (identical samples)
    assert judge_counts["judge_calls"] + judge_counts["cache_hits"] == 64 * 20 and judge_counts["judge_calls"] > 0
    assert list((tmp_path / "self_play" / "judgments").glob("judgments.*.jsonl"))


def test_a_killed_llm_judge_run_resumes_to_the_same_result(tiny_dir, tmp_path, judged_run):
    """Killed mid-training (before its first checkpoint), restarted with --ckpt_path last: a true line
    (no checkpoint yet), the stages reused (no question asked again), and the uninterrupted run's result."""
    import signal

    from tests.helpers import run_fit
    from tests.helpers import assert_same_run

    config, marker = llm_judge_config(tiny_dir, tmp_path), tmp_path / "killed"
    first = run_fit(config, tiny_dir, tmp_path, "--trainer.callbacks+=tests.kill_switch.KillSwitch",
                    f"--trainer.callbacks.marker={marker}", "--trainer.callbacks.epoch=0",
                    "--trainer.callbacks.batch=3", check=False)
    assert first.returncode == -signal.SIGKILL
    resumed = run_fit(config, tiny_dir, tmp_path, "--ckpt_path", "last")
    console = " ".join((resumed.stdout + resumed.stderr).split())
    assert "--ckpt_path last: no checkpoint in" in console and "HINT" not in console
    assert "iteration_1: reusing rankings" in console
    assert_same_run(judged_run, tmp_path)


def test_a_full_disk_while_keeping_judgments_is_one_line_and_keeps_the_earlier_ones(tiny_llama, tmp_path,
                                                                                  monkeypatch):
    """The disk fills while the judge's answers are appended: one line, the earlier judgments reused."""
    import errno
    import pathlib

    from sppo_lightning.errors import TrainingError

    first = judge(tiny_llama)
    first.use_cache(JudgmentCache(tmp_path))
    first.pairwise_logits(PROMPTS[:1], CANDIDATES[:1])  # 6 judgments on disk
    real_open = pathlib.Path.open

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            self.f.write(text[: len(text) // 2])  # half a line, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")

    def fills(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return Full(f) if path.name.startswith("judgments.") and "a" in mode else f

    second = judge(tiny_llama)
    second.use_cache(JudgmentCache(tmp_path))
    monkeypatch.setattr(pathlib.Path, "open", fills)
    with pytest.raises(TrainingError, match=rf"^no space left in {tmp_path} to keep the judge's answers "
                                            rf"\(.* MiB free\); the 6 judgments kept so far are reused on resume"):
        second.pairwise_logits(PROMPTS, CANDIDATES)
    monkeypatch.setattr(pathlib.Path, "open", real_open)
    again = judge(tiny_llama)
    again.use_cache(JudgmentCache(tmp_path))  # the torn line is skipped, the 6 answers are there
    again.pairwise_logits(PROMPTS, CANDIDATES)
    assert again.cache.hits == 6 and again.calls == 6
