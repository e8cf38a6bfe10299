"""Figures of BOED decisions (paper fig. 5 right and fig. 10).

:func:`plot_decision` draws one scan step as a row: the observations so far, the EIG over the
G x G grid drawn over the mean completion with a red x at the argmax, a few completions each
overlaid with its own information-gain map (eq. 69), and the observations after the scan.
:func:`plot_summary` draws the whole run: the scanned patches (numbered) on the observation and on
the full image, and the classifier probability after each scan. Figures are drawn with the
object-oriented Matplotlib API (no pyplot global state) and written atomically.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from boed.geometry import ScanGeometry
from xray.chestmnist import holds_chestmnist
from xray.errors import UserError
from xray.io import atomic_path, ensure_writable_dir

log = logging.getLogger(__name__)


def _gray(img: torch.Tensor | np.ndarray) -> np.ndarray:
    """uint8 ``(C, S, S)`` or ``(S, S)`` -> float ``(S, S)`` in [0, 1] (first channel)."""
    a = torch.as_tensor(img).detach().cpu()
    if a.dim() == 3:
        a = a[0]
    return a.float().numpy() / (255.0 if a.dtype == torch.uint8 else 1.0)


def grid_extent(geometry: ScanGeometry) -> tuple[float, float, float, float]:
    """imshow ``extent`` that puts grid cell (r, c) on the centre of its patch (cells ``stride`` wide)."""
    S, P, s = geometry.image_size, geometry.patch_size, geometry.stride
    if geometry.grid == 1:
        return (-0.5, S - 0.5, S - 0.5, -0.5)
    lo = P / 2 - s / 2 - 0.5
    hi = S - P / 2 + s / 2 - 0.5
    return (lo, hi, hi, lo)  # left, right, bottom, top (image rows grow downwards)


def patch_centre(geometry: ScanGeometry, loc: int) -> tuple[float, float]:
    """Pixel ``(x, y)`` of the centre of location ``loc``'s patch."""
    t, l, b, r = geometry.box(loc)
    return (l + r) / 2 - 0.5, (t + b) / 2 - 0.5


def draw_observation(ax, x_obs, mask, geometry: ScanGeometry | None = None, locations: Sequence[int] = (),
                     number: bool = False, title: str | None = None) -> None:
    """Observed pixels in gray, unobserved pixels dark blue; scanned boxes outlined (and numbered)."""
    img = _gray(x_obs)
    m = _gray(mask) > 0.5
    rgb = np.stack([img, img, img], -1)
    rgb[~m] = (0.05, 0.07, 0.18)
    ax.imshow(rgb, interpolation="nearest")
    if geometry is not None:
        for i, loc in enumerate(locations):
            t, l, b, r = geometry.box(loc)
            ax.add_patch(Rectangle((l - 0.5, t - 0.5), r - l, b - t, fill=False, ec="tab:orange", lw=1.2))
            if number:
                ax.text(l + 1, t + 1, str(i + 1), color="tab:orange", fontsize=8, va="top", ha="left", weight="bold")
    _clean(ax, title)


def draw_grid_heatmap(ax, image, values, geometry: ScanGeometry, mark: int | None = None, vmax: float | None = None,
                      title: str | None = None, alpha: float = 0.6, cmap: str = "inferno"):
    """``values (L,)`` over the G x G grid drawn on ``image``; a red x on ``mark``. Returns the heatmap artist."""
    ax.imshow(_gray(image), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    grid = geometry.grid_map(torch.as_tensor(values).detach().float().cpu()).numpy()  # (G, G)
    vmax = float(vmax if vmax is not None else max(grid.max(), 1e-12))
    art = ax.imshow(grid, cmap=cmap, alpha=alpha, vmin=0, vmax=vmax, extent=grid_extent(geometry),
                    interpolation="nearest")
    if mark is not None:
        cx, cy = patch_centre(geometry, int(mark))
        ax.plot([cx], [cy], marker="x", color="red", markersize=10, mew=2.5)
    S = geometry.image_size
    ax.set_xlim(-0.5, S - 0.5)
    ax.set_ylim(S - 0.5, -0.5)
    _clean(ax, title)
    return art


def _clean(ax, title: str | None) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8)


def _save(fig: Figure, path: str | os.PathLike, dpi: int) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")


