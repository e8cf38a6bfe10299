"""One training loop for every model in the toolkit (VAE, IPA partial encoder, AVP classifier).

A model plugs in as a :class:`TrainTask`; :func:`fit` does the rest:

- AdamW with linear warmup, EMA weights, gradient clipping, and update skipping on non-finite or
  huge gradient norms with a rule that cannot deadlock (see :class:`SkipRule`);
- ``run_dir/metrics.jsonl`` (+ tqdm and ``run_dir/train.log``), sample grids in
  ``run_dir/samples/``, test metrics in ``run_dir/eval.json``, the final (EMA) model in
  ``run_dir/model/``;
- atomic checkpoints in ``run_dir/checkpoints/`` (the last two kept) holding model, EMA,
  optimizer, step, every RNG state and the data order: rerunning the same command resumes
  exactly where it stopped, a corrupt latest checkpoint falls back to the previous one;
- multi-process data parallel training when started by ``torchrun`` (gloo on CPU, NCCL on CUDA),
  rank 0 writes.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import random
import re
import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from xray.errors import UserError
from xray.io import atomic_path, atomic_write_json, atomic_write_text, ensure_writable_dir

from . import distributed as dist_utils

log = logging.getLogger(__name__)

CKPT_DIR, CKPT_PATTERN, KEEP_CKPTS = "checkpoints", re.compile(r"^ckpt-(\d{8})\.pt$"), 2
CKPT_FORMAT = 1


# ----------------------------------------------------------------------------------------------
# configuration


@dataclass
class TrainConfig:
    """Optimisation settings (official VD-VAE names where they exist).

    ``batch_size`` is per process (like the official ``n_batch``): ``torchrun --nproc_per_node K``
    trains with K x batch_size images per step. ``grad_clip``/``skip_threshold`` None = off.
    """

    steps: int = 1000
    batch_size: int = 16
    lr: float = 2e-4
    warmup: int = 100
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.9)
    ema_rate: float | None = 0.999
    grad_clip: float | None = 200.0
    skip_threshold: float | None = 400.0
    log_every: int = 50
    sample_every: int = 500
    ckpt_every: int = 500
    seed: int = 0
    num_workers: int = 0
    device: str = "cpu"
    amp: bool = False
    channels_last: bool = False
    # robust skipping: never more than max_skips in a row; the threshold rises to
    # skip_margin x the skip_quantile of the last skip_window norms when the norm level moves up.
    max_skips: int = 10
    skip_window: int = 200
    skip_quantile: float = 0.95
    skip_margin: float = 2.0
    max_nonfinite: int = 50  # consecutive non-finite losses/gradients before giving up

    def __post_init__(self):
        self.betas = tuple(float(b) for b in self.betas)  # JSON gives lists back
        checks = [
            (self.steps >= 0, f"steps must be >= 0, got {self.steps}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.warmup >= 0, f"warmup must be >= 0, got {self.warmup}"),
            (len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"betas must be two numbers in [0, 1), got {self.betas}"),
            (self.ema_rate is None or 0 <= self.ema_rate < 1, f"ema_rate must be in [0, 1) or None, got {self.ema_rate}"),
            (self.grad_clip is None or self.grad_clip > 0, f"grad_clip must be > 0 or None, got {self.grad_clip}"),
            (self.skip_threshold is None or self.skip_threshold > 0, f"skip_threshold must be > 0 or None, got {self.skip_threshold}"),
            (min(self.log_every, self.sample_every, self.ckpt_every) >= 1, "log_every, sample_every and ckpt_every must be >= 1"),
            (self.max_skips >= 0 and self.skip_window >= 1, "max_skips must be >= 0 and skip_window >= 1"),
            (0 < self.skip_quantile <= 1 and self.skip_margin >= 1, "skip_quantile must be in (0, 1] and skip_margin >= 1"),
            (self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UserError(msg)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@runtime_checkable
class TrainTask(Protocol):
    """What :func:`fit` needs from a model. ``model`` holds everything a checkpoint holds."""

    model: nn.Module

    def trainable_parameters(self) -> list[nn.Parameter]: ...

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor], generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        """``batch`` = (uint8 images (B, C, S, S), float labels (B, K)) on the device; ``model`` may be DDP-wrapped."""
        ...

    def on_sample(self, model: nn.Module, step: int, out_png: Path) -> None: ...

    def evaluate(self, model: nn.Module, dataset) -> dict[str, float]: ...

    def save_pretrained(self, model: nn.Module, out_dir: Path) -> None: ...

    # Optional: ``prepare(dataset, generator)`` runs once before step 0 of a fresh run (e.g. to
    # measure input statistics into the model config); ``find_unused_parameters`` (bool) for DDP.


# ----------------------------------------------------------------------------------------------
# update skipping


@dataclass
class SkipRule:
    """Decide whether to apply an update, given its (pre-clip) gradient norm.

    Skip when the norm is non-finite, or when it is above ``max(threshold, margin x quantile q of
    the last `window` finite norms)`` - unless the last ``max_skips`` steps were all skipped, in
    which case the (clipped) update is applied anyway. The official rule (a fixed threshold)
    skips every step forever once the norm settles above it; here the threshold follows the norm
    level within a few steps and the cap bounds any run of skips. Non-finite norms are always
    skipped; ``max_nonfinite`` of them in a row raise (the run has diverged).
    """

    threshold: float | None
    max_skips: int = 10
    window: int = 200
    quantile: float = 0.95
    margin: float = 2.0
    max_nonfinite: int = 50
    history: deque = field(default_factory=deque)
    consecutive: int = 0
    nonfinite_run: int = 0
    skipped: int = 0

    MIN_HISTORY = 8

    def current_threshold(self) -> float:
        if self.threshold is None:
            return math.inf
        if len(self.history) < self.MIN_HISTORY:
            return self.threshold
        return max(self.threshold, self.margin * float(np.quantile(np.asarray(self.history), self.quantile)))

    def __call__(self, norm: float) -> bool:
        """True = skip this update. Updates the state."""
        if not math.isfinite(norm):
            self.nonfinite_run += 1
            self.skipped += 1
            if self.nonfinite_run >= self.max_nonfinite:
                raise FloatingPointError(f"loss or gradient non-finite for {self.nonfinite_run} steps in a row: training diverged; lower the learning rate or check the data")
            return True
        self.nonfinite_run = 0
        skip = norm > self.current_threshold() and self.consecutive < self.max_skips
        self.history.append(norm)
        while len(self.history) > self.window:
            self.history.popleft()
        self.consecutive = self.consecutive + 1 if skip else 0
        self.skipped += int(skip)
        return skip

    def state_dict(self) -> dict:
        return {"history": list(self.history), "consecutive": self.consecutive,
                "nonfinite_run": self.nonfinite_run, "skipped": self.skipped}

    def load_state_dict(self, d: dict) -> None:
        self.history = deque(d["history"])
        self.consecutive, self.nonfinite_run, self.skipped = d["consecutive"], d["nonfinite_run"], d["skipped"]


def warmup_lr(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``cfg.lr`` over ``cfg.warmup`` steps (official schedule), then constant."""
    return cfg.lr * min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else cfg.lr


