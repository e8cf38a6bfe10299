"""Prepared-image cache: decode every image of an NIH-format folder once, store S x S uint8.

Layout of a cache folder (everything a reader needs, nothing else)::

    images.u8        raw uint8 array (n_rows, S, S), opened with np.memmap
    labels.csv       one row per good image in cache order: image, row (into images.u8), split,
                     the label/metadata columns of xray.nih.read_labels
    manifest.json    source root, csv, size, counts per label and split, bad images; written last,
                     so its presence means the cache is complete
    bad_images.txt   missing/corrupt images and why (tab-separated), skipped
    progress.json    while preparing: finished chunks (the memmap is flushed before a chunk is
                     recorded), so a killed run resumes where it stopped

Images are centre-cropped to a square and resized with Lanczos antialiasing.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import multiprocessing as mp
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from . import nih
from .errors import UserError
from .imageio import read_image
from .io import atomic_path, atomic_write_json, atomic_write_text, ensure_writable_dir
from .labels import ANY_FINDING, NO_FINDING

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CHUNK = 64  # images per unit of work and of recorded progress
MAX_BAD_FRACTION = 0.01
IMAGES_FILE, LABELS_FILE, MANIFEST_FILE, BAD_FILE, PROGRESS_FILE = (
    "images.u8", "labels.csv", "manifest.json", "bad_images.txt", "progress.json")


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
class _Plan:
    root: Path
    csv: Path
    out: Path
    size: int
    labels: pd.DataFrame
    paths: list[str | None]
    splits: dict[str, list[str]]
    fingerprint: str  # what the pixels depend on: root, image names and order, size
    labels_hash: str  # what labels.csv depends on: the CSV and split-list bytes

    @property
    def n(self) -> int:
        return len(self.paths)

    @property
    def n_chunks(self) -> int:
        return (self.n + CHUNK - 1) // CHUNK

    def chunk_paths(self, cid: int) -> list[str | None]:
        return self.paths[cid * CHUNK:(cid + 1) * CHUNK]


def _context():
    """fork on Linux (workers only run PIL/numpy/pydicom; spawn re-imports torch, ~10 s), else spawn."""
    return mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")


def default_out(root: str | os.PathLike, size: int) -> Path:
    return Path(root).expanduser() / f"prepared-{size}"


def _plan(root, size: int, out) -> _Plan:
    if not isinstance(size, int) or size < 4 or size % 4:
        raise UserError(f"image size {size} is not a positive multiple of 4; the scan grid needs S % 4 == 0 (e.g. 64, 128, 256)")
    root = Path(root).expanduser()
    csv = nih.find_csv(root)  # checks that root is a folder
    labels = nih.read_labels(csv)
    files = nih.find_images(root)
    splits = nih.split(root, labels)
    out = Path(out).expanduser() if out is not None else default_out(root, size)
    paths = [str(files[n]) if n in files else None for n in labels.index]
    h = hashlib.sha1()
    for part in (str(FORMAT_VERSION), str(root.resolve()), csv.name, str(size), "\n".join(labels.index)):
        h.update(part.encode())
        h.update(b"\0")
    lh = hashlib.sha1()
    for f in (csv, root / "train_val_list.txt", root / "test_list.txt"):
        lh.update(f.read_bytes() if f.is_file() else b"-")
        lh.update(b"\0")
    return _Plan(root, csv, out, size, labels, paths, splits, h.hexdigest(), lh.hexdigest())


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_complete(cache_dir: str | os.PathLike) -> bool:
    """True when ``cache_dir`` holds a finished cache (its manifest is written last)."""
    return (Path(cache_dir) / MANIFEST_FILE).is_file()


def prepare(root: str | os.PathLike, size: int, out: str | os.PathLike | None = None,
            workers: int | None = None, progress: bool = True) -> Path:
    """Build (or finish, or reuse) the S x S cache of the NIH-format folder ``root``; return its path.

    ``out`` defaults to ``root/prepared-<size>``. ``workers``: decoding processes (None = all
    cores, 0 = in this process). A killed run resumes from its last recorded chunk; a complete
    cache for the same root, CSV and size returns at once. Missing/corrupt images are skipped and
    listed in ``bad_images.txt``; more than 1 % bad raises :class:`UserError`.
    """
    plan = _plan(root, size, out)
    ensure_writable_dir(plan.out)
    manifest = _read_json(plan.out / MANIFEST_FILE)
    if manifest is not None and manifest.get("fingerprint") == plan.fingerprint:
        if manifest.get("labels_hash") == plan.labels_hash:
            return plan.out
        # Same pixels, new labels or split lists: rewrite labels.csv and the manifest only.
        row_of = {name: r for r, name in enumerate(plan.labels.index)}
        return _finish(plan, {str(row_of[b["image"]]): b["reason"] for b in manifest["bad_images"]})
    if plan.n == 0:
        raise UserError(f"{plan.csv} lists no images; expected at least one row")

    images_path, progress_path = plan.out / IMAGES_FILE, plan.out / PROGRESS_FILE
    state = _read_json(progress_path)
    shape = (plan.n, plan.size, plan.size)
    nbytes = plan.n * plan.size * plan.size
    if (state is None or state.get("fingerprint") != plan.fingerprint or not images_path.is_file()
            or images_path.stat().st_size != nbytes):
        if manifest is not None:  # a cache of something else: it stops being valid now
            (plan.out / MANIFEST_FILE).unlink()
        state = {"fingerprint": plan.fingerprint, "done": [], "bad": {}}
        with atomic_path(images_path) as tmp:
            np.memmap(tmp, dtype=np.uint8, mode="w+", shape=shape).flush()  # sparse, zero-filled
        atomic_write_json(progress_path, state)

    done = set(state["done"])
    bad: dict[str, str] = dict(state["bad"])
    # Chunks with bad images are retried: the user may have fixed or added the files since.
    bad_chunks = {int(r) // CHUNK for r in bad}
    todo = [c for c in range(plan.n_chunks) if c not in done or c in bad_chunks]
    if todo:
        _run_chunks(plan, todo, done, bad, shape, progress, workers)

    return _finish(plan, bad)


def _run_chunks(plan: _Plan, todo: list[int], done: set[int], bad: dict[str, str], shape, progress: bool,
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
                atomic_write_json(plan.out / PROGRESS_FILE,
                                  {"fingerprint": plan.fingerprint, "done": sorted(done), "bad": bad})
                bar.update(len(arr))
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        del mm


def _split_column(plan: _Plan) -> np.ndarray:
    col = pd.Series("unused", index=plan.labels.index, dtype=object)
    for name in ("train", "val", "test"):
        col[plan.splits[name]] = name
    return col.to_numpy()


def _finish(plan: _Plan, bad: dict[str, str]) -> Path:
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

    good = np.ones(plan.n, dtype=bool)
    good[bad_rows] = False
    table = plan.labels.copy()
    table.insert(0, "split", _split_column(plan))
    table.insert(0, "row", np.arange(plan.n))
    table = table[good]
    with atomic_path(plan.out / LABELS_FILE) as tmp:
        table.to_csv(tmp, index_label="image")

    any_finding = int((table[NO_FINDING] == 0).sum())
    counts = {c: int(table[c].sum()) for c in nih.LABEL_COLUMNS} | {ANY_FINDING: any_finding}
    split_counts = {s: int((table["split"] == s).sum()) for s in ("train", "val", "test", "unused")}
    split_counts["trainval"] = split_counts["train"] + split_counts["val"]
    manifest = {
        "format": FORMAT_VERSION,
        "fingerprint": plan.fingerprint,
        "labels_hash": plan.labels_hash,
        "source_root": str(plan.root.resolve()),
        "csv": plan.csv.name,
        "image_size": plan.size,
        "n_rows": plan.n,
        "n_images": int(good.sum()),
        "counts": counts,
        "splits": split_counts,
        "bad_images": [{"image": names[r], "reason": bad[str(r)]} for r in bad_rows],
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_json(plan.out / MANIFEST_FILE, manifest)  # last: marks the cache complete
    (plan.out / PROGRESS_FILE).unlink(missing_ok=True)
    return plan.out


def read_manifest(cache_dir: str | os.PathLike) -> dict:
    """The manifest of a complete cache, or :class:`UserError` saying how to make one."""
    path = Path(cache_dir).expanduser() / MANIFEST_FILE
    m = _read_json(path)
    if m is None:
        raise UserError(f"{Path(cache_dir)} is not a prepared cache (no readable {MANIFEST_FILE}); run `xray prepare --root DIR --size S --out {cache_dir}`")
    return m
