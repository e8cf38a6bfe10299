"""The training record: interval means of step metrics in ``metrics.jsonl`` and a ``train.log``."""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor

from xray.io import atomic_write_text

from . import distributed as dist_utils


class MetricLog:
    """Interval means of the step metrics -> metrics.jsonl (rank 0; ``path`` None elsewhere)."""

    def __init__(self, path: Path | None):
        self.path, self.sums, self.count = path, {}, 0

    def add(self, metrics: dict[str, Any]) -> None:
        for k, v in metrics.items():  # tensors stay on the device until the flush
            v = v.detach().float() if isinstance(v, Tensor) else float(v)
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.count += 1

    def flush(self, extra: dict[str, Any]) -> dict[str, Any]:
        """Append one row (means over processes too, plus ``extra``) and start a new interval."""
        keys = sorted(self.sums)
        means = torch.tensor([float(self.sums[k]) / max(self.count, 1) for k in keys], dtype=torch.float64)
        means = dist_utils.all_reduce_mean(means)
        row = {**{k: float(v) for k, v in zip(keys, means)}, **extra}
        self.sums, self.count = {}, 0
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(row, sort_keys=True) + "\n")
        return row


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric rows past the checkpoint (and any half-written last line)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("step", 0) <= step:
            keep.append(line)
    atomic_write_text(path, "".join(l + "\n" for l in keep))


@contextlib.contextmanager
def log_file(run_dir: Path) -> Iterator[None]:
    """Copy INFO+ log records to ``run_dir/train.log`` while training (root logger restored after)."""
    root = logging.getLogger()
    h = logging.FileHandler(run_dir / "train.log")
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    h.setLevel(logging.INFO)
    old_level, old_handler_levels = root.level, {o: o.level for o in root.handlers}
    if root.level > logging.INFO:  # console handlers keep showing only what they showed before
        for o in root.handlers:
            o.setLevel(max(o.level, old_level))
        root.setLevel(logging.INFO)
    root.addHandler(h)
    try:
        yield
    finally:
        root.removeHandler(h)
        root.setLevel(old_level)
        for o, level in old_handler_levels.items():
            o.setLevel(level)
        h.close()
