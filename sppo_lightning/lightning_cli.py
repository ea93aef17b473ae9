"""The LightningCLI behind ``sppo-lightning``: one-line config errors, output checks before fit, the
verified ``Trainer``, and the ``export`` command. ``sppo_lightning/cli.py`` is the light entry point
that imports this only when a command needs it (so ``sppo-lightning --help`` is fast)."""

from __future__ import annotations

import argparse
import os
from typing import Optional

import lightning as L
from lightning.pytorch.cli import LightningCLI

from sppo_lightning.errors import ConfigError, SPPOLightningError
from sppo_lightning.models import export_hf, load_tokenizer
from sppo_lightning.module import PreferenceModule
from sppo_lightning.outputs import Trainer, check_output_locations, output_locations

# Shown at the top of `sppo-lightning fit --help` (and the other loops'): Lightning's own help lists
# the Trainer's options, and a subclass's settings need one more flag.
SETTINGS_HELP = (
    "Our model, data and callback settings, with their defaults and docs, are listed by "
    "--model.help PreferenceModule (or sppo_lightning.bond.BondModule), --data.help sppo_lightning.datamodules.SelfPlayDataModule "
    "(or sppo_lightning.datamodules.PreferenceDataModule), --data.method.help sppo_lightning.methods.SPPO (or JBOND, "
    "OnlinePairs: K, the generator, the ranker; with --config or --data SelfPlayDataModule before it), "
    "--data.method.ranker.help <ranker class> and --data.method.generator.help <generator class>; every key is "
    "a flag, e.g. --data.method.num_samples 3 --data.method.generator.temperature 1.0. The boundary's "
    "--self_play.eval_samples and --self_play.eval_every are listed below; "
    "--config <file> --print_config shows every key a config sets, defaults filled in. "
    "The options below are the Trainer's and LightningCLI's."
)


class SPPOLightningCLI(LightningCLI):
    def _prepare_subcommand_parser(self, klass, subcommand: str, **kwargs):
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        parser.description = SETTINGS_HELP
        return parser

    def init_parser(self, **kwargs):
        # Raise parse errors instead of printing the whole usage block: main() prints one line.
        parser = super().init_parser(**kwargs)
        parser.exit_on_error = False
        return parser

    def before_instantiate_classes(self) -> None:
        # jsonargparse lets `key: null` through for typed init args of subclasses; our classes would
        # then fail deep inside with a TypeError. Refuse it here, naming the key.
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        sections = [("model", config.get("model")), ("data", config.get("data"))]
        trainer = config.get("trainer")
        callbacks = (trainer.get("callbacks") if trainer is not None else None) or []
        sections += [(f"trainer.callbacks[{i}]", c) for i, c in enumerate(callbacks if isinstance(callbacks, list) else [])]
        for where, section in sections:
            check_nulls(where, section)
        if trainer is not None:
            outputs_under_root(trainer)

    def instantiate_classes(self) -> None:
        # jsonargparse re-raises what a constructor raised as a plain ValueError/TypeError, so our
        # ConfigError loses its type on the way. Anything raised while building the configured
        # classes is a configuration problem: report it as one.
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as err:
            if isinstance(err, SPPOLightningError) or os.environ.get("SPPO_LIGHTNING_DEBUG"):
                raise
            raise ConfigError(condense(str(err))) from err

    def before_fit(self) -> None:
        # Before any model is loaded: every folder the run writes must be writable (one line, exit 2).
        check_output_locations(self.trainer, self.datamodule)
        # One run per folder: a second run on this root or run dir stops here (run_lock.py).
        from sppo_lightning.run_lock import first_process, lock_folders

        if first_process():
            lock_folders(path for path, key in output_locations(self.trainer, self.datamodule)
                         if key in ("trainer.default_root_dir", "data.init_args.run_dir"))
        kwargs = self.config_init[self.subcommand]
        if kwargs.get("ckpt_path") == "last":  # a whole one, or a true line (not Lightning's hint)
            kwargs["ckpt_path"] = resume_point(self.trainer)
        if kwargs.get("ckpt_path") and os.path.isdir(kwargs["ckpt_path"]):  # sharded: data, not code
            from sppo_lightning.checkpoints import check_dcp_metadata

            check_dcp_metadata(kwargs["ckpt_path"])

    def _run_subcommand(self, subcommand: str) -> None:
        from sppo_lightning.run_lock import release_all

        try:
            super()._run_subcommand(subcommand)
        finally:  # the folders are free for the next run, also in the same process
            release_all()

    def add_arguments_to_parser(self, parser) -> None:
        # The iteration boundary of self-play runs, in every run (it does nothing in pair runs), so
        # that its settings are flags: --self_play.eval_samples 8.
        from sppo_lightning.callbacks.self_play import SelfPlay

        parser.add_lightning_class_args(SelfPlay, "self_play")
        # A self-play data module makes new rows every iteration: Lightning asks for them each epoch.
        parser.set_defaults({"trainer.reload_dataloaders_every_n_epochs": 1})
        # One model id configures both the policy and the tokenizer the data is encoded with.
        parser.link_arguments("model.init_args.model_name_or_path", "data.init_args.tokenizer")
        parser.link_arguments("model.init_args.trust_remote_code", "data.init_args.trust_remote_code")


