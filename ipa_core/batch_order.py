"""The training data order: a pure function of (seed, epoch, position, world size, dataset
data key), so a checkpoint needs only the step to resume it, with or without worker processes.

    order = BatchOrder(len(train_set), batch_size=8, seed=0, rank=0, world=1, fingerprint=data_order_key(train_set))
    idx = order.indices(k)          # dataset positions of this rank's share of global batch k
    epoch, pos = order.position(k)  # k = epoch * per_epoch + pos
"""

from __future__ import annotations

import hashlib
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from xray.errors import UserError


def data_order_key(dataset) -> str | None:
    """The dataset's key for the training order: ``order_key`` (which images and labels, not file
    mtimes; :class:`xray.dataset.XrayDataset`), else ``fingerprint``, else None."""
    return getattr(dataset, "order_key", None) or getattr(dataset, "fingerprint", None)


class BatchOrder:
    """Global batch ``k`` is batch ``k % per_epoch`` of the permutation of epoch ``k // per_epoch``,
    drawn from ``(seed, epoch, data key)`` (:func:`data_order_key`). With ``world`` processes each global batch of
    ``world x batch_size`` positions is cut into per-rank slices (what a DistributedSampler does);
    the last incomplete batch of an epoch is dropped.

    ``next()``/``state_dict()``/``load_state_dict()`` walk the same sequence with a counter.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1, fingerprint: str | None = None):
        if n < batch_size * world:
            raise UserError(f"the training set has {n} images, fewer than one batch of {batch_size} x {world} process(es); use a smaller --batch-size or more data")
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.per_epoch = n // (batch_size * world)
        # the data enter the order too: another dataset of the same size is never shuffled alike
        self._data_key = int.from_bytes(hashlib.blake2b(str(fingerprint).encode(), digest_size=4).digest(), "little") if fingerprint else 0
        self._cached: tuple[int, np.ndarray] | None = None
        self.k = 0  # the counter of next()

    def permutation(self, epoch: int) -> np.ndarray:
        """The permutation of dataset positions for ``epoch`` (the last one is cached)."""
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, np.random.default_rng([self.seed, epoch, self._data_key]).permutation(self.n))
        return self._cached[1]

    def position(self, k: int) -> tuple[int, int]:
        """(epoch, batch within the epoch) of global batch ``k``."""
        return divmod(k, self.per_epoch)

    def indices(self, k: int) -> np.ndarray:
        """Dataset positions of this rank's share of global batch ``k`` (k = 0, 1, ...)."""
        epoch, pos = self.position(k)
        start = pos * self.batch_size * self.world + self.rank * self.batch_size
        return self.permutation(epoch)[start:start + self.batch_size]

    def next(self) -> np.ndarray:
        idx = self.indices(self.k)
        self.k += 1
        return idx

    @property
    def epoch(self) -> int:
        """The epoch of the last batch handed out (0 before the first)."""
        return self.position(max(self.k - 1, 0))[0]

    def state_dict(self) -> dict:
        """Where the next batch comes from: ``{"epoch", "pos", "batch"}`` (batch = epoch x per_epoch + pos)."""
        epoch, pos = self.position(self.k)
        return {"epoch": epoch, "pos": pos, "batch": self.k}

    def load_state_dict(self, d: dict) -> None:
        self.k = int(d["epoch"]) * self.per_epoch + int(d["pos"])
        if "batch" in d and int(d["batch"]) != self.k:
            raise UserError(f"the saved data position (epoch {d['epoch']}, batch {d['pos']}) is batch {self.k} with "
                            f"{self.per_epoch} batches per epoch, not {d['batch']}; the data or batch size changed: pass --restart")


def fetch_batch(dataset, idx: np.ndarray) -> tuple[Tensor, Tensor]:
    """(images, labels) for dataset positions ``idx``; uses ``get_batch``/``get_labels`` when present."""
    if hasattr(dataset, "get_batch") and hasattr(dataset, "get_labels"):
        return dataset.get_batch(idx), dataset.get_labels(idx)
    items = [dataset[int(i)] for i in idx]
    return torch.stack([torch.as_tensor(x) for x, _ in items]), torch.stack([torch.as_tensor(y) for _, y in items])


class _BatchSource(torch.utils.data.Dataset):
    """Item ``i`` is the whole global batch ``start + i`` of this rank; workers compute the
    indices themselves from the pure order, so nothing is drawn ahead in the main process."""

    def __init__(self, dataset, order: BatchOrder, start: int, count: int):
        self.dataset, self.order, self.start, self.count = dataset, order, start, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int):
        idx = self.order.indices(self.start + i)
        return (*fetch_batch(self.dataset, idx), idx)


def iterate_batches(dataset, order: BatchOrder, start: int, count: int, num_workers: int = 0) -> Iterator[tuple[Tensor, Tensor, np.ndarray]]:
    """Global batches ``start .. start + count - 1`` as (images, labels, dataset positions),
    loaded in ``num_workers`` worker processes (the same batches in the same order for any number)."""
    if count <= 0:
        return
    src = _BatchSource(dataset, order, start, count)
    if num_workers == 0:
        yield from (src[i] for i in range(count))
        return
    yield from torch.utils.data.DataLoader(src, batch_size=None, shuffle=False, num_workers=num_workers,
                                           persistent_workers=False, prefetch_factor=4)


def check_batch(images: Tensor, labels: Tensor, idx: np.ndarray) -> None:
    """One-line UserError for NaN/inf in the data (uint8 images cannot hold any)."""
    for name, t in (("images", images), ("labels", labels)):
        if t.is_floating_point() and not torch.isfinite(t).all():
            bad = int(idx[int((~torch.isfinite(t)).flatten(1).any(1).nonzero()[0])])
            raise UserError(f"the training data holds NaN/inf {name} (dataset item {bad}); clean or rebuild the dataset")
