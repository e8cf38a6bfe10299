"""The integrity layer: every artifact the toolkit writes and later trusts carries a digest.

- **Files** (checkpoints, model weights and configs, cache files): a SHA-256 of the bytes,
  recorded at save time beside the file (``<name>.sha256``, in ``sha256sum`` format, so
  ``sha256sum -c`` checks it too) or in a folder's ``digest.json`` (:func:`write_folder_digest`),
  and compared on load (:func:`verify_file`, :func:`verify_folder`). A mismatch raises
  :class:`DamagedError` (a :class:`UserError`: one line naming the file and what to do); callers
  that have a fallback (training checkpoints) catch it. SHA-256 runs at ~1.7 GB/s on a CPU with
  SHA extensions: a 256 px checkpoint costs a fraction of its ``torch.load``.
- **Record lines** (JSON lines): :func:`seal_line` appends a checksum of the line's canonical JSON
  text; :func:`open_line` verifies it (a valid-JSON edit, a flipped label, a damaged key: all
  refused with :class:`DamagedError`).
- **Disk space**: :func:`check_free_space` before a long write of known size, and
  :func:`disk_full_error` to turn ``ENOSPC``/``EFBIG``/``EDQUOT`` into the one-line
  "no space left on DEVICE: need about N MB, have M MB".

Artifacts written before this layer existed have no digest: they are accepted with a warning
(:func:`verify_file` returns False), never refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Iterable

from .errors import UserError
from .io import atomic_write_json, atomic_write_text, check_free_space, disk_full_error, is_disk_full  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

ALGORITHM = "sha256"
SIDECAR_SUFFIX = ".sha256"
FOLDER_DIGEST = "digest.json"
LINE_KEY = "_sum"  # the checksum field of a sealed record line
LINE_SUM_SIZE = 8  # bytes of blake2b per record line (16 hex digits)
CHUNK = 1 << 22


class DamagedError(UserError):
    """An artifact's bytes do not match the digest recorded when it was written."""


class DamagedLineError(DamagedError, ValueError):
    """A record line that is not a JSON object or does not match its checksum (a ``ValueError`` too,
    so a reader that drops a torn last line on ``ValueError`` keeps doing so)."""


# ----------------------------------------------------------------------------------------------
# files


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def sidecar_path(path: str | os.PathLike) -> Path:
    """``<path>.sha256``: where the digest of a single file is recorded."""
    p = Path(path)
    return p.with_name(p.name + SIDECAR_SUFFIX)


def write_sidecar(path: str | os.PathLike, hexdigest: str | None = None, content_of: str | os.PathLike | None = None) -> Path:
    """Record the digest of ``path`` in ``<path>.sha256`` (atomically, ``sha256sum`` format).

    ``content_of``: hash this file instead (a temp file about to be renamed onto ``path``: record
    the digest first, rename second, and a kill never leaves an unrecorded file). ``hexdigest``:
    an already computed digest.
    """
    p = Path(path)
    if hexdigest is None:
        hexdigest = sha256_file(content_of if content_of is not None else p)
    side = sidecar_path(p)
    atomic_write_text(side, f"{hexdigest}  {p.name}\n")
    return side


def read_sidecar(path: str | os.PathLike) -> str | None:
    """The digest recorded for ``path``, or None when there is none (or it is unreadable: reported as damaged by the caller)."""
    side = sidecar_path(path)
    try:
        text = side.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError):
        return ""
    parts = text.split()
    return parts[0].lower() if parts and len(parts[0]) == 64 else ""


def verify_file(path: str | os.PathLike, expected: str | None = None, what: str = "file",
                hint: str = "restore it from a backup or re-create it") -> bool:
    """Check ``path`` against ``expected`` (default: its ``.sha256`` sidecar).

    Returns True when verified, False when no digest was recorded (an artifact from before this
    layer: the caller decides whether to warn). Raises :class:`DamagedError` on a mismatch.
    """
    p = Path(path)
    if expected is None:
        expected = read_sidecar(p)
        if expected is None:
            return False
    if not p.is_file():
        raise DamagedError(f"{what} {p} is missing although its digest is recorded; {hint}")
    actual = sha256_file(p)
    if actual != expected:
        raise DamagedError(f"{what} {p} is damaged: its SHA-256 is {actual[:16]}..., "
                           f"recorded {expected[:16] or '(unreadable)'}...; {hint}")
    return True


