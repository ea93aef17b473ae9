"""Prompt files for self-play: load, check, chat-template (token ids are kept from here on).

A file in the IFEval / IFBench format (``key``, ``prompt``, ``instruction_id_list``, ``kwargs``)
is a prompt file like any other; its instructions travel with each prompt (``Prompt.meta``) into
the generations and to a ranker that reads them (``prompt_view: record``, e.g.
``VerifiableInstructionRanker``), and to the instruction-following evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from transformers import PreTrainedTokenizerBase

from sppo_lightning.data.rows import ROLES, load_records
from sppo_lightning.data.tokenize import encode_prompt, keep_end
from sppo_lightning.errors import DataError


@dataclass
class Prompt:
    index: int  # row in the prompt file
    messages: list[dict[str, str]]  # the conversation to answer, ending with a user turn
    text: str  # what a ranker or judge reads: the turns' contents, blank-line separated
    ids: list[int]  # templated prompt with generation prompt, at most max_prompt_length tokens
    principle: Optional[str] = None  # Linear Alignment's per-prompt principle, when the file has one
    truncated: bool = False  # longer than max_prompt_length: its start was cut
    meta: Optional[dict[str, Any]] = None  # IFEval-format files: {key, instruction_id_list, kwargs}



def load_prompts(
    source: str,
    tokenizer: PreTrainedTokenizerBase,
    max_prompt_length: int,
    column: str = "prompt",
    split: str = "train",
    skip_bad_rows: bool = False,
    principle_column: Optional[str] = None,
) -> tuple[list[Prompt], int, list[str]]:
    """Read prompts from a file, saved dataset or hub name.

    A row's ``column`` is a string (one user turn) or a list of ``{role, content}`` messages ending
    with the user's turn. Prompts longer than ``max_prompt_length`` tokens keep their end (and BOS).

    Returns the prompts, how many were truncated, and the messages of skipped rows.
    """
    records = load_records(source, split)
    if not records:
        raise DataError(f"{source}: no prompts")
    if column not in records[0]:
        raise DataError(f"{source}: missing column '{column}'; found {sorted(records[0])} (set data.prompt_column)")
    prompts, skipped, truncated = [], [], 0
    instructed = "instruction_id_list" in records[0]  # an IFEval / IFBench file: every row has them
    for i, record in enumerate(records):
        bad_column = column
        try:
            if column not in record:
                raise ValueError("missing (this row has " + (", ".join(f"'{k}'" for k in sorted(record)) or "no columns")
                                 + ")")
            messages = _messages(record.get(column))
            principle = record.get(principle_column) if principle_column else None
            if principle is not None and (not isinstance(principle, str) or not principle.strip()):
                bad_column = principle_column
                raise ValueError("expected a non-empty principle string")
            meta = instruction_meta(record) if instructed else None
        except ValueError as err:
            message = f"{source}: row {i + 1}: column '{getattr(err, 'column', bad_column)}': {err}"
            if not skip_bad_rows:
                raise DataError(message) from None
            skipped.append(message)
            continue
        ids = encode_prompt(tokenizer, messages)
        cut = len(ids) > max_prompt_length
        truncated += cut
        ids = keep_end(ids, max_prompt_length, tokenizer.bos_token_id)
        text = "\n\n".join(m["content"] for m in messages if m["role"] != "system")
        prompts.append(Prompt(i, messages, text, ids, principle, cut, meta))
    if not prompts:
        raise DataError(f"{source}: every prompt is bad ({len(skipped)} skipped); first: {skipped[0]}")
    return prompts, truncated, skipped


class ColumnError(ValueError):
    """A bad value in a row, naming its ``column``."""

    def __init__(self, column: str, message: str) -> None:
        super().__init__(message)
        self.column = column


def instruction_meta(record: dict[str, Any]) -> dict[str, Any]:
    """A row's ``{key, instruction_id_list, kwargs}``: a list of instruction ids and one dict of
    arguments per id (``kwargs`` missing: no arguments). A ``ColumnError`` names what is wrong."""
    ids, kwargs = record.get("instruction_id_list"), record.get("kwargs")
    if not isinstance(ids, list) or not ids or not all(isinstance(x, str) and x for x in ids):
        raise ColumnError("instruction_id_list", f"expected a non-empty list of instruction ids, got {ids!r:.80}")
    if kwargs is None:
        kwargs = [{} for _ in ids]
    if not isinstance(kwargs, list) or len(kwargs) != len(ids) or not all(isinstance(k, dict) for k in kwargs):
        raise ColumnError("kwargs", f"must be a list of {len(ids)} dicts (one per instruction), got {kwargs!r:.80}")
    key = record.get("key")
    return {"key": key if isinstance(key, (str, int)) else None, "instruction_id_list": list(ids),
            "kwargs": [{k: v for k, v in d.items() if v is not None} for d in kwargs]}


def _messages(value: Any) -> list[dict[str, str]]:
    if isinstance(value, str):
        if not value.strip():
            raise ValueError("empty prompt")
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise ValueError(f"expected a string or a list of messages, got {type(value).__name__}")
    messages = []
    for turn, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"turn {turn}: expected {{'role': one of {ROLES}, 'content': <string>}}")
        messages.append({"role": m["role"], "content": m["content"]})
    if messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
        raise ValueError("the last turn must be a non-empty user turn")
    return messages


def prompts_fingerprint(prompts: Sequence[Prompt]) -> str:
    """A short hash of the prompts' token ids: artifacts made from other prompts are refused."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps([p.ids for p in prompts]).encode()).hexdigest()[:16]
