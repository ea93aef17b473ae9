"""Self-play generation: HF static ``generate`` (``HFGenerator``'s path) against vLLM
(``VLLMGenerator``: export of π_t, engine start, continuous batching) and the live engine
(``live: true``: one engine for the run, a sync of π's weights in memory per iteration), side by
side in one run.

    .venv-vllm/bin/python bench/generation.py                       # CPU: 3 model sizes, about 10 minutes
    .venv-vllm/bin/python bench/generation.py --sizes small --prompts 64 256
    .venv-vllm/bin/python bench/generation.py --sizes medium --prompts 32 --sides vllm live   # sync time

Needs the vLLM environment (README, "vLLM sampling"). The same model, prompts, K and sampling
(temperature 0.7, top_p 0.9, no top-k) on both sides, each side in its own process (so that peak
memory is its own). The model is a randomly initialised Llama with a 32k vocabulary; its responses
end when it samples one of a fixed set of stop tokens (every ``mean_length``-th id, also its
generation config's EOS list): near-uniform sampling then gives geometric lengths of mean about
``mean_length``, capped at ``max_new_tokens``, the same law on both sides. That spread is what
static batches waste time on: every batch runs until its longest sequence stops.

Reported per size and prompt count: generated tokens, their length spread, seconds of each part
of the stage (vLLM: export, engine start, sampling), tokens/s over sampling alone and over the
whole stage, peak RSS (vLLM: this process and the engine's), and vLLM/HF ratios. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

SIZES = {  # hidden, layers, intermediate, heads, kv heads (head size 32 or 64: vLLM's CPU attention)
    "tiny": (64, 2, 128, 2, 1),
    "small": (256, 4, 704, 4, 2),
    "medium": (512, 8, 1408, 8, 4),
}
VOCAB = 32_000


def build(folder: Path, size: str, mean_length: int) -> tuple[Path, int]:
    """A random Llama of ``size`` with a 32k vocabulary and its stop-token set; returns (folder, parameters)."""
    from transformers import LlamaForCausalLM

    from sppo_lightning.testing import llama_config, make_tiny_tokenizer

    hidden, layers, inter, heads, kv = SIZES[size]
    tokenizer = make_tiny_tokenizer()
    config = llama_config(tokenizer, vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers,
                          intermediate_size=inter, num_attention_heads=heads, num_key_value_heads=kv,
                          max_position_embeddings=1024)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = [t for t in range(16, VOCAB) if t % mean_length == 7]
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, sum(p.numel() for p in model.parameters())


def prompts(count: int, seed: int = 0) -> list[SimpleNamespace]:
    """``count`` prompts of 16-128 tokens (ids from the tokenizer's range), as the pipeline's Prompt."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(16, 129, (count,), generator=g).tolist()
    return [SimpleNamespace(ids=[1] + torch.randint(16, 500, (n - 1,), generator=g).tolist()) for n in lengths]


def peak_rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024


def run_side(side: str, folder: str, count: int, k: int, max_new_tokens: int, batch_size: int,
             device: str) -> dict:
    """One side's measurement, in this process."""
    from transformers import AutoModelForCausalLM

    from sppo_lightning.models import load_tokenizer
    from sppo_lightning.pipeline import DistContext

    torch.set_num_threads(os.cpu_count() or 1)
    tokenizer = load_tokenizer(folder)
    policy = AutoModelForCausalLM.from_pretrained(folder).to(device).eval()
    batch = prompts(count)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    if side == "hf":
        from sppo_lightning.generation import sample_responses

        t = time.perf_counter()
        responses = sample_responses(policy, tokenizer, [p.ids for p in batch], k, temperature=0.7, top_p=0.9,
                                     max_new_tokens=max_new_tokens, batch_size=batch_size, seed=0)
        seconds["sampling"] = time.perf_counter() - t
        engine_rss = None
    elif side == "live":  # one engine for the run; per iteration: a sync of the new weights, then sampling
        from sppo_lightning.pipeline import VLLMGenerator

        ctx = DistContext(device=torch.device(device))
        generator = VLLMGenerator(max_new_tokens=max_new_tokens, batch_size=batch_size, dtype="float32",
                                  max_model_len=1024, enforce_eager=device == "cpu", kv_cache_gib=4,
                                  show_progress=False, live=True)
        t = time.perf_counter()
        generator._live_engine(policy, tokenizer, ctx)  # the start (once per run) and the first sync
        seconds["engine_start_once"] = time.perf_counter() - t
        with torch.no_grad():  # a training update: every weight moves
            for param in policy.parameters():
                param.mul_(1.0001)
        t = time.perf_counter()
        generator._live_engine(policy, tokenizer, ctx)  # fingerprint, then the weights in memory
        seconds["sync"] = time.perf_counter() - t
        t = time.perf_counter()
        responses = generator.sample(policy, tokenizer, batch, k, 0, ctx)
        seconds["sampling"] = time.perf_counter() - t
        generator.close()
        engine_rss = peak_rss_mb(resource.RUSAGE_CHILDREN)
    else:
        from sppo_lightning.pipeline import VLLMGenerator
        from sppo_lightning.pipeline.policy_export import export_policy

        ctx = DistContext(device=torch.device(device))
        generator = VLLMGenerator(max_new_tokens=max_new_tokens, batch_size=batch_size, dtype="float32",
                                  max_model_len=1024, enforce_eager=device == "cpu", kv_cache_gib=4,
                                  show_progress=False)
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            export = export_policy(policy, tokenizer, Path(tmp) / "policy", ctx)
            seconds["export"] = time.perf_counter() - t
            t = time.perf_counter()
            generator._engine_for(export, ctx)  # the start, timed apart from the sampling
            seconds["engine_start"] = time.perf_counter() - t
            t = time.perf_counter()
            responses = generator.sample(export, tokenizer, batch, k, 0, ctx)
            seconds["sampling"] = time.perf_counter() - t
            t = time.perf_counter()
            generator.release()  # the engine process exits: its memory is returned
            seconds["release"] = time.perf_counter() - t
        engine_rss = peak_rss_mb(resource.RUSAGE_CHILDREN)
    # the stage of one iteration (live: its sync and its sampling; the start is paid once per run)
    seconds["stage"] = seconds["sync"] + seconds["sampling"] if side == "live" else time.perf_counter() - start
    lengths = [len(r) for per_prompt in responses for r in per_prompt]
    tokens = sum(lengths)
    return {"tokens": tokens, "sequences": len(lengths),
            "length_min_median_max": [min(lengths), statistics.median(lengths), max(lengths)],
            "hit_max_new_tokens": sum(n == max_new_tokens for n in lengths),
            "seconds": {k_: round(v, 2) for k_, v in seconds.items()},
            "tokens_per_s_sampling": round(tokens / seconds["sampling"], 1),
            "tokens_per_s_stage": round(tokens / seconds["stage"], 1),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "engine_peak_rss_mb": None if engine_rss is None else round(engine_rss, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small", "medium"], choices=list(SIZES))
    parser.add_argument("--prompts", nargs="+", type=int, default=[32, 128])
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--mean-length", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per HF generate call")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sides", nargs="+", default=["hf", "vllm", "live"], choices=["hf", "vllm", "live"])
    parser.add_argument("--side", choices=["hf", "vllm", "live"], help=argparse.SUPPRESS)  # one side, in a child
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(run_side(args.side, args.folder, args.prompts[0], args.k, args.max_new_tokens,
                                  args.batch_size, args.device)))
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            folder, parameters = build(Path(tmp) / size, size, args.mean_length)
            for count in args.prompts:
                row = {"size": size, "parameters": parameters, "prompts": count, "k": args.k,
                       "max_new_tokens": args.max_new_tokens}
                for side in args.sides:
                    out = subprocess.run([sys.executable, __file__, "--side", side, "--folder", str(folder),
                                          "--prompts", str(count), "--k", str(args.k), "--max-new-tokens",
                                          str(args.max_new_tokens), "--batch-size", str(args.batch_size),
                                          "--device", args.device], capture_output=True, text=True)
                    if out.returncode != 0:
                        raise SystemExit(f"{side} side failed on {size}/{count}:\n{out.stderr[-3000:]}")
                    row[side] = json.loads(out.stdout.strip().splitlines()[-1])
                for side in ("vllm", "live"):
                    if side in row and "hf" in row:
                        row[f"ratio_{side}_over_hf"] = {
                            key: round(row[side][key] / row["hf"][key], 2)
                            for key in ("tokens_per_s_sampling", "tokens_per_s_stage")}
                    if side in row:  # the whole stage against its sampling alone (goal for live: <= 1.3)
                        row[f"{side}_stage_over_sampling"] = round(row[side]["seconds"]["stage"] /
                                                                   row[side]["seconds"]["sampling"], 2)
                print(json.dumps(row), flush=True)
                results.append(row)
    print(json.dumps({"results": results}, indent=1))


if __name__ == "__main__":
    main()