def resume_point(trainer) -> Optional[str]:
    """The checkpoint ``--ckpt_path last`` loads: the newest whole ``last*.ckpt`` of the run's
    checkpoint folders, else the newest whole checkpoint (warned), else None, said in one line."""
    from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

    from sppo_lightning.checkpoints import resolve_last

    folders = [c.dirpath for c in trainer.checkpoint_callbacks if getattr(c, "dirpath", None)]
    path, warning = resolve_last(folders)
    if warning:
        rank_zero_warn(warning)
    if path is None:
        where = ", ".join(str(f) for f in folders) or "the run (it has no ModelCheckpoint)"
        rank_zero_info(f"--ckpt_path last: no checkpoint in {where} yet (the run stopped before its first "
                       f"checkpoint): starting from the beginning; finished self-play stages are reused")
    return path


def outputs_under_root(trainer) -> None:
    """Every output under ``trainer.default_root_dir`` unless a key says otherwise: a logger left to
    its default becomes a ``CSVLogger`` there (``<root>/lightning_logs/version_<n>/metrics.csv``,
    whatever else is installed), and a ``ModelCheckpoint`` without ``dirpath`` writes to
    ``<root>/checkpoints``, one folder for every run on that root, so ``--ckpt_path last`` finds
    the last checkpoint of the run it resumes (Lightning's default is the new run's version folder)."""
    from jsonargparse import Namespace

    root = trainer.get("default_root_dir") or os.getcwd()
    if trainer.get("logger") in (None, True):
        trainer["logger"] = Namespace(class_path="lightning.pytorch.loggers.CSVLogger",
                                      init_args=Namespace(save_dir=str(root)))
    callbacks = trainer.get("callbacks") or []
    for callback in callbacks if isinstance(callbacks, list) else []:
        init_args = getattr(callback, "init_args", None)
        if str(getattr(callback, "class_path", "")).endswith("ModelCheckpoint") and init_args is not None \
                and init_args.get("dirpath") is None:
            init_args["dirpath"] = os.path.join(str(root), "checkpoints")


def check_nulls(where: str, section) -> None:
    """ConfigError for an init arg set to null whose type does not allow None."""
    import typing

    from jsonargparse import Namespace

    class_path = getattr(section, "class_path", None) if isinstance(section, Namespace) else None
    init_args = getattr(section, "init_args", None)
    if not class_path or not isinstance(init_args, Namespace):
        return
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(__import__(module_name, fromlist=[name]), name)
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # not ours to judge: jsonargparse has checked what it could
        return
    for key, value in vars(init_args).items():
        if value is None and key in hints and not _allows_none(hints[key]):
            hint = hints[key]
            expected = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
            raise ConfigError(f"{where}.{key}: null is not allowed here (expected {expected})")


def _allows_none(hint) -> bool:
    import typing

    if hint is type(None) or hint is typing.Any:
        return True
    return typing.get_origin(hint) is typing.Union and type(None) in typing.get_args(hint)


