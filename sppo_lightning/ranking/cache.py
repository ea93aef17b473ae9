"""``JudgmentCache``: every pairwise judgment a judge has made, kept in the run dir.

A judgment is keyed by a hash of (the judge's fingerprint, prompt, response A, response B), so a
resumed run, a repeated evaluation or the same pair in another iteration never asks the judge
again, and a changed judge (template, model, endpoint) asks afresh. Judgments are appended to
``<folder>/judgments.<pid>.jsonl`` as each batch finishes (one file per process, so ranks never
write the same file), and every such file is read when the cache opens; a line torn by a crash is
skipped.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

from sppo_lightning.contracts import QuestionJudge, Ranker


def judgment_key(judge: str, prompt: str, a: str, b: str) -> str:
    return hashlib.sha256(json.dumps([judge, prompt, a, b]).encode()).hexdigest()[:32]


class JudgmentCache:
    """Args: folder: where the judgment files live (created on first write)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.values: dict[str, float] = {}
        self.hits = 0
        self.stored = 0
        for path in sorted(self.folder.glob("judgments.*.jsonl")):
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                    self.values[row["key"]] = float(row["value"])
                except (ValueError, KeyError, TypeError):
                    continue  # a line torn by a crash

    def get_many(self, keys: Iterable[str]) -> dict[str, float]:
        """The cached values of ``keys``; ``hits`` counts every question answered, repeats included
        (so that questions asked + hits = questions judged)."""
        keys = list(keys)
        found = {k: self.values[k] for k in keys if k in self.values}
        self.hits += sum(1 for k in keys if k in found)
        return found

    def put_many(self, values: dict[str, float]) -> None:
        if not values:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"judgments.{os.getpid()}.jsonl"
        try:
            with path.open("a") as f:
                for key, value in values.items():
                    f.write(json.dumps({"key": key, "value": value}) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as err:
            if err.errno != errno.ENOSPC:
                raise
            import shutil

            from sppo_lightning.errors import TrainingError

            free = shutil.disk_usage(self.folder).free / 2**20
            raise TrainingError(f"no space left in {self.folder} to keep the judge's answers ({free:.1f} MiB free); "
                                f"the {len(self.values)} judgments kept so far are reused on resume (a line torn by "
                                f"the full disk is skipped): free space, then resume with --ckpt_path last") from None
        self.values.update(values)
        self.stored += len(values)


def attach_judgment_cache(ranker: Ranker, run_dir: str | os.PathLike) -> None:
    """Give a judge that asks questions (``QuestionJudge``) the run dir's cache of answers, once."""
    if isinstance(ranker, QuestionJudge) and ranker.cache is None:
        ranker.use_cache(JudgmentCache(Path(run_dir) / "judgments"))


def counted(ranker: Ranker, rank) -> tuple[list, dict]:
    """``rank()``'s rows, and how many questions the judge asked and how many the cache answered
    meanwhile (``judge_calls``, ``cache_hits``, ``judged_by_logprobs``/``_verdict``); {} for a ranker
    that asks no questions."""
    if not isinstance(ranker, QuestionJudge):
        return rank(), {}
    cache = ranker.cache
    before, hits = ranker.counts(), cache.hits if cache is not None else 0
    rows = rank()
    after = ranker.counts()
    info = {"judge_calls": after["calls"] - before["calls"],
            "cache_hits": (cache.hits - hits) if cache is not None else 0}
    for name in ("by_logprobs", "by_verdict"):
        if name in after:
            info[f"judged_{name}"] = after[name] - before[name]
    return rows, info
