"""A sweep from the command line with the shipped quickstart config: every form the README shows parses
to the keys it names (K, η, the sampling, the ranker and its keys, the boundary), without a YAML edit."""

import pytest
import yaml

from sppo_lightning.lightning_cli import run_cli
from tests.helpers import REPO

QUICKSTART = str(REPO / "configs" / "quickstart.yaml")


def printed(capsys, monkeypatch, *flags):
    monkeypatch.setattr("sys.argv", ["sppo-lightning"])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["fit", "--config", QUICKSTART, *flags, "--print_config"])
    assert exit_info.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("form", ["short", "long"])
def test_k_eta_sampling_and_the_boundary_are_flags(capsys, monkeypatch, form):
    method = "--data.method." if form == "short" else "--data.init_args.method.init_args."
    generator = method + ("generator." if form == "short" else "generator.init_args.")
    config = printed(capsys, monkeypatch, f"{method}num_samples", "3", "--model.eta", "100",
                     f"{generator}temperature", "1.0", f"{generator}max_new_tokens", "12",
                     "--self_play.eval_samples", "2", "--self_play.eval_every", "2")
    settings = config["data"]["init_args"]["method"]["init_args"]
    assert settings["num_samples"] == 3 and config["model"]["init_args"]["eta"] == 100.0
    assert settings["generator"]["init_args"]["temperature"] == 1.0
    assert settings["generator"]["init_args"]["max_new_tokens"] == 12
    assert config["self_play"] == {"eval_samples": 2, "eval_every": 2, "instruction_following": False,
                                   "instruction_following_tokens": 256}  # the last two: their defaults
    assert config["trainer"]["reload_dataloaders_every_n_epochs"] == 1


def test_the_ranker_and_its_keys_are_flags(capsys, monkeypatch, tmp_path):
    config = printed(capsys, monkeypatch, "--data.method.ranker.function", "sppo_lightning.ranking.judges:shorter")
    ranker = config["data"]["init_args"]["method"]["init_args"]["ranker"]
    assert ranker["init_args"]["function"] == "sppo_lightning.ranking.judges:shorter"
    config = printed(capsys, monkeypatch, "--data.method.ranker", "sppo_lightning.ranking.PairRMRanker",
                     "--data.method.ranker.path", str(tmp_path / "pairrm"), "--data.method.ranker.device", "cpu")
    ranker = config["data"]["init_args"]["method"]["init_args"]["ranker"]
    assert ranker["class_path"] == "sppo_lightning.ranking.PairRMRanker"
    assert ranker["init_args"]["path"] == str(tmp_path / "pairrm") and ranker["init_args"]["device"] == "cpu"


def test_the_method_is_a_flag_too(capsys, monkeypatch):
    config = printed(capsys, monkeypatch, "--data.method", "sppo_lightning.methods.OnlinePairs",
                     "--data.method.num_samples", "6")
    method = config["data"]["init_args"]["method"]
    assert method["class_path"] == "sppo_lightning.methods.OnlinePairs" and method["init_args"]["num_samples"] == 6
