"""sppo_lightning/outputs.py: output folders checked before a run, checkpoints checked after saving."""

import lightning as L
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from sppo_lightning.callbacks.hf_export import HFExport
from sppo_lightning.datamodules import SelfPlayDataModule
from sppo_lightning.errors import ConfigError, TrainingError
from sppo_lightning.outputs import Trainer, check_output_locations, check_writable_folder, output_locations
from sppo_lightning.methods import SPPO
from sppo_lightning.ranking import FunctionJudge


def trainer_writing_to(tmp_path, **paths):
    """(trainer, data module) of a self-play run writing to ``paths`` (the defaults under ``tmp_path``)."""
    judge = FunctionJudge("sppo_lightning.ranking.judges:shorter")
    trainer = L.Trainer(
        default_root_dir=paths.get("root", tmp_path), logger=CSVLogger(paths.get("logs", tmp_path / "logs")),
        callbacks=[ModelCheckpoint(dirpath=paths.get("checkpoints", tmp_path / "ckpt")), HFExport(paths.get("export"))],
        accelerator="cpu", enable_progress_bar=False, enable_model_summary=False,
    )
    run_dir = paths.get("run_dir")
    return trainer, SelfPlayDataModule(SPPO(judge), prompts="p.jsonl", run_dir=None if run_dir is None else str(run_dir))


def test_every_output_location_is_listed_with_its_key(tmp_path):
    found = dict((key, path) for path, key in output_locations(*trainer_writing_to(tmp_path, export=tmp_path / "hf")))
    assert found == {
        "trainer.default_root_dir": tmp_path,
        "trainer.logger (CSVLogger).init_args.save_dir": tmp_path / "logs",
        "trainer.callbacks (ModelCheckpoint).init_args.dirpath": tmp_path / "ckpt",
        "data.init_args.run_dir": tmp_path / "self_play",
        "trainer.callbacks (HFExport).init_args.dirpath": tmp_path / "hf",
    }
    check_output_locations(*trainer_writing_to(tmp_path))  # creatable: fine, and nothing is created
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("key", ["checkpoints", "logs", "run_dir", "export", "root"])
def test_a_location_under_a_file_is_one_line_naming_its_key(tmp_path, key):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=f"{blocker / 'x'} is under {blocker}, which is a file"):
        check_output_locations(*trainer_writing_to(tmp_path, **{key: blocker / "x"}))


def test_a_file_itself_is_not_a_folder(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(ConfigError, match=r"^some.key: .*/file is a file, not a folder"):
        check_writable_folder(path, "some.key")


def test_a_read_only_folder_is_refused(tmp_path, monkeypatch):
    # Root writes whatever the mode says, so the refusal is shown through the probe itself.
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(ConfigError, match=r"^out.dir: .* is not writable \(Permission denied: "):
        check_writable_folder(tmp_path / "new", "out.dir")


def test_the_trainer_refuses_a_checkpoint_that_is_not_on_disk(tmp_path, tiny_llama):
    from sppo_lightning.module import PreferenceModule

    trainer = Trainer(default_root_dir=tmp_path, accelerator="cpu", logger=False, max_epochs=0)
    module = PreferenceModule(tiny_llama, loss="orpo")
    trainer.strategy.connect(module)
    trainer.strategy.checkpoint_io.save_checkpoint = lambda *a, **k: None  # a write that fails silently
    with pytest.raises(TrainingError, match="was not written"):
        trainer.save_checkpoint(tmp_path / "x.ckpt")


def test_the_quickstart_writes_everything_under_default_root_dir_and_resumes_there(tiny_dir, tmp_path):
    """Only `--trainer.default_root_dir` moves the outputs (the config hard-codes no other path);
    `--ckpt_path last` finds the checkpoint and the resumed run writes under the same root."""
    import subprocess
    import sys

    import yaml

    from tests.helpers import REPO, SCRIPT

    config = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    config["model"]["init_args"]["model_name_or_path"] = str(tiny_dir / "llama")
    path = tmp_path / "quickstart.yaml"
    path.write_text(yaml.safe_dump(config))
    root = tmp_path / "out"
    default_root = REPO / "runs" / "quickstart"
    existed = default_root.exists()
    command = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "sppo_lightning.cli"]

    def fit(*extra):
        result = subprocess.run(command + ["fit", "--config", str(path), "--trainer.default_root_dir", str(root),
                                           *extra], cwd=REPO, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]

    fit("--trainer.max_epochs", "1")
    assert (root / "checkpoints" / "last.ckpt").exists()
    assert (root / "lightning_logs" / "version_0" / "metrics.csv").exists()
    first_export = (root / "hf_model" / "model.safetensors").read_bytes()
    fit("--trainer.max_epochs", "2", "--ckpt_path", "last")
    summary = (root / "self_play" / "summary.json").read_text()
    assert '"iteration": 2' in summary
    assert (root / "lightning_logs" / "version_1" / "metrics.csv").exists()  # as the README says
    # the export stays where the README says, replaced whole by the resumed run's
    assert (root / "hf_model" / "model.safetensors").read_bytes() != first_export
    assert not list(root.glob(".hf_model.*")) and not (root / "lightning_logs" / "version_1" / "hf_model").exists()
    assert default_root.exists() == existed  # nothing went to the config's own root
