"""The ``sppo-lightning`` command: LightningCLI (fit/validate/test/predict) plus ``export``,
``generate`` and ``judge``.

    sppo-lightning fit --config configs/quickstart.yaml
    sppo-lightning export <checkpoint.ckpt> <out_dir>
    sppo-lightning generate <model> <prompts> <out> --format alpaca_eval|mt_bench
    sppo-lightning judge <answers A> <answers B> --ranker <class_path block>
    sppo-lightning ifeval <model> <prompts.jsonl> <out_dir>

This module stays light: the top-level help answers before Lightning is imported (0.1 s; importing
Lightning alone takes about 3 s here),
and the LightningCLI lives in ``lightning_cli.py``. ``<loop> --help`` is rendered by LightningCLI
once and then read from a cache (``$SPPO_LIGHTNING_CACHE``, default ``~/.cache/sppo-lightning``),
keyed by every version it depends on. Known third-party noise is filtered
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


def help_cache_path(loop: str) -> "Path":
    """Where ``sppo-lightning <loop> --help`` is kept once rendered: keyed by what the text depends
    on (the versions of this package, Lightning and jsonargparse, our CLI's source, the Python, the
    terminal width), so any change renders it anew."""
    import hashlib
    import shutil
    from importlib import metadata
    from pathlib import Path

    here = Path(__file__).resolve().parent
    parts = [sys.prefix, os.path.realpath(sys.executable), str(shutil.get_terminal_size().columns)]
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

    return cache_root() / f"help-{loop}-{key}.txt"


def loop_help(loop: str) -> str:
    """``<loop> --help``: LightningCLI's text, rendered once (Lightning and the Trainer's parser take
    seconds to build) and read back from the cache after that."""
    import contextlib
    import io

    path = help_cache_path(loop)
    try:
        return path.read_text()
    except OSError:
        pass
    from sppo_lightning.lightning_cli import run_cli

    buffer, argv = io.StringIO(), sys.argv
    sys.argv = [argv[0], loop, "--help"]  # LightningCLI reads sys.argv itself (and warns when given both)
    with contextlib.redirect_stdout(buffer):
        try:
            run_cli()
        except SystemExit:
            pass
        finally:
            sys.argv = argv
    text = buffer.getvalue()
    try:  # a cache that cannot be written costs the next call its speed, nothing else
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError:
        pass
    return text


# A negative number as a value: argparse takes only -1 or -.5 for one, and reads -1e-3 as a flag.
NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|nan)$")


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
    joined = join_negative_values(argv)
    if joined != argv:  # `--model.lr -1e-3` as users type it (argparse takes -1e-3 for a flag)
        argv = joined
        if args is None:
            sys.argv = [sys.argv[0], *argv]
        else:
            args = argv
    if not argv or argv[0] in ("-h", "--help"):
        print(HELP, end="")
        return
    if len(argv) == 2 and argv[0] in LOOPS and argv[1] in ("-h", "--help"):
        print(loop_help(argv[0]), end="")
        return
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
