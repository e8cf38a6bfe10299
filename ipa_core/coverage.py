"""Posterior coverage of completions: does the ground truth lie among the samples?

Per image, on the UNOBSERVED pixels only (pixel values scaled to [0, 1]):

- best-of-K MSE: min over K completions of the mean squared error to the ground truth. It falls
  with K for a sampler that covers the posterior; a mode-seeking one stays high (paper, LPIPS-GT).
  Estimated from N >= K samples as the mean over the N // K disjoint groups of K.
- diversity: mean over unobserved pixels of the per-pixel standard deviation across samples.

:func:`coverage_study` runs a sampler on images and masks grouped by observed-fraction bin and
returns one row per (bin, K). :func:`completion_quality` compares several completers on the same
partially observed states with the same seeds (best-of-K MSE, mean MSE, mean pairwise distance
between completions: :func:`pairwise_distance`); ``boed study completers`` uses it.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from matplotlib.figure import Figure
from torch import Tensor
from tqdm import tqdm

from xray.errors import UserError
from xray.io import atomic_path, atomic_write_text

from .masks import OBSERVED_BINS, bin_name, freeform_masks
from .sampling import sample_completions

# (x_obs uint8 (B, C, S, S), m (B, 1, S, S), n, generator) -> uint8 (B, N, C, S, S)
SampleFn = Callable[[Tensor, Tensor, int, torch.Generator], Tensor]


def _unobserved(m: Tensor, like: Tensor) -> Tensor:
    """Weights ``(B, 1, 1, S, S)`` = 1 on unobserved pixels."""
    return (m < 0.5).to(like.dtype)[:, None]  # (B, 1, 1, S, S)


def per_sample_mse(samples: Tensor, x: Tensor, m: Tensor) -> Tensor:
    """MSE on the unobserved pixels per image and sample: ``(B, N)``; NaN where nothing is unobserved.

    ``samples`` uint8 ``(B, N, C, S, S)``, ``x`` uint8 ``(B, C, S, S)``, ``m`` ``(B, 1, S, S)``.
    """
    if samples.dim() != 5 or tuple(samples.shape[2:]) != tuple(x.shape[1:]) or samples.shape[0] != x.shape[0]:
        raise UserError(f"samples {tuple(samples.shape)} do not match images {tuple(x.shape)}; expected (B, N, C, S, S)")
    s = samples.float() / 255.0
    err = (s - x.float()[:, None] / 255.0) ** 2  # (B, N, C, S, S)
    w = _unobserved(m, err)
    count = w.sum(dim=(2, 3, 4)) * x.shape[1]  # (B, 1) unobserved values per image
    total = (err * w).sum(dim=(2, 3, 4))  # (B, N)
    return total / count  # NaN (0/0) when fully observed


def best_of_k_mse(samples: Tensor, x: Tensor, m: Tensor, k: int) -> Tensor:
    """Best-of-K MSE on unobserved pixels per image ``(B,)``, averaged over the N // K groups of K samples."""
    mse = per_sample_mse(samples, x, m)  # (B, N)
    B, N = mse.shape
    if not 1 <= k <= N:
        raise UserError(f"best-of-{k} needs at least {k} samples, got {N}")
    groups = mse[:, : (N // k) * k].reshape(B, N // k, k)  # (B, groups, K)
    return groups.min(dim=2).values.mean(dim=1)


def diversity(samples: Tensor, m: Tensor) -> Tensor:
    """Mean per-pixel std across samples on the unobserved pixels, in [0, 1] units: ``(B,)``."""
    s = samples.float() / 255.0  # (B, N, C, S, S)
    std = s.std(dim=1, unbiased=False)[:, None] if s.shape[1] > 1 else torch.zeros_like(s[:, :1])  # (B, 1, C, S, S)
    w = _unobserved(m, s).expand_as(std)
    return (std * w).sum(dim=(1, 2, 3, 4)) / w.sum(dim=(1, 2, 3, 4))


@dataclass
class CoverageRow:
    method: str
    bin: str
    k: int
    best_of_k_mse: float
    best_of_k_mse_se: float  # standard error over images
    diversity: float
    n_images: int


def coverage_study(sample_fn: SampleFn, method: str, images: Tensor, masks_by_bin: dict[str, Tensor],
                   ks: Sequence[int] = (1, 10, 100), batch_size: int = 4,
                   generator: torch.Generator | None = None, progress: bool = True) -> list[CoverageRow]:
    """Rows of best-of-K MSE and diversity per bin for one sampler.

    ``images`` uint8 ``(B, C, S, S)``; ``masks_by_bin[name]`` ``(B, 1, S, S)`` (1 = observed), one
    mask per image. Draws ``max(ks)`` completions per image, ``batch_size`` images per call.
    """
    n = max(ks)
    rows: list[CoverageRow] = []
    for name, masks in masks_by_bin.items():
        if masks.shape[0] != images.shape[0]:
            raise UserError(f"bin {name}: {masks.shape[0]} masks for {images.shape[0]} images")
        best = {k: [] for k in ks}
        div = []
        for start in tqdm(range(0, images.shape[0], batch_size), desc=f"{method} {name}", disable=None if progress else True, leave=False):
            x, m = images[start:start + batch_size], masks[start:start + batch_size]
            samples = sample_fn(x, m, n, generator).cpu()  # (b, N, C, S, S)
            for k in ks:
                best[k].append(best_of_k_mse(samples, x.cpu(), m.cpu(), k))
            div.append(diversity(samples, m.cpu()))
        d = torch.cat(div)
        for k in ks:
            v = torch.cat(best[k])
            v, dk = v[~v.isnan()], d[~d.isnan()]
            se = float(v.std() / len(v) ** 0.5) if len(v) > 1 else float("nan")
            rows.append(CoverageRow(method, name, k, float(v.mean()), se, float(dk.mean()), len(v)))
    return rows


def ipa_sampler(model, t: float | Sequence[float] = 1.0, max_batch: int | None = 64) -> SampleFn:
    """A :data:`SampleFn` drawing IPA completions (observed pixels pasted back), ``max_batch`` rows per decoder pass."""
    device = model.decoder.gain.device

    def fn(x: Tensor, m: Tensor, n: int, generator: torch.Generator | None) -> Tensor:
        return sample_completions(model, x.to(device), m.to(device), n, t=t, generator=generator,
                                  max_batch=max_batch).cpu()  # (B, N, C, S, S)

    return fn


def bin_masks(n: int, S: int, generator: torch.Generator) -> dict[str, Tensor]:
    """One free-form mask per image for each observed-fraction bin: ``{"0-20%": (n, 1, S, S), ...}``."""
    return {bin_name(b): freeform_masks(n, S, generator, observed_range=b) for b in OBSERVED_BINS}


def write_results(rows: list[CoverageRow], out_dir: str | Path, notes: str = "") -> dict[str, Path]:
    """``coverage.csv`` (all rows), ``coverage.png`` (best-of-K MSE against K per bin, and diversity),
    ``coverage.md`` (tables of best-of-K MSE per method and bin, diversity, and ``notes``), written atomically."""
    out = Path(out_dir)
    fields = [f.name for f in dataclasses.fields(CoverageRow)]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(fields)
    for r in rows:
        w.writerow([getattr(r, f) if not isinstance(getattr(r, f), float) else f"{getattr(r, f):.6g}" for f in fields])
    atomic_write_text(out / "coverage.csv", buf.getvalue())

    methods = list(dict.fromkeys(r.method for r in rows))
    bins = list(dict.fromkeys(r.bin for r in rows))
    ks = sorted({r.k for r in rows})
    get = {(r.method, r.bin, r.k): r for r in rows}

    fig = Figure(figsize=(3.2 * (len(bins) + 1), 3.2))  # no pyplot: no global backend or figure registry
    axes = fig.subplots(1, len(bins) + 1, squeeze=False)
    for ax, b in zip(axes[0], bins):
        for mth in methods:
            pts = [(k, get[(mth, b, k)]) for k in ks if (mth, b, k) in get]
            ax.errorbar([k for k, _ in pts], [r.best_of_k_mse for _, r in pts], yerr=[r.best_of_k_mse_se for _, r in pts],
                        marker="o", capsize=2, label=mth)
        ax.set_xscale("log")
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.minorticks_off()
        ax.set_title(f"observed {b}")
        ax.set_xlabel("K")
    axes[0][0].set_ylabel("best-of-K MSE (unobserved pixels)")
    axes[0][0].legend(fontsize=7)
    ax = axes[0][-1]
    width = 0.8 / max(len(methods), 1)
    for i, mth in enumerate(methods):
        ax.bar([j + i * width for j in range(len(bins))], [get[(mth, b, ks[0])].diversity for b in bins], width, label=mth)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(bins))], bins, rotation=45, fontsize=7)
    ax.set_title("diversity (per-pixel std)")
    fig.tight_layout()
    with atomic_path(out / "coverage.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)

    lines = ["# Posterior coverage of IPA completions", "", notes.strip(), "",
             "Best-of-K MSE on the unobserved pixels (pixel values in [0, 1]; mean over images, +- standard error):", ""]
    lines.append("| method | observed | " + " | ".join(f"K={k}" for k in ks) + " | diversity |")
    lines.append("|---|---|" + "---|" * (len(ks) + 1))
    for mth in methods:
        for b in bins:
            cells = [f"{get[(mth, b, k)].best_of_k_mse:.4f} +- {get[(mth, b, k)].best_of_k_mse_se:.4f}" if (mth, b, k) in get else "" for k in ks]
            lines.append(f"| {mth} | {b} | " + " | ".join(cells) + f" | {get[(mth, b, ks[0])].diversity:.4f} |")
    atomic_write_text(out / "coverage.md", "\n".join(lines) + "\n")
    return {"csv": out / "coverage.csv", "png": out / "coverage.png", "md": out / "coverage.md"}


# ----------------------------------------------------------------------------------------------
# completion quality of several completers on the same states (the completer study)


def pairwise_distance(samples: Tensor, m: Tensor) -> Tensor:
    """Mean over pairs ``i < j`` of the RMS difference of completions i and j on the unobserved
    pixels, in [0, 1] units: ``(B,)``. 0 when all samples are identical (or N = 1); NaN where
    nothing is unobserved."""
    B, N = samples.shape[:2]
    if N < 2:
        return torch.zeros(B)
    s = samples.float().flatten(2) / 255.0  # (B, N, C*S*S)
    w = _unobserved(m, s).expand(B, 1, samples.shape[2], *samples.shape[-2:]).flatten(1)  # (B, C*S*S)
    count = w.sum(1)  # (B,) unobserved values per image
    total = torch.zeros(B)
    for i in range(N - 1):  # exact differences (a Gram-matrix shortcut loses identical pairs to rounding)
        d2 = ((s[:, i + 1:] - s[:, i:i + 1]) ** 2 * w[:, None]).sum(-1)  # (B, N - 1 - i)
        total += (d2 / count[:, None]).sqrt().sum(1)
    return total / (N * (N - 1) / 2)  # (B,); NaN where nothing is unobserved


@dataclass
class QualityRow:
    completer: str
    n_images: int
    n_samples: int  # K of best-of-K
    best_mse: float  # mean over images of min over the K completions of the unobserved-pixel MSE
    best_mse_se: float
    mean_mse: float  # mean over images and completions (the error of a typical completion)
    pairwise: float  # mean pairwise RMS distance between completions (diversity)
    pairwise_se: float
    pixel_std: float  # mean per-pixel std across completions (:func:`diversity`)


def completion_quality(completers: dict[str, SampleFn], images: Tensor, masks: Tensor, n_samples: int = 10,
                       seed: int = 0, batch_size: int = 8, progress: bool = True) -> list[QualityRow]:
    """Best-of-``n_samples`` MSE and diversity of every completer on the SAME partially observed states.

    ``images`` uint8 ``(B, C, S, S)``; ``masks`` ``(B, 1, S, S)`` (1 = observed). Each completer is
    a :data:`SampleFn` given the observations ``x * m`` (never the hidden pixels) and, for the
    images ``[i, i + batch_size)``, a generator seeded from ``(seed, i)``: the same seeds for
    every completer. Metrics are on the unobserved pixels only; images with nothing unobserved are
    skipped. One row per completer, in the order given.
    """
    if masks.shape[0] != images.shape[0] or masks.shape[-2:] != images.shape[-2:]:
        raise UserError(f"{tuple(masks.shape)} masks for {tuple(images.shape)} images; expected one (1, S, S) mask per image")
    if n_samples < 1:
        raise UserError(f"best-of-K needs K >= 1 completions, got {n_samples}")
    rows = []
    for name, fn in completers.items():
        best, mean, pair, std = [], [], [], []
        for start in tqdm(range(0, images.shape[0], batch_size), desc=f"quality {name}", disable=None if progress else True, leave=False):
            x, m = images[start:start + batch_size], masks[start:start + batch_size].float()
            x_obs = x * (m > 0.5).to(x.dtype)  # (b, C, S, S) what the completer may see
            g = torch.Generator().manual_seed(seed * 1_000_003 + start)
            s = fn(x_obs, m, n_samples, g).cpu()  # (b, N, C, S, S)
            if s.shape[:2] != (x.shape[0], n_samples) or s.dtype != torch.uint8:
                raise UserError(f"completer {name} returned {tuple(s.shape)} {s.dtype}; expected uint8 ({x.shape[0]}, {n_samples}, C, S, S)")
            mse = per_sample_mse(s, x, m)  # (b, N)
            best.append(mse.min(1).values)
            mean.append(mse.mean(1))
            pair.append(pairwise_distance(s, m))
            std.append(diversity(s, m))
        b, mn, p, sd = (torch.cat(v) for v in (best, mean, pair, std))
        ok = ~b.isnan()
        b, mn, p, sd = b[ok], mn[ok], p[ok], sd[ok]
        k = int(ok.sum())

        def se(v: Tensor) -> float:
            return float(v.std() / k ** 0.5) if k > 1 else float("nan")

        rows.append(QualityRow(name, k, n_samples, float(b.mean()), se(b), float(mn.mean()), float(p.mean()), se(p), float(sd.mean())))
    return rows