def export_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="sppo-lightning export",
        description="Save a checkpoint's policy in Hugging Face format (LoRA merged, safetensors).",
    )
    parser.add_argument("checkpoint", help="a .ckpt written by `sppo-lightning fit`, or a sharded checkpoint "
                                           "folder of the fsdp footprint")
    parser.add_argument("out_dir", help="folder for config.json, model.safetensors and the tokenizer")
    parser.add_argument("--anchor", action="store_true",
                        help="a J-BOND checkpoint: export the EMA anchor instead of the policy")
    args = parser.parse_args(argv)
    from pathlib import Path

    if Path(args.out_dir).exists() and not Path(args.out_dir).is_dir():
        raise ConfigError(f"{args.out_dir} is a file, not a folder: give export a folder to write the model into")
    module = _load_for_export(args.checkpoint)
    tokenizer = load_tokenizer(module.hparams.model_name_or_path, module.hparams.trust_remote_code)
    from sppo_lightning.bond import ANCHOR, BondModule

    if args.anchor and not isinstance(module, BondModule):
        raise ConfigError(f"{args.checkpoint} is a {type(module).__name__} checkpoint: --anchor exports the EMA "
                          f"anchor of a J-BOND (BondModule) checkpoint")
    what = "policy"
    if args.anchor and module.lora is not None:  # the anchor is the second adapter on the policy's base
        out, what = export_hf(module.policy, tokenizer, args.out_dir, adapter=ANCHOR), "J-BOND anchor"
    elif args.anchor:
        out, what = export_hf(module.anchor, tokenizer, args.out_dir), "J-BOND anchor"
    else:
        out = export_hf(module.policy, tokenizer, args.out_dir)
    print(f"Exported the {what} in Hugging Face format to {out}")


def _load_for_export(checkpoint: str) -> L.LightningModule:
    """The module of a ``.ckpt`` file (``PreferenceModule`` or J-BOND's ``BondModule``), or of a sharded
    checkpoint folder (footprint ``fsdp``), unsharded on CPU and without a reference model (export
    does not need one). A file that is not a checkpoint is one line."""
    import pickle
    from pathlib import Path

    import torch

    from sppo_lightning.checkpoints import verified

    path = Path(checkpoint)
    if not path.exists():
        raise ConfigError(f"no checkpoint at {checkpoint}")
    if path.is_file() and not verified(path):
        raise ConfigError(f"{checkpoint} is not a checkpoint (not a whole torch archive: torn, or another kind of "
                          f"file); export takes a .ckpt written by `sppo-lightning fit` or a sharded checkpoint folder")
    if path.is_dir():
        from lightning.fabric.utilities.load import _load_distributed_checkpoint

        from sppo_lightning.checkpoints import check_dcp_metadata

        check_dcp_metadata(path)  # before torch's reader unpickles it
        full = _load_distributed_checkpoint(path)
        hparams = dict(full["hyper_parameters"])
        hparams["reference"] = _export_reference(hparams)
        hparams["footprint"] = "lora" if hparams.get("lora") else "full"
        module = PreferenceModule(**hparams)
        module.configure_model()
        state = {k: v for k, v in full["state_dict"].items() if not k.startswith("reference.")}
        module.load_state_dict(state, strict=True)  # a sharded checkpoint holds every weight
        return module
    try:
        hparams = torch.load(checkpoint, map_location="cpu", weights_only=True).get("hyper_parameters")
    except (pickle.UnpicklingError, RuntimeError, KeyError, AttributeError, EOFError) as err:
        raise ConfigError(f"{checkpoint} cannot be read as a checkpoint ({' '.join(str(err).split())[:200]})") from None
    if not isinstance(hparams, dict):
        raise ConfigError(f"{checkpoint} holds no hyper_parameters: not a checkpoint written by `sppo-lightning fit`")
    if hparams.get("_class_path") == "sppo_lightning.bond.BondModule" or "jeffreys_beta" in hparams:
        from sppo_lightning.bond import BondModule

        return BondModule.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True)
    reference = _export_reference(hparams)
    return PreferenceModule.load_from_checkpoint(checkpoint, map_location="cpu", reference=reference, weights_only=True)


def _export_reference(hparams: dict) -> str:
    """Export needs no reference model: none for reference-free losses, else cached (never loaded)."""
    from sppo_lightning.loss_table import needs_reference

    return "cached" if needs_reference(hparams.get("loss", "sppo")) else "none"


