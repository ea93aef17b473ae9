"""Checkpoints that are whole or absent, and ``--ckpt_path last`` resolved to one that is whole.

Lightning writes a checkpoint through a temporary file in ``$TMPDIR`` and moves it into place; when
the run folder is on another filesystem the move is a copy, so a full disk or a kill leaves a torn
``last.ckpt`` under its final name, and the resume then fails on it. Here a checkpoint is written
under a temporary name in its own folder, verified (a ``.ckpt`` opens as a zip with its central
directory; a sharded folder has its ``.metadata``), and renamed over the old one only then: the
previous ``last.ckpt`` stays until the new one is whole. A full disk is one line naming the folder
and the space the checkpoint needs. On resume, a ``last`` that does not verify is passed over for
the newest checkpoint that does, with a warning naming both.
"""

from __future__ import annotations

import errno
import os
import shutil
import zipfile
from pathlib import Path
from typing import Callable, Iterable, Optional

from sppo_lightning.errors import TrainingError


def verified(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a whole checkpoint: a zip whose central directory reads (what ``torch.save``
    writes), or a sharded checkpoint folder with its ``.metadata``."""
    path = Path(path)
    if path.is_dir():
        return (path / ".metadata").is_file() and (path / ".metadata").stat().st_size > 0
    try:
        with zipfile.ZipFile(path) as archive:
            return bool(archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def save_whole(filepath: str | os.PathLike, save: Callable[[str], None], is_global_zero: bool,
               barrier: Callable[[], None] = lambda: None) -> None:
    """``save(tmp)`` writes the checkpoint to a temporary name beside ``filepath``; rank 0 then
    verifies it and renames it into place (every rank calls this: sharded saves are collectives,
    and ``barrier`` keeps the ranks from writing into a stale partial rank 0 is removing)."""
    target = Path(filepath)
    partial = target.with_name(f".{target.name}.partial")
    if is_global_zero:
        _remove(partial)  # left by a run killed while saving
    barrier()
    try:
        save(str(partial))
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        _remove(partial)
        raise TrainingError(no_space(target)) from None
    if not is_global_zero:
        return
    if not verified(partial):
        _remove(partial)
        raise TrainingError(f"the checkpoint {target} was not written whole (is the disk full, or its folder "
                            f"not writable?); the earlier checkpoints in {target.parent} are kept")
    if partial.is_file():
        with open(partial, "rb") as f:  # on disk before it takes the final name
            os.fsync(f.fileno())
    if target.is_dir():  # a sharded checkpoint folder cannot be renamed over: swap it out first
        old = target.with_name(f".{target.name}.old")
        _remove(old)
        os.replace(target, old)
        os.replace(partial, target)
        _remove(old)
    else:
        os.replace(partial, target)


def no_space(target: Path) -> str:
    """One line for a full disk: the folder, the space left, and what a checkpoint there takes."""
    folder = target.parent
    free = shutil.disk_usage(folder).free if folder.exists() else 0
    earlier = [p for p in folder.glob("*.ckpt") if p.is_file()] if folder.exists() else []
    needs = f"; a checkpoint of this run takes about {max(p.stat().st_size for p in earlier) / 2**20:.1f} MiB" \
        if earlier else ""
    return (f"no space left in {folder} for the checkpoint {target.name} ({free / 2**20:.1f} MiB free{needs}); "
            f"the earlier checkpoints there are kept: free space, then resume with --ckpt_path last")


def resolve_last(folders: Iterable[str | os.PathLike]) -> tuple[Optional[str], Optional[str]]:
    """What ``--ckpt_path last`` should load from the checkpoint ``folders``: (the newest ``last*.ckpt``
    that verifies, else the newest checkpoint that does, or None) and a warning when a ``last`` was
    passed over (None when there is nothing to say)."""
    found = [p for folder in folders if Path(folder).is_dir() for p in Path(folder).iterdir()
             if p.suffix == ".ckpt" and not p.name.startswith(".")]
    newest_first = sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)
    lasts = [p for p in newest_first if p.name.startswith("last")]
    whole = [p for p in newest_first if verified(p)]
    for last in lasts:
        if last in whole:
            return str(last), None
    if not whole:
        return None, (f"{lasts[0]} is torn (it does not open as a checkpoint), and no other checkpoint beside it "
                      f"is whole") if lasts else None
    if lasts:
        torn = lasts[0].with_name(lasts[0].name + ".torn")  # out of the way: the next `last` takes its name
        os.replace(lasts[0], torn)
        return str(whole[0]), (f"{lasts[0]} is torn (it does not open as a checkpoint: a full disk or a kill "
                               f"while it was written; kept as {torn.name}); resuming from {whole[0]} instead")
    return str(whole[0]), None


# What the pickled ``.metadata`` of a torch distributed checkpoint (DCP) refers to: its own
# dataclasses, shapes, dtypes and layouts, and the paths of its storage. Nothing else is loaded.
_DCP_MODULES = ("torch.distributed.checkpoint.",)
_DCP_NAMES = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
              ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
              ("pathlib", "PureWindowsPath"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice")}


def check_dcp_metadata(folder: str | os.PathLike) -> None:
    """Read a sharded checkpoint's ``.metadata`` with an unpickler that resolves only the classes DCP
    metadata holds, before torch's reader unpickles it freely: a crafted file that names anything
    else (``os.system``, ``builtins.eval``, ...) is refused in one line and never runs."""
    import io
    import pickle

    import torch

    from sppo_lightning.errors import ConfigError

    path = Path(folder) / ".metadata"
    if not path.is_file():
        raise ConfigError(f"{folder}: not a checkpoint (no .metadata file of a sharded checkpoint)")

    class Restricted(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            allowed = module.startswith(_DCP_MODULES) or (module, name) in _DCP_NAMES or (
                module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                              torch.memory_format)))
            if not allowed:
                raise ConfigError(f"{path} names {module}.{name}, which the metadata of a sharded checkpoint never "
                                  f"holds: refusing to load it (the folder is damaged or was tampered with)")
            return super().find_class(module, name)

    try:
        Restricted(io.BytesIO(path.read_bytes())).load()
    except ConfigError:
        raise
    except Exception as err:  # not a pickle at all, or cut short
        raise ConfigError(f"{path} is not the metadata of a sharded checkpoint ({type(err).__name__}: {err})") from None


def check_checkpoint(path: str | os.PathLike, module_class: Optional[str] = None) -> None:
    """A ``--ckpt_path`` checked before any model loads, in one line naming the path and what was
    found: missing, empty, not a checkpoint, cut short, or a pickle that names a global outside
    torch's ``weights_only`` allow-list (it is refused and never runs; the line never suggests
    ``weights_only=False``), or a checkpoint of another module than ``module_class`` (the run's
    ``model.class_path``). Unpickled by torch's own ``weights_only`` loader onto the meta device:
    the rules are torch's, and no tensor's bytes are read. A folder is a sharded checkpoint
    (``check_dcp_metadata``)."""
    import pickle

    import torch

    from sppo_lightning.errors import ConfigError

    target = Path(path)
    where = f"--ckpt_path {target}"
    if not target.exists():
        raise ConfigError(f"{where}: no such file or folder")
    if target.is_dir():
        check_dcp_metadata(target)
        return
    size = target.stat().st_size
    if size == 0:
        raise ConfigError(f"{where}: the file is empty (0 bytes), not a checkpoint")
    with target.open("rb") as f:
        head = f.read(16)
    if not verified(target):
        if head.startswith(b"PK\x03\x04"):  # a zip's first entry, without its central directory
            raise ConfigError(f"{where}: a damaged or cut-short checkpoint ({size} bytes); resume from another one")
        raise ConfigError(f"{where}: not a checkpoint (torch.save writes a zip archive; this file begins {head!r})")
    try:
        loaded = torch.load(target, map_location="meta", weights_only=True)
    except pickle.UnpicklingError as err:
        found = next((line.strip() for line in str(err).splitlines() if "GLOBAL" in line or "global" in line),
                     str(err).splitlines()[0] if str(err) else type(err).__name__)
        raise ConfigError(f"{where}: refused, it is not a plain checkpoint: its pickle names what a checkpoint never "
                          f"holds ({found[:200]}); it was not run. Where did this file come from?") from None
    except Exception as err:  # a zip that is not torch's, or records cut short
        raise ConfigError(f"{where}: not a readable checkpoint ({type(err).__name__}: {str(err)[:200]})") from None
    if not isinstance(loaded, dict) or "state_dict" not in loaded:
        raise ConfigError(f"{where}: a torch file but not a Lightning checkpoint (no state_dict in it)")
    hparams = loaded.get("hyper_parameters")
    made_by = hparams.get("_class_path") if isinstance(hparams, dict) else None
    if module_class and isinstance(made_by, str) and made_by.rpartition(".")[2] != module_class.rpartition(".")[2]:
        raise ConfigError(f"{where}: a checkpoint of {made_by}, but this run trains {module_class}; give the "
                          f"model.class_path it was made with, or another checkpoint")
