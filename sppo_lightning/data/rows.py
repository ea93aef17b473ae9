"""Preference rows: reading files, checking every row, and one normal form for both formats.

Two input formats are accepted (the first is the official SPPO scripts' ``train.parquet`` schema):

* **SPPO pairs**: ``chosen`` and ``rejected`` are conversations (lists of ``{"role", "content"}``)
  sharing every turn but the last, assistant, one; optionally ``chosen_probs`` (P(chosen ≻
  rejected)), ``chosen_probs_win`` and ``chosen_probs_lose`` (their win rates against the policy).
* **Plain strings**: ``prompt``, ``chosen`` and ``rejected`` strings.

Either may carry ``reference_chosen_logps`` / ``reference_rejected_logps`` (summed log-probs under
the reference), which self-play fills so that training runs no reference model.

Every row becomes a :class:`PreferenceRow`; anything wrong raises :class:`DataError` naming the
source, the row and the column.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sppo_lightning.errors import DataError

PROB_COLUMNS = ("chosen_probs", "chosen_probs_win", "chosen_probs_lose")
REFERENCE_COLUMNS = ("reference_chosen_logps", "reference_rejected_logps")
ROLES = ("system", "user", "assistant")


@dataclass
class PreferenceRow:
    prompt: list[dict[str, str]]  # the conversation up to the response, as chat messages
    chosen: str
    rejected: str
    probs: dict[str, float]  # present PROB_COLUMNS
    reference: dict[str, float]  # present REFERENCE_COLUMNS


def load_records(source: str, split: str = "train") -> list[dict[str, Any]]:
    """Read raw records from a json/jsonl/parquet file, a saved ``datasets`` folder or a hub name."""
    path = Path(source)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return _read_jsonl(path)
        if suffix == ".json":
            return _read_json(path)
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            try:
                return pq.read_table(path).to_pylist()
            except Exception as err:  # pyarrow raises several types for a broken file
                raise DataError(f"{source}: not a readable parquet file ({err})") from None
        raise DataError(f"{source}: unsupported file type '{suffix}' (use .json, .jsonl or .parquet)")
    if path.is_dir():
        import datasets

        try:
            data = datasets.load_from_disk(str(path))
        except FileNotFoundError as err:
            raise DataError(f"{source}: not a folder saved with `datasets.save_to_disk` ({err})") from None
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                raise DataError(f"{source}: no split '{split}'; it has {sorted(data)}")
            data = data[split]
        return data.to_list()
    if path.suffix.lower() in (".json", ".jsonl", ".parquet") or source.startswith((".", "/", "~")):
        raise DataError(f"{source}: no such file or folder")
    return _load_hub(source, split)


def _load_hub(name: str, split: str) -> list[dict[str, Any]]:
    import datasets

    try:
        return datasets.load_dataset(name, split=split).to_list()
    except Exception as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(
            f"{name}: not a local file or folder, and loading it from the Hugging Face hub failed "
            f"({reason}). Check the path, or download the dataset where the hub is reachable and "
            f"pass the saved folder."
        ) from None


def _text_lines(path: Path) -> list[str]:
    """The file's lines as UTF-8 text (a byte-order mark, as some editors write, is dropped); bytes
    that are not UTF-8 are one line naming the file and the line they are on."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line}: not UTF-8 text (byte {data[err.start]:#04x} at offset {err.start}); "
                        f"save the file as UTF-8") from None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    records = []
    for lineno, line in enumerate(_text_lines(path), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: line {lineno}: invalid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}: line {lineno}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


def _read_json(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads("\n".join(_text_lines(path)))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: invalid JSON at line {err.lineno} ({err.msg})") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path}: expected a JSON list of objects (or use .jsonl, one object per line)")
    return data


