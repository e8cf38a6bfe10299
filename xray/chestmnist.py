"""MedMNIST's ChestMNIST as a data source: the 112 120 NIH ChestX-ray14 images in one ``.npz``.

MedMNIST+ ships ChestMNIST as ``chestmnist_64.npz``, ``chestmnist_128.npz``, ``chestmnist_224.npz``
(and the 28 px ``chestmnist.npz``), each with the arrays ``train_images`` / ``val_images`` /
``test_images`` (uint8 ``(n, S, S)``) and ``train_labels`` / ``val_labels`` / ``test_labels``
(``(n, 14)`` 0/1, columns in :data:`MEDMNIST_LABELS` order). ``--data chestmnist`` finds the file in
``--data-root DIR`` (a folder, or the ``.npz`` itself) or in medmnist's own root (``~/.medmnist``),
fetches it through the ``medmnist`` package when that is installed, and otherwise says in one
line where to put it (``medmnist`` is not a dependency).

The file goes through the same rules as an NIH folder: it is prepared once into the cache layout
of :mod:`xray.cache` (``images.u8``, ``labels.csv``, ``manifest.json``, ``sources.json``, taken
under the same lock and resumable chunk by chunk), in ``DIR/prepared-chestmnist-S`` (with
``--cache-dir C``: ``C/prepared/<hash of DIR>-chestmnist-S``). Its identity is its content: the
fingerprint digests the file's bytes (hashed again only when its size or mtime changed), so a copy
is the same data. The labels map onto :data:`xray.labels.LABELS` (``pleural`` is
``Pleural_Thickening``; no positive label is ``No Finding``). The official split is used as is;
ChestMNIST has no patient ids, so each image counts as its own patient (``--max-images``), and no
boxes, ages, views or DICOM.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from . import cache as _cache
from .errors import UserError
from .io import atomic_path, atomic_write_json, atomic_write_text, ensure_writable_dir
from .labels import ANY_FINDING, NO_FINDING, PATHOLOGIES

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MEDMNIST_LABELS: tuple[str, ...] = (
    "atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule", "pneumonia", "pneumothorax",
    "consolidation", "edema", "emphysema", "fibrosis", "pleural", "hernia")
# MedMNIST's label -> the official NIH spelling of xray.labels.PATHOLOGIES
TO_PATHOLOGY: dict[str, str] = {m: ("Pleural_Thickening" if m == "pleural" else m.capitalize()) for m in MEDMNIST_LABELS}
SPLITS = ("train", "val", "test")
KEYS = tuple(f"{s}_{kind}" for s in SPLITS for kind in ("images", "labels"))
FILES: dict[int, str] = {28: "chestmnist.npz", 64: "chestmnist_64.npz", 128: "chestmnist_128.npz", 224: "chestmnist_224.npz"}
DOWNLOAD_PAGE = "https://zenodo.org/records/10519652"  # MedMNIST+ (the 64/128/224 px files)
DEFAULT_ROOT_TEXT = "~/.medmnist"  # medmnist's own default root
CHUNK = 1024  # images per unit of work and of recorded progress
STATE_FILE = "chestmnist_state.json"  # while preparing: the source fingerprint and the finished chunks


def medmnist_root() -> Path:
    """Where the ``medmnist`` package keeps its files (``~/.medmnist``; its own setting when installed)."""
    try:
        from medmnist.info import DEFAULT_ROOT  # optional: not a dependency
    except Exception:  # noqa: BLE001 - not installed, or broken: the documented default
        DEFAULT_ROOT = None
    return Path(DEFAULT_ROOT) if DEFAULT_ROOT else Path(DEFAULT_ROOT_TEXT).expanduser()


def holds_chestmnist(path: str | os.PathLike | None) -> bool:
    """True when ``path`` is a ChestMNIST ``.npz`` or a folder holding one and no NIH label CSV."""
    if path is None:
        return False
    p = Path(path).expanduser()
    if p.is_file():
        return p.suffix == ".npz" and p.name.startswith("chestmnist")
    return p.is_dir() and any((p / f).is_file() for f in FILES.values()) and not any(p.glob("Data_Entry_2017*.csv*"))


def _where(root: Path) -> str:
    return f"{root}" if " " not in str(root) else f"'{root}'"


def find_npz(data_root: str | os.PathLike | None, size: int, fetch: bool = True) -> Path:
    """The ChestMNIST file to read for S = ``size``: ``data_root`` itself when it is an ``.npz``, else
    in ``data_root`` (default: :func:`medmnist_root`) the file at exactly S px, or else the smallest
    larger one (resized down). None there: fetched through ``medmnist`` when installed (``fetch``),
    else a one-line :class:`UserError` saying which file to put where."""
    if data_root is not None and Path(data_root).expanduser().suffix == ".npz":
        f = Path(data_root).expanduser()
        if not f.is_file():
            raise UserError(f"ChestMNIST file {f} does not exist; pass the folder or the .npz you downloaded "
                            f"({FILES[64]} from {DOWNLOAD_PAGE})")
        return f
    root = Path(data_root).expanduser() if data_root is not None else medmnist_root()
    if root.exists() and not root.is_dir():
        raise UserError(f"--data-root {root} is neither a folder nor a .npz file; pass the folder holding {FILES[64]}")
    want = min((s for s in FILES if s >= size), default=None)
    if want is None:
        raise UserError(f"ChestMNIST comes at most at {max(FILES)} px; --image-size {size} is larger, use 224 or less")
    present = {s: root / name for s, name in FILES.items() if (root / name).is_file()}
    larger = sorted(s for s in present if s >= size)
    if larger:
        return present[larger[0]]
    if fetch:
        got = _fetch(root, want)
        if got is not None:
            return got
    found = f" (found only {', '.join(present[s].name for s in sorted(present))}, smaller than {size} px)" if present else ""
    raise UserError(f"no ChestMNIST file for {size} px in {_where(root)}{found}; download {FILES[want]} from {DOWNLOAD_PAGE} "
                    f"(or `pip install medmnist` and rerun to fetch it) and put it in {_where(root)}, or pass "
                    "--data-root DIR with the folder that holds it")


def _fetch(root: Path, size: int) -> Path | None:
    """Fetch ``FILES[size]`` into ``root`` with the ``medmnist`` package; None when it is not installed."""
    try:
        import medmnist  # optional: not a dependency
    except ImportError:
        return None
    ensure_writable_dir(root)
    log.info("fetching %s into %s through medmnist", FILES[size], root)
    try:
        kw = {} if size == 28 else {"size": size}
        medmnist.ChestMNIST(split="test", download=True, root=str(root), **kw)
    except Exception as e:  # noqa: BLE001 - offline, old medmnist, a server error: all mean "put it there yourself"
        raise UserError(f"could not fetch {FILES[size]} through medmnist ({type(e).__name__}: {e}); download it from "
                        f"{DOWNLOAD_PAGE} and put it in {_where(root)}") from None
    f = root / FILES[size]
    return f if f.is_file() else None


# ----------------------------------------------------------------------------------------------
# reading the .npz without loading a 4 GB array: one member at a time, rows in chunks


def _member_header(zf: zipfile.ZipFile, key: str, path: Path):
    try:
        fh = zf.open(f"{key}.npy")
    except KeyError:
        raise UserError(f"{path} has no array {key!r}; expected a MedMNIST file with {', '.join(KEYS)}") from None
    try:
        version = np.lib.format.read_magic(fh)
        read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read is None:
            raise ValueError(f"unsupported .npy version {version}")
        shape, fortran, dtype = read(fh)
    except ValueError as e:
        fh.close()
        raise UserError(f"{path}: array {key!r} is not a .npy array ({e}); download the file again") from None
    if fortran or dtype.hasobject:
        fh.close()
        raise UserError(f"{path}: array {key!r} is stored as {'Fortran-ordered' if fortran else 'objects'}; "
                        "expected MedMNIST's C-ordered numbers; download the file again")
    return fh, tuple(shape), dtype


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise UserError(f"{path} is not a readable .npz file ({e}); download {path.name} again from {DOWNLOAD_PAGE}") from None


def read_layout(path: Path) -> dict[str, tuple[int, int]]:
    """``{split: (n images, S)}`` of a ChestMNIST file, checked: every key present, images uint8
    ``(n, S, S)``, labels ``(n, 14)`` 0/1. Reads only the arrays' headers and the (small) labels."""
    out = {}
    with _open_zip(path) as zf:
        for split in SPLITS:
            fh, shape, dtype = _member_header(zf, f"{split}_images", path)
            fh.close()
            if len(shape) == 4 and shape[-1] == 1:
                shape = shape[:3]
            if len(shape) != 3 or shape[1] != shape[2] or dtype != np.uint8:
                raise UserError(f"{path}: {split}_images is {dtype} {shape}; expected uint8 (n, S, S) grey images "
                                "(ChestMNIST is grey; is this another MedMNIST set?)")
            labels = _labels(zf, split, path)
            if len(labels) != shape[0]:
                raise UserError(f"{path}: {split}_images holds {shape[0]} images but {split}_labels {len(labels)} rows; "
                                "download the file again")
            out[split] = (int(shape[0]), int(shape[1]))
    sizes = {s for _, s in out.values()}
    if len(sizes) != 1:
        raise UserError(f"{path}: the splits have different image sizes {sorted(sizes)}; expected one")
    return out


