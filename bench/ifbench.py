"""The SPPO paper's table in miniature: SmolLM2-135M-Instruct on held-out IFBench prompts, per
iteration, for SPPO (several seeds), iterative DPO and the online K-sample method.

    python -m sppo_lightning.real_model .real        # once: the model and the prompt split
    python bench/ifbench.py --out runs/bench_ifbench --runs sppo:0 sppo:1 dpo:0 online:0

Each run is ``sppo-lightning fit --config configs/smollm2_<method>.yaml`` with the seed set (the
global seed and the sampling seed), one after another, into ``<out>/<method>_seed<seed>``; a run
that already finished is read, not run again (``--ckpt_path last`` finishes a killed one). Then it
prints, for π_0 and every measured iteration, IFEval's four numbers on the 67 held-out prompts,
the win rate against π_0 (the run's ranker), the mean answer length and the wall time per stage,
as the markdown table recorded in ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {"sppo": "self_play", "dpo": "self_play", "online": "online"}


def run(method: str, seed: int, out: Path, extra: list[str], variant: str = "") -> Path:
    folder = out / run_name(method, seed, variant)
    summary = folder / FOLDERS[method] / "summary.json"
    done = folder / "hf_model" / "config.json"
    if done.exists() and summary.exists():
        return folder
    command = [str(Path(sys.executable).with_name("sppo-lightning")), "fit", "--config",
               str(REPO / "configs" / f"smollm2_{method}.yaml"), "--trainer.default_root_dir", str(folder),
               "--seed_everything", str(seed), "--data.init_args.method.init_args.seed", str(seed), *extra]
    if (folder / "checkpoints" / "last.ckpt").exists():
        command += ["--ckpt_path", "last"]
    start = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True)
    (folder / "wall_seconds.txt").write_text(f"{time.perf_counter() - start:.0f}\n")
    return folder


def run_name(method: str, seed: int, variant: str = "") -> str:
    return f"{method}{'_' + variant if variant else ''}_seed{seed}"


def rows(method: str, seed: int, folder: Path, label: str = "") -> list[str]:
    summary = json.loads((folder / FOLDERS[method] / "summary.json").read_text())
    initial = summary.get("initial", {})
    out = []
    measured = [r for r in summary["iterations"] if r.get("if_prompt_loose") is not None]
    for when, r in [("π_0", initial)] + [(str(r["iteration"]), r) for r in measured]:
        seconds = r.get("seconds", {})
        if isinstance(seconds, (int, float)):  # π_0: the evaluation's seconds alone
            seconds = {"evaluate": seconds}
        stages = " / ".join(f"{seconds[k]:.0f}" if k in seconds else "-"
                            for k in ("generate", "rank", "reference", "train", "evaluate"))
        win = r.get("win_rate_vs_initial")
        out.append(f"| {label or method} | {seed} | {when} | {r['if_prompt_loose']:.3f} | {r['if_prompt_strict']:.3f} | "
                   f"{r['if_instruction_loose']:.3f} | {r['if_instruction_strict']:.3f} | "
                   f"{'-' if win is None else f'{win:.3f}'} | {r['if_words']:.0f} | {stages} |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/bench_ifbench")
    parser.add_argument("--runs", nargs="+", default=["sppo:0", "sppo:1", "dpo:0", "online:0"],
                        help="method:seed, method one of sppo, dpo, online")
    parser.add_argument("--table-only", action="store_true", help="read finished runs, run nothing")
    parser.add_argument("--variant", default="", help="a name for runs with the extra flags given (e.g. k8): "
                        "their folders are <method>_<variant>_seed<seed> and their rows say so")
    args, extra = parser.parse_known_args()
    out = Path(args.out)
    lines = ["| method | seed | iteration | prompt loose | prompt strict | instruction loose | instruction strict "
             "| win rate vs π_0 | mean words | seconds: generate / rank / reference / train / evaluate |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    walls = []
    for spec in args.runs:
        method, seed = spec.split(":")
        folder = out / run_name(method, int(seed), args.variant) if args.table_only else \
            run(method, int(seed), out, extra, args.variant)
        label = f"{method} ({args.variant})" if args.variant else method
        if not (folder / FOLDERS[method] / "summary.json").exists():
            lines.append(f"| {method} | {seed} | not measured (not started) | | | | | | | |")
            continue
        lines += rows(method, int(seed), folder, label)
        wall = folder / "wall_seconds.txt"
        if wall.exists():
            walls.append(f"{label} seed {seed}: {int(wall.read_text()) / 60:.1f} min")
    print("\n".join(lines))
    if walls:
        print("\nwhole runs (wall clock): " + "; ".join(walls))


if __name__ == "__main__":
    main()
