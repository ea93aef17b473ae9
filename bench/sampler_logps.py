"""π_t's log-probs from the sampler against a forward pass: per-sequence agreement, and an SPPO run each way.

    python bench/sampler_logps.py --model .real/smollm2        # agreement on a real model (fp32)
    python bench/sampler_logps.py --quickstart                 # + the quickstart's 3 SPPO iterations, each way

1. Agreement: ``--prompts`` IFBench-style prompts (or the tiny prompt file), K samples each from
   ``HFGenerator`` with ``sample_with_logprobs``; each response's summed log-prob as recorded while
   sampling against a no-grad forward over the same ids (``model_logprobs``): mean and largest
   absolute difference in nats per sequence, and the seconds of the forward the sampler saves.
2. ``--quickstart``: ``configs/quickstart.yaml`` through the CLI with ``reference_logps: forward``
   and ``sampler``, side by side: the win rate per iteration, the largest relative difference of the
   per-step losses, and the reference stage's seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def agreement(model_path: str, prompts_file: str, count: int, k: int, tokens: int) -> None:
    from sppo_lightning.data.prompts import load_prompts
    from sppo_lightning.data.tokenize import collate_responses
    from sppo_lightning.distributed import DistContext
    from sppo_lightning.logprobs import model_logprobs
    from sppo_lightning.models import load_causal_lm, load_tokenizer
    from sppo_lightning.pipeline import HFGenerator

    tokenizer = load_tokenizer(model_path)
    model = load_causal_lm(model_path, "float32").eval()
    prompts = load_prompts(prompts_file, tokenizer, 256)[0][:count]
    generator = HFGenerator(temperature=0.7, top_p=0.9, max_new_tokens=tokens, batch_size=8, show_progress=False)
    start = time.perf_counter()
    ids, logps = generator.sample_with_logprobs(model, tokenizer, prompts, k, 0, DistContext())
    sampled = time.perf_counter() - start
    rows = [{"prompt_ids": p.ids, "response": r} for p, rs in zip(prompts, ids) for r in rs]
    start = time.perf_counter()
    with torch.no_grad():
        forward = torch.cat([model_logprobs(model, collate_responses(rows[i : i + 8], "response", tokenizer.pad_token_id)).sum
                             for i in range(0, len(rows), 8)])
    seconds = time.perf_counter() - start
    difference = (torch.tensor([x for xs in logps for x in xs]) - forward).abs()
    tokens_out = sum(len(r["response"]) for r in rows)
    print(f"| {Path(model_path).name} | float32 | {len(rows)} ({tokens_out} tokens) | {difference.mean():.2e} | "
          f"{difference.max():.2e} | {forward.abs().mean():.1f} | {sampled:.1f} | {seconds:.1f} |", flush=True)


def quickstart() -> None:
    work = Path(tempfile.mkdtemp(prefix="sampler_logps_"))
    subprocess.run([sys.executable, "-m", "sppo_lightning.testing", str(work / "tiny")], check=True, capture_output=True)
    config = (REPO / "configs" / "quickstart.yaml").read_text().replace(".tiny/", f"{work / 'tiny'}/")
    found = {}
    for mode in ("forward", "sampler"):
        path = work / f"{mode}.yaml"
        path.write_text(config.replace("reference_logps: forward", f"reference_logps: {mode}"))
        out = work / mode
        subprocess.run([sys.executable, "-m", "sppo_lightning.cli", "fit", "--config", str(path),
                        "--trainer.default_root_dir", str(out)], cwd=REPO, check=True, capture_output=True,
                       env=dict(os.environ, HF_HUB_OFFLINE="1"))
        rows = json.loads((out / "self_play" / "summary.json").read_text())["iterations"]
        losses = [json.loads(line)["loss"] for line in (out / "self_play" / "losses.jsonl").read_text().splitlines()]
        found[mode] = (rows, losses)
    fw_losses, sa_losses = found["forward"][1], found["sampler"][1]
    worst = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(fw_losses, sa_losses))
    for mode, (rows, _) in found.items():
        wins = " / ".join(f"{r['win_rate_vs_initial']:.3f}" for r in rows)
        reference = " / ".join(f"{r['seconds']['reference']:.2f}" for r in rows)
        print(f"| quickstart | {mode} | {wins} | {reference} |")
    print(f"per-step losses: {len(fw_losses)} steps each, largest relative difference {worst:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a model folder for the agreement (e.g. .real/smollm2)")
    parser.add_argument("--prompts", default=".real/ifbench_train.jsonl")
    parser.add_argument("--count", type=int, default=16)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--quickstart", action="store_true")
    args = parser.parse_args()
    if args.model:
        print("| model | dtype | sequences | mean abs difference (nats) | largest | mean abs log-prob | "
              "sampling s | the forward it saves, s |\n|---|---|---|---|---|---|---|---|")
        agreement(args.model, args.prompts, args.count, args.k, args.tokens)
    if args.quickstart:
        print("| run | reference_logps | win rate per iteration | reference seconds per iteration |\n|---|---|---|---|")
        quickstart()


if __name__ == "__main__":
    main()
