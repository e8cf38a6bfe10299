"""Provenance: what an artifact depends on, as a plain dict, and the one check every resume uses.

An artifact (a training checkpoint, an evaluation records file, a demo stage, a prepared cache)
stores a *provenance dict*: every setting that changes its result (flags, seeds, world size), the
fingerprint of its data (``XrayDataset.fingerprint``) and the digests of the upstream models it was
made from (``file_digest`` of their weights). Flags that do not change results (progress bars, log
level, number of workers) are left out.

On resume, merge or skip the stored dict is compared with the new one by :func:`check_same`: the
first differing field is named with both values in a one-line :class:`UserError`, and the user is
told to pass ``--restart`` (which moves the old outputs aside with :func:`move_aside`, never mixing
them with new ones).

    prov = {"config": asdict(cfg), "data": train_set.fingerprint, "vae": file_digest(vae_weights)}
    check_same(f"checkpoint {path}", stored_prov, prov)
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

from .errors import UserError

_MISSING = object()


def canonical(obj: Any) -> Any:
    """A JSON-able, order-stable copy of ``obj``: tuples -> lists, Paths -> str, dataclasses -> dicts."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, Mapping):
        return {str(k): canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [canonical(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def digest(obj: Any, size: int = 8) -> str:
    """A short, stable hex digest of any JSON-able object (key order does not matter)."""
    text = json.dumps(canonical(obj), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.blake2b(text.encode(), digest_size=size).hexdigest()


def file_digest(path: str | os.PathLike, size: int = 8) -> str:
    """A short digest of a file's bytes (read in 4 MiB chunks)."""
    h = hashlib.blake2b(digest_size=size)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def first_difference(old: Mapping, new: Mapping, prefix: str = "") -> tuple[str, Any, Any] | None:
    """The first field (dotted path, sorted order) whose values differ, as ``(field, old, new)``.

    A field present on one side only differs too (its missing side is shown as ``<missing>``).
    """
    old, new = canonical(old), canonical(new)
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, _MISSING), new.get(key, _MISSING)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            d = first_difference(a, b, prefix=name + ".")
            if d is not None:
                return d
        elif a != b:
            return name, ("<missing>" if a is _MISSING else a), ("<missing>" if b is _MISSING else b)
    return None


def _short(v: Any, width: int = 60) -> str:
    s = json.dumps(v, default=str) if not isinstance(v, str) else v
    return s if len(s) <= width else s[: width - 3] + "..."


def _get(d: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, Mapping) or part not in d:
            return _MISSING
        d = d[part]
    return d


def check_same(what: str, old: Mapping, new: Mapping, hint: str = "use the same flags to resume, or pass --restart to start over",
               flags: Mapping[str, str] | None = None) -> None:
    """Raise a one-line :class:`UserError` naming the first field where ``old`` and ``new`` differ.

    ``flags`` maps dotted fields to the command-line flag that sets them (``{"seed": "--seed"}``):
    those are compared first, in the mapping's order, and a difference is named by its flag
    (``--seed changed: ... was made with 0, this run has 1``), so the user reads the flag they
    changed rather than a field derived from it. A field missing on the old side (written by an
    older version) is left to the plain comparison."""
    old, new = canonical(old), canonical(new)
    for field, flag in (flags or {}).items():
        a, b = _get(old, field), _get(new, field)
        if a is not _MISSING and b is not _MISSING and a != b:
            raise UserError(f"{flag} changed: {what} was made with {_short(a)}, this run has {_short(b)}; {hint}")
    d = first_difference(old, new)
    if d is not None:
        field, a, b = d
        raise UserError(f"{what} was made with {field}={_short(a)}, this run has {field}={_short(b)}; {hint}")


def move_aside(path: str | os.PathLike) -> Path | None:
    """Rename ``path`` (file or folder) to ``<name>.old-<UTC time>`` beside it; returns the new path.

    Used by ``--restart``: old outputs are kept for inspection and never mixed with new ones.
    """
    p = Path(path)
    if not p.exists():
        return None
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%f")
    dst = p.with_name(f"{p.name}.old-{stamp}")
    os.replace(p, dst)
    return dst