def parse_rows(
    records: list[dict[str, Any]], source: str, skip_bad_rows: bool = False
) -> tuple[list[PreferenceRow], list[str]]:
    """Check and normalise records. Returns the good rows and, with ``skip_bad_rows``, one message
    per skipped row; without it the first bad row raises :class:`DataError`."""
    if not records:
        raise DataError(f"{source}: no rows")
    columns = set(records[0])
    missing = [c for c in ("chosen", "rejected") if c not in columns]
    conversational = isinstance(records[0].get("chosen"), list)
    if not conversational and "prompt" not in columns:
        missing.insert(0, "prompt")
    if missing:
        raise DataError(
            f"{source}: missing column(s) {missing}; found {sorted(columns)}. Expected either "
            f"'chosen'/'rejected' conversations or 'prompt'/'chosen'/'rejected' strings."
        )
    optional = [c for c in PROB_COLUMNS + REFERENCE_COLUMNS if c in columns]
    rows, skipped = [], []
    for i, record in enumerate(records):
        try:
            rows.append(_parse_row(record, conversational, optional))
        except _RowError as err:
            message = f"{source}: row {i + 1}: column '{err.column}': {err.problem}"
            if not skip_bad_rows:
                raise DataError(message) from None
            skipped.append(message)
    if not rows:
        raise DataError(f"{source}: every row is bad ({len(skipped)} skipped); first: {skipped[0]}")
    return rows, skipped


class _RowError(Exception):
    def __init__(self, column: str, problem: str):
        self.column, self.problem = column, problem


def _parse_row(record: dict[str, Any], conversational: bool, optional: list[str]) -> PreferenceRow:
    for column in ("chosen", "rejected") + (() if conversational else ("prompt",)):
        if record.get(column) is None:
            raise _RowError(column, "missing value")
    if conversational:
        prompt, chosen = _split_conversation(record["chosen"], "chosen")
        prompt_r, rejected = _split_conversation(record["rejected"], "rejected")
        if prompt != prompt_r:
            raise _RowError("rejected", "its turns before the response differ from those of 'chosen'")
    else:
        prompt = [{"role": "user", "content": _text(record["prompt"], "prompt")}]
        chosen = _text(record["chosen"], "chosen")
        rejected = _text(record["rejected"], "rejected")
    if chosen == rejected:
        raise _RowError("rejected", "identical to 'chosen'; a pair needs two different responses")
    probs = {c: _number(record.get(c), c, 0.0, 1.0) for c in optional if c in PROB_COLUMNS}
    reference = {c: _number(record.get(c), c, -math.inf, 0.0) for c in optional if c in REFERENCE_COLUMNS}
    return PreferenceRow(prompt, chosen, rejected, probs, reference)


def _text(value: Any, column: str) -> str:
    if not isinstance(value, str):
        raise _RowError(column, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise _RowError(column, "empty text")
    return value


def _split_conversation(value: Any, column: str) -> tuple[list[dict[str, str]], str]:
    if not isinstance(value, list) or len(value) < 2:
        raise _RowError(column, "expected a conversation: a list of at least 2 {role, content} messages")
    messages = []
    for turn, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise _RowError(column, f"turn {turn}: expected {{'role': ..., 'content': <string>}}")
        if message.get("role") not in ROLES:
            raise _RowError(column, f"turn {turn}: role {message.get('role')!r} is not one of {ROLES}")
        messages.append({"role": message["role"], "content": message["content"]})
    if messages[-1]["role"] != "assistant":
        raise _RowError(column, "the last turn must be the assistant's response")
    if not any(m["role"] == "user" for m in messages[:-1]):
        raise _RowError(column, "no user turn before the response")
    if not messages[-1]["content"].strip():
        raise _RowError(column, "empty response")
    return messages[:-1], messages[-1]["content"]


def _number(value: Any, column: str, low: float, high: float) -> float:
    if value is None:
        raise _RowError(column, "missing value")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _RowError(column, f"expected a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise _RowError(column, f"{value} is not finite")
    if not low <= value <= high:
        raise _RowError(column, f"{value} is outside [{low}, {high}]")
    return value
