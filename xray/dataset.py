"""Torch datasets over a prepared cache, and the ``--data`` flags every CLI shares.

``XrayDataset(cache_dir, split)`` yields ``(uint8 (1, S, S), float32 (15,))`` with the 15 =
``xray.labels.LABELS``. ``open_dataset("chestxray", data_root=DIR)`` or ``open_dataset("phantom")``
prepares the cache on first use and reuses it afterwards.
"""

from __future__ import annotations

import argparse
import hashlib
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
from .errors import UserError
from .io import ensure_writable_dir
from .labels import LABELS, NO_FINDING, PATHOLOGIES

log = logging.getLogger(__name__)

DATA_NAMES = ("phantom", "chestxray")
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

    Attributes: ``image_size`` (S), ``names`` (image names), ``labels`` (float32 (n, 15)),
    ``label_names`` (= ``LABELS``), ``indices`` (rows of the cache's memmap), ``table`` (the
    metadata). The memmap opens lazily in each process, so DataLoader workers share the page cache
    instead of pickling pixels.
    """

    def __init__(self, cache_dir: str | os.PathLike, split: str = "train"):
        self.cache_dir = Path(cache_dir).expanduser()
        if split not in SPLITS:
            raise UserError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        self.manifest = _cache.read_manifest(self.cache_dir)
        self.split = split
        self.image_size = int(self.manifest["image_size"])
        self._n_rows = int(self.manifest["n_rows"])
        table = pd.read_csv(self.cache_dir / _cache.LABELS_FILE, index_col="image", keep_default_na=False)
        if split == "trainval":
            table = table[table["split"].isin(["train", "val"])]
        elif split != "all":
            table = table[table["split"] == split]
        self.table = table
        self.names: list[str] = table.index.tolist()
        self.indices: np.ndarray = table["row"].to_numpy(dtype=np.int64)
        self.labels: np.ndarray = labels_matrix(table)
        self.label_names: tuple[str, ...] = LABELS
        self._mm: np.memmap | None = None

    @property
    def fingerprint(self) -> str:
        """What this split's pixels and labels came from: the cache's source fingerprint, its
        label hash, the image size and the split (see :mod:`xray.provenance`)."""
        from .provenance import digest

        m = self.manifest
        return digest({"source": m.get("fingerprint"), "labels": m.get("labels_hash"), "size": self.image_size,
                       "split": self.split, "n": len(self)})

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


def _root_key(root: Path) -> str:
    return hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:12]


def prepared_dir(root: str | os.PathLike, size: int, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where :func:`open_dataset` keeps the cache of ``root`` at ``size``."""
    base = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR).expanduser()
    return base / "prepared" / f"{_root_key(Path(root).expanduser())}-{size}"


def phantom_root(cache_dir: str | os.PathLike | None = None, workers: int | None = None, progress: bool = True) -> Path:
    """The default phantom set, generated on first use (into a temp folder, then renamed)."""
    from xray import phantom  # lazy: the renderer is only needed here

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
                 progress: bool = True) -> XrayDataset:
    """Open ``data`` ("chestxray" with an NIH-format ``data_root``, or "phantom") at S = ``size``.

    The prepared cache lives in ``<cache_dir>/prepared/<hash of root>-<size>`` (default cache_dir
    ``~/.cache/boed``): built on first use, reused afterwards.
    """
    if not isinstance(size, int) or size < 4 or size % 4:
        raise UserError(f"image size {size} is not a positive multiple of 4; use e.g. --image-size 64")
    if data == "chestxray":
        if data_root is None:
            raise UserError("--data chestxray needs --data-root DIR (a folder with Data_Entry_2017*.csv and images/)")
        root = Path(data_root).expanduser()
        if not root.is_dir():
            raise UserError(f"data root {root} is not a folder; pass the NIH-format folder with --data-root")
    elif data == "phantom":
        root = Path(data_root).expanduser() if data_root is not None else phantom_root(cache_dir, workers, progress)
    else:
        raise UserError(f"unknown data {data!r}; expected one of {', '.join(DATA_NAMES)}")
    out = prepared_dir(root, size, cache_dir)
    if not _cache.is_complete(out):
        _cache.prepare(root, size, out=out, workers=workers, progress=progress)
    return XrayDataset(out, split)


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--data``, ``--data-root``, ``--cache-dir``, ``--image-size`` (shared by every CLI)."""
    g = parser.add_argument_group("data")
    g.add_argument("--data", choices=DATA_NAMES, default="phantom",
                   help="phantom: synthetic set generated on first use; chestxray: NIH-format folder (default: phantom)")
    g.add_argument("--data-root", metavar="DIR", default=None, help="NIH-format folder (needed for --data chestxray)")
    g.add_argument("--cache-dir", metavar="DIR", default=None, help=f"where prepared caches live (default: {DEFAULT_CACHE_DIR})")
    g.add_argument("--image-size", metavar="S", type=int, default=DEFAULT_IMAGE_SIZE,
                   help=f"image side in pixels, a multiple of 4 (default: {DEFAULT_IMAGE_SIZE})")


def dataset_from_args(args: argparse.Namespace, split: str) -> XrayDataset:
    """:func:`open_dataset` from the flags of :func:`add_data_args`."""
    return open_dataset(args.data, data_root=args.data_root, size=args.image_size, split=split,
                        cache_dir=args.cache_dir, workers=getattr(args, "workers", None),
                        progress=getattr(args, "progress", True))


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
