"""The check every method makes of the generator and ranker it is given: each has the members of
its contract (``sppo_lightning/contracts.py``), or the run stops in one line naming what is missing."""

from __future__ import annotations

from typing import Any

from sppo_lightning.contracts import Generator, Ranker, lacking
from sppo_lightning.errors import ConfigError

HOW = {"generator": "sample(), fingerprint() and the sampling settings, as HFGenerator",
       "ranker": "pairwise_logits(), fingerprint() and prompt_view, as FunctionJudge (README: adding a ranker)"}


def check_plugins(owner: str, generator: Any, ranker: Any) -> None:
    for role, plugin, contract in (("generator", generator, Generator), ("ranker", ranker, Ranker)):
        missing = lacking(plugin, contract)
        if missing:
            raise ConfigError(f"{owner}: the {role} {type(plugin).__name__} lacks {', '.join(missing)}; a {role} "
                              f"has {HOW[role]}")
