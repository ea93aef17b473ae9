"""PairRM ranking throughput: ``PairRMRanker.scores`` against llm-blender's ``Blender.rank``.

    python bench/pairrm.py                    # about 11 minutes on 2 cores

Same random PairRM (DeBERTa-v2 backbone, 4 layers, hidden 256, llm-blender's head, saved in
llm-blender's layout and loaded by both), same 64 prompts with K = 5 candidates each (all 20
ordered pairs per prompt). Ours at its best batch size among 4, 8 and 16. Baseline:
``Blender.rank(..., return_scores=True, batch_size=1)`` as the
official SPPO pipeline calls it, and llm-blender's best batch size among 4, 8 and 16. The scores
must agree to 1e-4 in the same run. Reported: seconds per call and the speed-up, min/median/max.

Both sides run the same K(K-1) cross-encoder passes, so the script also counts their matmul FLOPs
(``torch.utils.flop_counter``) and measures this machine's fp32 matmul ceiling: each side's
achieved FLOP rate against the ceiling bounds what any exact (score-preserving) speed-up can reach.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from ceiling import matmul_ceiling  # bench/ceiling.py (the script's folder is on sys.path)

PROMPTS, K = 64, 5


def texts() -> tuple[list[str], list[list[str]]]:
    from sppo_lightning.testing import WORDS

    g = torch.Generator().manual_seed(0)

    def text(low: int, high: int) -> str:
        n = int(torch.randint(low, high, (1,), generator=g))
        return " ".join(WORDS[i] for i in torch.randint(len(WORDS), (n,), generator=g).tolist())

    prompts = [text(10, 60) for _ in range(PROMPTS)]
    return prompts, [[text(5, 120) for _ in range(K)] for _ in prompts]


def timed(fn, repeats: int) -> tuple[list[float], object]:
    seconds, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        seconds.append(time.perf_counter() - start)
    return seconds, result


def pass_flops(ranker, prompts: list[str], candidates: list[list[str]]) -> int:
    """Matmul FLOPs of one ``pairwise_logits`` call (the same passes llm-blender runs)."""
    from torch.utils.flop_counter import FlopCounterMode

    for parameter in ranker.model.parameters():  # the counter's module hooks trip on grad-requiring
        parameter.requires_grad_(False)       # parameters under inference_mode; scoring needs none
    counter = FlopCounterMode(display=False)
    with counter:
        ranker.pairwise_logits(prompts, candidates)
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 8, 16],
                        help="our pair sequences per forward to try; the best is reported (as for llm-blender)")
    args = parser.parse_args()
    torch.manual_seed(0)
    from sppo_lightning.ranking import PairRMRanker
    from sppo_lightning.ranking.pairrm import import_llm_blender
    from sppo_lightning.testing import make_tiny_pairrm

    prompts, candidates = texts()
    with tempfile.TemporaryDirectory() as tmp:
        # init 0.05: order-5 scores, and a model conditioned well enough that batching changes only
        # fp32 rounding (~1e-5), as with real PairRM weights
        blender_dir, _ = make_tiny_pairrm(Path(tmp), hidden_size=256, num_layers=4, num_heads=4,
                                          initializer_range=0.05, head_std=1.0)
        llm_blender = import_llm_blender()
        blender = llm_blender.Blender(blender_config=llm_blender.BlenderConfig(device="cpu", use_tqdm=False))
        blender.loadranker(str(blender_dir), device="cpu")
        ours_by_bs = {}
        for bs in args.batch_sizes:
            ours = PairRMRanker.from_pretrained(str(blender_dir), batch_size=bs, show_progress=False)
            ours_by_bs[bs], ours_scores = timed(lambda: ours.scores(prompts, candidates), args.repeats)
        ours_bs = min(ours_by_bs, key=lambda b: statistics.median(ours_by_bs[b]))
        ours_s = ours_by_bs[ours_bs]
        base_s, base_scores = timed(
            lambda: blender.rank(prompts, candidates, return_scores=True, batch_size=1), args.repeats)
        best = {}
        for bs in (4, 8, 16):
            best[bs], scores = timed(
                lambda: blender.rank(prompts, candidates, return_scores=True, batch_size=bs), args.repeats)
        # One pair per forward: no padding, so exactly the work llm-blender's batch_size=1 does.
        flops = pass_flops(PairRMRanker.from_pretrained(str(blender_dir), batch_size=1, show_progress=False),
                           prompts, candidates)
        # Ours batched: the relative-position projections are shared by a batch, padding is added.
        ours_flops = pass_flops(PairRMRanker.from_pretrained(str(blender_dir), batch_size=ours_bs,
                                                             show_progress=False), prompts, candidates)
    # shapes like PairRM's layers (hidden 256, FFN 1024), and a square one
    ceiling = matmul_ceiling([(4096, 256, 1024), (4096, 1024, 256), (1024, 1024, 1024)])
    agreement = float((ours_scores - torch.tensor(base_scores)).abs().max())
    assert agreement < 1e-4, f"scores disagree by {agreement}"
    best_bs = min(best, key=lambda b: statistics.median(best[b]))
    speedup = [b / o for o, b in zip(ours_s, base_s)]
    speedup_best = [b / o for o, b in zip(ours_s, best[best_bs])]
    import transformers

    print(json.dumps({
        "machine": f"{os.cpu_count()} cores, torch {torch.__version__}, transformers {transformers.__version__}",
        "pairs_scored": PROMPTS * K * (K - 1),
        f"ours_best_bs{ours_bs}_seconds": ours_s,
        "ours_median_seconds_by_batch_size": {b: round(statistics.median(v), 2) for b, v in ours_by_bs.items()},
        "blender_bs1_seconds": base_s,
        f"blender_best_bs{best_bs}_seconds": best[best_bs],
        "max_abs_score_difference": agreement,
        "speedup_vs_bs1_min_median_max": f"{min(speedup):.2f} / {statistics.median(speedup):.2f} / {max(speedup):.2f}",
        f"speedup_vs_bs{best_bs}_min_median_max":
            f"{min(speedup_best):.2f} / {statistics.median(speedup_best):.2f} / {max(speedup_best):.2f}",
        "matmul_gflop_per_call_one_pair_per_forward": round(flops / 1e9, 1),
        f"matmul_gflop_per_call_ours_bs{ours_bs}": round(ours_flops / 1e9, 1),
        "fp32_matmul_ceiling_gflops": round(ceiling / 1e9, 1),
        "ours_gflops_fraction_of_ceiling": f"{ours_flops / statistics.median(ours_s) / 1e9:.1f} "
                                           f"({ours_flops / statistics.median(ours_s) / ceiling:.0%})",
        "blender_bs1_gflops_fraction_of_ceiling": f"{flops / statistics.median(base_s) / 1e9:.1f} "
                                                  f"({flops / statistics.median(base_s) / ceiling:.0%})",
        # ours' FLOPs at 100% of the ceiling: the most any score-preserving batching can gain here
        "speedup_bound_vs_bs1_at_full_ceiling": round(statistics.median(base_s) * ceiling / ours_flops, 2),
        "fraction_of_ceiling_a_3x_speedup_needs":
            f"{3 * ours_flops / statistics.median(base_s) / ceiling:.0%}",
    }, indent=2))


if __name__ == "__main__":
    main()
