"""``OpenAIJudge``: the "A or B?" question sent to any OpenAI-compatible server (vLLM, SGLang, a
hosted API), through ``/v1/chat/completions`` or ``/v1/completions``.

The margin ``d(i, j)`` comes from the answer token's log-probs where the server returns them
(``logprobs``/``top_logprobs``): ``log P(A) - log P(B)``, an answer missing from the top list
counting at the lowest listed log-prob. Where it does not, the parsed verdict gives
``±verdict_margin`` (0 for an answer that is neither). Which one ran is counted
(``by_logprobs``, ``by_verdict``) and recorded with the rankings.

Requests run ``max_concurrency`` at a time, each with a timeout; a 429 or 5xx answer, a timeout
or a refused connection is retried with exponential backoff (a ``Retry-After`` header is
honoured), and after the last retry the run stops with one line naming the URL and the status.
Judgments finished before that are already in the cache. The API key is read from the
environment variable named in the config, never from the config itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, Optional

from torch import Tensor
from tqdm.auto import tqdm

from sppo_lightning.errors import ConfigError, ServiceError
from sppo_lightning.ranking.cache import JudgmentCache
from sppo_lightning.ranking.pairwise_question import (
    DEFAULT_TEMPLATE, Question, cached_margins, check_question_settings, pairwise_matrix, render_question,
)
from sppo_lightning.ranking.protocol import PromptView, fingerprint_hash, prompt_view_of

RETRIED = (429, 500, 502, 503, 504)


class OpenAIJudge:
    """Args:
        base_url: the server, e.g. ``http://127.0.0.1:8000/v1``.
        model: the model name the server serves.
        api_key_env: the environment variable holding the API key (unset: no key is sent).
        endpoint: ``chat`` (``/chat/completions``) or ``completions`` (``/completions``, the
            question sent as is, with no chat template).
        template, answers, both_orders, prompt_view: as for ``LLMJudge``.
        top_logprobs: how many top log-probs to ask for.
        verdict_margin: the margin of a parsed verdict when the server gives no log-probs.
        max_concurrency: requests in flight at once. timeout: seconds per request.
        max_retries: retries of a request after a 429/5xx, a timeout or a refused connection.
        backoff: seconds before the first retry; doubled for each next one.
    """

    def __init__(self, base_url: str, model: str, api_key_env: Optional[str] = "OPENAI_API_KEY",
                 endpoint: Literal["chat", "completions"] = "chat", template: str = DEFAULT_TEMPLATE,
                 answers: tuple[str, str] = ("A", "B"), both_orders: bool = True, top_logprobs: int = 5,
                 verdict_margin: float = 5.0, max_concurrency: int = 8, timeout: float = 60.0,
                 max_retries: int = 5, backoff: float = 1.0, prompt_view: PromptView = "raw",
                 show_progress: bool = True) -> None:
        check_question_settings("OpenAIJudge", template, tuple(answers))
        if endpoint not in ("chat", "completions"):
            raise ConfigError(f"OpenAIJudge: endpoint must be chat or completions, got {endpoint!r}")
        if max_concurrency < 1 or timeout <= 0 or max_retries < 0 or backoff < 0:
            raise ConfigError("OpenAIJudge: max_concurrency >= 1, timeout > 0, max_retries >= 0 and backoff >= 0")
        self.base_url, self.model, self.api_key_env, self.endpoint = base_url.rstrip("/"), model, api_key_env, endpoint
        self.template, self.answers, self.both_orders = template, tuple(answers), both_orders
        self.top_logprobs, self.verdict_margin = top_logprobs, verdict_margin
        self.max_concurrency, self.timeout, self.max_retries, self.backoff = max_concurrency, timeout, max_retries, backoff
        self.prompt_view, self.show_progress = prompt_view, show_progress
        prompt_view_of(self)
        self.cache: Optional[JudgmentCache] = None
        self.calls = self.by_logprobs = self.by_verdict = 0

    def fingerprint(self) -> dict[str, Any]:
        # The key is not part of it: it changes no judgment, and it must never reach an artifact.
        return {"class": "OpenAIJudge", "base_url": self.base_url, "model": self.model, "endpoint": self.endpoint,
                "template": hashlib.sha256(self.template.encode()).hexdigest()[:16], "answers": list(self.answers),
                "both_orders": self.both_orders, "verdict_margin": self.verdict_margin,
                "prompt_view": self.prompt_view}

    def use_cache(self, cache: Optional[JudgmentCache]) -> None:
        self.cache = cache

    def counts(self) -> dict[str, int]:
        """Questions asked so far (``contracts.QuestionJudge``)."""
        return {"calls": self.calls, "by_logprobs": self.by_logprobs, "by_verdict": self.by_verdict}

    def pairwise_logits(self, prompts: list[str], candidates: list[list[str]]) -> Tensor:
        return pairwise_matrix(prompts, candidates, self.both_orders, self.margins)

    def margins(self, questions: list[Question]) -> list[float]:
        values, computed = cached_margins(fingerprint_hash(self.fingerprint()), questions, self.cache, self._ask_all)
        self.calls += computed
        return values

    # ------------------------------------------------------------------------------ requests
    def _ask_all(self, questions: list[Question], keys: list[str]) -> list[float]:
        """Every question, ``max_concurrency`` at a time; each chunk's answers are cached as it finishes."""
        out: list[float] = []
        chunk = self.max_concurrency * 4
        with ThreadPoolExecutor(self.max_concurrency) as pool, \
                tqdm(total=len(questions), desc="LLM judge (server)", disable=not self.show_progress) as bar:
            for start in range(0, len(questions), chunk):
                part = questions[start : start + chunk]
                values = list(pool.map(self._ask, part))
                out += values
                bar.update(len(part))
                if self.cache is not None:
                    self.cache.put_many(dict(zip(keys[start : start + chunk], values)))
        return out

    def _ask(self, question: Question) -> float:
        text = render_question(self.template, *question)
        if self.endpoint == "chat":
            url = f"{self.base_url}/chat/completions"
            body = {"model": self.model, "messages": [{"role": "user", "content": text}], "max_tokens": 1,
                    "temperature": 0.0, "logprobs": True, "top_logprobs": self.top_logprobs}
        else:
            url = f"{self.base_url}/completions"
            body = {"model": self.model, "prompt": text, "max_tokens": 1, "temperature": 0.0,
                    "logprobs": self.top_logprobs}
        return self._margin(self._post(url, body))

    def _post(self, url: str, body: dict) -> dict:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        data = json.dumps(body).encode()
        for attempt in range(self.max_retries + 1):
            wait = self.backoff * 2**attempt
            try:
                request = urllib.request.Request(url, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as err:
                status = f"HTTP {err.code}"
                if err.code not in RETRIED:
                    raise ServiceError(f"OpenAIJudge: {url} answered {status}: {_detail(err)}") from None
                retry_after = err.headers.get("Retry-After") if err.headers else None
                if retry_after and retry_after.replace(".", "", 1).isdigit():
                    wait = max(wait, float(retry_after))
            except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
                reason = getattr(err, "reason", err)
                status = f"no answer ({reason})" if not isinstance(err, TimeoutError) else \
                    f"no answer within {self.timeout:g} s"
            if attempt < self.max_retries:
                time.sleep(wait)
        raise ServiceError(f"OpenAIJudge: {url} failed after {self.max_retries + 1} tries: {status}; the judgments "
                           f"made before are kept in the run dir's cache")

    def _margin(self, answer: dict) -> float:
        """``log P(A) - log P(B)`` from the answer's top log-probs, else the parsed verdict."""
        choice = (answer.get("choices") or [{}])[0]
        top = _top_logprobs(choice, self.endpoint)
        if top:
            a, b = (_first_logprob(top, x) for x in self.answers)
            if a is not None or b is not None:
                floor = min(top.values())
                self.by_logprobs += 1
                return (a if a is not None else floor) - (b if b is not None else floor)
        self.by_verdict += 1
        text = (choice.get("message") or {}).get("content") if self.endpoint == "chat" else choice.get("text")
        verdict = (text or "").strip()
        if verdict.startswith(self.answers[0]):
            return self.verdict_margin
        if verdict.startswith(self.answers[1]):
            return -self.verdict_margin
        return 0.0


def _top_logprobs(choice: dict, endpoint: str) -> dict[str, float]:
    """{token: log-prob} of the first generated token, in either endpoint's format; {} if absent."""
    logprobs = choice.get("logprobs") or {}
    if endpoint == "chat":
        content = logprobs.get("content") or []
        if not content:
            return {}
        return {t["token"]: float(t["logprob"]) for t in content[0].get("top_logprobs") or []}
    tops = logprobs.get("top_logprobs") or []
    return {k: float(v) for k, v in (tops[0] or {}).items()} if tops else {}


def _first_logprob(top: dict[str, float], answer: str) -> Optional[float]:
    """The best log-prob of a token that is the answer (leading spaces allowed, as tokenizers write)."""
    found = [lp for token, lp in top.items() if token.strip() == answer]
    return max(found) if found else None


def _detail(err: urllib.error.HTTPError) -> str:
    try:
        return " ".join(err.read().decode(errors="replace").split())[:200]
    except Exception:  # the body is only for the message
        return ""
