"""A small OpenAI-compatible server over the tiny Llama, for OpenAIJudge's tests: aiohttp on
127.0.0.1, in a thread of the test process. It answers ``/v1/chat/completions`` and
``/v1/completions`` with the model's real next-token log-probs, and can be told to fail first:
``faults`` (HTTP statuses to answer before the real answers, a 429 with ``Retry-After``),
``delays`` (seconds to wait before answering), ``logprobs`` (False: omit them, as some servers do)."""

import asyncio
import threading
from collections import deque

import torch
from aiohttp import web
from transformers import AutoModelForCausalLM

from sppo_lightning.models import load_tokenizer


class JudgeServer:
    def __init__(self, model_dir: str, retry_after: float = 1.0) -> None:
        self.model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        self.tokenizer = load_tokenizer(model_dir)
        self.faults: deque[int] = deque()
        self.delays: deque[float] = deque()
        self.logprobs = True
        self.retry_after = retry_after
        self.requests = 0
        self.authorization = None
        self.loop = asyncio.new_event_loop()
        self.runner = None
        self.port = None

    def _top(self, ids: list[int], k: int) -> tuple[str, list[tuple[str, float]]]:
        with torch.no_grad():
            logits = self.model(torch.tensor([ids])).logits[0, -1]
        logps = torch.log_softmax(logits.float(), -1)
        values, tokens = logps.topk(k)
        top = [(self.tokenizer.decode([t]), float(v)) for t, v in zip(tokens.tolist(), values.tolist())]
        return top[0][0], top

    async def _fault(self, request):
        self.requests += 1
        self.authorization = request.headers.get("Authorization")
        if self.delays:
            await asyncio.sleep(self.delays.popleft())
        if self.faults:
            status = self.faults.popleft()
            headers = {"Retry-After": str(self.retry_after)} if status == 429 else {}
            return web.json_response({"error": {"message": f"injected {status}"}}, status=status, headers=headers)
        return None

    async def chat(self, request: web.Request) -> web.Response:
        fault = await self._fault(request)
        if fault is not None:
            return fault
        body = await request.json()
        text = self.tokenizer.apply_chat_template(body["messages"], tokenize=False, add_generation_prompt=True)
        token, top = self._top(self.tokenizer(text, add_special_tokens=False)["input_ids"], body.get("top_logprobs", 5))
        choice = {"index": 0, "message": {"role": "assistant", "content": token}, "finish_reason": "length"}
        if self.logprobs and body.get("logprobs"):
            choice["logprobs"] = {"content": [{"token": token, "logprob": top[0][1],
                                               "top_logprobs": [{"token": t, "logprob": v} for t, v in top]}]}
        return web.json_response({"object": "chat.completion", "model": body["model"], "choices": [choice]})

    async def completions(self, request: web.Request) -> web.Response:
        fault = await self._fault(request)
        if fault is not None:
            return fault
        body = await request.json()
        token, top = self._top(self.tokenizer(body["prompt"])["input_ids"], body.get("logprobs") or 5)
        choice = {"index": 0, "text": token, "finish_reason": "length"}
        if self.logprobs and body.get("logprobs"):
            choice["logprobs"] = {"tokens": [token], "top_logprobs": [dict(top)]}
        return web.json_response({"object": "text_completion", "model": body["model"], "choices": [choice]})

    def start(self) -> "JudgeServer":
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        ready = threading.Event()

        def serve():
            asyncio.set_event_loop(self.loop)
            self.runner = web.AppRunner(app)
            self.loop.run_until_complete(self.runner.setup())
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            self.loop.run_until_complete(site.start())
            self.port = site._server.sockets[0].getsockname()[1]
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()
        ready.wait(30)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