def write_folder_digest(folder: str | os.PathLike, names: Iterable[str]) -> dict:
    """Write ``folder/digest.json`` = ``{"algorithm": "sha256", "files": {name: hex}}`` for ``names``."""
    d = Path(folder)
    record = {"algorithm": ALGORITHM, "files": {n: sha256_file(d / n) for n in sorted(names)}}
    atomic_write_json(d / FOLDER_DIGEST, record)
    return record


def read_folder_digest(folder: str | os.PathLike) -> dict[str, str] | None:
    """``{name: hex}`` from ``folder/digest.json``; None when absent. An unreadable one is damaged."""
    p = Path(folder) / FOLDER_DIGEST
    try:
        record = json.loads(p.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise DamagedError(f"{p} is damaged ({type(e).__name__}); re-save the folder's contents") from None
    files = record.get("files") if isinstance(record, dict) else None
    if record.get("algorithm") != ALGORITHM or not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise DamagedError(f"{p} is damaged (expected {{'algorithm': 'sha256', 'files': {{name: hex}}}}); re-save the folder's contents")
    return files


def verify_folder(folder: str | os.PathLike, what: str = "model folder",
                  hint: str = "restore it from a backup or re-save it") -> bool:
    """Check every file listed in ``folder/digest.json``. False (and a warning) when there is none."""
    d = Path(folder)
    files = read_folder_digest(d)
    if files is None:
        msg = (f"{what} {d} has no {FOLDER_DIGEST} (saved by an older version): its files cannot be checked "
               "for damage; re-save it to add one")
        log.warning(msg)
        warnings.warn(msg, stacklevel=2)
        return False
    for name, expected in sorted(files.items()):
        verify_file(d / name, expected, what="file", hint=hint)
    return True


def folder_digest(folder: str | os.PathLike, size: int = 8) -> str | None:
    """A short digest of ``folder/digest.json`` (the identity of a saved model without rehashing
    its weights); None when the folder has none."""
    files = read_folder_digest(folder)
    if files is None:
        return None
    text = json.dumps(files, sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=size).hexdigest()


# ----------------------------------------------------------------------------------------------
# record lines


def _line_sum(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.blake2b(text.encode(), digest_size=LINE_SUM_SIZE).hexdigest()


def seal_line(obj: dict) -> str:
    """One JSON line (no newline) for the record ``obj`` with its checksum in ``"_sum"``.

    The checksum covers the canonical JSON of every other field (key order does not matter), so
    any edit of a value or a key, valid JSON or not, is caught by :func:`open_line`.
    """
    if not isinstance(obj, dict):
        raise TypeError(f"seal_line takes a dict record, got {type(obj).__name__}")
    body = {k: v for k, v in obj.items() if k != LINE_KEY}
    return json.dumps({**body, LINE_KEY: _line_sum(body)}, sort_keys=True)


def open_line(line: str, source: str = "records", lineno: int | None = None, require: bool = True) -> dict:
    """Parse a line written by :func:`seal_line` and verify its checksum; returns the record without ``"_sum"``.

    Raises :class:`DamagedLineError` (one line naming ``source`` and the line number) when the line is
    not a JSON object or its checksum does not match. ``require=False`` accepts a line without a
    checksum (records written before this layer).
    """
    where = f"{source}" + (f" line {lineno}" if lineno is not None else "")
    hint = "the file was edited or damaged; delete that line (it will be recomputed) or rerun with --restart"
    try:
        obj = json.loads(line)
    except ValueError:
        raise DamagedLineError(f"{where} is not valid JSON; {hint}") from None
    if not isinstance(obj, dict):
        raise DamagedLineError(f"{where} is a JSON {type(obj).__name__}, expected an object; {hint}")
    stored = obj.pop(LINE_KEY, None)
    if stored is None:
        if require:
            raise DamagedLineError(f"{where} has no checksum field {LINE_KEY!r}; {hint}")
        return obj
    if stored != _line_sum(obj):
        raise DamagedLineError(f"{where} does not match its checksum; {hint}")
    return obj
