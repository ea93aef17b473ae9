"""Files written whole or not at all, with the mode the umask gives new files.

Every file the project writes goes through here: to a temporary name next to its place, then renamed
(a crash leaves the old file or the new one, never half of one); a full disk is one line naming the
file and what is kept.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable


def file_mode() -> int:
    """The mode a new file gets under the process's umask (0644 under 0022), as ``open`` gives it."""
    return 0o666 & ~_umask()


def readable_as_umask_says(*paths: str | Path) -> None:
    """Give files written through a private temporary (``mkstemp``'s 0600, or a library's) the mode
    the umask gives new files, so that colleagues on a shared machine read a run as they read HF's files."""
    mode = file_mode()
    for path in paths:
        path = Path(path)
        for file in ([path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]):
            os.chmod(file, mode)


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(f)`` on a temporary file next to ``path``, then rename it into place: a crash
    leaves the old file or the new one, never half of one. ``write`` may stream (no whole copy in memory)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fchmod(f.fileno(), file_mode())  # mkstemp makes it 0600
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            import shutil

            from sppo_lightning.errors import TrainingError

            free = shutil.disk_usage(path.parent).free / 2**20
            raise TrainingError(f"no space left in {path.parent} to write {path.name} ({free:.1f} MiB free); "
                                f"what was finished before is kept: free space, then resume with --ckpt_path "
                                f"last to redo only this file") from None
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    def write(f: BinaryIO) -> None:
        f.write(data)

    atomic_write(path, write)


def atomic_write_json(path: Path, value: Any) -> None:
    atomic_write_bytes(path, json.dumps(value, indent=2, sort_keys=True).encode())


def append_json_line(path: Path, value: Any) -> None:
    """``value`` as one JSON line at the end of ``path`` (an append-only record). Never through a
    symlink (``O_NOFOLLOW``): a link planted in a run folder fails here instead of being followed."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    with os.fdopen(fd, "a") as f:
        f.write(json.dumps(value) + "\n")


def folder_whole(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(folder)`` on a temporary folder next to ``path``, then put it in ``path``'s place
    (an earlier folder there is replaced only once the new one is complete): a crash or a full disk
    leaves the old folder or the new one, never a mix. A full disk is one line."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial"))
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    try:
        write(tmp)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not path.exists():
            os.replace(old, path)  # the earlier folder back in place
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            from sppo_lightning.errors import TrainingError

            free = shutil.disk_usage(path.parent).free / 2**20
            raise TrainingError(f"no space left in {path.parent} to write {path.name}/ ({free:.1f} MiB free); "
                                f"what was there before is kept: free space and export again") from None
        raise
    shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sha256_file(path: Path) -> str:
    """The sha256 of a file, read a MiB at a time."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def remove_outward_links(folder: Path) -> list[str]:
    """Remove every symbolic link under ``folder`` that leads outside it (or nowhere), without
    following any: what a run folder holds is its own, and nothing outside it is read or written
    because a link there says so. The links go, their targets are never touched. Returns one line
    per link removed (for a warning)."""
    folder = Path(folder)
    if not folder.is_dir() or folder.is_symlink():
        return []
    root = folder.resolve()
    said = []
    for parent, dirs, names in os.walk(folder):  # never descends into a linked folder
        for name in [*dirs, *names]:
            path = Path(parent) / name
            if not path.is_symlink():
                continue
            target = Path(os.path.realpath(path))
            if target == root or root in target.parents:
                continue  # a link inside the run folder to its own file: harmless
            path.unlink()
            said.append(f"{path} was a symbolic link to {target}, outside the run folder: removed (its target is "
                        f"untouched); what it stood for is made again")
    return said
