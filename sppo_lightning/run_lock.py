"""One run per output folder: an exclusive lock on ``<folder>/.sppo-lightning.lock``.

Two runs writing one folder interleave their checkpoints, losses and self-play stages (the second
reuses the first's files mid-write). ``fit`` therefore takes, before any model loads, an exclusive
``flock`` on a lock file in the run's root dir and in its self-play run dir; a second run on either
folder stops at once with one line naming the folder and the process that holds it. The kernel
drops a ``flock`` when its process dies, however it dies, so a run killed with SIGKILL leaves
nothing to clean up: the next run takes the folder over. The file itself stays (an empty name
costs nothing; deleting it would race with a run that has just opened it).

Only the first process of a distributed run locks (the others run the same command under it).
``flock`` works on local filesystems and on NFS v4 (as a byte-range lock); on a filesystem that
refuses locks the run goes on, with a warning.
"""

from __future__ import annotations

import os
import socket
import warnings
from pathlib import Path
from typing import Iterable

from sppo_lightning.errors import ConfigError

LOCK_NAME = ".sppo-lightning.lock"

_held: dict[str, int] = {}  # folder (resolved) -> the open, locked file descriptor


def first_process() -> bool:
    """Whether this process is rank 0 of its run by the launchers' variables (unset: a single process)."""
    for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK",
                 "PMI_RANK"):
        value = os.environ.get(name, "0")
        if value.strip() not in ("", "0"):
            return False
    return True


def lock_folders(folders: Iterable[str | os.PathLike]) -> None:
    """Hold an exclusive lock on each folder (created if missing) until ``release_all``; a folder
    another live process holds raises ``ConfigError`` naming it and that process."""
    import fcntl

    from sppo_lightning.files import file_mode

    for folder in dict.fromkeys(str(Path(f).expanduser().resolve()) for f in folders):
        if folder in _held:
            continue
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, LOCK_NAME)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, file_mode())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ConfigError(f"{folder} is in use by another run ({holder}; lock {path}): wait for it to end, "
                              f"or give this run another trainer.default_root_dir (and data.init_args.run_dir)") \
                from None
        except OSError as err:  # a filesystem without locks
            os.close(fd)
            warnings.warn(f"{folder}: cannot lock {path} ({err.strerror}); nothing stops a second run from "
                          f"writing this folder at the same time")
            continue
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        _held[folder] = fd


def release_all() -> None:
    """Give back every folder this process holds (a finished or failed run)."""
    while _held:
        _, fd = _held.popitem()
        os.close(fd)  # closing the descriptor drops the flock
