"""Posterior coverage of completions: does the ground truth lie among the samples?

Per image, on the UNOBSERVED pixels only (pixel values scaled to [0, 1]):

- best-of-K MSE: min over K completions of the mean squared error to the ground truth. It falls
  with K for a sampler that covers the posterior; a mode-seeking one stays high (paper, LPIPS-GT).
  Estimated from N >= K samples as the mean over the N // K disjoint groups of K.
- diversity: mean over unobserved pixels of the per-pixel standard deviation across samples.

:func:`coverage_study` runs a sampler on images and masks grouped by observed-fraction bin and
returns one row per (bin, K).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor
from tqdm import tqdm

from xray.errors import UserError

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
    from .sampling import sample_completions

    device = model.decoder.gain.device

    def fn(x: Tensor, m: Tensor, n: int, generator: torch.Generator | None) -> Tensor:
        return sample_completions(model, x.to(device), m.to(device), n, t=t, generator=generator,
                                  max_batch=max_batch).cpu()  # (B, N, C, S, S)

    return fn


def bin_masks(n: int, S: int, generator: torch.Generator) -> dict[str, Tensor]:
    """One free-form mask per image for each observed-fraction bin: ``{"0-20%": (n, 1, S, S), ...}``."""
    from .masks import OBSERVED_BINS, bin_name, freeform_masks

    return {bin_name(b): freeform_masks(n, S, generator, observed_range=b) for b in OBSERVED_BINS}


def write_results(rows: list[CoverageRow], out_dir: str | Path, notes: str = "") -> dict[str, Path]:
    """``coverage.csv`` (all rows), ``coverage.png`` (best-of-K MSE against K per bin, and diversity),
    ``coverage.md`` (tables of best-of-K MSE per method and bin, diversity, and ``notes``), written atomically."""
    import csv
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from xray.io import atomic_path, atomic_write_text

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

    fig, axes = plt.subplots(1, len(bins) + 1, figsize=(3.2 * (len(bins) + 1), 3.2), squeeze=False)
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
    plt.close(fig)

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
