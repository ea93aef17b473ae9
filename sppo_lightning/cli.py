"""The ``sppo-lightning`` command: LightningCLI (fit/validate/test/predict) plus ``export``,
``generate`` and ``judge``.

    sppo-lightning fit --config configs/quickstart.yaml
    sppo-lightning export <checkpoint.ckpt> <out_dir>
    sppo-lightning generate <model> <prompts> <out> --format alpaca_eval|mt_bench
    sppo-lightning judge <answers A> <answers B> --ranker <class_path block>
    sppo-lightning ifeval <model> <prompts.jsonl> <out_dir>

This module stays light: the top-level help answers before Lightning is imported (0.1 s; importing
Lightning alone takes about 3 s here),
and the LightningCLI lives in ``lightning_cli.py``. Every help request without a config file
(``<command> --help``, ``fit --model.help PreferenceModule``, ...) is rendered once and then read
from a cache (``$SPPO_LIGHTNING_CACHE``, default ``~/.cache/sppo-lightning``), keyed by its
arguments and every version it depends on. Known third-party noise is filtered
(``sppo_lightning/console.py``); ``--verbose`` shows it.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import TYPE_CHECKING, Optional

from sppo_lightning import console
from sppo_lightning.errors import SPPOLightningError

if TYPE_CHECKING:
    from pathlib import Path

# Before Lightning, peft and bitsandbytes are imported: some of their noise comes at import time.
if not console.verbose_requested(sys.argv[1:]):
    console.quiet()

HELP = """usage: sppo-lightning <command> [options]

Self-play preference optimisation (SPPO, J-BOND, DPO, IPO, ORPO, ASFT, SimPO) on PyTorch Lightning.

