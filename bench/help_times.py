"""Seconds to answer each help request and a few errors: the first call (rendered) and the second
(from the cache), against the issue's target of 2 s after the first call.

    python bench/help_times.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCRIPT = Path(sys.executable).with_name("sppo-lightning")
REQUESTS = [
    ["--help"],
    ["fit", "--help"],
    ["fit", "--model.help", "PreferenceModule"],
    ["fit", "--data.help", "SelfPlayDataModule"],
    ["fit", "--data", "SelfPlayDataModule", "--data.method.help", "SPPO"],
    ["fit", "--data", "SelfPlayDataModule", "--data.method", "SPPO", "--data.method.ranker.help", "PairRMRanker"],
    ["generate", "--help"],
    ["export", "--help"],
    ["ifeval", "--help"],
]
ERRORS = [  # answered once each: one line and exit 2
    ["fit", "--config", "configs/quickstart.yaml", "--model.model_name_or_path", "/no/such/model"],
    ["fit", "--config", "configs/quickstart.yaml", "--model.lossx", "dpo"],
]


def seconds(args: list[str], env: dict[str, str]) -> tuple[float, int]:
    start = time.perf_counter()
    result = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, env=env)
    return time.perf_counter() - start, result.returncode


def main() -> None:
    env = dict(os.environ, SPPO_LIGHTNING_CACHE=tempfile.mkdtemp(prefix="help_cache_"), HF_HUB_OFFLINE="1")
    print("| request | first call, s | second call, s | target: second ≤ 2 s |\n|---|---|---|---|")
    for args in REQUESTS:
        first, _ = seconds(args, env)
        second, _ = seconds(args, env)
        print(f"| `{' '.join(args)}` | {first:.1f} | {second:.2f} | {'yes' if second <= 2 else 'no'} |", flush=True)
    print("\n| error | seconds to its line | exit |\n|---|---|---|")
    for args in ERRORS:
        took, code = seconds(args, env)
        print(f"| `{' '.join(args)}` | {took:.1f} | {code} |", flush=True)


if __name__ == "__main__":
    main()
