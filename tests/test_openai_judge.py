"""OpenAIJudge against a real OpenAI-compatible server on 127.0.0.1 (tests/judge_server.py, aiohttp
over the tiny Llama): log-probs on both endpoints, the verdict fallback, retries after a 500, a
429 with backoff and a timeout, a dead server, the cache and the API key."""

import time

import pytest
import torch

from sppo_lightning.errors import ServiceError
from sppo_lightning.ranking import LLMJudge, OpenAIJudge, fingerprint_of
from sppo_lightning.ranking.cache import JudgmentCache
from tests.judge_server import JudgeServer

PROMPTS = ["Name a color.", "What is 2 plus 3?"]
CANDIDATES = [["Blue.", "It is red, I think.", "Green"], ["5", "five", "It is 5."]]


@pytest.fixture
def server(tiny_llama):
    running = JudgeServer(tiny_llama).start()
    yield running
    if running.thread.is_alive():
        running.stop()


def judge(server, **kwargs):
    options = dict(max_retries=3, backoff=0.01, timeout=10.0, show_progress=False, api_key_env="JUDGE_TEST_KEY")
    options.update(kwargs)
    return OpenAIJudge(server.url, "tiny", **options)


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_server_log_probs_give_an_antisymmetric_matrix(server, endpoint):
    j = judge(server, endpoint=endpoint)
    m = j.pairwise_logits(PROMPTS, CANDIDATES)
    assert m.shape == (2, 3, 3) and torch.equal(m.diagonal(dim1=-2, dim2=-1), torch.zeros(2, 3))
    torch.testing.assert_close(m, -m.transpose(-1, -2))
    assert j.calls == 12 and server.requests == 12
    assert j.by_logprobs + j.by_verdict == 12


def test_the_chat_endpoint_agrees_with_the_local_judge(server, tiny_llama):
    """Where both answer tokens are in the server's top list, the margin is the local judge's."""
    remote = judge(server, top_logprobs=512)
    local = LLMJudge(tiny_llama, show_progress=False)
    torch.testing.assert_close(remote.pairwise_logits(PROMPTS, CANDIDATES),
                               local.pairwise_logits(PROMPTS, CANDIDATES), atol=1e-3, rtol=0)
    assert remote.by_logprobs == 12


def test_without_log_probs_the_verdict_is_used(server):
    server.logprobs = False
    j = judge(server, verdict_margin=3.0)
    m = j.pairwise_logits(PROMPTS, CANDIDATES)
    assert j.by_verdict == 12 and j.by_logprobs == 0
    assert set(m.flatten().tolist()) <= {-3.0, -1.5, 0.0, 1.5, 3.0}


def test_a_500_then_success_is_retried(server):
    server.faults.extend([500, 503])
    j = judge(server, max_concurrency=1)
    j.pairwise_logits(PROMPTS[:1], CANDIDATES[:1])
    assert j.calls == 6 and server.requests == 8  # two failed tries, then every question answered


def test_a_429_waits_its_retry_after(server):
    server.faults.append(429)
    j = judge(server, max_concurrency=1)
    start = time.perf_counter()
    j.pairwise_logits(PROMPTS[:1], CANDIDATES[:1])
    assert time.perf_counter() - start >= 1.0  # Retry-After: 1 beats a backoff of 0.01 s
    assert server.requests == 7


def test_a_slow_answer_times_out_and_is_retried(server):
    server.delays.append(2.0)
    j = judge(server, max_concurrency=1, timeout=0.5)
    j.pairwise_logits(PROMPTS[:1], CANDIDATES[:1])
    assert j.calls == 6 and server.requests == 7


def test_a_dead_server_is_one_line_and_keeps_what_was_judged(server, tmp_path):
    j = judge(server, max_retries=1)
    j.use_cache(JudgmentCache(tmp_path))
    j.pairwise_logits(PROMPTS[:1], CANDIDATES[:1])  # 6 judgments made and cached
    server.stop()
    with pytest.raises(ServiceError, match=rf"^OpenAIJudge: {server.url}/chat/completions failed after 2 tries: "
                                           r"no answer .*; the judgments made before are kept"):
        j.pairwise_logits(PROMPTS, CANDIDATES)
    again = judge(server)
    again.use_cache(JudgmentCache(tmp_path))
    again.margins([])  # nothing asked
    assert len(again.cache.values) == 6


def test_a_client_error_is_not_retried(server):
    server.faults.append(400)
    with pytest.raises(ServiceError, match=r"answered HTTP 400: .*injected 400"):
        judge(server).pairwise_logits(PROMPTS[:1], CANDIDATES[:1])
    assert server.requests <= 6  # at most one try per question (the rest are cancelled): a 400 is not retried


def test_the_key_is_sent_from_the_environment_and_never_fingerprinted(server, monkeypatch):
    monkeypatch.setenv("JUDGE_TEST_KEY", "sk-secret")
    j = judge(server)
    j.pairwise_logits(PROMPTS[:1], [["a", "b"]])
    assert server.authorization == "Bearer sk-secret"
    assert "sk-secret" not in str(fingerprint_of(j))
    assert fingerprint_of(j) != fingerprint_of(judge(server, endpoint="completions"))
    assert fingerprint_of(j) != fingerprint_of(OpenAIJudge("http://127.0.0.1:1/v1", "tiny"))
