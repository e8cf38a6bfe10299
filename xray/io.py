"""Atomic file writes: a reader never sees a half-written file, a kill never leaves one.

Also :func:`run_lock`: one writer per output folder (an exclusive, non-blocking ``flock``).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from .errors import UserError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no inter-process lock, one writer per folder is the user's job
    fcntl = None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def normal_mode(directory: bool = False) -> int:
    """The permissions a new file (``0o666``) or folder (``0o777``) gets under the user's umask."""
    return (0o777 if directory else 0o666) & ~_umask()


# ----------------------------------------------------------------------------------------------
# disk space

_DISK_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


def mount_point(path: str | os.PathLike) -> Path:
    """The mount point holding ``path`` (or its nearest existing parent)."""
    p = Path(path).expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    p = p.resolve()
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return p


def free_bytes(path: str | os.PathLike) -> int:
    p = Path(path).expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def _mb(n: int) -> str:
    return f"{max(n, 0) / 1e6:.0f} MB" if n >= 1e6 or n <= 0 else f"{n / 1e6:.2f} MB"


def no_space_message(path: str | os.PathLike, need: int | None) -> str:
    have = free_bytes(path)
    need_s = f"need about {_mb(need)}" if need is not None else "need more"
    return (f"no space left on {mount_point(path)} (writing {path}): {need_s}, have {_mb(have)}; "
            "free some space or choose another folder, then rerun (nothing was left half-written)")


def check_free_space(path: str | os.PathLike, need: int, margin: float = 0.02) -> None:
    """Raise a one-line :class:`UserError` when the file system of ``path`` has under ``need`` bytes free."""
    need = int(need * (1 + margin))
    if free_bytes(path) < need:
        raise UserError(no_space_message(path, need))


def is_disk_full(exc: BaseException) -> bool:
    """True for ``ENOSPC``/``EFBIG``/``EDQUOT`` (also when torch wraps them in a RuntimeError)."""
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(s in text for s in (
        "unexpected pos", "No space left", "File too large", "Disk quota", "file write failed"))


def disk_full_error(exc: BaseException, path: str | os.PathLike, need: int | None = None) -> UserError:
    """The one-line :class:`UserError` for a write to ``path`` that failed with a full disk."""
    return UserError(no_space_message(path, need))


# ----------------------------------------------------------------------------------------------
# atomic writes


def ensure_writable_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` (and parents) and check that files can be written there."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=p, prefix=".write-test-"):
            pass
    except OSError as e:
        raise UserError(f"cannot write to output folder {p}: {e.strerror or e}; choose a writable path") from None
    return p


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, need: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed onto ``path``.

    On any exception the temporary file is removed and ``path`` is left as it was. ``need``: the
    bytes about to be written, checked against the free space first. A full disk (``ENOSPC``,
    ``EFBIG``, ``EDQUOT``, or torch's wrapped write errors) is a one-line :class:`UserError`.
    """
    dst = Path(path)
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        if need is not None:
            check_free_space(dst.parent, need)
        fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    except OSError as e:  # a read-only disk, no permission, a full disk, a path through a file
        if is_disk_full(e):
            raise disk_full_error(e, dst, need) from None
        raise UserError(f"cannot write {dst}: {e.strerror or e}; choose a writable path") from None
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the file normal permissions
    try:
        try:
            yield tmp_path
            with open(tmp_path, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp_path, dst)
        except (OSError, RuntimeError) as e:
            if is_disk_full(e):
                raise disk_full_error(e, dst, need) from None
            raise
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def remove_temp_files(folder: str | os.PathLike, min_age_s: float = 0.0) -> list[Path]:
    """Remove the temp files :func:`atomic_path` leaves in ``folder`` when a write is killed midway
    (``.NAME.*.tmp``, never renamed into place), sparing those younger than ``min_age_s`` (a live
    writer's, where other processes share the folder). Returns what was removed."""
    d, now, gone = Path(folder), time.time(), []
    for p in d.glob(".*.tmp") if d.is_dir() else ():
        try:
            if p.is_file() and now - p.stat().st_mtime >= min_age_s:
                p.unlink()
                gone.append(p)
        except OSError:  # removed by another process meanwhile
            continue
    return gone


# ----------------------------------------------------------------------------------------------
# one writer per output folder

RUN_LOCK_FILE = ".lock"


@contextlib.contextmanager
def run_lock(folder: str | os.PathLike, what: str = "training", flag: str = "--out") -> Iterator[Path]:
    """Hold an exclusive, non-blocking ``flock`` on ``folder/.lock`` for the body of the ``with``.

    Creates ``folder`` when missing. A second holder (another process) is refused at once with a
    one-line :class:`UserError` naming the holder's pid; the refused process writes nothing (it only
    opens the existing lock file to read). The OS releases the lock when the holder exits or is
    killed, so a stale ``.lock`` file never blocks anyone. Yields the lock file's path.
    """
    p = Path(folder)
    lock = p / RUN_LOCK_FILE
    try:
        p.mkdir(parents=True, exist_ok=True)
        f = open(lock, "a+")
    except OSError as e:
        raise UserError(f"cannot write to output folder {p}: {e.strerror or e}; choose a writable path") from None
    with f:
        if fcntl is None:  # pragma: no cover - not POSIX
            yield lock
            return
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            pid = f.read().strip() or "unknown"
            raise UserError(f"another {what} is writing {p} (pid {pid}); wait for it or use another {flag}") from None
        try:
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()}\n")
            f.flush()
            yield lock
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
