"""Prepared-image cache: decode every image of an NIH-format folder once, store S x S uint8.

Layout of a cache folder (everything a reader needs, nothing else)::

    images.u8        raw uint8 array (n_rows, S, S), opened with np.memmap
    labels.csv       one row per good image in cache order: image, row (into images.u8), split,
                     the label/metadata columns of xray.nih.read_labels
    manifest.json    source root, csv, size, the source fingerprint, counts per label and split,
                     bad and absent images, image files the CSV does not list; written last, so its presence means the cache is complete
    sources.json     name, bytes and mtime of the file behind every row: lets a rebuild reuse the
                     rows whose file did not change
    bad_images.txt   missing/corrupt images and why (tab-separated), skipped
    progress.json    while preparing: finished chunks (the memmap is flushed before a chunk is
                     recorded), so a killed run resumes where it stopped
    .lock            taken (``flock``) by whoever prepares: two writers never interleave, the
                     second waits and then finds the cache done

**The cache knows its source.** ``fingerprint`` digests every row's image name, file size and
modification time (one ``stat`` per file, no reads), the image size and the ``present_only`` mode;
``labels_hash`` digests the bytes of the label CSV and the split lists. Every open through
:func:`prepare` (which :func:`xray.dataset.open_dataset` calls each time) recomputes both and
compares them with the manifest: new labels rewrite ``labels.csv`` only; new, removed or replaced
images rebuild the cache, copying over the rows whose file is unchanged. A file whose size and mtime
differ from those recorded has its bytes hashed: equal content (a copy of the folder, a touch) is
recorded as unchanged, nothing is decoded. **Identity is content**: the manifest's ``identity``
digests every row's name and source SHA-256 (:func:`content_identity`); it is what
:attr:`xray.dataset.XrayDataset.fingerprint` covers, so a byte-identical copy of the data is the
same data for every resume and provenance check.

**One location rule** (:func:`cache_location`): the cache of ``ROOT`` at ``S`` px is
``ROOT/prepared-S``; with a cache folder ``C`` (``--cache-dir C``) it is ``C/prepared/<hash of
ROOT's absolute path>-S``. ``xray prepare --root ROOT --size S`` writes exactly what every
``--data-root ROOT --image-size S`` command reads.

**The cache checks its own files** (:func:`check_files`). The manifest records the size and
SHA-256 of ``labels.csv`` and a digest of every chunk of :data:`CHUNK` rows of ``images.u8``;
``sources.json`` records the SHA-256 of every source image file. Every open checks, besides the
source stat check above: the manifest's image size against the requested one, the sizes of
``images.u8`` and ``labels.csv``, the SHA-256 of ``labels.csv`` (a few ms per 100 000 rows), the
pixels of :data:`SAMPLE_CHUNKS` random chunks of ``images.u8`` and the bytes of
:data:`SAMPLE_SOURCES` random source images (about 30 ms at 256 px). ``xray prepare --verify``
checks everything: every chunk and every source file's content (a same-size file swapped with
its mtime kept). Damage found is repaired: ``labels.csv`` is rewritten, damaged or stale rows are
decoded again (a truncated or deleted ``images.u8``: all of them).

Images are centre-cropped to a square and resized with Lanczos antialiasing.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import multiprocessing as mp
import os
import random
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from . import nih
from .errors import UserError
from .imageio import read_image
from .integrity import sha256_file
from .io import (atomic_path, atomic_write_json, atomic_write_text, check_free_space, ensure_writable_dir,
                 remove_temp_files)
from .labels import ANY_FINDING, NO_FINDING

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
CHUNK = 64  # images per unit of work and of recorded progress
MAX_BAD_FRACTION = 0.01
COPY_BLOCK = 1024  # rows copied at a time when a rebuild reuses unchanged images
SAMPLE_CHUNKS = 4  # chunks of images.u8 whose digest every open checks
SAMPLE_SOURCES = 4  # source image files whose content every open checks
STALE = -1  # bytes/mtime recorded for a row found damaged or stale: it is decoded again
IMAGES_FILE, LABELS_FILE, MANIFEST_FILE, BAD_FILE, PROGRESS_FILE, SOURCES_FILE, LOCK_FILE = (
    "images.u8", "labels.csv", "manifest.json", "bad_images.txt", "progress.json", "sources.json", ".lock")


def resize_square(img: np.ndarray, size: int) -> np.ndarray:
    """float (H, W) in [0, 1] -> uint8 (size, size): centre-crop to a square, Lanczos resize."""
    h, w = img.shape
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    img = img[top:top + s, left:left + s]  # (s, s)
    if s != size:
        pil = Image.fromarray(np.ascontiguousarray(img, dtype=np.float32), mode="F")
        img = np.asarray(pil.resize((size, size), Image.Resampling.LANCZOS, reducing_gap=3.0))
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


def _load_one(path: str, size: int) -> np.ndarray:
    """Decode and resize one image (module-level so worker processes can run it)."""
    return resize_square(read_image(path), size)


def _load_chunk(task: tuple[int, list[str | None], int]) -> tuple[int, np.ndarray, dict[str, str]]:
    """Decode one chunk -> (chunk id, uint8 (k, S, S), {position-in-chunk: reason} of bad images)."""
    cid, paths, size = task
    out = np.zeros((len(paths), size, size), dtype=np.uint8)
    bad: dict[str, str] = {}
    for i, p in enumerate(paths):
        if p is None:
            bad[str(i)] = "missing: no file under images/ or images_*/images/"
            continue
        try:
            out[i] = _load_one(p, size)
        except UserError as e:
            bad[str(i)] = f"unreadable: {e}"
    return cid, out, bad


@dataclass(frozen=True)
class Plan:
    """What a cache of ``root`` at ``size`` must hold, computed from the source folder as it is now."""

    root: Path
    csv: Path
    out: Path
    size: int
    labels: pd.DataFrame  # one row per cache row (the present images only, with present_only)
    paths: list[str | None]
    stats: list[tuple[int, int] | None]  # (bytes, mtime_ns) of each row's file; None when absent
    splits: dict[str, list[str]]
    present_only: bool
    absent: list[str]  # listed images without a file, left out (present_only) or counted as bad
    fingerprint: str  # what the pixels depend on: names and order, file sizes and mtimes, S, mode
    labels_hash: str  # what labels.csv depends on: the CSV and split-list bytes
    unlisted: tuple[str, ...] = ()  # image files on disk that the label CSV does not list (a truncated CSV?)

    @property
    def n(self) -> int:
        return len(self.paths)

    @property
    def n_chunks(self) -> int:
        return (self.n + CHUNK - 1) // CHUNK

    def chunk_paths(self, cid: int) -> list[str | None]:
        return self.paths[cid * CHUNK:(cid + 1) * CHUNK]

    def source(self) -> dict:
        """The source fingerprint stored in the manifest (and compared on every open)."""
        return {"fingerprint": self.fingerprint, "labels_hash": self.labels_hash, "csv": self.csv.name,
                "listed": self.n + (len(self.absent) if self.present_only else 0),
                "files": sum(1 for s in self.stats if s is not None),
                "bytes": sum(s[0] for s in self.stats if s is not None), "present_only": self.present_only}


def _context():
    """fork on Linux (workers only run PIL/numpy/pydicom; spawn re-imports torch, ~10 s), else spawn."""
    return mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")


def root_key(root: str | os.PathLike) -> str:
    """12 hex digits naming ``root`` (its absolute path) inside a shared cache folder."""
    return hashlib.sha1(str(Path(root).expanduser().resolve()).encode()).hexdigest()[:12]


def cache_location(root: str | os.PathLike, size: int, cache_dir: str | os.PathLike | None = None) -> Path:
    """THE rule for where the cache of ``root`` at ``size`` lives (see the module docstring)."""
    if cache_dir is None:
        return Path(root).expanduser() / f"prepared-{size}"
    return Path(cache_dir).expanduser() / "prepared" / f"{root_key(root)}-{size}"


def _file_hash(paths) -> str:
    h = hashlib.sha1()
    for f in paths:
        if f.is_file():
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
        else:
            h.update(b"-")
        h.update(b"\0")
    return h.hexdigest()


def check_size(size) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < 4 or size % 4:
        raise UserError(f"image size {size} is not a positive multiple of 4; the scan grid needs S % 4 == 0 (e.g. 64, 128, 256)")


def make_plan(root, size: int, out=None, present_only: bool = False) -> Plan:
    """Read the source folder (CSV, split lists, one ``stat`` per image) -> the :class:`Plan`.

    Raises :class:`UserError` for a bad size or folder, and (``present_only``) when no listed
    image is present. Creates nothing.
    """
    check_size(size)
    root = Path(root).expanduser()
    csv = nih.find_csv(root)  # checks that root is a folder
    labels = nih.read_labels(csv)
    files = nih.scan_images(root)
    splits = nih.split(root, labels)  # on the full table: the split of an image never depends on what else is present
    out = Path(out).expanduser() if out is not None else cache_location(root, size)
    absent = [n for n in labels.index if n not in files]
    if present_only and absent:
        if len(absent) == len(labels):
            raise UserError(f"none of the {len(labels)} images listed in {csv.name} is present under {root}/images or "
                            f"{root}/images_*/images; download some parts first (`xray download --out {root} --parts 1`)")
        keep = set(absent)
        labels = labels[~labels.index.isin(keep)]
        splits = {k: [n for n in v if n not in keep] for k, v in splits.items()}
    names = labels.index.tolist()
    paths = [str(files[n][0]) if n in files else None for n in names]
    stats = [(files[n][1], files[n][2]) if n in files else None for n in names]
    h = hashlib.sha1()
    h.update(f"v{FORMAT_VERSION}\0{size}\0{int(present_only)}\0".encode())
    for n, st in zip(names, stats):
        h.update(f"{n}\t{st[0]}\t{st[1]}\n".encode() if st else f"{n}\t-\n".encode())
    lh = _file_hash((csv, root / "train_val_list.txt", root / "test_list.txt"))
    listed = {files[n][0] for n in labels.index if n in files}
    unlisted = tuple(sorted(Path(f).name for f in {item[0] for item in files.values()} - listed))  # a .dcm: one file, two keys
    return Plan(root, csv, out, size, labels, paths, stats, splits, bool(present_only), absent, h.hexdigest(), lh, unlisted)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_complete(cache_dir: str | os.PathLike) -> bool:
    """True when ``cache_dir`` holds a finished cache (its manifest is written last)."""
    return (Path(cache_dir) / MANIFEST_FILE).is_file()


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``folder/.lock``: one writer at a time; others wait here."""
    try:
        import fcntl  # POSIX only: not at the top so that other platforms can import this module
    except ImportError:  # pragma: no cover - not POSIX: no inter-process lock, say so once
        warnings.warn("no fcntl on this platform: do not prepare one cache from two processes at once", stacklevel=3)
        yield
        return
    with open(folder / LOCK_FILE, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process preparing %s", folder)
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _inherit_mode(out: Path, present_only: bool | None) -> bool:
    """``present_only=None``: as the cache at ``out`` was prepared (off when there is none)."""
    if present_only is not None:
        return bool(present_only)
    for name in (MANIFEST_FILE, PROGRESS_FILE):
        m = _read_json(out / name)
        if m is not None and "present_only" in m:
            return bool(m["present_only"])
    return False


def is_current(p: Plan) -> bool:
    """True when the cache at ``p.out`` is complete and was made from exactly this source."""
    m = _read_json(p.out / MANIFEST_FILE)
    return (m is not None and m.get("fingerprint") == p.fingerprint and m.get("labels_hash") == p.labels_hash
            and m.get("image_size") == p.size and check_files(p.out, p.size, sample=0) is None)


def prepare(root: str | os.PathLike, size: int, out: str | os.PathLike | None = None,
            workers: int | None = None, progress: bool = True, present_only: bool | None = None,
            verify: bool = False) -> Path:
    """Build (or finish, or bring up to date, or reuse) the S x S cache of ``root``; return its path.

    ``out`` defaults to :func:`cache_location` ``(root, size)`` = ``root/prepared-<size>``.
    ``workers``: decoding processes (None = all cores, 0 = in this process). ``present_only``:
    cache only the listed images that have a file (absent ones are counted in the manifest, not
    errors); None keeps the mode the existing cache was made with (off for a new one).

    A complete cache made from the same source returns at once; a changed source (labels, split
    lists, images added, removed, replaced or touched) is brought up to date, copying the rows whose
    file did not change; a killed run resumes from its last recorded chunk. Missing (without
    ``present_only``) or corrupt images are skipped and listed in ``bad_images.txt``; more than
    1 % bad raises :class:`UserError`. Two processes preparing one cache take turns (a lock file).

    Every open also checks the cache's own files and a sample of chunks and source files
    (:func:`check_files`, :func:`check_sources`); ``verify`` checks every chunk and every source
    file's bytes. Damage or changed content found is repaired (those rows are decoded again).
    """
    if out is not None:
        out = Path(out).expanduser()
    else:
        check_size(size)
        out = cache_location(root, size)
    mode = _inherit_mode(out, present_only)
    seen = _unchanged(root, size, out, mode)
    if seen is not None:  # the common case: no CSV parsing, no lock, no writes
        damage = check_files(out, size, full=verify)
        changed = [] if damage is not None else check_sources(out, root, sample=None if verify else SAMPLE_SOURCES, seen=seen)
        if damage is None and not changed:
            if verify:
                _backfill_digests(out, seen)
            return out
        what = damage.what if damage is not None else (f"{len(changed)} source image(s) have other bytes than when "
                                                        f"cached, same size and mtime (first: {changed[0]})")
        log.warning("prepared cache %s: %s; repairing it", out, what)
        with _locked(out):
            _mark_stale(out, damage, changed)
    p = make_plan(root, size, out, mode)
    if is_current(p):
        return p.out
    try:
        ensure_writable_dir(p.out)
    except UserError as e:
        raise UserError(f"{e} (the prepared cache of {p.root} goes to {p.out}; for a read-only data folder pass "
                        "--cache-dir DIR, which every command takes, to keep caches elsewhere)") from None
    with _locked(p.out):
        # Plan again under the lock: the mode or the files may have changed while we waited.
        p = make_plan(root, size, out, _inherit_mode(out, present_only))
        return _prepare_locked(p, workers, progress)


def _prepare_locked(plan: Plan, workers: int | None, progress: bool) -> Path:
    remove_temp_files(plan.out)  # of a killed run (we hold the lock: no writer is live)
    manifest = _read_json(plan.out / MANIFEST_FILE)
    if manifest is not None:
        damage = check_files(plan.out, plan.size, sample=0)
        if damage is not None:
            log.warning("prepared cache %s: %s; repairing it", plan.out, damage.what)
            _mark_stale(plan.out, damage)
            manifest = _read_json(plan.out / MANIFEST_FILE)
    if manifest is not None and manifest.get("fingerprint") != plan.fingerprint and _restamp(plan, manifest):
        manifest = _read_json(plan.out / MANIFEST_FILE)
    if manifest is not None and manifest.get("fingerprint") == plan.fingerprint:
        if manifest.get("labels_hash") == plan.labels_hash:
            return plan.out
        log.info("%s: the label CSV or split lists changed; rewriting labels.csv (pixels unchanged)", plan.out)
        row_of = {name: r for r, name in enumerate(plan.labels.index)}
        return _finish(plan, {str(row_of[b["image"]]): b["reason"] for b in manifest["bad_images"]})
    if plan.n == 0:
        raise UserError(f"{plan.csv} lists no images; expected at least one row")

    progress_path = plan.out / PROGRESS_FILE
    state = _read_json(progress_path)
    if state is None or state.get("fingerprint") != plan.fingerprint or not _images_ok(plan.out, plan.n, plan.size):
        if manifest is not None:
            log.warning("%s was prepared from another version of %s (%s); bringing it up to date, reusing unchanged images",
                        plan.out, plan.root, _what_changed(manifest, plan))
        state = _start_build(plan)

    done = set(state["done"])
    bad: dict[str, str] = dict(state["bad"])
    # Chunks with bad images are retried: the user may have fixed or added the files since.
    bad_chunks = {int(r) // CHUNK for r in bad}
    todo = [c for c in range(plan.n_chunks) if c not in done or c in bad_chunks]
    if todo:
        _run_chunks(plan, todo, done, bad, (plan.n, plan.size, plan.size), progress, workers)

    return _finish(plan, bad)


def content_identity(size: int, present_only: bool, rows: list) -> str | None:
    """What the cache's pixels are, by content: a digest of every row's image name and source file
    SHA-256 (``sources.json`` rows ``[name, bytes, mtime_ns, sha256]``), the image size and the
    ``present_only`` mode. None when a present file has no recorded digest."""
    h = hashlib.sha1(f"content-v{FORMAT_VERSION}\0{size}\0{int(present_only)}\0".encode())
    for row in rows:
        if row[1] is None:
            h.update(f"{row[0]}\t-\n".encode())
        elif len(row) > 3 and row[3]:
            h.update(f"{row[0]}\t{row[3]}\n".encode())
        else:
            return None
    return h.hexdigest()


def _restamp(plan: Plan, manifest: dict) -> bool:
    """Image files whose size and mtime differ from ``sources.json`` but whose bytes are those cached
    (a copy of the data folder, a touch, a phantom set generated again): their content is hashed and,
    when equal, their new size and mtime are recorded; nothing is decoded. True when the cache then
    matches ``plan`` entirely: its stat fingerprint becomes the plan's and its ``identity`` (what
    :attr:`xray.dataset.XrayDataset.fingerprint` digests) stays as it was. Otherwise the files found
    equal are recorded, so the rebuild that follows reuses their rows."""
    src = _read_json(plan.out / SOURCES_FILE)
    if (src is None or src.get("fingerprint") not in (manifest.get("fingerprint"), plan.fingerprint)
            or manifest.get("format") != FORMAT_VERSION or manifest.get("image_size") != plan.size
            or bool(manifest.get("present_only")) != plan.present_only or src.get("size") != plan.size):
        return False
    rows = src.get("rows") or []
    if [row[0] for row in rows] != plan.labels.index.tolist():
        return False

    def stat_of(row):
        return None if row[1] is None else (row[1], row[2])

    differ = [r for r, (row, st) in enumerate(zip(rows, plan.stats)) if stat_of(row) != (None if st is None else tuple(st))]
    candidates = [r for r in differ if plan.stats[r] is not None and rows[r][1] == plan.stats[r][0] and len(rows[r]) > 3 and rows[r][3]]
    if candidates:
        log.info("%d image file(s) of %s have another mtime than when cached; comparing their content", len(candidates), plan.root)
    same = []
    for r in candidates:
        try:
            if sha256_file(plan.paths[r]) == rows[r][3]:
                same.append(r)
        except OSError:
            pass
    for r in same:
        rows[r] = [rows[r][0], *plan.stats[r], rows[r][3]]
    if len(same) < len(differ):
        if same:  # the rebuild reuses these rows (keyed by name, size and mtime)
            atomic_write_json(plan.out / SOURCES_FILE, src)
        return False
    identity = manifest.get("identity") or manifest.get("fingerprint")  # a cache made before identities: its old fingerprint
    src["fingerprint"] = plan.fingerprint
    atomic_write_json(plan.out / SOURCES_FILE, src)  # a kill here: the next open restamps again (src matches the plan)
    atomic_write_json(plan.out / MANIFEST_FILE, {**manifest, "fingerprint": plan.fingerprint, "identity": identity,
                                                 "source": plan.source(), "source_root": str(plan.root.resolve())})
    if same:
        log.info("%s: same content as when cached (%d file(s) copied or touched); nothing to decode", plan.out, len(same))
    return True


def _unchanged(root, size: int, out: Path, present_only: bool) -> dict | None:
    """The cheap check of a complete cache against its source: the label CSV's and split lists'
    bytes hash as recorded, and every image file (each row's, and each absent one's) has the size
    and mtime recorded in ``sources.json``. One ``stat`` per file and one read of the small text
    files; no CSV parsing. None means "plan it properly", never "stale"; else what it read
    (``sources.json`` and the image files found), which the content check reuses.
    """
    m, src = _read_json(out / MANIFEST_FILE), _read_json(out / SOURCES_FILE)
    if (m is None or src is None or src.get("fingerprint") != m.get("fingerprint") or m.get("format") != FORMAT_VERSION
            or m.get("image_size") != size or bool(m.get("present_only")) != present_only):
        return None
    try:
        root = Path(root).expanduser()
        csv = nih.find_csv(root)
        if csv.name != m.get("csv") or _file_hash((csv, root / "train_val_list.txt", root / "test_list.txt")) != m.get("labels_hash"):
            return None
        files = nih.scan_images(root)
    except (UserError, OSError):
        return None
    for name, nbytes, mtime, *_ in src.get("rows", []):
        f = files.get(name)
        if (None if f is None else (f[1], f[2])) != (None if nbytes is None else (nbytes, mtime)):
            return None
    if any(name in files for name in src.get("absent", [])):
        return None
    return {"sources": src, "files": files}


def _images_ok(out: Path, n: int, size: int) -> bool:
    f = out / IMAGES_FILE
    return f.is_file() and f.stat().st_size == n * size * size


def _what_changed(manifest: dict, plan: Plan) -> str:
    """A few words on how the source differs from the one the manifest was made from."""
    old = manifest.get("source") or {}
    new = plan.source()
    if old.get("present_only") != new["present_only"]:
        return f"present_only {old.get('present_only')} -> {new['present_only']}"
    if old.get("files") != new["files"]:
        return f"{old.get('files')} -> {new['files']} image files"
    if old.get("listed") != new["listed"]:
        return f"{old.get('listed')} -> {new['listed']} listed images"
    return "image files replaced or modified (sizes or modification times differ)"


def _reusable_rows(out: Path, size: int) -> tuple[dict[tuple, int], int]:
    """``{(name, bytes, mtime_ns): row}`` of the finished rows of the cache now in ``out``, and its row count.

    Only rows whose pixels are known to be written count: every good row of a complete cache, or
    the rows of finished chunks of an interrupted one. Anything inconsistent -> nothing reusable.
    """
    src = _read_json(out / SOURCES_FILE)
    if src is None or src.get("size") != size:
        return {}, 0
    rows = src.get("rows") or []
    if not _images_ok(out, len(rows), size):
        return {}, 0
    manifest, state = _read_json(out / MANIFEST_FILE), _read_json(out / PROGRESS_FILE)
    if manifest is not None and manifest.get("fingerprint") == src.get("fingerprint"):
        bad_names = {b["image"] for b in manifest.get("bad_images", [])}
        ok = [r for r, row in enumerate(rows) if row[0] not in bad_names]
    elif state is not None and state.get("fingerprint") == src.get("fingerprint"):
        done, bad = set(state.get("done", [])), set(state.get("bad", {}))
        ok = [r for r in range(len(rows)) if r // CHUNK in done and str(r) not in bad]
    else:
        return {}, 0
    return {tuple(rows[r][:3]): r for r in ok if rows[r][1] is not None}, len(rows)


def _start_build(plan: Plan) -> dict:
    """A fresh ``images.u8`` for ``plan``, holding every unchanged row of the old cache; the new progress state."""
    reuse, old_n = _reusable_rows(plan.out, plan.size)
    old_src = _read_json(plan.out / SOURCES_FILE) or {}
    hashes = {tuple(r[:3]): r[3] for r in old_src.get("rows", []) if len(r) > 3 and r[3]}  # content digests carried over
    names = plan.labels.index.tolist()
    pairs = [(new, reuse[key]) for new, key in enumerate((n, *st) if st else None for n, st in zip(names, plan.stats))
             if key is not None and key in reuse]  # (new row, old row)
    # The old cache stops being valid now; a kill from here on starts from scratch (never mixes).
    for f in (MANIFEST_FILE, PROGRESS_FILE, SOURCES_FILE):
        (plan.out / f).unlink(missing_ok=True)
    shape = (plan.n, plan.size, plan.size)
    nbytes = plan.n * plan.size * plan.size
    check_free_space(plan.out, nbytes)  # before anything is written (reused rows: the old file is still there)
    with atomic_path(plan.out / IMAGES_FILE, need=nbytes) as tmp:
        _allocate(tmp, nbytes)  # real blocks, not a sparse file: a full disk fails here, never with SIGBUS later
        mm = np.memmap(tmp, dtype=np.uint8, mode="r+", shape=shape)
        if pairs:
            old = np.memmap(plan.out / IMAGES_FILE, dtype=np.uint8, mode="r", shape=(old_n, plan.size, plan.size))
            for i in range(0, len(pairs), COPY_BLOCK):
                new_rows, old_rows = map(np.array, zip(*pairs[i:i + COPY_BLOCK]))
                mm[new_rows] = old[old_rows]  # (k, S, S)
            del old
        mm.flush()
        del mm
    atomic_write_json(plan.out / SOURCES_FILE, {"fingerprint": plan.fingerprint, "size": plan.size,
                                                "rows": [[n, *(st or (None, None)), *([hashes[(n, *st)]] if st and (n, *st) in hashes else [])]
                                                         for n, st in zip(names, plan.stats)],
                                                "absent": plan.absent if plan.present_only else []})
    reused = np.zeros(plan.n_chunks * CHUNK, dtype=bool)
    reused[[new for new, _ in pairs]] = True
    reused[plan.n:] = True
    done = [c for c in range(plan.n_chunks) if reused[c * CHUNK:(c + 1) * CHUNK].all()]
    if pairs:
        log.info("reusing %d of %d images from the previous cache (%d chunks of %d need decoding)",
                 len(pairs), plan.n, plan.n_chunks - len(done), plan.n_chunks)
    state = {"fingerprint": plan.fingerprint, "present_only": plan.present_only, "done": done, "bad": {}}
    atomic_write_json(plan.out / PROGRESS_FILE, state)
    return state


def _allocate(path: Path, nbytes: int) -> None:
    """Give ``path`` ``nbytes`` of allocated (zero) blocks; ``ENOSPC`` raised now, as an ``OSError``."""
    with open(path, "r+b") as f:
        if hasattr(os, "posix_fallocate") and nbytes:
            os.posix_fallocate(f.fileno(), 0, nbytes)
        else:  # pragma: no cover - not POSIX
            f.truncate(nbytes)


def _run_chunks(plan: Plan, todo: list[int], done: set[int], bad: dict[str, str], shape, progress: bool,
                workers: int | None) -> None:
    mm = np.memmap(plan.out / IMAGES_FILE, dtype=np.uint8, mode="r+", shape=shape)
    remaining = sum(len(plan.chunk_paths(c)) for c in todo)
    tasks = [(c, plan.chunk_paths(c), plan.size) for c in todo]
    if workers is None:
        workers = os.cpu_count() or 1
    workers = min(workers, len(tasks))
    pool = _context().Pool(workers) if workers > 1 else None
    try:
        results = pool.imap_unordered(_load_chunk, tasks) if pool else map(_load_chunk, tasks)
        with tqdm(total=plan.n, initial=plan.n - remaining, unit="img", desc=f"prepare {plan.size}px",
                  disable=not progress or None) as bar:
            for cid, arr, chunk_bad in results:
                start = cid * CHUNK
                mm[start:start + len(arr)] = arr  # (k, S, S)
                mm.flush()  # pixels reach the file before the chunk is recorded as done
                for r in range(start, start + len(arr)):
                    bad.pop(str(r), None)
                bad.update({str(start + int(i)): why for i, why in chunk_bad.items()})
                done.add(cid)
                atomic_write_json(plan.out / PROGRESS_FILE, {"fingerprint": plan.fingerprint, "present_only": plan.present_only,
                                                             "done": sorted(done), "bad": bad})
                bar.update(len(arr))
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        del mm


def _known_or_new_digests(plan: Plan) -> list[str]:
    """The chunk digests of ``images.u8``: the manifest's when the pixels did not change (a labels-only
    rewrite, checked on a sample), else read from the file."""
    old = _read_json(plan.out / MANIFEST_FILE) or {}
    chunks = ((old.get("files") or {}).get(IMAGES_FILE) or {}).get("chunks")
    if (old.get("fingerprint") == plan.fingerprint and old.get("image_size") == plan.size and chunks
            and len(chunks) == plan.n_chunks and _images_ok(plan.out, plan.n, plan.size)
            and not _bad_chunks(plan.out, plan.n, plan.size, chunks, random.Random().sample(range(len(chunks)), min(SAMPLE_CHUNKS, len(chunks))))):
        return chunks
    return _image_digests(plan.out, plan.n, plan.size)


def _record_source_digests(plan: Plan) -> None:
    """Add each row's source file SHA-256 to ``sources.json`` (kept for rows already hashed with the same size and mtime)."""
    src = _read_json(plan.out / SOURCES_FILE)
    if src is None:
        return
    rows = src.get("rows", [])
    for r, row in enumerate(rows):
        path = plan.paths[r] if r < len(plan.paths) else None
        if path is None or row[1] is None:
            continue
        if len(row) < 4 or not row[3]:
            try:
                rows[r] = [*row[:3], sha256_file(path)]
            except OSError:
                rows[r] = [*row[:3], None]
    atomic_write_json(plan.out / SOURCES_FILE, src)


def _split_column(plan: Plan) -> np.ndarray:
    col = pd.Series("unused", index=plan.labels.index, dtype=object)
    for name in ("train", "val", "test"):
        col[plan.splits[name]] = name
    return col.to_numpy()


def _finish(plan: Plan, bad: dict[str, str]) -> Path:
    names = plan.labels.index
    bad_rows = sorted(int(r) for r in bad)
    report = "".join(f"{names[r]}\t{bad[str(r)]}\n" for r in bad_rows)
    atomic_write_text(plan.out / BAD_FILE, report)
    if len(bad_rows) > MAX_BAD_FRACTION * plan.n:
        first = names[bad_rows[0]]
        raise UserError(f"{len(bad_rows)} of {plan.n} images are missing or unreadable (> {MAX_BAD_FRACTION:.0%}; first: {first}: "
                        f"{bad[str(bad_rows[0])]}); see {plan.out / BAD_FILE}, fix the files and rerun (finished images are kept)")
    if bad_rows:
        log.warning("skipping %d missing/unreadable image(s), listed in %s", len(bad_rows), plan.out / BAD_FILE)
    if plan.unlisted:
        log.warning("%d image file(s) under %s are not listed in %s (e.g. %s) and are left out; a truncated or "
                    "partial label CSV? Restore the full CSV and rerun to include them", len(plan.unlisted), plan.root,
                    plan.csv.name, plan.unlisted[0])

    good = np.ones(plan.n, dtype=bool)
    good[bad_rows] = False
    table = plan.labels.copy()
    table.insert(0, "split", _split_column(plan))
    table.insert(0, "row", np.arange(plan.n))
    table = table[good]
    with atomic_path(plan.out / LABELS_FILE) as tmp:
        table.to_csv(tmp, index_label="image")
        labels_file = {"bytes": tmp.stat().st_size, "sha256": sha256_file(tmp)}
    _record_source_digests(plan)
    identity = content_identity(plan.size, plan.present_only, (_read_json(plan.out / SOURCES_FILE) or {}).get("rows", []))

    any_finding = int((table[NO_FINDING] == 0).sum())
    counts = {c: int(table[c].sum()) for c in nih.LABEL_COLUMNS} | {ANY_FINDING: any_finding}
    split_counts = {s: int((table["split"] == s).sum()) for s in ("train", "val", "test", "unused")}
    split_counts["trainval"] = split_counts["train"] + split_counts["val"]
    manifest = {
        "format": FORMAT_VERSION,
        "fingerprint": plan.fingerprint,
        "identity": identity or plan.fingerprint,  # content: a copy of the data is the same data
        "labels_hash": plan.labels_hash,
        "source": plan.source(),
        "present_only": plan.present_only,
        "n_absent": len(plan.absent) if plan.present_only else 0,
        "absent_examples": plan.absent[:10] if plan.present_only else [],
        "n_unlisted": len(plan.unlisted),  # image files on disk the label CSV does not list (left out)
        "unlisted_examples": list(plan.unlisted[:10]),
        "source_root": str(plan.root.resolve()),
        "csv": plan.csv.name,
        "image_size": plan.size,
        "n_rows": plan.n,
        "n_images": int(good.sum()),
        "counts": counts,
        "splits": split_counts,
        "bad_images": [{"image": names[r], "reason": bad[str(r)]} for r in bad_rows],
        "files": {LABELS_FILE: labels_file, IMAGES_FILE: {"chunk_rows": CHUNK, "chunks": _known_or_new_digests(plan)}},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_json(plan.out / MANIFEST_FILE, manifest)  # last: marks the cache complete
    (plan.out / PROGRESS_FILE).unlink(missing_ok=True)
    return plan.out


# ----------------------------------------------------------------------------------------------
# the cache's own files


def _chunk_digest(block: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(block).data).hexdigest()[:16]  # SHA-NI: ~2x blake2b


def _image_digests(out: Path, n: int, size: int) -> list[str]:
    mm = np.memmap(out / IMAGES_FILE, dtype=np.uint8, mode="r", shape=(n, size, size))
    try:
        return [_chunk_digest(mm[c * CHUNK:(c + 1) * CHUNK]) for c in range((n + CHUNK - 1) // CHUNK)]  # (k, S, S) each
    finally:
        del mm


def _bad_chunks(out: Path, n: int, size: int, digests: list[str], chunks) -> list[int]:
    """The chunks (of ``chunks``) of ``images.u8`` whose pixels differ from ``digests``."""
    mm = np.memmap(out / IMAGES_FILE, dtype=np.uint8, mode="r", shape=(n, size, size))
    try:
        return [c for c in chunks if _chunk_digest(mm[c * CHUNK:(c + 1) * CHUNK]) != digests[c]]  # (k, S, S)
    finally:
        del mm


@dataclass(frozen=True)
class Damage:
    """What :func:`check_files` found wrong: ``what`` (one line), and what to redo."""

    what: str
    rows: frozenset = frozenset()  # rows to decode again
    all_rows: bool = False  # images.u8 unusable: decode everything
    labels: bool = False  # rewrite labels.csv


def check_files(out: str | os.PathLike, size: int | None = None, full: bool = False, sample: int = SAMPLE_CHUNKS,
                rng: random.Random | None = None) -> Damage | None:
    """Check a complete cache's own files against its manifest; None when healthy.

    Always: the manifest's image size (against ``size``), the sizes of ``images.u8`` and
    ``labels.csv`` and the SHA-256 of ``labels.csv``; then the digests of ``sample`` random chunks of
    ``images.u8`` (``full``: every chunk). A cache made before these digests existed passes the checks
    it has data for.
    """
    out = Path(out)
    m = _read_json(out / MANIFEST_FILE)
    if m is None:
        return Damage(f"{out / MANIFEST_FILE} is missing or unreadable", all_rows=True)
    if size is not None and m.get("image_size") != size:
        return Damage(f"its manifest says image_size {m.get('image_size')}, expected {size}", all_rows=True)
    n, s = m.get("n_rows"), m.get("image_size")
    f = out / IMAGES_FILE
    if not isinstance(n, int) or not isinstance(s, int):
        return Damage(f"{out / MANIFEST_FILE} lacks n_rows/image_size", all_rows=True)
    have = f.stat().st_size if f.is_file() else None
    if have != n * s * s:
        return Damage(f"{f} is {'missing' if have is None else f'{have} bytes'}, expected {n * s * s}", all_rows=True)
    files = m.get("files") or {}
    lab = files.get(LABELS_FILE)
    lf = out / LABELS_FILE
    if not lf.is_file():
        return Damage(f"{lf} is missing", labels=True)
    if lab is not None:
        if lf.stat().st_size != lab.get("bytes") or sha256_file(lf) != lab.get("sha256"):
            return Damage(f"{lf} differs from the one written (size or SHA-256)", labels=True)
    digests = (files.get(IMAGES_FILE) or {}).get("chunks")
    if digests and len(digests) == (n + CHUNK - 1) // CHUNK:
        chunks = range(len(digests)) if full else (rng or random.Random()).sample(range(len(digests)), min(sample, len(digests)))
        bad = _bad_chunks(out, n, s, digests, chunks)
        if bad:
            rows = frozenset(r for c in bad for r in range(c * CHUNK, min((c + 1) * CHUNK, n)))
            return Damage(f"{f}: the pixels of {len(bad)} chunk(s) of {CHUNK} rows differ from those written", rows=rows)
    return None


def check_sources(out: str | os.PathLike, root: str | os.PathLike, sample: int | None = SAMPLE_SOURCES,
                  rng: random.Random | None = None, seen: dict | None = None) -> list[str]:
    """Names of source images whose bytes differ from those the cache was made from (``sample``
    random ones, or all with ``sample=None``): a same-size file replaced with its mtime kept.
    ``seen``: what :func:`_unchanged` read (``sources.json`` and the image files), not read again."""
    src = (seen or {}).get("sources") or _read_json(Path(out) / SOURCES_FILE) or {}
    rows = [r for r in src.get("rows", []) if len(r) > 3 and r[3]]
    if sample is not None:
        rows = (rng or random.Random()).sample(rows, min(sample, len(rows)))
    if not rows:
        return []
    found = (seen or {}).get("files")
    files = {k: v[0] for k, v in found.items()} if found is not None else (
        nih.find_images(Path(root).expanduser()) if sample is None else None)
    changed = []
    for name, _, _, digest in rows:
        path = files.get(name) if files is not None else _find_one(Path(root).expanduser(), name)
        try:
            if path is None or sha256_file(path) != digest:
                changed.append(name)
        except OSError:
            changed.append(name)
    return changed


def _find_one(root: Path, name: str) -> Path | None:
    for cand in [root / "images" / name, *root.glob(f"images_*/images/{name}")]:
        if cand.is_file():
            return cand
    return None


def _backfill_digests(out: Path, seen: dict) -> None:
    """``--verify`` on a cache made before digests existed: record them now (what is there is taken as good)."""
    m, src = _read_json(out / MANIFEST_FILE), seen["sources"]
    missing = [r for r, row in enumerate(src.get("rows", [])) if row[1] is not None and (len(row) < 4 or not row[3])]
    if m is None or ("files" in m and not missing):
        return
    log.warning("%s was prepared before content digests existed; recording them now", out)
    with _locked(out):
        for r in missing:
            row = src["rows"][r]
            f = seen["files"].get(row[0])
            src["rows"][r] = [*row[:3], sha256_file(f[0]) if f else None]
        atomic_write_json(out / SOURCES_FILE, src)
        lf = out / LABELS_FILE
        m["files"] = {LABELS_FILE: {"bytes": lf.stat().st_size, "sha256": sha256_file(lf)},
                      IMAGES_FILE: {"chunk_rows": CHUNK, "chunks": _image_digests(out, m["n_rows"], m["image_size"])}}
        atomic_write_json(out / MANIFEST_FILE, m)


def _mark_stale(out: Path, damage: Damage | None = None, names: list[str] | None = None) -> None:
    """Make the next :func:`prepare` redo what ``damage`` (or the changed source ``names``) needs."""
    m, src = _read_json(out / MANIFEST_FILE), _read_json(out / SOURCES_FILE)
    if m is None or src is None or (damage is not None and damage.all_rows):
        (out / MANIFEST_FILE).unlink(missing_ok=True)
        return
    if damage is not None and damage.labels and not damage.rows:
        m["labels_hash"] = "damaged"
        atomic_write_json(out / MANIFEST_FILE, m)
        return
    rows = set(damage.rows if damage is not None else ())
    wanted = set(names or ())
    rows |= {r for r, row in enumerate(src["rows"]) if row[0] in wanted}
    for r in rows:
        if src["rows"][r][1] is not None:
            src["rows"][r] = [src["rows"][r][0], STALE, STALE]
    stale = "stale-" + hashlib.sha1(json.dumps(sorted(rows)).encode()).hexdigest()[:12]
    src["fingerprint"] = m["fingerprint"] = stale
    atomic_write_json(out / SOURCES_FILE, src)  # sources first: a kill in between leaves a mismatch, i.e. a rebuild
    atomic_write_json(out / MANIFEST_FILE, m)


def read_manifest(cache_dir: str | os.PathLike) -> dict:
    """The manifest of a complete cache, or :class:`UserError` saying how to make one."""
    path = Path(cache_dir).expanduser() / MANIFEST_FILE
    m = _read_json(path)
    if m is None:
        raise UserError(f"{Path(cache_dir)} is not a prepared cache (no readable {MANIFEST_FILE}); run `xray prepare --root DIR --size S --out {cache_dir}`")
    return m