# Lines of jsonargparse's nested Union reports that say nothing about the actual mistake.
_NOISE = ("Does not validate against any of the Union subtypes", "Subtypes:", "Errors:", "Given value type:",
          "Given value:", "Expected a <class 'NoneType'>", "Problem with given class_path",
          "Not a valid subclass of", "Subclass types expect one of", "a class path", "a dict with", "a class name")


def condense(message: str) -> str:
    """jsonargparse's multi-line report of a bad config as one line: the key path and the reason,
    e.g. ``model.eta: Expected a <class 'float'>. Got value: abc``."""
    import re

    keys = re.findall(r'Parser key "([^"]+)"', message)
    lines = [line.strip().lstrip("- ").strip() for line in message.splitlines()]
    reasons = [line for line in lines if line and not line.startswith(_NOISE) and not line.startswith("Parser key")]
    reason = "; ".join(dict.fromkeys(reasons)) or message.strip().splitlines()[0]
    where = ".".join(keys)
    return f"{where + ': ' if where else ''}{' '.join(reason.split())}"


def config_error_line(message: str, argv: list[str]) -> str:
    """``condense`` plus where to look up the keys, the config file a YAML error is in, and, for an
    unknown key, where it was given and the closest key the class takes."""
    import re

    command = argv[0] if argv and not argv[0].startswith("-") else "fit"
    line = condense(message)
    configs = _config_files(argv)
    empty = _empty(configs)
    if empty and line.startswith("Unexpected config"):  # jsonargparse's whole report for an empty file
        return (f"{empty} is empty (or only comments): a config sets at least model: and data: "
                f"(see configs/quickstart.yaml, or `sppo-lightning {command} --help`)")
    if '"<unicode string>"' in line:  # a YAML syntax error: name the file it is in
        line = line.replace('"<unicode string>"', _unparsable(configs) or "a --config file")
    unknown = re.match(r"^([\w.]+): Option '(\w+)' is not accepted", line)
    if unknown:
        line += _unknown_key_hint(unknown.group(1), unknown.group(2), configs)
    return f"{line} (see `sppo-lightning {command} --help`)"


def _config_files(argv: list[str]) -> list[str]:
    files = []
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


def _empty(configs: list[str]) -> Optional[str]:
    import yaml

    for path in configs:
        try:
            if yaml.safe_load(open(path, encoding="utf-8")) is None:
                return path
        except (OSError, yaml.YAMLError):
            continue
    return None


def _unparsable(configs: list[str]) -> Optional[str]:
    import yaml

    for path in configs:
        try:
            yaml.safe_load(open(path, encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            return path
    return None


def _section(data, dotted: str):
    """The ``init_args`` node of ``dotted`` (``model``, ``data.method``) in a loaded config, or None."""
    node = data
    for name in dotted.split("."):
        node = node.get(name) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get("init_args"), dict) and "class_path" in node:
            node = {"class_path": node["class_path"], **node["init_args"]}
    return node if isinstance(node, dict) else None


def _unknown_key_hint(section: str, key: str, configs: list[str]) -> str:
    """``; in <file>`` (or on the command line) and ``; did you mean `x`?`` for an unknown key."""
    import difflib
    import inspect
    from importlib import import_module

    import yaml

    where, class_path = "on the command line", None
    for path in configs:
        try:
            node = _section(yaml.safe_load(open(path, encoding="utf-8")), section)
        except (OSError, yaml.YAMLError):
            continue
        if node is not None:
            class_path = node.get("class_path", class_path)
            if key in node:
                where = f"in {path}"
    hint = f" ({where})"
    try:
        module, _, name = class_path.rpartition(".")
        params = [p for p in inspect.signature(getattr(import_module(module), name)).parameters if p != "self"]
    except (AttributeError, ImportError, ValueError, TypeError):
        return hint
    close = difflib.get_close_matches(key, params, n=1)
    return hint + (f"; did you mean `{close[0]}`?" if close else "")


def run_cli(args: Optional[list[str]] = None) -> SPPOLightningCLI:
    """LightningCLI over any LightningModule (``model.class_path``: ``PreferenceModule`` for the
    preference losses, ``BondModule``, ``LinearAlignmentModule``) and any LightningDataModule."""
    return SPPOLightningCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_class=Trainer,
        args=args,
        save_config_kwargs={"overwrite": True},
    )
