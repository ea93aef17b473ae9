"""LLMJudge time per 1,000 pairs on the tiny local judge, uncached and answered from the cache.

    python bench/llm_judge.py --repeats 3        # about a minute on 2 cores

The quickstart's tiny Llama (``python -m sppo_lightning.testing``, built in a temporary folder) judges
50 prompts with K = 5 candidates each: 1,000 ordered pairs, both orders asked (each pair is one
question). Uncached: a fresh judgment cache every repeat. Cached: the same questions again, every
one a cache hit (what a resumed run or a repeated evaluation pays). Reported: seconds per 1,000
pairs, min / median / max, and the ratio cached / uncached.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = "good best sure thank help please yes simple the a cat dog blue red five seven is it".split()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    from sppo_lightning.ranking import LLMJudge
    from sppo_lightning.ranking.cache import JudgmentCache

    rng = random.Random(0)
    prompts = [" ".join(rng.choices(WORDS, k=8)) + "?" for _ in range(50)]
    candidates = [[" ".join(rng.choices(WORDS, k=rng.randint(3, 30))) for _ in range(5)] for _ in prompts]
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "sppo_lightning.testing", f"{tmp}/tiny"], check=True, capture_output=True)
        judge = LLMJudge(f"{tmp}/tiny/llama", batch_size=args.batch_size, show_progress=False).load()
        uncached, cached = [], []
        for repeat in range(args.repeats):
            folder = Path(tmp) / f"cache{repeat}"
            judge.use_cache(JudgmentCache(folder))
            start = time.perf_counter()
            first = judge.pairwise_logits(prompts, candidates)
            uncached.append(time.perf_counter() - start)
            judge.use_cache(JudgmentCache(folder))  # as a resumed run opens it
            start = time.perf_counter()
            second = judge.pairwise_logits(prompts, candidates)
            cached.append(time.perf_counter() - start)
            assert judge.cache.hits == 1000 and (first == second).all()
    print(json.dumps({
        "pairs": 1000,
        "uncached_s_per_1000_pairs": [round(x, 3) for x in uncached],
        "cached_s_per_1000_pairs": [round(x, 4) for x in cached],
        "cached_over_uncached": [round(c / u, 5) for c, u in zip(cached, uncached)],
        "median_uncached": round(statistics.median(uncached), 3),
        "median_cached": round(statistics.median(cached), 4),
    }, indent=2))


if __name__ == "__main__":
    main()
