"""One run per folder (sppo_lightning/run_lock.py): a second run on a held folder stops at once, naming
the folder and the process holding it; a folder whose holder was SIGKILLed is taken over; different
folders never block each other."""

import os
import signal
import subprocess
import sys
from pathlib import Path

from sppo_lightning.errors import ConfigError
from sppo_lightning.run_lock import LOCK_NAME, lock_folders, release_all
from tests.helpers import REPO, fit_pairs as fit, run_cli as run

HOLD = ("import sys, time\nfrom sppo_lightning.run_lock import lock_folders\n"
        "lock_folders(sys.argv[1:])\nprint('held', flush=True)\ntime.sleep(600)\n")


def holder(*folders: Path) -> subprocess.Popen:
    """Another process holding ``folders`` the way a running ``fit`` does (the same function)."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, *map(str, folders)], cwd=REPO, stdout=subprocess.PIPE,
                               text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_second_run_on_a_held_root_stops_at_once_and_a_killed_holder_is_taken_over(tmp_path, tiny_llama):
    root, other = tmp_path / "root", tmp_path / "other"
    first = holder(root)
    try:
        second = fit(root, tiny_llama, "--trainer.max_epochs", "1", check=False)
        assert second.returncode == 2
        line = second.stderr.strip().splitlines()[-1]
        assert line.startswith(f"sppo-lightning: error: {root.resolve()} is in use by another run "
                               f"(pid {first.pid} on "), line
        assert sorted(p.name for p in root.iterdir()) == [LOCK_NAME]  # it wrote nothing there
        fit(other, tiny_llama, "--trainer.max_epochs", "1")  # another folder: not blocked
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    fit(root, tiny_llama, "--trainer.max_epochs", "1")  # the killed holder's lock is gone with it
    assert (root / "lightning_logs" / "version_0" / "metrics.csv").exists()


def test_a_held_self_play_run_dir_stops_a_run_with_another_root(tmp_path, tiny_dir):
    run_dir = tmp_path / "shared_self_play"
    first = holder(run_dir)
    try:
        result = run("fit", "--config", "configs/quickstart.yaml", "--model.model_name_or_path", tiny_dir / "llama",
                     "--trainer.default_root_dir", tmp_path / "root",
                     "--data.run_dir", run_dir, check=False)
        assert result.returncode == 2
        assert f"{run_dir.resolve()} is in use by another run (pid {first.pid} on " in result.stderr
    finally:
        first.kill()
        first.wait()


def test_locks_are_per_folder_held_once_and_released(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    try:
        lock_folders([a, b, a / "."])  # the same folder twice is one lock
        lock_folders([a])  # already held by this process: nothing to do
        assert (a / LOCK_NAME).read_text() == f"pid {os.getpid()} on {os.uname().nodename}\n"
        probe = subprocess.run([sys.executable, "-c", HOLD, str(b)], cwd=REPO, capture_output=True, text=True,
                               timeout=120)
        assert probe.returncode != 0 and f"{b.resolve()} is in use by another run (pid {os.getpid()}" in probe.stderr
    finally:
        release_all()
    try:
        process = holder(a, b)  # free again
        try:
            lock_folders([tmp_path / "c"])
            try:
                lock_folders([b])
                raise AssertionError("a held folder was locked twice")
            except ConfigError as err:
                assert f"(pid {process.pid} on " in str(err)
        finally:
            process.kill()
            process.wait()
    finally:
        release_all()
