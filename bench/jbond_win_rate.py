"""The self-play methods side by side on the quickstart: win rate against the initial policy, and wall time.

    python bench/jbond_win_rate.py --seeds 0 1 2                          # every recipe below
    python bench/jbond_win_rate.py --seeds 0 1 2 --configs online.yaml    # one of them

The recipes as shipped (configs/jbond.yaml: 48 on-policy J-BOND steps of 4 prompts, win rate every
16; configs/online.yaml: 32 on-policy steps of online best-of-4/worst-of-4 DPO pairs, win rate
every 8; configs/quickstart.yaml: 3 SPPO iterations of 64 prompts), on the quickstart's tiny models
and positive-words judge, one fresh output folder per run; only the seeds change
(``seed_everything`` and the method's ``seed``). Reported per seed: the win rates and the wall time
of the whole ``sppo-lightning fit`` command.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def run(config: str, seed: int, tmp: Path, tiny: Path) -> dict:
    data = yaml.safe_load((REPO / "configs" / config).read_text())
    data["seed_everything"] = seed
    data["model"]["init_args"]["model_name_or_path"] = str(tiny / "llama")
    out = tmp / f"{Path(config).stem}_{seed}"
    data["trainer"]["default_root_dir"] = str(out)
    data["data"]["init_args"]["method"]["init_args"]["seed"] = seed
    for callback in data["trainer"]["callbacks"]:
        if callback["class_path"].endswith("ModelCheckpoint"):
            callback["init_args"]["dirpath"] = str(out / "checkpoints")
    path = tmp / f"{Path(config).stem}_{seed}.yaml"
    path.write_text(yaml.safe_dump(data))
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "sppo_lightning.cli", "fit", "--config", str(path)], cwd=REPO,
                   check=True, capture_output=True)
    seconds = time.perf_counter() - start
    folder = {"jbond.yaml": "bond", "online.yaml": "online"}.get(config, "self_play")
    rows = json.loads((out / folder / "summary.json").read_text())["iterations"]
    return {"win_rates": [round(r["win_rate_vs_initial"], 3) for r in rows if "win_rate_vs_initial" in r],
            "seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--configs", nargs="+", default=["jbond.yaml", "online.yaml", "quickstart.yaml"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, "-m", "sppo_lightning.testing", str(tmp / "tiny")], check=True,
                       capture_output=True)
        results = {config: {seed: run(config, seed, tmp, tmp / "tiny") for seed in args.seeds}
                   for config in args.configs}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