commands:
  fit        train from a YAML config:   sppo-lightning fit --config configs/quickstart.yaml
  validate, test, predict
             Lightning's other loops, from the same config (--ckpt_path <checkpoint>)
  export     a checkpoint's policy in Hugging Face format:   sppo-lightning export <ckpt> <out_dir>
  generate   answers for AlpacaEval or MT-Bench:   sppo-lightning generate <model> <prompts> <out> --format ...
  judge      two answer files head to head, with any ranker:   sppo-lightning judge <A> <B> --ranker ...
  ifeval     instruction-following accuracy (IFEval's four numbers) of a model folder or .gguf file
             on IFEval/IFBench-format prompts:   sppo-lightning ifeval <model> <prompts.jsonl> <out_dir>

our settings, with their defaults and docs:
  sppo-lightning fit --model.help PreferenceModule      (or sppo_lightning.bond.BondModule)
  sppo-lightning fit --data.help sppo_lightning.datamodules.SelfPlayDataModule
  sppo-lightning fit --data SelfPlayDataModule --data.method.help sppo_lightning.methods.SPPO
                     (or JBOND, OnlinePairs: K, the generator, the ranker)
  sppo-lightning fit --help      (also the boundary's --self_play.eval_samples, --self_play.eval_every)
  sppo-lightning fit --config configs/quickstart.yaml --print_config
  sppo-lightning <command> --help      (a command's own options; fit's lists the Trainer's)

options:
  --verbose  show third-party warnings and tips (or SPPO_LIGHTNING_VERBOSE=1)
  -h, --help show this message
"""

LOOPS = ("fit", "validate", "test", "predict")


def is_help_request(argv: list[str]) -> bool:
    """Whether ``argv`` asks for help text only (``--help``, ``-h``, ``--X.help [class]``) and names
    no config file: then the text depends on the arguments and the code alone, and is cached."""
    if any(a in ("--config", "-c", "--print_config") or a.startswith(("--config=", "--print_config")) for a in argv):
        return False
    return any(a in ("-h", "--help") or (a.startswith("--") and a.split("=")[0].endswith(".help")) for a in argv)


def help_cache_path(argv: list[str]) -> "Path":
    """Where the help text of ``argv`` is kept once rendered: keyed by the arguments and by what the
    text depends on (the versions of this package, Lightning and jsonargparse, our CLI's sources, the
    Python, the terminal width), so any change renders it anew."""
    import hashlib
    import shutil
    from importlib import metadata
    from pathlib import Path

    here = Path(__file__).resolve().parent
    parts = ["\0".join(argv), sys.prefix, os.path.realpath(sys.executable), str(shutil.get_terminal_size().columns)]
    for package in ("sppo-lightning", "lightning", "jsonargparse"):
        try:
            parts.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            parts.append(package)
    for source in ("cli.py", "lightning_cli.py", "outputs.py"):
        stat = (here / source).stat()
        parts.append(f"{source} {stat.st_mtime_ns} {stat.st_size}")
    key = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
    from sppo_lightning.gguf import cache_root  # light: the standard library and our errors

    return cache_root() / f"help-{argv[0].lstrip('-')}-{key}.txt"


def full_flags(text: str, argv: list[str]) -> str:
    """Nested help (``--data.method.help SPPO``) as jsonargparse prints it names its flags from the
    last part (``--method.num_samples``): here they read as typed (``--data.method.num_samples``)."""
    for arg in argv:
        flag = arg.split("=")[0]
        if flag.startswith("--") and flag.endswith(".help") and flag.count(".") >= 2:
            prefix = flag[2 : -len(".help")]  # data.method
            last = prefix.rsplit(".", 1)[1]  # method
            text = re.sub(rf"(?<![\w.-])--{re.escape(last)}\.", f"--{prefix}.", text)
    return text


def cached_help(argv: list[str]) -> tuple[str, int]:
    """The help text of ``argv`` and its exit code: read from the cache, or rendered once (Lightning
    and the Trainer's parser take seconds to build, and a command's own parser imports torch) and
    kept when it succeeded."""
    import contextlib
    import io

    path = help_cache_path(argv)
    try:
        return path.read_text(), 0
    except OSError:
        pass
    buffer, saved, code = io.StringIO(), sys.argv, 0
    sys.argv = [saved[0] if saved else "sppo-lightning", *argv]  # LightningCLI reads sys.argv itself
    with contextlib.redirect_stdout(buffer):
        try:
            _run(argv, None)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        finally:
            sys.argv = saved
    text = full_flags(buffer.getvalue(), argv)
    if code == 0 and text:  # a cache that cannot be written costs the next call its speed, nothing else
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            tmp.write_text(text)
            os.replace(tmp, path)
        except OSError:
            pass
    return text, code


# A negative number as a value: argparse takes only -1 or -.5 for one, and reads -1e-3 as a flag.
NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|nan)$")


# Our plug-ins by their class names: a config or flag may name one so where the name is unambiguous
# (jsonargparse resolves short names of a class's subclasses, not implementers of a Protocol such as
# the method, ranker and generator slots). tests/test_cli.py checks each resolves to its class.
SHORT_NAMES = {
    **{n: f"sppo_lightning.methods.{n}" for n in ("SPPO", "JBOND", "OnlinePairs")},
    **{n: f"sppo_lightning.ranking.{n}" for n in ("PairRMRanker", "RewardModelRanker", "FunctionJudge", "LLMJudge",
                                                  "OpenAIJudge", "VerifiableInstructionRanker")},
    **{n: f"sppo_lightning.pipeline.{n}" for n in ("HFGenerator", "VLLMGenerator")},
    "LinearAlignmentGenerator": "sppo_lightning.decoding.LinearAlignmentGenerator",
    **{n: f"sppo_lightning.datamodules.{n}" for n in ("SelfPlayDataModule", "PreferenceDataModule", "PromptDataModule")},
    "PreferenceModule": "sppo_lightning.module.PreferenceModule", "BondModule": "sppo_lightning.bond.BondModule",
}
_CLASS_FLAGS = re.compile(r"^--(model|data|([\w.]+\.(method|ranker|generator|help)))$")


def expand_short_names(argv: list[str]) -> list[str]:
    """``--data.method SPPO`` → ``--data.method sppo_lightning.methods.SPPO`` (and ``--X.help``,
    ``.ranker``, ``.generator``, ``--data``, ``--model`` values, ``--flag=value`` too)."""
    out, i = [], 0
    while i < len(argv):
        token = argv[i]
        flag, eq, value = token.partition("=")
        if _CLASS_FLAGS.match(flag) and eq and value in SHORT_NAMES:
            token = f"{flag}={SHORT_NAMES[value]}"
        elif _CLASS_FLAGS.match(token) and i + 1 < len(argv) and argv[i + 1] in SHORT_NAMES:
            out += [token, SHORT_NAMES[argv[i + 1]]]
            i += 2
            continue
        out.append(token)
        i += 1
    return out


def join_negative_values(argv: list[str]) -> list[str]:
    """``--key -1e-3`` → ``--key=-1e-3``: a negative number after a flag is that flag's value."""
    out, i = [], 0
    while i < len(argv):
        token = argv[i]
        if token.startswith("--") and "=" not in token and i + 1 < len(argv) and NEGATIVE_NUMBER.match(argv[i + 1]):
            out.append(f"{token}={argv[i + 1]}")
            i += 2
        else:
            out.append(token)
            i += 1
    return out


def main(args: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if args is None else args
    if "--verbose" in argv:  # every third-party line back (see sppo_lightning/console.py)
        argv = [a for a in argv if a != "--verbose"]
        if args is None:
            sys.argv = [sys.argv[0], *argv]  # LightningCLI reads sys.argv itself
        else:
            args = argv
    joined = expand_short_names(join_negative_values(argv))
    if joined != argv:  # `--model.lr -1e-3` as users type it (argparse takes -1e-3 for a flag), short names
        argv = joined
        if args is None:
            sys.argv = [sys.argv[0], *argv]
        else:
            args = argv
    if not argv or argv[0] in ("-h", "--help"):
        print(HELP, end="")
        return
    if is_help_request(argv) and not os.environ.get("SPPO_LIGHTNING_NO_HELP_CACHE"):
        text, code = cached_help(argv)
        print(text, end="")
        if code:
            sys.exit(code)
        return
    _run(argv, args)


def _run(argv: list[str], args: Optional[list[str]]) -> None:
    """A command (``argv``), with our errors as one line (``args``: what LightningCLI is given; None:
    it reads ``sys.argv``)."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from sppo_lightning.config_errors import config_error_line
    from sppo_lightning.export import export_main
    from sppo_lightning.lightning_cli import run_cli

    try:
        if argv and argv[0] == "export":
            export_main(argv[1:])
        elif argv and argv[0] == "generate":
            from sppo_lightning.evaluation import generate_main

            generate_main(argv[1:])
        elif argv and argv[0] == "ifeval":
            from sppo_lightning.instruction_following import ifeval_main

            ifeval_main(argv[1:])
        elif argv and argv[0] == "judge":
            from sppo_lightning.judging import judge_main

            judge_main(argv[1:])
        else:
            run_cli(args)
    except (SPPOLightningError, argparse.ArgumentError, MisconfigurationException) as err:
        # Lightning's MisconfigurationException: impossible trainer settings (max_epochs -2, ...).
        # Bad data, files or settings: one readable line, not a traceback wall.
        # SPPO_LIGHTNING_DEBUG=1 shows the traceback.
        if os.environ.get("SPPO_LIGHTNING_DEBUG"):
            raise
        message = config_error_line(str(err), argv) if isinstance(err, argparse.ArgumentError) else \
            " ".join(str(err).split())
        print(f"sppo-lightning: error: {message}", file=sys.stderr)
        sys.exit(2)



if __name__ == "__main__":
    main()