def _labels(zf: zipfile.ZipFile, split: str, path: Path) -> np.ndarray:
    fh, shape, dtype = _member_header(zf, f"{split}_labels", path)
    with fh:
        n = int(np.prod(shape))
        arr = np.frombuffer(fh.read(n * dtype.itemsize), dtype=dtype)
    if arr.size != n or len(shape) != 2 or shape[1] != len(MEDMNIST_LABELS):
        raise UserError(f"{path}: {split}_labels is {shape}; expected (n, {len(MEDMNIST_LABELS)}) in the order "
                        f"{', '.join(MEDMNIST_LABELS)} (ChestMNIST's 14 labels)")
    arr = arr.reshape(shape)  # (n, 14)
    if not np.isin(arr, (0, 1)).all():
        raise UserError(f"{path}: {split}_labels holds values other than 0 and 1; expected ChestMNIST's multi-label 0/1 table")
    return arr.astype(np.int8)


def label_table(path: Path) -> pd.DataFrame:
    """One row per image in file order (train, val, test): name, split, the 14 NIH pathology
    columns, ``No Finding`` (no positive) and ``patient_id`` (the row: ChestMNIST has no patient ids)."""
    frames = []
    with _open_zip(path) as zf:
        for split in SPLITS:
            lab = _labels(zf, split, path)  # (n, 14) in MEDMNIST_LABELS order
            t = pd.DataFrame(lab, columns=[TO_PATHOLOGY[m] for m in MEDMNIST_LABELS])
            t = t[list(PATHOLOGIES)]
            t[NO_FINDING] = (lab.sum(axis=1) == 0).astype(np.int8)
            t.insert(0, "split", split)
            t.index = pd.Index([f"{split}_{i:06d}" for i in range(len(t))], name="image")
            frames.append(t)
    table = pd.concat(frames)
    table["patient_id"] = np.arange(len(table))
    return table


