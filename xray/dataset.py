"""Torch datasets over a prepared cache, and the ``--data`` flags every CLI shares.

``XrayDataset(cache_dir, split)`` yields ``(uint8 (1, S, S), float32 (15,))`` with the 15 =
``xray.labels.LABELS``. ``open_dataset("chestxray", data_root=DIR)``, ``open_dataset("chestmnist",
data_root=DIR)`` (MedMNIST's ``chestmnist_S.npz``, see :mod:`xray.chestmnist`) or
``open_dataset("phantom")`` prepares the cache on first use and reuses it afterwards.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from . import cache as _cache
from . import chestmnist as _chestmnist
from .errors import UserError
from .io import atomic_write_json, ensure_writable_dir
from .labels import LABELS, NO_FINDING, PATHOLOGIES
from .nih import _patient_bucket
from .provenance import digest

log = logging.getLogger(__name__)

DATA_NAMES = ("phantom", "chestxray", "chestmnist")
SPLITS = ("train", "val", "trainval", "test", "all")
DEFAULT_PHANTOM_N = 8000
DEFAULT_PHANTOM_SIZE = 128
DEFAULT_IMAGE_SIZE = 64
DEFAULT_CACHE_DIR = Path("~/.cache/boed")


def labels_matrix(table: pd.DataFrame) -> np.ndarray:
    """Label table (14 pathology columns + "No Finding") -> float32 (n, 15) in ``LABELS`` order."""
    path = table[list(PATHOLOGIES)].to_numpy(dtype=np.float32)  # (n, 14)
    anyf = 1.0 - table[NO_FINDING].to_numpy(dtype=np.float32)  # (n,)
    return np.concatenate([path, anyf[:, None]], axis=1)  # (n, 15)


class XrayDataset(Dataset):
    """One split of a prepared cache: ``ds[i] -> (uint8 (1, S, S), float32 (15,))``.

    ``max_images``: keep at most this many images of the split, whole patients first in a fixed
    pseudo-random patient order (:func:`subset_rows`), so a CPU run uses a small, reproducible and
    patient-disjoint part of a large set; it is part of :attr:`fingerprint`.

    Attributes: ``image_size`` (S), ``names`` (image names), ``labels`` (float32 (n, 15)),
    ``label_names`` (= ``LABELS``), ``indices`` (rows of the cache's memmap), ``table`` (the
    metadata). The memmap opens lazily in each process, so DataLoader workers share the page cache
    instead of pickling pixels.
    """

    def __init__(self, cache_dir: str | os.PathLike, split: str = "train", max_images: int | None = None):
        self.cache_dir = Path(cache_dir).expanduser()
        if split not in SPLITS:
            raise UserError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        check_max_images(max_images)
        self.manifest = _cache.read_manifest(self.cache_dir)
        damage = _cache.check_files(self.cache_dir)  # sizes, labels.csv SHA-256, a few random chunks: ~30 ms at 256 px
        if damage is not None:
            raise UserError(f"prepared cache {self.cache_dir} is damaged: {damage.what}; run `xray prepare` on its data folder "
                            "(or any command with --data-root) to repair it")
        self.split = split
        self.image_size = int(self.manifest["image_size"])
        self._n_rows = int(self.manifest["n_rows"])
        table = pd.read_csv(self.cache_dir / _cache.LABELS_FILE, index_col="image", keep_default_na=False)
        if split == "trainval":
            table = table[table["split"].isin(["train", "val"])]
        elif split != "all":
            table = table[table["split"] == split]
        self.max_images = max_images
        if max_images is not None and max_images < len(table):
            table = table.iloc[subset_rows(table, max_images)]
        self.table = table
        self.names: list[str] = table.index.tolist()
        self.indices: np.ndarray = table["row"].to_numpy(dtype=np.int64)
        self.labels: np.ndarray = labels_matrix(table)
        self.label_names: tuple[str, ...] = LABELS
        self._mm: np.memmap | None = None

    @property
    def fingerprint(self) -> str:
        """What this split's pixels and labels came from: the cache's source identity (every image
        file's name and content SHA-256; a cache made before identities existed keeps its old
        name/size/mtime fingerprint), its label hash (the label CSV and the split lists' bytes), the
        image size, the split and ``max_images`` (see :mod:`xray.provenance`). Content, not file
        times: a byte-identical copy of the data (``cp -r``) is the same data."""
        m = self.manifest
        return digest({"source": m.get("identity") or m.get("fingerprint"), "labels": m.get("labels_hash"), "size": self.image_size,
                       "split": self.split, "n": len(self), "max_images": self.max_images})

    @property
    def order_key(self) -> str:
        """What the training order may depend on: which images (names, in order), their labels,
        the image size, the split and ``max_images``; not when the files were written nor (unlike
        :attr:`fingerprint`) the bytes of each file."""
        return digest({"names": self.names, "labels": self.labels.astype(np.uint8).tobytes().hex(), "size": self.image_size,
                       "split": self.split, "max_images": self.max_images})

    def _images(self) -> np.memmap:
        if self._mm is None:
            S = self.image_size
            self._mm = np.memmap(self.cache_dir / _cache.IMAGES_FILE, dtype=np.uint8, mode="r",
                                 shape=(self._n_rows, S, S))
        return self._mm

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_mm"] = None  # reopen in the worker, never pickle pixels
        return state

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = np.array(self._images()[self.indices[i]])  # (S, S) copy out of the memmap
        return torch.from_numpy(img).unsqueeze(0), torch.from_numpy(self.labels[i].copy())  # (1, S, S), (15,)

    def get_batch(self, idx: Sequence[int]) -> torch.Tensor:
        """uint8 ``(B, 1, S, S)`` for dataset positions ``idx``, read straight from the memmap."""
        rows = self.indices[np.asarray(idx, dtype=np.int64)]
        order = np.argsort(rows, kind="stable")  # sequential reads, then undo the sort
        out = np.empty((len(rows), self.image_size, self.image_size), dtype=np.uint8)
        out[order] = self._images()[rows[order]]  # (B, S, S)
        return torch.from_numpy(out).unsqueeze(1)  # (B, 1, S, S)

    def get_labels(self, idx: Sequence[int]) -> torch.Tensor:
        """float32 ``(B, 15)`` for dataset positions ``idx``."""
        return torch.from_numpy(self.labels[np.asarray(idx, dtype=np.int64)])

    def batches(self, batch_size: int, shuffle: bool = True, generator: torch.Generator | None = None,
                drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of ``(uint8 (B, 1, S, S), float32 (B, 15))`` via :meth:`get_batch`.

        Faster than a DataLoader for these small uint8 images (see benchmarks/bench_dataset.py).
        """
        n = len(self)
        order = torch.randperm(n, generator=generator).numpy() if shuffle else np.arange(n)
        stop = n - n % batch_size if drop_last else n
        for i in range(0, stop, batch_size):
            idx = order[i:i + batch_size]
            yield self.get_batch(idx), self.get_labels(idx)

    def __repr__(self) -> str:
        return f"XrayDataset({str(self.cache_dir)!r}, split={self.split!r}, n={len(self)}, S={self.image_size})"


def check_max_images(max_images) -> None:
    if max_images is not None and (isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1):
        raise UserError(f"--max-images is {max_images!r}; expected a positive number of images (or leave it out for all)")


def subset_rows(table: pd.DataFrame, n: int) -> np.ndarray:
    """Positions of ``n`` rows of ``table`` (in table order): patients in a fixed pseudo-random
    order (a hash of the patient id), all images of a patient before the next one.

    Deterministic, nested (a larger ``n`` keeps every image of a smaller one) and independent of
    which other images are present, so a subset of a partial download is a subset of the full one.
    """
    bucket = _patient_bucket(table["patient_id"].to_numpy(), "subset")
    order = np.lexsort((table.index.to_numpy(dtype=str), bucket))  # by patient bucket, then name
    return np.sort(order[:n])


def prepared_dir(root: str | os.PathLike, size: int, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the cache of ``root`` at ``size`` lives: :func:`xray.cache.cache_location` (``root/prepared-S``,
    or ``cache_dir/prepared/<hash of root>-S``), the same place ``xray prepare`` writes."""
    return _cache.cache_location(root, size, cache_dir)


def phantom_root(cache_dir: str | os.PathLike | None = None, workers: int | None = None, progress: bool = True) -> Path:
    """The default phantom set, generated on first use (into a temp folder, then renamed)."""
    from xray import phantom  # here, not at the top: +0.6-0.75 s (scipy) on `boed`/`ipa_core --help` (measured)

    base = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR).expanduser()
    dst = base / f"phantom-default-v{phantom.PHANTOM_VERSION}"  # a new renderer version never reuses old images
    if dst.is_dir():
        return dst

    ensure_writable_dir(base)
    tmp = Path(tempfile.mkdtemp(dir=base, prefix=f".{dst.name}.tmp-"))
    try:
        log.info("generating the default phantom set (%d images, %d px) in %s", DEFAULT_PHANTOM_N, DEFAULT_PHANTOM_SIZE, dst)
        phantom.generate(tmp, n=DEFAULT_PHANTOM_N, size=DEFAULT_PHANTOM_SIZE, seed=0,
                         workers=None if workers is None else max(workers, 1),
                         prevalence=phantom.DEMO_PREVALENCE, progress=progress)
        try:
            os.rename(tmp, dst)
        except OSError:
            if not dst.is_dir():  # lost a race with another process: theirs is as good
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dst


def open_dataset(data: str, data_root: str | os.PathLike | None = None, size: int = DEFAULT_IMAGE_SIZE,
                 split: str = "train", cache_dir: str | os.PathLike | None = None, workers: int | None = None,
                 progress: bool = True, present_only: bool | None = None, max_images: int | None = None) -> XrayDataset:
    """Open ``data`` ("chestxray" with an NIH-format ``data_root``, "chestmnist" with the folder
    holding MedMNIST's ``chestmnist_S.npz`` (default: medmnist's root), or "phantom") at S = ``size``.

    The prepared cache is :func:`prepared_dir` ``(root, size, cache_dir)``: ``root/prepared-S``
    (what ``xray prepare --root ROOT --size S`` writes), or under ``cache_dir`` when given. Every
    open checks the cache against its source folder (labels, split lists, image files' sizes and
    mtimes; a file whose size or mtime changed has its content compared) and brings it up to date
    when they differ; a missing cache is built. ``present_only``:
    use the listed images that are present (None: as the existing cache was prepared).
    ``max_images`` caps the split (see :class:`XrayDataset`). The default phantom set lives in
    ``cache_dir`` (default ``~/.cache/boed``).
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 4 or size % 4:
        raise UserError(f"image size {size} is not a positive multiple of 4; use e.g. --image-size 64")
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    check_max_images(max_images)
    if data == "chestxray":
        if data_root is None:
            raise UserError("--data chestxray needs --data-root DIR (a folder with Data_Entry_2017*.csv and images/)")
        root = Path(data_root).expanduser()
        if not root.is_dir():
            raise UserError(f"data root {root} is not a folder; pass the NIH-format folder with --data-root")
    elif data == "chestmnist":
        if present_only:
            raise UserError("--present-only is for a partial NIH download; ChestMNIST is one complete file, leave it out")
        out = _chestmnist.prepare(data_root, size, cache_dir=cache_dir, progress=progress)
        return XrayDataset(out, split, max_images=max_images)
    elif data == "phantom":
        root = Path(data_root).expanduser() if data_root is not None else phantom_root(cache_dir, workers, progress)
    else:
        raise UserError(f"unknown data {data!r}; expected one of {', '.join(DATA_NAMES)}")
    out = prepared_dir(root, size, cache_dir)
    _cache.prepare(root, size, out=out, workers=workers, progress=progress, present_only=present_only)
    return XrayDataset(out, split, max_images=max_images)


def data_summary(data: str, data_root: str | os.PathLike | None = None, size: int = DEFAULT_IMAGE_SIZE,
                 cache_dir: str | os.PathLike | None = None, present_only: bool | None = None,
                 max_images: int | None = None) -> dict:
    """What a run used, for summaries: the source, the cache, how many images were listed, prepared,
    absent, and used for training and testing (after ``max_images``); plus a one-line ``text``."""
    train = open_dataset(data, data_root, size, "train", cache_dir, workers=None, progress=False,
                         present_only=present_only, max_images=max_images)
    test = open_dataset(data, data_root, size, "test", cache_dir, progress=False, max_images=max_images)
    m = train.manifest
    listed = int((m.get("source") or {}).get("listed", m["n_rows"]))
    real = data in ("chestxray", "chestmnist")
    out = {"data": {"chestxray": "NIH-format folder", "chestmnist": "ChestMNIST file"}.get(data, "phantom"), "root": m.get("source_root"), "cache": str(train.cache_dir),
           "image_size": train.image_size, "listed": listed, "prepared": int(m["n_images"]),
           "absent": int(m.get("n_absent", 0)), "bad": len(m.get("bad_images", [])), "max_images": max_images,
           "train_images": len(train), "test_images": len(test),
           "train_fingerprint": train.fingerprint, "test_fingerprint": test.fingerprint}
    kind = "real images" if real else "phantom images"
    out["text"] = (f"{out['train_images']} training and {out['test_images']} test {kind} at {train.image_size} px from "
                   f"{out['root']} ({out['prepared']} prepared of {listed} listed"
                   + (f", {out['absent']} absent" if out["absent"] else "") + ")")
    return out


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--data``, ``--data-root``, ``--cache-dir``, ``--image-size``, ``--present-only``,
    ``--max-images`` (shared by every CLI)."""
    g = parser.add_argument_group("data")
    g.add_argument("--data", choices=DATA_NAMES, default="phantom",
                   help="phantom: synthetic set generated on first use; chestxray: NIH-format folder; chestmnist: "
                        "MedMNIST's chestmnist_64/128/224.npz (the NIH images in one small file) (default: phantom)")
    g.add_argument("--data-root", metavar="DIR", default=None,
                   help="NIH-format folder (needed for --data chestxray), or the folder holding chestmnist_S.npz "
                        f"(for --data chestmnist; left out: medmnist's {_chestmnist.DEFAULT_ROOT_TEXT}) (default: none)")
    g.add_argument("--cache-dir", metavar="DIR", default=None,
                   help="folder for prepared caches (as CACHE_DIR/prepared/<hash>-S) and the default phantom set; "
                        f"left out: DATA_ROOT/prepared-S, and {DEFAULT_CACHE_DIR} for the default phantom set (default: none)")
    g.add_argument("--image-size", metavar="S", type=int, default=DEFAULT_IMAGE_SIZE,
                   help=f"image side in pixels, a multiple of 4 (default: {DEFAULT_IMAGE_SIZE})")
    g.add_argument("--present-only", action="store_true", default=None,
                   help="use the listed images that are present and report the absent ones (a partial download); "
                        "without it, a cache prepared with it keeps its mode")
    g.add_argument("--max-images", metavar="N", type=int, default=None,
                   help="use at most N images of each split, whole patients in a fixed order, for a quick CPU run "
                        "(default: none: all)")


def dataset_from_args(args: argparse.Namespace, split: str) -> XrayDataset:
    """:func:`open_dataset` from the flags of :func:`add_data_args`."""
    return open_dataset(args.data, data_root=args.data_root, size=args.image_size, split=split,
                        cache_dir=args.cache_dir, workers=getattr(args, "workers", None),
                        progress=getattr(args, "progress", True), present_only=getattr(args, "present_only", None),
                        max_images=getattr(args, "max_images", None))


def dataset_images(dataset, idx) -> torch.Tensor:
    """Images ``uint8 (len(idx), C, S, S)`` of any dataset: ``get_batch(idx)`` when it has one
    (an :class:`XrayDataset`), else its items' first elements."""
    idx = torch.as_tensor(idx).long().reshape(-1)
    if hasattr(dataset, "get_batch"):
        x = torch.as_tensor(dataset.get_batch(idx.tolist()))
    else:
        x = torch.stack([torch.as_tensor(dataset[int(i)][0]) for i in idx.tolist()])
    if x.dtype != torch.uint8:
        raise UserError(f"dataset images must be uint8, got {x.dtype}; use an xray.dataset split")
    return x  # (B, C, S, S)


DATA_RECORD = "data.json"  # what a training run was trained on (read by `boed run` for its t = 1 draws)


def write_data_record(run_dir: str | os.PathLike, args: argparse.Namespace, train_set) -> None:
    """Record in ``run_dir/data.json`` the data a model is trained on (flags of :func:`add_data_args`,
    the image size and the training split's fingerprint), so later commands can draw from the same data."""
    def resolved(p):
        return None if p is None else str(Path(p).expanduser().resolve())

    atomic_write_json(Path(run_dir) / DATA_RECORD, {
        "data": args.data, "data_root": resolved(args.data_root), "cache_dir": resolved(args.cache_dir),
        "max_images": getattr(args, "max_images", None), "present_only": getattr(args, "present_only", None),
        "image_size": getattr(train_set, "image_size", None), "fingerprint": getattr(train_set, "fingerprint", None)})


DATA_KEYS = ("data", "data_root", "cache_dir")  # the fields of a data record that say where the data is


def _record_files(model_path: str | os.PathLike) -> list[Path]:
    """Where a run may record its training data: the run folder (and its parent when given ``.../model``)."""
    p = Path(model_path)
    dirs = [p] + ([p.parent] if p.name == "model" else [])
    return [d / name for d in dirs for name in (DATA_RECORD, "provenance.json", "train_config.json")]


def recorded_data(model_path: str | os.PathLike) -> dict | None:
    """The training data a model run recorded: ``{"data", "data_root", "cache_dir", "image_size",
    "fingerprint"}`` (missing keys None), or None when the run records nothing.

    Read from ``data.json`` in the run folder (or a ``"data"`` object in ``provenance.json`` /
    ``train_config.json`` there), next to ``model/``.
    """
    import json

    for path in _record_files(model_path):
        if not path.is_file():
            continue
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            raise UserError(f"{path} is not valid JSON; repair it or pass --data-root DIR explicitly") from None
        if isinstance(d, dict) and isinstance(d.get("data"), dict):  # nested: {"data": {...}, ...}
            d = d["data"]
        if isinstance(d, dict) and isinstance(d.get("data"), str):
            rec = {k: d.get(k) for k in (*DATA_KEYS, "image_size", "fingerprint")}
            if rec["data_root"] is not None:
                root = Path(rec["data_root"]).expanduser()
                rec["data_root"] = str(root if root.is_absolute() else (path.parent / root))
            return rec
    return None


def models_data(models: dict[str, str | os.PathLike | None]) -> tuple[dict | None, str | None]:
    """``(record, conflict)`` of the data the models ``{what: run folder}`` record: the one record
    they agree on (or the only one), and a few words naming the first field where two records differ
    (then ``record`` is None)."""
    known = {w: r for w, p in models.items() if p is not None for r in (recorded_data(p),) if r is not None}
    items = list(known.items())
    for (wa, a), (wb, b) in zip(items, items[1:]):
        for k in DATA_KEYS:
            if a[k] != b[k]:
                return None, f"the {wa} run was trained on {k}={a[k]} but the {wb} run on {k}={b[k]}"
    return (items[0][1] if items else None), None


def same_data(args: argparse.Namespace, rec: dict) -> bool:
    """True when the flags name the data folder (or set) the record ``rec`` names."""
    def where(p):
        return None if p is None else str(Path(p).expanduser().resolve())

    return args.data == rec.get("data") and where(args.data_root) == where(rec.get("data_root"))


def data_text(args: argparse.Namespace) -> str:
    """A few words naming the data the flags of :func:`add_data_args` select."""
    if args.data == "phantom" and args.data_root is None:
        return "the default phantom set"
    return f"--data {args.data}" + ("" if args.data_root is None else f" --data-root {args.data_root}")


def use_models_data(args: argparse.Namespace, models: dict[str, str | os.PathLike | None], command: str,
                    required: bool = False) -> dict | None:
    """THE data rule of every command that uses trained models (``args.data`` defaults to None):
    ``--data``/``--data-root`` given win (a warning when the models record other data); otherwise
    the data the models record (their runs' ``data.json``); otherwise, when nothing is recorded,
    the default phantom set, or with ``required`` a one-line error. Fills ``args.data``,
    ``args.data_root`` (and ``args.cache_dir`` when not given) and logs one line saying which data
    is used; returns the models' record (None when there is none or the records disagree)."""
    rec, conflict = models_data(models)
    if args.data is not None or args.data_root is not None:
        if args.data is None:  # MedMNIST's file, or an NIH-format folder
            args.data = "chestmnist" if _chestmnist.holds_chestmnist(args.data_root) else "chestxray"
        if conflict is not None:
            log.warning("%s; %s uses the data given, %s", conflict, command, data_text(args))
        elif rec is not None and not same_data(args, rec):
            log.warning("%s uses %s, but the models were trained on %s; results on other data than the training data "
                        "are not comparable", command, data_text(args), data_text(argparse.Namespace(**rec)))
        else:
            log.info("%s uses %s (given)", command, data_text(args))
        return rec
    if conflict is not None:
        raise UserError(f"{conflict}; pass --data/--data-root to say which data {command} uses")
    if rec is None:
        where = " and ".join(str(p) for p in models.values() if p is not None)
        if required:
            raise UserError(f"the models in {where} do not record the data they were trained on (no {DATA_RECORD}); "
                            "pass --data-root DIR (the NIH-format folder they were trained on), or --data phantom for the "
                            "default phantom set")
        args.data = "phantom"
        log.info("%s uses the default phantom set (the models in %s record no %s; pass --data/--data-root for other data)",
                 command, where, DATA_RECORD)
        return None
    args.data, args.data_root = rec["data"], rec["data_root"]
    if args.cache_dir is None:
        args.cache_dir = rec["cache_dir"]
    log.info("%s uses the models' training data: %s (recorded in their %s)", command, data_text(args), DATA_RECORD)
    return rec


def models_data_help() -> str:
    """The ``--data`` help of a command that follows :func:`use_models_data`."""
    return ("phantom, chestxray or chestmnist (default: the data the models were trained on, as recorded in their runs' "
            f"{DATA_RECORD}; the default phantom set when they record none)")
