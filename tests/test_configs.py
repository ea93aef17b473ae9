"""Every shipped config parses against the real CLI (keys and types), without loading a model."""

from pathlib import Path

import pytest
import yaml

from sppo_lightning.lightning_cli import run_cli

CONFIGS = sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_parses(config, capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["sppo-lightning"])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    source = yaml.safe_load(config.read_text())
    assert printed["model"]["class_path"] == source["model"]["class_path"]
    for key, value in source["model"].get("init_args", {}).items():
        got = printed["model"]["init_args"][key]
        if isinstance(value, dict):  # dataclass settings: defaults fill the keys not given
            got = {k: got[k] for k in value}
        assert got == value, key
    assert_given(source["data"]["init_args"], printed["data"]["init_args"], "data.init_args")
    if "self_play" in source:
        assert_given(source["self_play"], printed["self_play"], "self_play")


def assert_given(source, printed, where: str) -> None:
    """Every key the config gives is printed with its value (nested blocks: the defaults fill in the rest)."""
    for key, value in source.items():
        if isinstance(value, dict) and isinstance(printed.get(key), dict):
            assert_given(value, printed[key], f"{where}.{key}")
        else:
            assert printed.get(key) == value, f"{where}.{key}"


def test_configs_exist():
    assert {"quickstart.yaml", "tiny_pairs.yaml", "sppo_pairs.yaml", "dpo.yaml"} <= {c.name for c in CONFIGS}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_instantiates(config, monkeypatch):
    """Every class the config names is built (module, data module, callbacks, ranker) with its
    constructor checks; only the hardware is made CPU. Weights load later, in configure_model."""
    from sppo_lightning.lightning_cli import SPPOLightningCLI

    import lightning as L

    monkeypatch.setattr("sys.argv", ["sppo-lightning"])
    cli = SPPOLightningCLI(
        L.LightningModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True, run=False,
        args=["--config", str(config), "--trainer.accelerator", "cpu", "--trainer.devices", "1"],
    )
    assert cli.model.hparams["model_name_or_path"]
    assert cli.trainer.callbacks
    if type(cli.model).__name__ != "LinearAlignmentModule":  # every recipe that trains can be resumed
        from lightning.pytorch.callbacks import ModelCheckpoint

        (checkpoint,) = [c for c in cli.trainer.callbacks if isinstance(c, ModelCheckpoint)]
        assert checkpoint.save_last, f"{config.name}: no last.ckpt for --ckpt_path last"
        assert Path(checkpoint.dirpath) == (Path(cli.trainer.default_root_dir) / "checkpoints").absolute()


LOSS_LAYERS = sorted(Path(__file__).resolve().parents[1].joinpath("configs", "losses").glob("*.yaml"))


@pytest.mark.parametrize("layer", LOSS_LAYERS, ids=lambda p: p.name)
def test_a_loss_layer_changes_only_its_keys_of_the_dpo_base(layer, capsys, monkeypatch):
    """configs/losses/<loss>.yaml on configs/dpo.yaml: its keys win, the base's model, data and
    trainer stay, and the module builds (the loss's settings checked)."""
    from sppo_lightning.lightning_cli import SPPOLightningCLI

    import lightning as L

    base = layer.parents[1] / "dpo.yaml"
    monkeypatch.setattr("sys.argv", ["sppo-lightning"])
    with pytest.raises(SystemExit):
        run_cli(["fit", "--config", str(base), "--config", str(layer), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    source, own = yaml.safe_load(base.read_text()), yaml.safe_load(layer.read_text())
    assert printed["model"]["init_args"]["loss"] == layer.stem
    for key, value in own["model"]["init_args"].items():
        assert printed["model"]["init_args"][key] == value, key
    assert printed["model"]["init_args"]["model_name_or_path"] == source["model"]["init_args"]["model_name_or_path"]
    assert printed["data"]["init_args"]["train_data"] == source["data"]["init_args"]["train_data"]
    assert printed["trainer"]["default_root_dir"] == f"runs/{layer.stem}"
    cli = SPPOLightningCLI(
        L.LightningModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True, run=False,
        args=["--config", str(base), "--config", str(layer), "--trainer.accelerator", "cpu", "--trainer.devices", "1"],
    )
    assert cli.model.loss_name == layer.stem


def test_no_config_lists_the_loss_names_by_hand():
    from sppo_lightning import loss_table

    for config in CONFIGS + LOSS_LAYERS:
        for line in config.read_text().splitlines():
            named = [name for name in loss_table.LOSSES if f" {name} " in f" {line} ".replace("|", " ")]
            assert len(named) < 3, f"{config.name}: {line}"