def _iter_images(path: Path, split: str, n: int, s: int, stop: int | None = None):
    """Chunks of ``CHUNK`` rows ``uint8 (k, s, s)`` of ``split``'s images up to row ``stop`` (a stream: no whole-array load)."""
    stop = n if stop is None else stop
    with _open_zip(path) as zf:
        fh, _, _ = _member_header(zf, f"{split}_images", path)
        with fh:
            for i in range(0, stop, CHUNK):
                k = min(CHUNK, stop - i)
                buf = fh.read(k * s * s)
                if len(buf) != k * s * s:
                    raise UserError(f"{path}: {split}_images ends early (truncated download); download {path.name} again")
                yield np.frombuffer(buf, dtype=np.uint8).reshape(k, s, s)  # (k, s, s)


# ----------------------------------------------------------------------------------------------
# the prepared cache


def cache_location(root: str | os.PathLike, size: int, cache_dir: str | os.PathLike | None = None) -> Path:
    """``ROOT/prepared-chestmnist-S``, or ``CACHE_DIR/prepared/<hash of ROOT>-chestmnist-S``
    (``ROOT``: the folder holding the ``.npz``)."""
    if cache_dir is None:
        return Path(root).expanduser() / f"prepared-chestmnist-{size}"
    return Path(cache_dir).expanduser() / "prepared" / f"{_cache.root_key(root)}-chestmnist-{size}"


