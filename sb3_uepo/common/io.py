"""Crash-safe file writing: every file the project writes (datasets, checkpoints, reports, results) goes
through :func:`atomic_write` or :func:`atomic_path`, so an interrupted run never leaves a half-written file
where a good one used to be.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path`` (atomic on POSIX).

    Works for files and for directories (a directory target is replaced as a whole).
    On any exception the temporary is removed and ``path`` is left untouched.

    :param path: final destination
    :param suffix: suffix of the temporary name (some writers, e.g. ``numpy.savez``, care about it)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or ".tmp", dir=path.parent)
    os.close(fd)
    os.unlink(tmp_name)  # let the writer create it (file or directory)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if path.is_dir() and tmp.is_dir():
            backup = path.with_name(f".{path.name}.old")
            shutil.rmtree(backup, ignore_errors=True)
            os.replace(path, backup)
            os.replace(tmp, path)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs: Any) -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; rename it onto ``path`` when the block succeeds."""
    with atomic_path(path) as tmp, open(tmp, mode, **open_kwargs) as handle:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_write(path) as handle:
        json.dump(data, handle, indent=2, sort_keys=False, default=_json_default)
        handle.write("\n")


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, type):  # e.g. an activation class in policy_kwargs
        return f"{obj.__module__}.{obj.__qualname__}"
    if callable(obj) and type(obj).__module__ == "stable_baselines3.common.utils":  # SB3's schedules print their values
        return repr(obj)
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serialisable")


class LockedError(RuntimeError):
    """Another live process holds the lock of an output path."""


@contextlib.contextmanager
def output_lock(path: str | os.PathLike, what: str = "output") -> Iterator[Path]:
    """Hold ``<path>.lock`` for the duration of the block, so that two runs never write the same output.

    The lock file holds the owner's pid and command line. A second run fails at once with :class:`LockedError`
    naming the running one; a lock left by a dead process (killed, crashed) is taken over.

    :param path: the output path the lock guards (a file path without extension, or a directory)
    :param what: what the path is, for the error message (``"--out"``, ``"pretrain_dir"``)
    """
    lock = Path(str(path) + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    owner = f"{os.getpid()}\n{' '.join(sys.argv)}\n"
    for _attempt in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pid, command = _lock_owner(lock)
            if pid is not None and pid != os.getpid() and _alive(pid):
                raise LockedError(
                    f"{what} '{path}' is in use by a running process (pid {pid}: {command or '?'}); wait for it to "
                    f"finish, stop it, or choose another {what}"
                ) from None
            lock.unlink(missing_ok=True)  # stale: its owner is gone
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(owner)
        break
    else:
        raise LockedError(f"could not take the lock {lock}: another process keeps creating it")
    try:
        yield lock
    finally:
        with contextlib.suppress(OSError):
            if _lock_owner(lock)[0] == os.getpid():
                lock.unlink()


def _lock_owner(lock: Path) -> tuple[int | None, str]:
    try:
        lines = lock.read_text().splitlines()
        return int(lines[0]), (lines[1] if len(lines) > 1 else "")
    except (OSError, ValueError, IndexError):
        return None, ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