def plot_decision(
    path: str | os.PathLike,
    geometry: ScanGeometry,
    x_obs: torch.Tensor,
    mask: torch.Tensor,
    eig: torch.Tensor,
    info_gain: torch.Tensor,
    samples: torch.Tensor,
    chosen: int,
    x_obs_after: torch.Tensor,
    mask_after: torch.Tensor,
    locations_before: Sequence[int] = (),
    title: str = "",
    n_show: int = 5,
    dpi: int = 110,
) -> None:
    """One scan step as a PNG row (fig. 10): ``x_obs (C,S,S)``, ``mask (1,S,S)``, ``eig (L,)``,
    ``info_gain (L, N)``, ``samples (N, C, S, S)`` uint8, the chosen location and the state after."""
    N = samples.shape[0]
    k = min(n_show, N)
    cols = 3 + k
    fig = Figure(figsize=(1.9 * cols, 2.3))
    axes = fig.subplots(1, cols)
    draw_observation(axes[0], x_obs, mask, geometry, locations_before, title="observed so far")
    mean_img = samples.float().mean(0)  # (C, S, S) pixel-space average of the completions
    art = draw_grid_heatmap(axes[1], mean_img / 255, eig, geometry, mark=chosen,
                            title=f"EIG (max {float(eig.max()):.3g} nats)")
    fig.colorbar(art, ax=axes[1], fraction=0.046, pad=0.02, format="%.2g").ax.tick_params(labelsize=6)
    ig = info_gain.detach().float().cpu()  # (L, N)
    vmax = float(ig[:, :k].max()) if k else None
    for j in range(k):
        draw_grid_heatmap(axes[2 + j], samples[j], ig[:, j], geometry, vmax=vmax, alpha=0.5,
                          title=f"sample {j + 1}: IG")
    draw_observation(axes[-1], x_obs_after, mask_after, geometry, list(locations_before) + [int(chosen)],
                     title="after the scan")
    if title:
        fig.suptitle(title, fontsize=9)
    _save(fig, path, dpi)


def plot_summary(
    path: str | os.PathLike,
    geometry: ScanGeometry,
    x_full: torch.Tensor,
    x_obs: torch.Tensor,
    mask: torch.Tensor,
    locations: Sequence[int],
    probs: Sequence[float],
    gains: Sequence[float],
    illness_name: str,
    target: float | None = None,
    dpi: int = 110,
) -> None:
    """Whole run: numbered scans on the observation and on the full image; p(illness) and EIG per scan.

    ``probs`` has T + 1 entries (t = 0..T), ``gains`` T entries (EIG of each chosen location).
    """
    fig = Figure(figsize=(10, 3.2))
    axes = fig.subplots(1, 3)
    draw_observation(axes[0], x_obs, mask, geometry, locations, number=True, title=f"{len(locations)} scans")
    axes[1].imshow(_gray(x_full), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    for i, loc in enumerate(locations):
        t, l, b, r = geometry.box(loc)
        axes[1].add_patch(Rectangle((l - 0.5, t - 0.5), r - l, b - t, fill=False, ec="tab:orange", lw=1.2))
        axes[1].text(l + 1, t + 1, str(i + 1), color="tab:orange", fontsize=8, va="top", weight="bold")
    _clean(axes[1], "full image (not seen)" if target is None else f"full image, label {illness_name} = {int(target)}")
    ax = axes[2]
    ts = np.arange(len(probs))
    ax.plot(ts, probs, "o-", color="tab:blue", label=f"p({illness_name})")
    ax.set_ylim(0, 1)
    ax.set_xlabel("scans t")
    ax.set_ylabel("probability", color="tab:blue")
    ax.set_xticks(ts)
    ax2 = ax.twinx()
    ax2.bar(ts[1:], gains, color="tab:red", alpha=0.35, width=0.5, label="EIG of scan")
    ax2.set_ylabel("EIG (nats)", color="tab:red")
    ax.set_zorder(ax2.get_zorder() + 1)  # the probability line above the bars
    ax.patch.set_visible(False)
    ax.set_title(f"{illness_name}: classifier after each scan", fontsize=9)
    fig.tight_layout()
    _save(fig, path, dpi)


RUN_OUTPUTS = ("step_*.png", "summary.png", "scans.json")  # what a scan run writes, and so owns, in --out


def scan_out_dir(out: str | Path, data_root: str | Path | None = None) -> Path:
    """The output folder of a scan run, ready to write: refused inside a data folder (``--data-root``,
    or any folder holding an NIH label CSV or a ChestMNIST file: PNGs must not land among x-rays),
    and cleared of what an earlier run wrote there (its ``step_*.png`` of later scans would otherwise
    stay beside the new ones). Other files in it are left alone."""
    p = Path(out).expanduser().resolve()
    roots = [Path(data_root).expanduser().resolve()] if data_root is not None else []
    for folder in (p, *p.parents):
        if folder in roots or (folder.is_dir() and (any(folder.glob("Data_Entry_2017*.csv*")) or holds_chestmnist(folder))):
            raise UserError(f"--out {out} is inside the data folder {folder}; write scans outside it (e.g. --out runs/scan)")
    p = ensure_writable_dir(out)
    stale = [f for pattern in RUN_OUTPUTS for f in p.glob(pattern) if f.is_file()]
    for f in stale:
        f.unlink()
    if stale:
        log.info("removed %d output file(s) of an earlier run in %s", len(stale), p)
    return p
