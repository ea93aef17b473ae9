"""One self-play iteration, stage by stage, and how it scales with the number of prompts.

    python bench/iteration.py                 # about 8 minutes on 2 cores

On the quickstart's models (tiny warmed-up Llama, ``positive_words`` judge, K = 5, 24 new tokens):

1. one SPPO iteration (generate, rank, reference log-probs, train) at 64 prompts: seconds per stage;
2. our generation (one batched ``generate`` with ``num_return_sequences=K``: one prefill per prompt)
   against K separate sampling passes, the official pipeline's structure;
3. the same iteration at 1x, 2x and 4x the prompts (256, 512, 1024), each in its own process:
   time (with the fitted seconds per prompt) and peak RSS, with the stages streamed in shards of
   64 prompts (``generation_shard_size``) and, side by side, with the whole iteration as one shard
   (every row in memory at once, as before the stages were sharded).
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

import torch

QUESTIONS = ["Tell me about the {}.", "What color is the {}?", "Why is the {} good?", "Say something about the {}."]
TOPICS = ["sky", "sun", "moon", "tree", "river", "city", "house", "cat", "dog", "bird", "water", "grass"]


def write_prompts(path: Path, n: int) -> None:
    rows = [{"prompt": QUESTIONS[i % len(QUESTIONS)].format(TOPICS[(i // len(QUESTIONS)) % len(TOPICS)]) + f" ({i})"}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def one_iteration(model_dir: str, prompts: str, run_dir: str, shard_size: str) -> dict:
    import lightning as L

    from sppo_lightning.callbacks.self_play import SelfPlay
    from sppo_lightning.datamodules import SelfPlayDataModule
    from sppo_lightning.methods import SPPO
    from sppo_lightning.module import PreferenceModule
    from sppo_lightning.pipeline import HFGenerator
    from sppo_lightning.ranking import FunctionJudge

    L.seed_everything(0)
    method = SPPO(FunctionJudge("sppo_lightning.ranking.judges:positive_words"),
                  HFGenerator(max_new_tokens=24, batch_size=16, show_progress=False), num_samples=5,
                  show_progress=False, generation_shard_size=int(shard_size))
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[SelfPlay()],
                        reload_dataloaders_every_n_epochs=1)
    start = time.perf_counter()
    trainer.fit(PreferenceModule(model_dir, loss="sppo", reference="cached", lr=3e-4),
                datamodule=SelfPlayDataModule(method, prompts=prompts, tokenizer=model_dir, batch_size=8,
                                              max_prompt_length=64, run_dir=run_dir))
    seconds = json.loads((Path(run_dir) / "summary.json").read_text())["iterations"][0]["seconds"]
    return {"total_seconds": time.perf_counter() - start, "stages": seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def spread(values: list[float]) -> tuple[float, float, float]:
    return min(values), statistics.median(values), max(values)


def generation_comparison(model_dir: str, prompts_file: str, repeats: int) -> dict:
    from transformers import AutoModelForCausalLM

    from sppo_lightning.data.prompts import load_prompts
    from sppo_lightning.generation import sample_responses
    from sppo_lightning.models import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = [p.ids for p in load_prompts(prompts_file, tokenizer, 64)[0]]
    options = dict(temperature=0.7, top_p=0.9, max_new_tokens=24, batch_size=16)
    batched, separate = [], []
    for r in range(repeats):
        start = time.perf_counter()
        sample_responses(model, tokenizer, ids, 5, seed=r, **options)
        batched.append(time.perf_counter() - start)
        start = time.perf_counter()
        for k in range(5):  # the official structure: K passes over the prompts, one seed each
            sample_responses(model, tokenizer, ids, 1, seed=100 * r + k, **options)
        separate.append(time.perf_counter() - start)
    ratio = [s / b for b, s in zip(batched, separate)]
    return {"batched_seconds": batched, "k_passes_seconds": separate,
            "speedup_min_median_max": f"{min(ratio):.2f} / {statistics.median(ratio):.2f} / {max(ratio):.2f}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--one", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one_iteration(*args.one)))
        return
    from sppo_lightning.testing import make_tiny_llama

    report = {"machine": f"{os.cpu_count()} cores, torch {torch.__version__}"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = str(make_tiny_llama(tmp / "llama", hidden_size=64, sft_steps=300))
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")

        def run(n: int, shard_size: int, repeat: int = 0) -> dict:
            prompts = tmp / f"prompts_{n}.jsonl"
            if not prompts.exists():
                write_prompts(prompts, n)
            done = subprocess.run([sys.executable, __file__, "--one", model_dir, str(prompts),
                                   str(tmp / f"run_{n}_{shard_size}_{repeat}"), str(shard_size)],
                                  env=env, capture_output=True, text=True)
            lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
            if not lines:
                raise SystemExit(done.stderr[-3000:])
            return json.loads(lines[-1][len("RESULT "):])

        report["iteration_64_prompts_stage_seconds"] = run(64, 512)["stages"]
        report["generation_one_generate_vs_k_passes"] = generation_comparison(
            model_dir, str(tmp / "prompts_64.jsonl"), args.repeats)
        for label, shard_size in (("shards_of_64", 64), ("one_shard", 1 << 20)):
            sizes = (256, 512, 1024)
            # a fresh run directory each time: a reused one would resume its finished stages
            runs = {n: [run(n, shard_size, r) for r in range(args.repeats)] for n in sizes}
            medians = [statistics.median(r["total_seconds"] for r in runs[n]) for n in sizes]
            mean_x, mean_y = statistics.mean(sizes), statistics.mean(medians)
            slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(sizes, medians)) / \
                sum((x - mean_x) ** 2 for x in sizes)
            residual = max(abs(y - (mean_y + slope * (x - mean_x))) / y for x, y in zip(sizes, medians))
            peaks = [max(r["peak_rss_mb"] for r in runs[n]) for n in sizes]
            report[f"scaling_{label}"] = {
                **{str(n): {"seconds_min_median_max": " / ".join(
                                f"{v:.2f}" for v in spread([r["total_seconds"] for r in runs[n]])),
                            "peak_rss_mb_max": round(peak, 1)} for n, peak in zip(sizes, peaks)},
                "fitted_seconds_per_prompt": round(slope, 4),
                "fitted_intercept_seconds": round(mean_y - slope * mean_x, 2),
                "largest_relative_residual_of_linear_fit": round(residual, 3),
                "rss_growth_1x_to_4x_mb": round(peaks[-1] - peaks[0], 1),
            }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
