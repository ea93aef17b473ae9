"""Every shipped config parses against the real CLI (keys and types), without loading a model."""

from pathlib import Path

import pytest
import yaml

from sppo_lightning.cli import run_cli

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
    for key, value in source["data"]["init_args"].items():
        assert printed["data"]["init_args"][key] == value, key


def test_configs_exist():
    assert {"quickstart.yaml", "tiny_pairs.yaml", "sppo_pairs.yaml", "dpo.yaml"} <= {c.name for c in CONFIGS}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_instantiates(config, monkeypatch):
    """Every class the config names is built (module, data module, callbacks, ranker) with its
    constructor checks; only the hardware is made CPU. Weights load later, in configure_model."""
    from sppo_lightning.cli import SPPOLightningCLI

    import lightning as L

    monkeypatch.setattr("sys.argv", ["sppo-lightning"])
    cli = SPPOLightningCLI(
        L.LightningModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True, run=False,
        args=["--config", str(config), "--trainer.accelerator", "cpu", "--trainer.devices", "1"],
    )
    assert cli.model.hparams["model_name_or_path"]
    assert cli.trainer.callbacks
