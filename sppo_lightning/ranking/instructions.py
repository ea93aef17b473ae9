"""Verifiable instructions: IFEval's and IFBench's own checkers, through ``if-verifiable``.

A prompt of an IFEval-format file carries ``instruction_id_list`` and ``kwargs``
(``data/prompts.py``: ``Prompt.meta``). :class:`InstructionChecks` says, for one response, which
of its prompt's instructions it follows, strictly (the response as it is) and loosely (IFEval's
eight variants: first or last line removed, ``*`` removed). The checking itself is
``if_verifiable.common.evaluate_instructions`` with Google's IFEval checker classes and AllenAI's
IFBench ones (their instruction ids do not overlap, so one table serves both); nothing of it is
rewritten here. What is added:

- **Checkers that cannot run here.** Some need NLTK data (``punkt_tab``, ``stopwords``, a POS
  tagger) that cannot be downloaded offline, and an id may be unknown. ``usable`` tries each
  (instruction id, arguments) once on a short text and remembers the reason it fails;
  ``screen`` names each such instruction once, with how many prompts it drops. A checker that
  fails later, on some response, is marked unusable then, never failing the iteration.
- **IFEval's counting.** An empty response follows none of its instructions (``if-verifiable``
  returns no results for it; IFEval counts each instruction as failed).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from sppo_lightning.errors import ConfigError

# The short text each checker is tried on first: a checker that cannot run raises here.
_PROBE = "Hello world. This is a short answer.\nIt has a second line."


def checker_table() -> dict[str, Any]:
    """IFEval's and IFBench's checker classes by instruction id. Importing IFBench's utilities tries
    to download NLTK data and prints the failure offline: kept off the console."""
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            from if_verifiable.ifbench.instructions_registry import INSTRUCTION_DICT as ifbench
            from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT as ifeval
    except ImportError as err:
        raise ConfigError(f"checking instructions needs the if-verifiable package (pip install if-verifiable): "
                          f"{err}") from None
    return {**ifeval, **ifbench}


@dataclass
class Checked:
    """One response against its prompt's instructions: the ids checked and, for each, whether it is
    followed strictly and loosely. ``dropped``: ids whose checker cannot run here (not counted)."""

    ids: list[str]
    strict: list[bool]
    loose: list[bool]
    dropped: list[str]


def parse_record(view: str) -> tuple[str, dict[str, Any]]:
    """A ``prompt_view: record`` prompt (a JSON object) as (prompt text, its instructions)."""
    try:
        record = json.loads(view)
        return record["prompt"], {"instruction_id_list": record["instruction_id_list"],
                                  "kwargs": record.get("kwargs") or [{} for _ in record["instruction_id_list"]]}
    except (ValueError, KeyError, TypeError):
        from sppo_lightning.errors import DataError

        raise DataError(f"a prompt without instructions reached an instruction checker ({view[:60]!r}): the prompt "
                        f"file needs IFEval's columns instruction_id_list and kwargs") from None


class InstructionChecks:
    """Checks responses against IFEval / IFBench instructions (see the module docstring)."""

    def __init__(self) -> None:
        from if_verifiable.common import evaluate_instructions

        self.table = checker_table()
        self._evaluate = evaluate_instructions
        self.unusable: dict[str, str] = {}  # instruction id -> why its checker cannot run here
        self._tried: set[str] = set()

    def _reason(self, instruction_id: str, kwargs: dict[str, Any], prompt: str) -> Optional[str]:
        """Why this instruction's checker cannot run here, or None when it runs."""
        if instruction_id not in self.table:
            return "unknown instruction id"
        try:
            self._check_one(instruction_id, kwargs, prompt, _PROBE)
        except LookupError as err:  # NLTK: "Resource punkt_tab not found"
            found = re.search(r"Resource\s+(?:\x1b\[[0-9;]*m)?'?([\w/.-]+)", str(err))
            name = f" '{found.group(1)}'" if found else ""
            return f"needs the NLTK data{name}, which is not installed and cannot be downloaded offline"
        except Exception as err:  # noqa: BLE001 - any other failure of a third-party checker
            return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}".strip()
        return None

    def _check_one(self, instruction_id: str, kwargs: dict[str, Any], prompt: str, response: str) -> None:
        self._evaluate(response=response, instruction_id_list=[instruction_id], kwargs_list=[kwargs], prompt=prompt,
                       instruction_registry=self.table)

    def usable(self, instruction_id: str, kwargs: dict[str, Any], prompt: str) -> bool:
        """Whether this instruction's checker runs here (tried once per id)."""
        if instruction_id not in self._tried:
            self._tried.add(instruction_id)
            reason = self._reason(instruction_id, kwargs, prompt)
            if reason is not None:
                self.unusable[instruction_id] = reason
        return instruction_id not in self.unusable

    def screen(self, records: Sequence[tuple[str, dict[str, Any]]]) -> tuple[list[int], list[str]]:
        """Which prompts can be checked in full here: their indices, and one line per instruction
        that cannot, naming it, why, and how many of these prompts it drops."""
        keep: list[int] = []
        drops: dict[str, int] = {}
        for n, (prompt, meta) in enumerate(records):
            bad = [i for i, k in zip(meta["instruction_id_list"], meta["kwargs"]) if not self.usable(i, k, prompt)]
            if bad:
                for instruction in set(bad):
                    drops[instruction] = drops.get(instruction, 0) + 1
            else:
                keep.append(n)
        lines = [f"instruction {i} cannot be checked here ({self.unusable[i]}): {count} prompt(s) with it dropped"
                 for i, count in sorted(drops.items())]
        return keep, lines

    def check(self, prompt: str, meta: dict[str, Any], response: str) -> Checked:
        """Which of ``meta``'s instructions ``response`` follows, strictly and loosely."""
        pairs = [(i, k) for i, k in zip(meta["instruction_id_list"], meta["kwargs"])]
        usable = [(i, k) for i, k in pairs if self.usable(i, k, prompt)]
        dropped = [i for i, _ in pairs if i in self.unusable]
        ids = [i for i, _ in usable]
        if not response.strip() or not usable:  # IFEval: an empty response follows nothing
            return Checked(ids, [False] * len(ids), [False] * len(ids), dropped)
        try:
            results, _ = self._evaluate(response=response, instruction_id_list=ids, kwargs_list=[k for _, k in usable],
                                        prompt=prompt, instruction_registry=self.table)
        except Exception:  # noqa: BLE001 - a checker that fails on this response: find it, mark it, go on
            return self._one_by_one(prompt, usable, response, dropped)
        return Checked(ids, [r.strict_pass for r in results], [r.loose_pass for r in results], dropped)

    def _one_by_one(self, prompt: str, usable: list[tuple[str, dict]], response: str, dropped: list[str]) -> Checked:
        ids, strict, loose = [], [], []
        for instruction_id, kwargs in usable:
            try:
                results, _ = self._evaluate(response=response, instruction_id_list=[instruction_id],
                                            kwargs_list=[kwargs], prompt=prompt, instruction_registry=self.table)
            except Exception as err:  # noqa: BLE001
                self.unusable[instruction_id] = f"{type(err).__name__} on a response"
                dropped.append(instruction_id)
                continue
            ids.append(instruction_id)
            strict.append(results[0].strict_pass)
            loose.append(results[0].loose_pass)
        return Checked(ids, strict, loose, dropped)
