"""sppo_lightning/checkpoints.py: checkpoints whole or absent, and `--ckpt_path last` resolved to a whole one."""

import errno
import os
import time

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from sppo_lightning.checkpoints import resolve_last, save_whole, verified
from sppo_lightning.errors import TrainingError
from tests.helpers import REPO, fit_pairs as fit


def write_checkpoint(path, value=1.0):
    torch.save({"state_dict": {"w": torch.full((64,), value)}}, path)
    return path


def tear(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # what a full disk or a kill mid-copy leaves


def test_verified_tells_whole_from_torn(tmp_path):
    whole = write_checkpoint(tmp_path / "a.ckpt")
    assert verified(whole)
    torn = write_checkpoint(tmp_path / "b.ckpt")
    tear(torn)
    assert not verified(torn) and not verified(tmp_path / "missing.ckpt")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    assert not verified(tmp_path / "empty.ckpt")
    sharded = tmp_path / "sharded.ckpt"
    sharded.mkdir()
    assert not verified(sharded)
    (sharded / ".metadata").write_bytes(b"x")
    assert verified(sharded)


def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tmp_path):
    last = write_checkpoint(tmp_path / "last.ckpt", 1.0)
    before = last.read_bytes()

    def full_disk(tmp):
        with open(tmp, "wb") as f:
            f.write(b"PK\x03\x04 half a zip")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(TrainingError, match=rf"^no space left in {tmp_path} for the checkpoint last.ckpt "
                                            rf"\(.* MiB free; a checkpoint of this run takes about .* MiB\)"):
        save_whole(last, full_disk, is_global_zero=True)
    assert last.read_bytes() == before and verified(last)
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no partial file left


def test_a_torn_write_never_takes_the_final_name(tmp_path):
    last = write_checkpoint(tmp_path / "last.ckpt", 1.0)
    before = last.read_bytes()

    def torn_write(tmp):
        write_checkpoint(tmp, 2.0)
        data = open(tmp, "rb").read()
        open(tmp, "wb").write(data[:100])

    with pytest.raises(TrainingError, match="was not written whole"):
        save_whole(last, torn_write, is_global_zero=True)
    assert last.read_bytes() == before
    save_whole(last, lambda tmp: write_checkpoint(tmp, 3.0), is_global_zero=True)
    assert torch.load(last, weights_only=True)["state_dict"]["w"][0] == 3.0


def test_resume_passes_over_a_torn_last_for_the_newest_whole_checkpoint(tmp_path):
    assert resolve_last([tmp_path]) == (None, None)
    older = write_checkpoint(tmp_path / "epoch=0-step=8.ckpt")
    time.sleep(0.01)
    newer = write_checkpoint(tmp_path / "epoch=1-step=16.ckpt")
    time.sleep(0.01)
    last = write_checkpoint(tmp_path / "last.ckpt")
    assert resolve_last([tmp_path]) == (str(last), None)
    tear(last)
    path, warning = resolve_last([tmp_path])
    assert path == str(newer) and warning.startswith(f"{last} is torn") and str(newer) in warning
    assert (tmp_path / "last.ckpt.torn").exists() and not last.exists()  # the next save takes its name
    assert os.path.exists(older)


def test_a_torn_last_through_the_cli_resumes_from_the_epoch_checkpoint(tmp_path, tiny_llama):
    checkpoints = tmp_path / "checkpoints"  # the recipe's ModelCheckpoint (save_last) under the root
    fit(tmp_path, tiny_llama, "--trainer.max_epochs", "1")
    tear(checkpoints / "last.ckpt")
    result = fit(tmp_path, tiny_llama, "--trainer.max_epochs", "2", "--ckpt_path", "last")
    (epoch,) = checkpoints.glob("epoch=0-*.ckpt")
    assert f"{checkpoints / 'last.ckpt'} is torn" in result.stderr and f"resuming from {epoch} instead" in result.stderr
    assert f"Restored all states from the checkpoint at {epoch}" in result.stderr + result.stdout
    assert verified(checkpoints / "last.ckpt")  # written whole by the resumed run, under its own name


def test_no_checkpoint_yet_is_a_true_line_not_lightnings_hint(tmp_path, tiny_llama):
    checkpoints = tmp_path / "checkpoints"
    result = fit(tmp_path, tiny_llama, "--trainer.max_epochs", "1", "--ckpt_path", "last")
    console = result.stdout + result.stderr
    assert f"--ckpt_path last: no checkpoint in {checkpoints} yet" in console
    assert "HINT" not in console and "save_last=True" not in console
    assert verified(checkpoints / "last.ckpt")


