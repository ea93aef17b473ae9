"""Write the docs' generated pages; run before the docs build (`.ci/run` does):

    python docs/generate.py

- ``docs/index.md``: the README, its links made relative to the site (one text, never a copy that drifts);
- ``docs/config-reference.md``: from the classes' signatures and docstrings, every key of every class a
  config names, its default and what it does.
"""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

# (where the class sits in a config, its class path)
CLASSES = [
    ("model (pair losses, SPPO)", "sppo_lightning.module.PreferenceModule"),
    ("model (J-BOND, BOND)", "sppo_lightning.bond.BondModule"),
    ("data (self-play)", "sppo_lightning.datamodules.SelfPlayDataModule"),
    ("data (a pair file)", "sppo_lightning.datamodules.PreferenceDataModule"),
    ("data (prompts for predict)", "sppo_lightning.datamodules.PromptDataModule"),
    ("data.method", "sppo_lightning.methods.SPPO"),
    ("data.method", "sppo_lightning.methods.JBOND"),
    ("data.method", "sppo_lightning.methods.OnlinePairs"),
    ("data.method.generator", "sppo_lightning.pipeline.HFGenerator"),
    ("data.method.generator", "sppo_lightning.pipeline.VLLMGenerator"),
    ("data.method.generator", "sppo_lightning.decoding.LinearAlignmentGenerator"),
    ("data.method.ranker", "sppo_lightning.ranking.PairRMRanker"),
    ("data.method.ranker", "sppo_lightning.ranking.RewardModelRanker"),
    ("data.method.ranker", "sppo_lightning.ranking.FunctionJudge"),
    ("data.method.ranker", "sppo_lightning.ranking.LLMJudge"),
    ("data.method.ranker", "sppo_lightning.ranking.OpenAIJudge"),
    ("data.method.ranker", "sppo_lightning.ranking.VerifiableInstructionRanker"),
    ("self_play", "sppo_lightning.callbacks.self_play.SelfPlay"),
    ("trainer.callbacks", "sppo_lightning.callbacks.hf_export.HFExport"),
    ("trainer.callbacks", "sppo_lightning.callbacks.ema_anchor.EMAAnchor"),
]


def documented_args(cls) -> dict[str, str]:
    """``name -> text`` from the ``Args:`` section of the class's (or its ``__init__``'s) docstring;
    an entry may name several keys (``temperature, top_p: ...``)."""
    doc = inspect.cleandoc(cls.__doc__ or "") + "\n" + inspect.cleandoc(cls.__init__.__doc__ or "")
    found: dict[str, str] = {}
    lines = doc.splitlines()
    for start, line in enumerate(lines):
        if line.strip() != "Args:":
            continue
        indent = None
        names: list[str] = []
        for entry in lines[start + 1:]:
            if not entry.strip():
                continue
            depth = len(entry) - len(entry.lstrip())
            if indent is None:
                indent = depth
            if depth < indent:
                break
            match = re.match(r"\s*([A-Za-z_][\w, /]*?):\s(.*)", entry) if depth == indent else None
            if match:
                names = [n.strip() for n in re.split(r"[,/]", match.group(1)) if n.strip()]
                for name in names:
                    found[name] = match.group(2).strip()
            else:
                for name in names:
                    found[name] += " " + entry.strip()
    return found


def default_of(parameter: inspect.Parameter) -> str:
    if parameter.default is inspect.Parameter.empty:
        return "required"
    return f"`{parameter.default!r}`"


def main() -> None:
    out = ["# Config reference", "",
           "Generated from the classes' signatures and docstrings by `docs/generate.py`: every key",
           "of every class a config names. In YAML a key sits under the class's `init_args`; on the command",
           "line it is a flag, e.g. `--data.method.num_samples 3` or `--model.lr 1e-6`.", ""]
    for where, path in CLASSES:
        module, _, name = path.rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        args = documented_args(cls)
        summary = inspect.cleandoc(cls.__doc__ or "").split("\n\n")[0].replace("\n", " ")
        out += [f"## {name}", "", f"`{where}`: `class_path: {path}`. {summary}", "",
                "| key | default | what it does |", "|---|---|---|"]
        for parameter in list(inspect.signature(cls.__init__).parameters.values())[1:]:
            if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
                continue
            text = args.get(parameter.name, "").replace("|", "\\|")
            out.append(f"| `{parameter.name}` | {default_of(parameter).replace('|', '&#124;')} | {text} |")
        out.append("")
    target = Path(__file__).with_name("config-reference.md")
    target.write_text("\n".join(out))
    print(f"wrote {target}")
    index = Path(__file__).with_name("index.md")
    index.write_text(site_index(Path(__file__).parents[1] / "README.md"))
    print(f"wrote {index}")


def site_index(readme: Path) -> str:
    """The README as the site's home page: links into docs/ made relative, the rest named as files."""
    text = readme.read_text().replace("](docs/", "](")
    text = text.replace("[bench/README.md](bench/README.md)", "`bench/README.md` in the repository")
    return text.replace("the generated config reference and the API reference (on the site)",
                        "[the generated config reference](config-reference.md), [the API reference](api.md)")


if __name__ == "__main__":
    main()