# ----------------------------------------------------------------------------------------------
# data order


class BatchOrder:
    """Deterministic, resumable batch order: one permutation per epoch from ``(seed, epoch)``.

    With ``world`` processes, each global batch of ``world x batch_size`` positions is cut into
    per-rank slices (what a DistributedSampler does); the last incomplete batch is dropped.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        if n < batch_size * world:
            raise UserError(f"the training set has {n} images, fewer than one batch of {batch_size} x {world} process(es); use a smaller --batch-size or more data")
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.per_epoch = n // (batch_size * world)
        self.epoch, self.pos = 0, 0
        self._perm: np.ndarray | None = None

    def _permutation(self) -> np.ndarray:
        if self._perm is None:
            self._perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        return self._perm

    def next(self) -> np.ndarray:
        """Dataset positions of this rank's next batch."""
        if self.pos >= self.per_epoch:
            self.epoch, self.pos, self._perm = self.epoch + 1, 0, None
        g = self.batch_size * self.world
        start = self.pos * g + self.rank * self.batch_size
        self.pos += 1
        return self._permutation()[start:start + self.batch_size]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, d: dict) -> None:
        self.epoch, self.pos, self._perm = d["epoch"], d["pos"], None


def fetch_batch(dataset, idx: np.ndarray) -> tuple[Tensor, Tensor]:
    """(images, labels) for dataset positions ``idx``; uses ``get_batch``/``get_labels`` when present."""
    if hasattr(dataset, "get_batch") and hasattr(dataset, "get_labels"):
        return dataset.get_batch(idx), dataset.get_labels(idx)
    items = [dataset[int(i)] for i in idx]
    return torch.stack([torch.as_tensor(x) for x, _ in items]), torch.stack([torch.as_tensor(y) for _, y in items])


