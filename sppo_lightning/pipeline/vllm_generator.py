"""``VLLMGenerator``: self-play sampling with a vLLM engine, continuous batching instead of static
``generate`` batches.

Two ways to reach π's weights (``live``):

* **live** (the default): one engine for the whole run, started once on the model's config without
  weights, and given π's weights in memory whenever they changed since its last sample (a
  fingerprint of the weights decides; ``live_weights.py``, ``EngineProcess.load_weights``). The
  methods hand ``sample`` the module itself, so per-step methods (J-BOND, online pairs) and the win
  rate sample with the engine too; J-BOND's policy and anchor are swapped into the one engine.
  Full-weight, LoRA and QLoRA policies (merged on the fly, a 4-bit base dequantised), and FSDP-sharded
  ones (gathered one unit at a time; every rank takes part in each sync).
* **per-iteration export** (``live: false``): the pipeline exports π_t
  (``policy_export.py``: a merged model, or a LoRA adapter on its base) and hands this generator
  that export; an engine starts on it, samples the iteration's shards, and exits when the
  pipeline calls ``release()``.

The engine runs in a child process (``vllm_engine.py``); its memory goes when it exits. On CUDA a
live engine sleeps between samples (``sleep_level``, vLLM's sleep mode): the training policy gets
the GPU back while it trains, and the engine wakes its weights, takes the new ones, then wakes its
KV cache to sample. On CPU (vLLM has no sleep mode there) it stays as it is.

Sampling means what it means in :class:`~sppo_lightning.pipeline.HFGenerator`: temperature, top_p,
no top-k, ``max_new_tokens``, stop at the policy's EOS ids (kept in the response); responses are
token ids. Every request has its own seed, derived from the global batch seed as the HF generator
derives its batches', so a prompt's samples depend on neither the shard nor the rank that draws it.
The HF and vLLM samplers draw different random streams: the same seed gives the same responses
within one generator, not across the two.

Multi-GPU: with ``tensor_parallel_size: 1`` every rank runs its own engine on its GPU and its share
of the batches (data-parallel, as the official scripts run one process per GPU); with
``tensor_parallel_size > 1`` rank 0 alone runs one engine over that many GPUs and the others wait.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

from tqdm.auto import tqdm

from sppo_lightning import seeds
from sppo_lightning.data.prompts import Prompt
from sppo_lightning.distributed import DistContext, rank_batches
from sppo_lightning.errors import ConfigError
from sppo_lightning.generation import batch_seed, gather_responses
from sppo_lightning.pipeline.generators import check_sampling
from sppo_lightning.pipeline.policy_export import LORA_MODES, PolicyExport
from sppo_lightning.pipeline.vllm_engine import EngineProcess
from sppo_lightning.pipeline.vllm_settings import engine_arguments, vllm_version

class VLLMGenerator:
    """Self-play sampling with vLLM (see the module docstring).

    Args:
        temperature, top_p, max_new_tokens: as ``HFGenerator`` (paper: 0.7, 0.9, 2048).
        batch_size: prompts per seed batch and per shard boundary, as ``HFGenerator``'s; the engine
            gets all of a shard's requests at once and batches them itself.
        gpu_memory_utilization: the share of the GPU the engine may take (weights and KV cache).
        tensor_parallel_size: GPUs per engine (see the module docstring).
        dtype: the engine's compute dtype (``auto``: the export's; ``float32`` for exact checks).
        max_model_len: prompt + response tokens at most; None takes the model's (128k for
            Llama 3, which needs a large KV cache: set it to what your prompts need).
        enforce_eager: no CUDA graphs (faster start, slower steps).
        kv_cache_gib: the KV cache's size in GiB (``VLLM_CPU_KVCACHE_SPACE`` on CPU,
            ``kv_cache_memory_bytes`` on GPU); None: the engine's default.
        engine_kwargs: any other ``vllm.LLM`` argument (``quantization``, ``swap_space`` on versions
            that have it, ``enable_prefix_caching``, ...); they override the ones above.
        lora: how a LoRA policy reaches the engine: ``request`` (the adapter on the unchanged base),
            ``merged`` (a merged copy), or ``auto`` (request for LoRA, merged for QLoRA and FSDP).
        keep_policy_exports: how many iterations' exports of π_t to keep (the newest): 0 removes
            each once its generations are written, -1 keeps all (per-iteration checkpoints). A live
            engine needs none: with 0 none is written; otherwise SPPO writes them for you.
        offload_policy: move the training policy to host memory while the engine samples (GPU).
        show_progress: a progress bar of finished sequences (rank 0).
        start_timeout: seconds an engine may take to start.
        live: keep one engine for the run and sync π's weights into it in memory (see the module
            docstring); false: export π_t and start an engine every iteration.
        bucket_mib: the most MiB of weights sent to a live engine at a time.
        log_dir: where a live engine writes vLLM's console output (``vllm_rank<r>.log``); None: a
            temporary folder, removed with the engine (the start line names it).
        sleep_level: on CUDA, how a live engine sleeps between samples: 2 frees its weights and KV
            cache (the weights are re-sent at the next sample), 1 keeps the weights in host memory,
            0 never sleeps. Ignored on CPU.
    """

    def __init__(self, temperature: float = 0.7, top_p: float = 0.9, max_new_tokens: int = 512,
                 batch_size: int = 64, gpu_memory_utilization: float = 0.5, tensor_parallel_size: int = 1,
                 dtype: str = "auto", max_model_len: Optional[int] = None, enforce_eager: bool = False,
                 kv_cache_gib: Optional[float] = None, engine_kwargs: Optional[dict[str, Any]] = None,
                 lora: str = "auto", keep_policy_exports: int = 1, offload_policy: bool = True,
                 show_progress: bool = True, start_timeout: float = 1800.0, live: bool = True,
                 bucket_mib: int = 256, log_dir: Optional[str] = None, sleep_level: int = 2) -> None:
        check_sampling(type(self).__name__, temperature, top_p, max_new_tokens, batch_size)
        checks = [
            (0 < gpu_memory_utilization <= 1, f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}"),
            (isinstance(tensor_parallel_size, int) and tensor_parallel_size >= 1,
             f"tensor_parallel_size must be an integer >= 1, got {tensor_parallel_size!r}"),
            (lora in LORA_MODES, f"lora must be one of {', '.join(LORA_MODES)}, got {lora!r}"),
            (isinstance(keep_policy_exports, int), f"keep_policy_exports must be an integer, got {keep_policy_exports!r}"),
            (kv_cache_gib is None or kv_cache_gib > 0, f"kv_cache_gib must be > 0, got {kv_cache_gib}"),
            (max_model_len is None or max_model_len > max_new_tokens,
             f"max_model_len ({max_model_len}) must exceed max_new_tokens ({max_new_tokens})"),
            (sleep_level in (0, 1, 2), f"sleep_level must be 0, 1 or 2, got {sleep_level!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"VLLMGenerator: {message}")
        self.temperature, self.top_p, self.max_new_tokens, self.batch_size = temperature, top_p, max_new_tokens, batch_size
        self.gpu_memory_utilization, self.tensor_parallel_size = gpu_memory_utilization, tensor_parallel_size
        self.dtype, self.max_model_len, self.enforce_eager, self.kv_cache_gib = dtype, max_model_len, enforce_eager, kv_cache_gib
        self.engine_kwargs = dict(engine_kwargs or {})
        self.lora, self.keep_policy_exports, self.offload_policy = lora, keep_policy_exports, offload_policy
        self.show_progress, self.start_timeout = show_progress, start_timeout
        if not isinstance(bucket_mib, int) or bucket_mib < 1:
            raise ConfigError(f"VLLMGenerator: bucket_mib must be an integer >= 1, got {bucket_mib!r}")
        self.live, self.bucket_mib, self.log_dir, self.sleep_level = live, bucket_mib, log_dir, sleep_level
        self._asleep = False  # the live engine sleeps (CUDA) between samples
        self._engine: Optional[EngineProcess] = None
        self._engine_key: Optional[tuple] = None
        self._live_folder: Optional[str] = None
        self._synced: Optional[str] = None  # the fingerprint of the weights the live engine holds
        self.sync_seconds: list[float] = []  # each sync's time (parent and engine), for the bench
        self._said: set[str] = set()
        self._close_at_exit = False

    def exports_policy(self, policy) -> bool:
        """Whether ``policy`` reaches the engine through a per-iteration export (``live: false``; said once)."""
        if not self.live:
            self._say("VLLMGenerator: π_t is exported every iteration and an engine started on it (live: false)")
        return not self.live

    def _say(self, line: str) -> None:  # one line, once
        if line not in self._said:
            from lightning.pytorch.utilities import rank_zero_info

            self._said.add(line)
            rank_zero_info(line)

    def fingerprint(self) -> dict[str, Any]:
        """What the samples depend on besides π_t (whose fingerprint the generations record); ``live``
        is not in it: a live engine and one on the export sample the same responses."""
        return {"class": "VLLMGenerator", "engine": vllm_version(), "temperature": self.temperature,
                "top_p": self.top_p, "max_new_tokens": self.max_new_tokens, "batch_size": self.batch_size,
                "dtype": self.dtype, "max_model_len": self.max_model_len, "lora": self.lora,
                "tensor_parallel_size": self.tensor_parallel_size,
                "engine_kwargs": {k: repr(v) for k, v in sorted(self.engine_kwargs.items())}}

    # ------------------------------------------------------------------------------ engine
    def engine_settings(self, export: Optional[PolicyExport], ctx: DistContext) -> tuple[dict[str, Any], dict[str, str]]:
        """``vllm.LLM`` keyword arguments and the child's environment, for ``export`` (None: live) on
        ``ctx``'s device (``vllm_settings.engine_arguments``)."""
        return engine_arguments(export, ctx, dtype=self.dtype, enforce_eager=self.enforce_eager,
                                tensor_parallel_size=self.tensor_parallel_size, max_model_len=self.max_model_len,
                                gpu_memory_utilization=self.gpu_memory_utilization, kv_cache_gib=self.kv_cache_gib,
                                sleeps=self._sleeps(ctx), engine_kwargs=self.engine_kwargs)

    def _engine_for(self, export: PolicyExport, ctx: DistContext) -> EngineProcess:
        key = (export.model, export.adapter, export.checksum)
        if self._engine is None or self._engine_key != key or not self._engine.alive:
            self.release()
            kwargs, env = self.engine_settings(export, ctx)
            log = export.folder.parent / f"vllm_rank{ctx.rank}.log"
            self._engine = EngineProcess(export.model, kwargs, env, log_path=log, start_timeout=self.start_timeout)
            self._engine_key = key
        return self._engine

    def _live_engine(self, model, tokenizer, ctx: DistContext, here: bool = True) -> Optional[EngineProcess]:
        """The run's engine (started on the first call), holding ``model``'s weights. ``here``: this
        rank runs an engine; under FSDP a rank without one (``tensor_parallel_size > 1``, rank > 0)
        still takes part in gathering the weights, and every rank decides to sync together."""
        import atexit
        import tempfile
        import time

        from sppo_lightning.pipeline.live_weights import engine_folder, policy_weights, weights_identity
        from sppo_lightning.sharding import is_sharded

        if here and (self._engine is None or not self._engine.alive or self._engine_key != ("live",)):
            self.close()
            self._live_folder = tempfile.mkdtemp(prefix="sppo-lightning-vllm-")
            folder = engine_folder(model, tokenizer, Path(self._live_folder) / "config")
            kwargs, env = self.engine_settings(None, ctx)
            log = Path(self.log_dir or self._live_folder) / f"vllm_rank{ctx.rank}.log"
            self._engine = EngineProcess(str(folder), kwargs, env, log_path=log, start_timeout=self.start_timeout)
            self._engine_key, self._synced, self._asleep = ("live",), None, False
            if not self._close_at_exit:  # once per generator, however many engines it starts
                atexit.register(self.close)
                self._close_at_exit = True
            self._say(f"VLLMGenerator: one live engine for the run, fed π's weights in memory (vLLM log: {log})")
        identity = weights_identity(model)  # under FSDP, of this rank's shards
        stale = identity != self._synced
        if is_sharded(model):  # each gather is a collective: sync on every rank if any needs it
            stale = any(ctx.all_gather_object(stale))
        if here and self._asleep:  # the weights' memory first: the new weights are loaded into it
            self._engine.wake_up(["weights"])
        if stale:
            start = time.perf_counter()
            if here:
                self._engine.load_weights(policy_weights(model), bucket_bytes=self.bucket_mib << 20)
            else:
                for _ in policy_weights(model):  # gathered for the engine on rank 0
                    pass
            self.sync_seconds.append(time.perf_counter() - start)
            self._synced = identity
        if here and self._asleep:  # then the KV cache, to sample
            self._engine.wake_up(["kv_cache"])
            self._asleep = False
        return self._engine

    def _sleeps(self, ctx: DistContext) -> bool:
        return self.live and self.sleep_level > 0 and ctx.device.type == "cuda"

    def _rest(self, ctx: DistContext) -> None:
        """A live engine's samples are taken: on CUDA it sleeps, giving the GPU back to training. At
        level 2 its weights are gone, so the next sample re-sends them even if π did not change."""
        if self._engine is None or self._engine_key != ("live",) or not self._sleeps(ctx) or self._asleep:
            return
        self._engine.sleep(self.sleep_level)
        self._asleep = True
        if self.sleep_level == 2:
            self._synced = None

    def release(self) -> None:
        """An iteration's generations are written: an export engine stops (its memory goes with it);
        a live engine stays for the next iteration."""
        if self._engine_key != ("live",):
            self.close()

    def close(self) -> None:
        """Stop the engine, live or not (at the end of the run, or at exit)."""
        import shutil

        if self._engine is not None:
            self._engine.close()
        self._engine, self._engine_key, self._synced, self._asleep = None, None, None, False
        if self._live_folder is not None:
            shutil.rmtree(self._live_folder, ignore_errors=True)
            self._live_folder = None

    # ------------------------------------------------------------------------------ sampling
    def requests(self, prompts: Sequence[Prompt], num_samples: int, seed: int, batches: Sequence[int],
                 batch_offset: int, stop: Sequence[int]) -> list[tuple[list[int], dict[str, Any]]]:
        """The engine requests of ``batches`` (indices into ``prompts`` cut in ``batch_size``): one per
        prompt and sample, each with its own seed (the batch's seed, indexed by row and sample)."""
        out = []
        for b in batches:
            base = batch_seed(seed, batch_offset + b)
            for row, prompt in enumerate(prompts[b * self.batch_size : (b + 1) * self.batch_size]):
                for k in range(num_samples):
                    out.append((list(prompt.ids), {
                        "temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_new_tokens,
                        "seed": seeds.indexed(base, row * num_samples + k), "stop_token_ids": list(stop),
                        "skip_special_tokens": False, "detokenize": False,
                    }))
        return out

    def sample(self, model: Any, tokenizer, prompts: Sequence[Prompt], num_samples: int, seed: int,
               ctx: DistContext, batch_offset: int = 0, desc: str = "sampling") -> list[list[list[int]]]:
        """``[N][num_samples]`` response ids on every rank (see ``Generator.sample``). ``model``: the
        module (live: synced into the run's engine first if its weights changed), or π_t's
        ``PolicyExport`` (the per-iteration path: an engine started on it)."""
        export = model if isinstance(model, PolicyExport) else None
        sharded = False
        if export is None:
            from sppo_lightning.generation import eos_ids
            from sppo_lightning.pipeline.live_weights import _inner
            from sppo_lightning.sharding import is_sharded

            if not self.live:
                raise ConfigError("VLLMGenerator cannot sample this policy in memory (live: false samples a "
                                  "per-iteration export): use live: true for this method, or HFGenerator")
            stop = sorted(eos_ids(_inner(model), tokenizer))
            sharded = is_sharded(model)
        else:
            stop = export.eos_token_ids
        count = math.ceil(len(prompts) / self.batch_size)
        if self.tensor_parallel_size > 1:  # one engine, on rank 0, over several GPUs
            mine = list(range(count)) if ctx.is_global_zero else []
        else:
            mine = [b for b, _ in rank_batches(count, ctx.rank, ctx.world_size)]
        results: list[list[list[int]]] = [[] for _ in prompts]
        requests = self.requests(prompts, num_samples, seed, mine, batch_offset, stop)
        engine = None
        if sharded:  # every rank takes part in gathering the weights, even one with nothing to sample
            engine = self._live_engine(model, tokenizer, ctx, here=self.tensor_parallel_size == 1 or ctx.is_global_zero)
        if requests:
            lora = ("policy", 1, export.adapter) if export is not None and export.adapter else None
            if engine is None:
                engine = self._engine_for(export, ctx) if export is not None else self._live_engine(model, tokenizer, ctx)
            with tqdm(total=len(requests), desc=desc, unit="seq",
                      disable=not (self.show_progress and ctx.is_global_zero)) as bar:
                outputs = engine.generate(requests, lora, on_progress=bar.update)
            rows = [i for b in mine for i in range(b * self.batch_size, min((b + 1) * self.batch_size, len(prompts)))]
            for n, row in enumerate(rows):
                results[row] = [list(ids) for ids in outputs[n * num_samples : (n + 1) * num_samples]]
        if export is None:
            self._rest(ctx)
        return gather_responses(results, ctx.world_size)
