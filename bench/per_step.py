"""Steps per second of the per-step methods (online pairs, J-BOND), this code against a baseline tree.

    git worktree add /tmp/landed <commit> --detach && ln -s ../callbacks /tmp/landed/sppo_lightning/callbacks
    python bench/per_step.py --baseline /tmp/landed          # HF generate, about 10 minutes on 2 cores
    .venv-vllm/bin/python bench/per_step.py --baseline /tmp/landed --engine vllm   # the live vLLM engine

Each tree runs its own ``configs/online.yaml`` and ``configs/jbond.yaml`` through the CLI, on the
quickstart's tiny models (built once), without held-out prompts, twice: for ``--steps`` optimizer
steps and for 2. Steps per second are ``(steps - 2) / (T_steps - T_2)``: the start-up (imports,
model load) and the first step cancel. The runs alternate between the trees, so that a busy machine
slows both alike. It also counts the files each run leaves in its run folder. ``--engine vllm``
swaps in a live ``VLLMGenerator`` (the tiny Llama with a head size of 32, which vLLM's CPU attention
needs), one engine a run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"online": "online", "jbond": "bond"}  # config -> its run folder


def config_for(tree: Path, name: str, tiny: Path, steps: int, engine: str, out: Path) -> Path:
    data = yaml.safe_load((tree / "configs" / f"{name}.yaml").read_text().replace(".tiny/", f"{tiny}/"))
    data["trainer"]["max_epochs"] = steps
    data["data"]["init_args"]["eval_prompts"] = None  # the loop alone, not the win rate
    data["data"]["init_args"]["prompts"] = str(tree / data["data"]["init_args"]["prompts"])
    if engine == "vllm":
        model = str(tiny / "llama_vllm")
        data["model"]["init_args"]["model_name_or_path"] = model
        old = data["data"]["init_args"]["method"]["init_args"]["generator"]["init_args"]
        data["data"]["init_args"]["method"]["init_args"]["generator"] = {
            "class_path": "sppo_lightning.pipeline.VLLMGenerator",
            "init_args": {"temperature": old["temperature"], "top_p": old["top_p"],
                          "max_new_tokens": old["max_new_tokens"], "batch_size": old["batch_size"],
                          "dtype": "float32", "max_model_len": 256, "kv_cache_gib": 1, "show_progress": False}}
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run(tree: Path, name: str, tiny: Path, steps: int, engine: str, out: Path) -> tuple[float, int]:
    """Seconds of one whole ``fit`` and the files its run folder holds."""
    out.mkdir(parents=True)
    config = config_for(tree, name, tiny, steps, engine, out)
    env = dict(os.environ, PYTHONPATH=str(tree), HF_HUB_OFFLINE="1")
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "sppo_lightning.cli", "fit", "--config", str(config),
                             "--trainer.default_root_dir", str(out)], cwd=tree, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{tree} {name} ({steps} steps) failed:\n{result.stderr[-3000:]}")
    folder = out / CONFIGS[name]
    return seconds, sum(1 for p in folder.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", required=True, help="a checkout of the code to compare with (git worktree)")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--engine", choices=["hf", "vllm"], default="hf")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--tiny", help="the quickstart's models (python -m sppo_lightning.testing DIR); default: built")
    args = parser.parse_args()
    trees = {"baseline": Path(args.baseline).resolve(), "this": REPO}
    work = Path(tempfile.mkdtemp(prefix="per_step_"))
    tiny = Path(args.tiny) if args.tiny else work / "tiny"
    if not args.tiny:
        flags = ["--vllm"] if args.engine == "vllm" else []
        subprocess.run([sys.executable, "-m", "sppo_lightning.testing", str(tiny)], check=True, capture_output=True)
        if flags:
            subprocess.run([sys.executable, "-m", "sppo_lightning.testing", str(tiny), *flags], check=True,
                           capture_output=True)
    print(f"| config | engine | code | steps/s | seconds ({args.steps} steps / 2 steps) | files in the run folder "
          f"({args.steps} steps) |\n|---|---|---|---|---|---|")
    for name in args.configs:
        found = {}
        for steps in (2, args.steps):
            for label, tree in trees.items():  # alternating: a busy machine slows both alike
                found[label, steps] = run(tree, name, tiny, steps, args.engine, work / f"{label}_{name}_{steps}")
        for label in trees:
            (short, _), (long, files) = found[label, 2], found[label, args.steps]
            rate = (args.steps - 2) / (long - short)
            print(f"| {name}.yaml | {args.engine} | {label} | {rate:.2f} | {long:.0f} / {short:.0f} | {files} |",
                  flush=True)
        ratio = ((found["baseline", args.steps][0] - found["baseline", 2][0])
                 / (found["this", args.steps][0] - found["this", 2][0]))
        print(f"| {name}.yaml | {args.engine} | this / baseline | {ratio:.2f}x | | |", flush=True)


if __name__ == "__main__":
    main()