class _BatchSource(torch.utils.data.Dataset):
    """Each item is one whole batch (so DataLoader workers keep the exact order)."""

    def __init__(self, dataset, order: BatchOrder, count: int):
        self.dataset = dataset
        self.batches = [order.next() for _ in range(count)]

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int):
        return (*fetch_batch(self.dataset, self.batches[i]), self.batches[i])


def iterate_batches(dataset, order: BatchOrder, count: int, num_workers: int) -> Iterator[tuple[Tensor, Tensor, np.ndarray]]:
    """``count`` (images, labels, dataset positions) batches in ``order`` (advancing it), loaded
    in ``num_workers`` worker processes."""
    if num_workers == 0:
        for _ in range(count):
            idx = order.next()
            yield (*fetch_batch(dataset, idx), idx)
        return
    src = _BatchSource(dataset, order, count)
    yield from torch.utils.data.DataLoader(src, batch_size=None, shuffle=False, num_workers=num_workers,
                                           persistent_workers=False, prefetch_factor=4)


def check_batch(images: Tensor, labels: Tensor, idx: np.ndarray) -> None:
    """One-line UserError for NaN/inf in the data (uint8 images cannot hold any)."""
    for name, t in (("images", images), ("labels", labels)):
        if t.is_floating_point() and not torch.isfinite(t).all():
            bad = int(idx[int((~torch.isfinite(t)).flatten(1).any(1).nonzero()[0])])
            raise UserError(f"the training data holds NaN/inf {name} (dataset item {bad}); clean or rebuild the dataset")


# ----------------------------------------------------------------------------------------------
# checkpoints


def _config_dict(model: nn.Module) -> dict | None:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dataclasses.asdict(cfg)


def checkpoint_paths(run_dir: Path) -> list[Path]:
    """Checkpoints of a run, newest first."""
    d = run_dir / CKPT_DIR
    if not d.is_dir():
        return []
    return sorted((p for p in d.iterdir() if CKPT_PATTERN.match(p.name)), reverse=True)


def save_checkpoint(run_dir: Path, state: dict) -> Path:
    """Write ``checkpoints/ckpt-<step>.pt`` atomically; keep the newest :data:`KEEP_CKPTS`."""
    path = run_dir / CKPT_DIR / f"ckpt-{state['step']:08d}.pt"
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    for old in checkpoint_paths(run_dir)[KEEP_CKPTS:]:
        old.unlink(missing_ok=True)
    return path


def load_latest_checkpoint(run_dir: Path) -> dict | None:
    """The newest readable checkpoint; a damaged one is reported and the previous one used."""
    for path in checkpoint_paths(run_dir):
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
            if not isinstance(state, dict) or state.get("format") != CKPT_FORMAT:
                raise ValueError("not a checkpoint written by this trainer")
        except Exception as e:  # truncated zip, unpickling error, ...
            msg = f"checkpoint {path} is damaged ({type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}); falling back to the previous one"
            log.warning(msg)
            warnings.warn(msg, stacklevel=2)
            continue
        state["path"] = str(path)
        return state
    return None


def _merge_model_config(model: nn.Module, saved: dict | None) -> None:
    """Refuse a resume with a different model config; fill fields left None (measured) from the checkpoint."""
    current = _config_dict(model)
    if current is None or saved is None:
        return
    for k in sorted(set(current) | set(saved)):
        a, b = current.get(k), saved.get(k)
        if a is None and b is not None:
            setattr(model.config, k, b)
        elif a != b and not (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and list(a) == list(b)):
            raise UserError(f"the run folder was trained with a different model config ({k} = {b!r}, now {a!r}); use a new --out folder or the original config")


def _rng_state(generator: torch.Generator) -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "generator": generator.get_state()}


