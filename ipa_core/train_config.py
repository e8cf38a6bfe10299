"""Training settings (:class:`TrainConfig`), the task protocol, the learning-rate schedule and the
shared ``--steps --batch-size ... --restart`` flags of every training command."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from xray.cli_base import finite_float, format_default
from xray.errors import UserError

DEFAULT_DEVICE = "auto"


@dataclass
class TrainConfig:
    """Optimisation settings (official VD-VAE names where they exist).

    ``batch_size`` is per process (like the official ``n_batch``): ``torchrun --nproc_per_node K``
    trains with K x batch_size images per step. ``grad_clip``/``skip_threshold`` None = off.
    ``restart`` moves an existing run folder aside (``<run>.old-<time>``) and starts at step 0.
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
    device: str = DEFAULT_DEVICE
    amp: bool = False
    channels_last: bool = False
    # robust skipping: never more than max_skips in a row; the threshold rises to
    # skip_margin x the skip_quantile of the last skip_window norms when the norm level moves up.
    max_skips: int = 10
    skip_window: int = 200
    skip_quantile: float = 0.95
    skip_margin: float = 2.0
    max_nonfinite: int = 50  # consecutive non-finite losses/gradients before giving up
    restart: bool = False

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

    def provenance(self) -> dict:
        """The fields that change the trained weights (see :data:`RESULT_FIELDS`)."""
        d = self.to_dict()
        return {k: d[k] for k in RESULT_FIELDS}


# What a resume must keep equal. Left out on purpose: ``steps`` (training on is legitimate, the
# schedule does not depend on it), the logging/sample/checkpoint intervals, ``num_workers``
# (the batch order does not depend on it), ``device`` and ``channels_last`` (same maths; a run may
# move to another machine) and ``restart``. ``amp`` stays in: bf16 changes the numbers.
RESULT_FIELDS = ("seed", "batch_size", "lr", "warmup", "weight_decay", "betas", "ema_rate", "grad_clip",
                 "skip_threshold", "max_skips", "skip_window", "skip_quantile", "skip_margin", "max_nonfinite", "amp")


@runtime_checkable
class TrainTask(Protocol):
    """What :func:`ipa_core.trainer.fit` needs from a model. ``model`` holds everything a checkpoint holds."""

    model: nn.Module

    def trainable_parameters(self) -> list[nn.Parameter]: ...

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor], generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        """``batch`` = (uint8 images (B, C, S, S), float labels (B, K)) on the device; ``model`` may be DDP-wrapped."""
        ...

    def on_sample(self, model: nn.Module, step: int, out_png: Path) -> None: ...

    def evaluate(self, model: nn.Module, dataset) -> dict[str, float]: ...

    def save_pretrained(self, model: nn.Module, out_dir: Path) -> None: ...

    # Optional: ``prepare(dataset, generator)`` runs once before step 0 of a fresh run (e.g. to
    # measure input statistics into the model config); ``find_unused_parameters`` (bool) for DDP;
    # ``provenance() -> dict`` (JSON-able task settings and digests of upstream models), stored in
    # every checkpoint and compared on resume.


def warmup_lr(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``cfg.lr`` over ``cfg.warmup`` steps (official schedule), then constant."""
    return cfg.lr * min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else cfg.lr


# ----------------------------------------------------------------------------------------------
# command-line flags


def add_train_args(parser: argparse.ArgumentParser, defaults: TrainConfig, note: str = "") -> None:
    """Add ``--steps --batch-size --lr ... --restart`` with ``defaults`` shown in the help (``note``
    follows each default, e.g. " with --config tiny"). Flags left out keep the defaults passed to
    :func:`train_config_from_args`."""
    g = parser.add_argument_group("training")
    d = defaults

    def said(v) -> str:  # as help texts write a default; 10**9 steps between events means never
        return "never" if isinstance(v, int) and not isinstance(v, bool) and v >= 10**9 else format_default(v)

    g.add_argument("--steps", type=int, default=None, help=f"total optimiser steps; a finished run trains on to a larger value (default: {said(d.steps)}{note})")
    g.add_argument("--batch-size", type=int, default=None, help=f"images per step per process (default: {said(d.batch_size)}{note})")
    g.add_argument("--lr", type=finite_float(0, 1, lo_open=True), default=None, help=f"peak learning rate (default: {said(d.lr)}{note})")
    g.add_argument("--warmup", type=int, default=None, help=f"linear warmup steps (default: {said(d.warmup)}{note})")
    g.add_argument("--weight-decay", type=finite_float(0), default=None, help=f"AdamW weight decay (default: {said(d.weight_decay)}{note})")
    g.add_argument("--ema-rate", type=finite_float(0, 1, hi_open=True, none=True), default=argparse.SUPPRESS, help=f"EMA rate, or 'none' (default: {said(d.ema_rate)}{note})")
    g.add_argument("--grad-clip", type=finite_float(0, lo_open=True, none=True), default=argparse.SUPPRESS, help=f"gradient norm clip, or 'none' (default: {said(d.grad_clip)}{note})")
    g.add_argument("--skip-threshold", type=finite_float(0, lo_open=True, none=True), default=argparse.SUPPRESS, help=f"skip updates with a larger gradient norm, or 'none' (default: {said(d.skip_threshold)}{note})")
    g.add_argument("--log-every", type=int, default=None, help=f"steps between metric rows (default: {said(d.log_every)}{note})")
    g.add_argument("--sample-every", type=int, default=None, help=f"steps between sample grids (default: {said(d.sample_every)}{note})")
    g.add_argument("--ckpt-every", type=int, default=None, help=f"steps between checkpoints (default: {said(d.ckpt_every)}{note})")
    g.add_argument("--seed", type=int, default=None, help=f"random seed (default: {said(d.seed)}{note})")
    g.add_argument("--num-workers", type=int, default=None, help=f"data loading processes (default: {said(d.num_workers)}{note})")
    g.add_argument("--device", default=None, help=f"auto, cpu, cuda, cuda:1, mps ... (default: {said(d.device)}{note})")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (CUDA)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None, help="channels_last memory format")
    g.add_argument("--restart", action="store_true", default=False,
                   help="move an existing run folder aside (to <out>.old-<time>) and train from step 0; without it a "
                        "rerun resumes, and refuses when a setting that changes the result differs (default: off)")


_FLAG_FIELDS = ("steps", "batch_size", "lr", "warmup", "weight_decay", "ema_rate", "grad_clip", "skip_threshold",
                "log_every", "sample_every", "ckpt_every", "seed", "num_workers", "device", "amp", "channels_last", "restart")


def train_config_from_args(args: argparse.Namespace, defaults: TrainConfig) -> TrainConfig:
    """``defaults`` overridden by the flags the user gave."""
    given = {}
    for k in _FLAG_FIELDS:
        v = getattr(args, k, None)
        if v is not None or k in ("ema_rate", "grad_clip", "skip_threshold") and hasattr(args, k):
            given[k] = v  # the three optional floats are absent unless given ('none' -> None)
    return dataclasses.replace(defaults, **given)