def test_a_full_disk_mid_run_stops_in_one_line_and_the_run_resumes(tmp_path, tiny_llama, monkeypatch):
    """The real Trainer and ModelCheckpoint: the disk fills while epoch 2's checkpoint is written."""
    import lightning.fabric.plugins.io.torch_io as torch_io

    from sppo_lightning.datamodules import PreferenceDataModule
    from sppo_lightning.module import PreferenceModule
    from sppo_lightning.outputs import Trainer

    def run(epochs, ckpt_path=None):
        trainer = Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                          enable_model_summary=False, default_root_dir=tmp_path,
                          callbacks=[ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)])
        data = PreferenceDataModule(str(REPO / "configs" / "data" / "tiny_preferences.jsonl"), tokenizer=tiny_llama,
                                    batch_size=16, max_length=128, max_prompt_length=64)
        trainer.fit(PreferenceModule(tiny_llama, loss="dpo", lr=1e-3), datamodule=data, ckpt_path=ckpt_path)

    run(1)
    last = tmp_path / "checkpoints" / "last.ckpt"
    whole = last.read_bytes()
    real = torch_io._atomic_save

    def fills_up(checkpoint, filepath):
        real(checkpoint, filepath)
        data = open(filepath, "rb").read()
        open(filepath, "wb").write(data[: len(data) // 3])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch_io, "_atomic_save", fills_up)
    with pytest.raises(TrainingError, match=f"no space left in {tmp_path / 'checkpoints'} for the checkpoint"):
        run(2, ckpt_path=str(last))
    assert last.read_bytes() == whole  # the earlier checkpoint is whole and where it was
    assert not list((tmp_path / "checkpoints").glob(".*partial"))
    monkeypatch.setattr(torch_io, "_atomic_save", real)  # space freed: the run resumes from it
    run(2, ckpt_path=str(last))
    assert torch.load(last, weights_only=True)["epoch"] == 1


class _Payload:
    """What a hostile checkpoint folder would hold: unpickling it writes a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def test_sharded_checkpoint_metadata_is_data_not_code(tmp_path, tiny_llama):
    import pickle
    import warnings

    import torch.distributed.checkpoint as dcp

    from sppo_lightning.checkpoints import check_dcp_metadata
    from sppo_lightning.errors import ConfigError
    from tests.helpers import run_cli as run

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save({"state_dict": {"w": torch.randn(4, 3), "b": torch.zeros(2, dtype=torch.bfloat16)}, "epoch": 3},
                 checkpoint_id=str(tmp_path / "real.ckpt"), no_dist=True)
    check_dcp_metadata(tmp_path / "real.ckpt")  # a real one reads

    hostile, marker = tmp_path / "hostile.ckpt", tmp_path / "marker"
    hostile.mkdir()
    (hostile / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ConfigError, match=r"hostile.ckpt/.metadata names builtins.exec, which the metadata of a "
                                          r"sharded checkpoint never holds"):
        check_dcp_metadata(hostile)
    result = run("export", hostile, tmp_path / "out", check=False)  # the CLI path that used to run it
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("sppo-lightning: error: ")
    assert not marker.exists() and not (tmp_path / "out").exists()
    (hostile / ".metadata").write_bytes(b"not a pickle")
    with pytest.raises(ConfigError, match="is not the metadata of a sharded checkpoint"):
        check_dcp_metadata(hostile)


class RunsACommand:
    """What a hostile checkpoint holds: unpickling it would run a shell command."""

    def __init__(self, victim):
        self.victim = str(victim)

    def __reduce__(self):
        return os.system, (f"touch {self.victim}",)


def bad_checkpoints(tmp_path):
    """(name, path, what the line says) for every kind of bad --ckpt_path."""
    empty, text, torn, foreign, hostile, bond = (tmp_path / n for n in ("empty.ckpt", "text.ckpt", "torn.ckpt",
                                                                         "foreign.ckpt", "hostile.ckpt", "bond.ckpt"))
    empty.write_bytes(b"")
    text.write_text("epoch=3\n")
    write_checkpoint(torn)
    tear(torn)
    torch.save({"weights": torch.zeros(2)}, foreign)
    torch.save({"state_dict": {}, "hparams": RunsACommand(tmp_path / "victim")}, hostile)
    torch.save({"state_dict": {}, "hyper_parameters": {"_class_path": "sppo_lightning.bond.BondModule"}}, bond)
    return [("another module", bond, "a checkpoint of sppo_lightning.bond.BondModule, but this run trains "
                                     "sppo_lightning.module.PreferenceModule"),
            ("missing", tmp_path / "nowhere.ckpt", "no such file or folder"),
            ("empty", empty, "the file is empty \\(0 bytes\\), not a checkpoint"),
            ("text", text, "not a checkpoint \\(torch.save writes a zip archive; this file begins b'epoch=3"),
            ("torn", torn, "a damaged or cut-short checkpoint"),
            ("foreign", foreign, "a torch file but not a Lightning checkpoint"),
            ("hostile", hostile, "refused, it is not a plain checkpoint: its pickle names what a checkpoint never "
                                 "holds .*system.*; it was not run")]


def test_every_bad_ckpt_path_is_one_line_before_any_model_loads(tmp_path, tiny_llama):
    import re

    for name, path, line in bad_checkpoints(tmp_path):
        result = fit(tmp_path / name, tiny_llama, "--trainer.max_epochs", "1", "--ckpt_path", path, check=False)
        assert result.returncode == 2, (name, result.stderr[-2000:])
        assert "Traceback" not in result.stderr and "weights_only=False" not in result.stderr, name
        (error,) = [e for e in result.stderr.splitlines() if e.startswith("sppo-lightning: error:")]
        assert re.search(f"--ckpt_path {re.escape(str(path))}: {line}", error), (name, error)
        assert "Loading weights" not in result.stderr, name  # refused before the model loaded
    assert not (tmp_path / "victim").exists()  # the hostile pickle never ran


def test_a_hostile_last_ckpt_is_refused_on_resume_too(tmp_path, tiny_llama):
    fit(tmp_path, tiny_llama, "--trainer.max_epochs", "1")
    last = tmp_path / "checkpoints" / "last.ckpt"
    torch.save({"state_dict": {}, "hparams": RunsACommand(tmp_path / "victim")}, last)
    result = fit(tmp_path, tiny_llama, "--trainer.max_epochs", "2", "--ckpt_path", "last", check=False)
    assert result.returncode == 2 and f"--ckpt_path {last}: refused" in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "victim").exists()