def _set_rng_state(d: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(d["torch"])
    np.random.set_state(d["numpy"])
    random.setstate(d["python"])
    if d.get("cuda") is not None and torch.cuda.is_available() and len(d["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(d["cuda"])
    generator.set_state(d["generator"])


# ----------------------------------------------------------------------------------------------
# helpers for tasks


def save_image_grid(images: Tensor, path: str | os.PathLike, nrow: int | None = None, pad: int = 2) -> None:
    """Write uint8 ``(N, C, H, W)`` images (C = 1 or 3) as one PNG grid, atomically."""
    from PIL import Image

    x = images.detach().to("cpu", torch.uint8)
    n, c, h, w = x.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = torch.full((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), 255, dtype=torch.uint8)
    for i in range(n):
        r, k = divmod(i, nrow)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = x[i]
    arr = grid[0].numpy() if c == 1 else grid.permute(1, 2, 0).numpy()  # (H, W) or (H, W, 3)
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")


# ----------------------------------------------------------------------------------------------
# the loop


class EMA:
    """``ema <- rate * ema + (1 - rate) * model`` over the trainable parameters (one fused
    ``_foreach_lerp_``; the pairs are gathered once), buffers copied."""

    def __init__(self, ema: nn.Module, model: nn.Module, rate: float):
        pairs = [(e, m) for e, m in zip(ema.parameters(), model.parameters()) if m.requires_grad]
        self.ema_params, self.model_params = [e for e, _ in pairs], [m for _, m in pairs]
        self.buffers = list(zip(ema.buffers(), model.buffers()))
        self.rate = rate

    @torch.no_grad()
    def update(self) -> None:
        if self.ema_params:
            torch._foreach_lerp_(self.ema_params, self.model_params, 1.0 - self.rate)
        for eb, mb in self.buffers:
            eb.copy_(mb)


def _autocast(device: torch.device, enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


class _MetricLog:
    """Interval means of the step metrics -> metrics.jsonl (rank 0)."""

    def __init__(self, path: Path | None):
        self.path, self.sums, self.count = path, {}, 0

    def add(self, metrics: dict[str, Any]) -> None:
        for k, v in metrics.items():  # tensors stay on the device until the flush
            v = v.detach().float() if isinstance(v, Tensor) else float(v)
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.count += 1

    def flush(self, extra: dict[str, Any]) -> dict[str, Any]:
        keys = sorted(self.sums)
        means = torch.tensor([float(self.sums[k]) / max(self.count, 1) for k in keys], dtype=torch.float64)
        means = dist_utils.all_reduce_mean(means)
        row = {**{k: float(v) for k, v in zip(keys, means)}, **extra}
        self.sums, self.count = {}, 0
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(row, sort_keys=True) + "\n")
        return row


def _truncate_metrics(path: Path, step: int) -> None:
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
def _log_file(run_dir: Path) -> Iterator[None]:
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


def fit(task: TrainTask, train_set, cfg: TrainConfig, run_dir: str | os.PathLike, test_set=None) -> nn.Module:
    """Train ``task.model`` on ``train_set``; resume from ``run_dir`` if it holds checkpoints.

    Returns the EMA model (the raw model when ``cfg.ema_rate`` is None). Under ``torchrun`` every
    process calls this unchanged; rank 0 writes the files.
    """
    run_dir = Path(run_dir)
    with dist_utils.process_group(cfg.device) as ctx:
        rank, world, device = ctx.rank, ctx.world, ctx.device
        if rank != 0:
            return _fit(task, train_set, cfg, run_dir, test_set, rank, world, device)
        ensure_writable_dir(run_dir)
        with _log_file(run_dir):
            return _fit(task, train_set, cfg, run_dir, test_set, rank, world, device)


def _fit(task, train_set, cfg: TrainConfig, run_dir: Path, test_set, rank: int, world: int, device: torch.device) -> nn.Module:
    model: nn.Module = task.model
    if len(train_set) == 0:
        raise UserError("the training set is empty; check --data/--data-root")
    order = BatchOrder(len(train_set), cfg.batch_size, cfg.seed, rank, world)
    generator = torch.Generator(device=device)
    generator.manual_seed(cfg.seed * 1_000_003 + rank)
    torch.manual_seed(cfg.seed)  # identical initialisation of anything a task draws globally
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)

    state = load_latest_checkpoint(run_dir) if run_dir.is_dir() else None
    if state is not None:
        _merge_model_config(model, state.get("model_config"))
    elif hasattr(task, "prepare"):
        task.prepare(train_set, torch.Generator().manual_seed(cfg.seed))

    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    params = [p for p in task.trainable_parameters()]
    if not params:
        raise UserError("the task has no trainable parameters")
    # DDP broadcasts rank 0's weights when it wraps the model: wrap before the EMA copy is taken
    train_model = dist_utils.wrap_ddp(model, device, getattr(task, "find_unused_parameters", False)) if world > 1 else model
    ema = copy.deepcopy(model).eval().requires_grad_(False) if cfg.ema_rate is not None else None
    # foreach: one fused kernel per op over all tensors (PyTorch only picks it itself on CUDA)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, foreach=True)
    skip = SkipRule(cfg.skip_threshold, cfg.max_skips, cfg.skip_window, cfg.skip_quantile, cfg.skip_margin, cfg.max_nonfinite)
    step = 0
    metrics_path = run_dir / "metrics.jsonl"

    if state is not None:
        model.load_state_dict(state["model"])
        if ema is not None:
            ema.load_state_dict(state["ema"] if state.get("ema") is not None else state["model"])
        opt.load_state_dict(state["optimizer"])
        skip.load_state_dict(state["skip"])
        order.load_state_dict(state["data"])
        step = int(state["step"])
        rngs = state["rng"]
        if state.get("world") == world:
            _set_rng_state(rngs[rank], generator)
        else:
            log.warning("resuming with %d processes, the checkpoint was written by %s: noise streams restart", world, state.get("world"))
        if rank == 0:
            log.info("resumed from %s at step %d", state["path"], step)
            _truncate_metrics(metrics_path, step)
            for tmp in (run_dir / CKPT_DIR).glob(".ckpt-*.tmp"):  # left by a kill during a write
                tmp.unlink(missing_ok=True)
        del state

    model.train()
    out_model = ema if ema is not None else model
    ema_updater = EMA(ema, model, cfg.ema_rate) if ema is not None else None

    def checkpoint() -> None:
        rng = dist_utils.gather_objects(_rng_state(generator))
        if rank == 0:
            path = save_checkpoint(run_dir, {
                "format": CKPT_FORMAT, "step": step, "world": world,
                "model": model.state_dict(), "ema": ema.state_dict() if ema is not None else None,
                "optimizer": opt.state_dict(), "skip": skip.state_dict(), "data": order.state_dict(),
                "rng": rng, "model_config": _config_dict(model), "train_config": cfg.to_dict(),
            })
            log.debug("wrote %s", path)
        dist_utils.barrier()

    def sample(step_: int) -> None:
        if rank == 0:
            with torch.no_grad():
                was = out_model.training
                out_model.eval()
                task.on_sample(out_model, step_, run_dir / "samples" / f"step-{step_:08d}.png")
                out_model.train(was)
        dist_utils.barrier()

    if rank == 0:
        atomic_write_json(run_dir / "train_config.json", cfg.to_dict())
        n_train = sum(p.numel() for p in params)
        log.info("training %s: %d trainable parameters, %d images, %d process(es) x batch %d, device %s, steps %d -> %d",
                 type(model).__name__, n_train, len(train_set), world, cfg.batch_size, device, step, cfg.steps)
    mlog = _MetricLog(metrics_path if rank == 0 else None)
    bar = tqdm(total=cfg.steps, initial=step, disable=None if rank == 0 else True, desc="train", dynamic_ncols=True)
    t_last, imgs, start_step = time.perf_counter(), 0, step
    batches = iterate_batches(train_set, order, max(cfg.steps - step, 0), cfg.num_workers)
    try:
        for images, labels, idx in batches:
            check_batch(images, labels, np.asarray(idx))
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            lr = warmup_lr(step, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            with _autocast(device, cfg.amp):
                loss, metrics = task.loss(train_model, (images, labels), generator)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # even when non-finite: under DDP every rank must join the all-reduce
            norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or math.inf, foreach=True))
            if not math.isfinite(float(loss.detach())):
                norm = math.nan
            norm = dist_utils.max_scalar(norm) if world > 1 else norm  # same skip decision on every rank
            threshold = skip.current_threshold()
            skipped = skip(norm)
            if skipped and rank == 0 and (skip.skipped <= 10 or skip.skipped % 100 == 0):
                log.warning("step %d: update skipped (gradient norm %.4g, threshold %.4g; %d skipped so far)",
                            step + 1, norm, threshold, skip.skipped)
            if not skipped:
                opt.step()
                if ema_updater is not None:
                    ema_updater.update()
            step += 1
            imgs += len(images)
            mlog.add({"loss": loss.detach(), "grad_norm": norm if math.isfinite(norm) else 0.0, **metrics})
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                now = time.perf_counter()
                row = mlog.flush({"step": step, "lr": lr, "skipped": skip.skipped, "epoch": order.epoch,
                                  "images_per_s": imgs * world / max(now - t_last, 1e-9), "time": time.time()})
                t_last, imgs = now, 0
                bar.set_postfix(loss=f"{row['loss']:.4f}", gnorm=f"{row['grad_norm']:.1f}", skip=skip.skipped)
                if rank == 0:
                    log.info("step %d: %s", step, " ".join(f"{k}={v:.4g}" for k, v in row.items() if k not in ("step", "time")))
            if step % cfg.sample_every == 0:
                sample(step)
            if step % cfg.ckpt_every == 0 or step == cfg.steps:
                checkpoint()
    finally:
        bar.close()
    if step % cfg.sample_every and step > start_step:
        sample(step)  # the final model's samples too

    if rank == 0:
        task.save_pretrained(out_model, run_dir / "model")
        if test_set is not None and len(test_set):
            with torch.no_grad():
                results = task.evaluate(out_model, test_set)
            atomic_write_json(run_dir / "eval.json", {"step": step, **results})
            log.info("test metrics at step %d: %s", step, " ".join(f"{k}={v:.4g}" for k, v in results.items()))
    dist_utils.barrier()
    return out_model


# ----------------------------------------------------------------------------------------------
# command-line flags


def add_train_args(parser: argparse.ArgumentParser, defaults: TrainConfig, note: str = "") -> None:
    """Add ``--steps --batch-size --lr ...`` with ``defaults`` shown in the help (``note`` follows
    each default, e.g. " with --config tiny"). Flags left out keep the defaults passed to
    :func:`train_config_from_args`."""
    g = parser.add_argument_group("training")
    d = defaults

    def opt_float(s: str) -> float | None:
        return None if s.lower() in ("none", "off") else float(s)

    g.add_argument("--steps", type=int, default=None, help=f"total optimiser steps (default {d.steps}{note})")
    g.add_argument("--batch-size", type=int, default=None, help=f"images per step per process (default {d.batch_size}{note})")
    g.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default {d.lr}{note})")
    g.add_argument("--warmup", type=int, default=None, help=f"linear warmup steps (default {d.warmup}{note})")
    g.add_argument("--weight-decay", type=float, default=None, help=f"AdamW weight decay (default {d.weight_decay}{note})")
    g.add_argument("--ema-rate", type=opt_float, default=argparse.SUPPRESS, help=f"EMA rate, or 'none' (default {d.ema_rate}{note})")
    g.add_argument("--grad-clip", type=opt_float, default=argparse.SUPPRESS, help=f"gradient norm clip, or 'none' (default {d.grad_clip}{note})")
    g.add_argument("--skip-threshold", type=opt_float, default=argparse.SUPPRESS, help=f"skip updates with a larger gradient norm, or 'none' (default {d.skip_threshold}{note})")
    g.add_argument("--log-every", type=int, default=None, help=f"steps between metric rows (default {d.log_every}{note})")
    g.add_argument("--sample-every", type=int, default=None, help=f"steps between sample grids (default {d.sample_every}{note})")
    g.add_argument("--ckpt-every", type=int, default=None, help=f"steps between checkpoints (default {d.ckpt_every}{note})")
    g.add_argument("--seed", type=int, default=None, help=f"random seed (default {d.seed}{note})")
    g.add_argument("--num-workers", type=int, default=None, help=f"data loading processes (default {d.num_workers}{note})")
    g.add_argument("--device", default=None, help=f"cpu, cuda, cuda:1, mps ... (default {d.device}{note})")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (CUDA)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None, help="channels_last memory format")


_FLAG_FIELDS = ("steps", "batch_size", "lr", "warmup", "weight_decay", "ema_rate", "grad_clip", "skip_threshold",
                "log_every", "sample_every", "ckpt_every", "seed", "num_workers", "device", "amp", "channels_last")


def train_config_from_args(args: argparse.Namespace, defaults: TrainConfig) -> TrainConfig:
    """``defaults`` overridden by the flags the user gave."""
    given = {}
    for k in _FLAG_FIELDS:
        v = getattr(args, k, None)
        if v is not None or k in ("ema_rate", "grad_clip", "skip_threshold") and hasattr(args, k):
            given[k] = v  # the three optional floats are absent unless given ('none' -> None)
    return dataclasses.replace(defaults, **given)
