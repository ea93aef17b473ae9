"""The LightningCLI behind ``sppo-lightning``: output checks before fit, the verified ``Trainer``,
nulls where a setting takes none named, the self-play boundary's flags. ``sppo_lightning/cli.py``
is the light entry point that imports this only when a command needs it (so ``sppo-lightning
--help`` is fast); the one-line config errors are ``config_errors.py``, ``export`` is ``export.py``."""

from __future__ import annotations

import os
from typing import Optional

import lightning as L
from lightning.pytorch.cli import LightningCLI

from sppo_lightning.errors import ConfigError, SPPOLightningError
from sppo_lightning.config_errors import condense
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

    def _parse_ckpt_path(self) -> None:
        # Lightning reads a checkpoint file's hyperparameters while it parses (a full torch.load), for
        # every subcommand: a given path is checked first, in one line (checkpoints.check_checkpoint).
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry"):
            self._check_checkpoint(ckpt_path)
        super()._parse_ckpt_path()

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
        # The memory check sizes the data module's batches; the module is told, never probes it.
        from sppo_lightning.policy import SizedByRows, rows_of

        if isinstance(self.model, SizedByRows):
            self.model.training_rows = rows_of(self.datamodule)
        kwargs = self.config_init[self.subcommand]
        if kwargs.get("ckpt_path") == "last":  # a whole one, or a true line (not Lightning's hint)
            kwargs["ckpt_path"] = resume_point(self.trainer)
            if kwargs["ckpt_path"]:  # checked as a given path is (_parse_ckpt_path)
                self._check_checkpoint(kwargs["ckpt_path"])

    def _check_checkpoint(self, path: str) -> None:
        """Before any model loads: one line for a bad checkpoint (``checkpoints.check_checkpoint``)."""
        from sppo_lightning.checkpoints import check_checkpoint

        check_checkpoint(path, self._model_class_path())

    def _model_class_path(self) -> Optional[str]:
        """The run's ``model.class_path`` as parsed, or None where it is not known yet."""
        try:
            subcommand = self.config.get("subcommand")
            model = (self.config[subcommand] if subcommand else self.config).get("model")
            return str(model.class_path) if model is not None and model.get("class_path") else None
        except (AttributeError, KeyError, TypeError):
            return None

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