def content_hash(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _stat(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _fingerprint(digest: str, size: int) -> str:
    return hashlib.sha1(f"chestmnist-v{FORMAT_VERSION}\0{size}\0{digest}".encode()).hexdigest()


def _current(out: Path, npz: Path, size: int) -> bool:
    """The cache at ``out`` is complete and made from this file's content at this size. A file
    whose size and mtime are as recorded is taken as unchanged; otherwise its bytes are hashed,
    and equal content (a copy, a touch) is the same data: the record is updated, nothing rebuilt."""
    m, src = _read_json(out / _cache.MANIFEST_FILE), _read_json(out / _cache.SOURCES_FILE)
    if m is None or src is None or m.get("kind") != "chestmnist" or m.get("image_size") != size:
        return False
    if src.get("file") == str(npz.resolve()) and src.get("stat") == _stat(npz):
        return m.get("fingerprint") == _fingerprint(src.get("content", ""), size)
    digest = content_hash(npz)
    if m.get("fingerprint") != _fingerprint(digest, size):
        return False
    atomic_write_json(out / _cache.SOURCES_FILE, {**src, "file": str(npz.resolve()), "stat": _stat(npz), "content": digest})
    return True


def prepare(data_root: str | os.PathLike | None, size: int, cache_dir: str | os.PathLike | None = None,
            progress: bool = True) -> Path:
    """Build (or finish, or reuse) the S x S cache of the ChestMNIST file for ``size``; return its folder."""
    _cache.check_size(size)
    npz = find_npz(data_root, size)
    out = cache_location(npz.parent, size, cache_dir)
    if _current(out, npz, size):
        return out
    layout = read_layout(npz)  # checks the file before anything is created
    try:
        ensure_writable_dir(out)
    except UserError as e:
        raise UserError(f"{e} (the prepared cache of {npz} goes to {out}; for a read-only folder pass --cache-dir DIR)") from None
    with _cache._locked(out):  # noqa: SLF001 - the one cache lock: two writers take turns
        if _current(out, npz, size):
            return out
        return _build(npz, out, size, layout, progress)


def _build(npz: Path, out: Path, size: int, layout: dict[str, tuple[int, int]], progress: bool) -> Path:
    digest = content_hash(npz)
    fp = _fingerprint(digest, size)
    n = sum(k for k, _ in layout.values())
    src_px = next(iter(layout.values()))[1]
    state = _read_json(out / STATE_FILE)
    images = out / _cache.IMAGES_FILE
    if state is None or state.get("fingerprint") != fp or not (images.is_file() and images.stat().st_size == n * size * size):
        for f in (_cache.MANIFEST_FILE, _cache.SOURCES_FILE, STATE_FILE):
            (out / f).unlink(missing_ok=True)
        with atomic_path(images) as tmp:
            np.memmap(tmp, dtype=np.uint8, mode="w+", shape=(n, size, size)).flush()  # sparse, zero-filled
        state = {"fingerprint": fp, "done": []}
        atomic_write_json(out / STATE_FILE, state)
    done = set(state["done"])
    mm = np.memmap(images, dtype=np.uint8, mode="r+", shape=(n, size, size))
    try:
        with tqdm(total=n, unit="img", desc=f"prepare chestmnist {size}px", disable=not progress or None) as bar:
            offset = 0
            for split in SPLITS:
                k, _ = layout[split]
                todo = {c for c in range(0, k, CHUNK) if f"{split}:{c}" not in done}
                bar.update(k - sum(min(CHUNK, k - c) for c in todo))
                if todo:  # one pass through the member (a compressed stream cannot seek)
                    for c, arr in zip(range(0, k, CHUNK), _iter_images(npz, split, k, src_px, stop=max(todo) + min(CHUNK, k - max(todo)))):
                        if c not in todo:
                            continue
                        if src_px != size:
                            arr = np.stack([_cache.resize_square(a.astype(np.float32) / 255.0, size) for a in arr])
                        mm[offset + c:offset + c + len(arr)] = arr  # (k, S, S)
                        mm.flush()  # pixels reach the file before the chunk is recorded as done
                        done.add(f"{split}:{c}")
                        atomic_write_json(out / STATE_FILE, {"fingerprint": fp, "done": sorted(done)})
                        bar.update(len(arr))
                offset += k
    finally:
        del mm
    table = label_table(npz)
    table.insert(0, "row", np.arange(n))
    with atomic_path(out / _cache.LABELS_FILE) as tmp:
        table.to_csv(tmp, index_label="image")
    atomic_write_json(out / _cache.SOURCES_FILE, {"file": str(npz.resolve()), "stat": _stat(npz), "content": digest, "size": size})
    atomic_write_text(out / _cache.BAD_FILE, "")
    splits = {s: layout[s][0] for s in SPLITS} | {"unused": 0, "trainval": layout["train"][0] + layout["val"][0]}
    counts = {c: int(table[c].sum()) for c in (*PATHOLOGIES, NO_FINDING)} | {ANY_FINDING: int((table[NO_FINDING] == 0).sum())}
    manifest = {
        "format": _cache.FORMAT_VERSION, "kind": "chestmnist", "fingerprint": fp, "labels_hash": digest,
        "source": {"fingerprint": fp, "labels_hash": digest, "csv": npz.name, "listed": n, "files": 1,
                   "bytes": npz.stat().st_size, "present_only": False, "source_px": src_px},
        "present_only": False, "n_absent": 0, "absent_examples": [], "source_root": str(npz.parent.resolve()),
        "csv": npz.name, "image_size": size, "n_rows": n, "n_images": n, "counts": counts, "splits": splits,
        "bad_images": [], "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_json(out / _cache.MANIFEST_FILE, manifest)  # last: marks the cache complete
    (out / STATE_FILE).unlink(missing_ok=True)
    log.info("prepared %d ChestMNIST images at %d px (from %s, %d px) in %s", n, size, npz.name, src_px, out)
    return out


def write_npz(path: str | os.PathLike, splits: dict[str, tuple[np.ndarray, np.ndarray]], compressed: bool = True) -> Path:
    """Write a file in the MedMNIST layout: ``{split: (uint8 (n, S, S) images, (n, 14) labels)}`` (tests, examples)."""
    arrays = {}
    for split in SPLITS:
        x, y = splits[split]
        arrays[f"{split}_images"] = np.asarray(x, dtype=np.uint8)
        arrays[f"{split}_labels"] = np.asarray(y, dtype=np.uint8)
    path = Path(path)
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return path
