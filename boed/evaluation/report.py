"""From evaluation records to the paper's numbers and figures.

Every number is a mean over the evaluation's repeats (policy seeds) and every interval a two-level
bootstrap 95 % CI (resample repeats, then the test images shared by them; :mod:`boed.metrics`).
Records of methods that do not depend on the repeat (``repeat`` None, e.g. the full image) are
used for every repeat.

- ``metrics.csv`` (columns ``CSV_COLUMNS``): every method scored on each task with that task's own
  scan locations, t = 0..T: AUROC with CI and between-repeat sd, NLL with CI, n images, R repeats.
- ``auroc.png`` (paper fig. 5 left) and ``nll.png`` (fig. 8 top): one panel per task, one line per
  method with its interval band.
- ``paired.csv`` + ``paired.png``: EIG-IPA minus every other method on the same images and
  repeats, per t = 1..T and averaged over t = 2..T (row ``t = "2-T"``: t = 1 is shared by
  construction between the EIG methods, so it is left out of the average), with paired two-level
  bootstrap 95 % CIs (columns ``PAIRED_COLUMNS``).
- ``cross_task.csv`` + ``cross_task_<method>.png`` (fig. 9): scan with task A's locations (columns),
  score task B (rows), AUROC after T scans; cell colour = distance to the best cell of its row.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from matplotlib.figure import Figure

from xray.io import atomic_path, atomic_write_text
from xray.labels import resolve_illness

from .methods import METHODS
from .metrics import capture_ratio, paired_auroc_diff, summarize

log = logging.getLogger(__name__)

CSV_COLUMNS = ("method", "illness", "t", "auroc", "auroc_lo", "auroc_hi", "auroc_sd_repeats", "nll", "nll_lo", "nll_hi",
               "n", "repeats")
PAIRED_COLUMNS = ("method", "baseline", "illness", "t", "diff", "diff_lo", "diff_hi", "diff_sd_repeats", "p_above", "n",
                  "repeats")
CROSS_COLUMNS = ("method", "scan_task", "score_task", "t", "auroc", "auroc_lo", "auroc_hi", "auroc_sd_repeats", "nll",
                 "n", "repeats")
METHOD_ORDER = tuple(METHODS)  # legend order
METHOD_LABELS = {name: m.label for name, m in METHODS.items()}
METHOD_STYLE = {name: m.style for name, m in METHODS.items()}


def _order(methods: Iterable[str]) -> list[str]:
    ms = list(dict.fromkeys(methods))
    return sorted(ms, key=lambda m: (METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER), m))


def _repeat(rec: dict):
    return rec.get("repeat", 0)


def _by_repeat(records: Sequence[dict], method: str, task: str | None, own_task_only: bool = False) -> dict:
    """``{repeat: {index: record}}`` of ``method`` scanned for ``task`` (task-free records too,
    unless ``own_task_only``)."""
    out: dict = {}
    for r in records:
        if r["method"] == method and (r["task"] == task or (r["task"] is None and not own_task_only)):
            out.setdefault(_repeat(r), {})[r["index"]] = r
    return out


def _aligned(tables: Sequence[dict]) -> tuple[list, list[int]]:
    """Common repeats (a table with the single repeat None, i.e. repeat-free, fits any) and the
    images every repeat of every table scored."""
    own = [set(t) for t in tables if set(t) != {None}]
    reps = sorted(set.intersection(*own)) if own else [None]
    images = None
    for t in tables:
        for r in (reps if set(t) != {None} else [None]):
            idx = set(t.get(r, {}))
            images = idx if images is None else images & idx
    return reps, sorted(images or ())


def _scores(table: dict, reps: list, images: list[int], ts: Sequence[int], ill) -> np.ndarray:
    """``(R, T, n)`` illness probabilities of ``images`` at the scan counts ``ts``."""
    rows = []
    for r in reps:
        recs = table[r] if r in table else table[None]
        probs = np.array([[recs[i]["probs"][t] for i in images] for t in ts], dtype=np.float64)  # (T, n, K)
        rows.append(ill.prob(probs))  # (T, n)
    return np.stack(rows)  # (R, T, n)


def _labels(table: dict, reps: list, images: list[int], ill) -> np.ndarray:
    recs = table[reps[0]] if reps[0] in table else table[None]
    return ill.target(np.array([recs[i]["labels"] for i in images], dtype=np.float64).reshape(len(images), -1))  # (n,)


def _score(table: dict, task: str, t: int, n_boot: int, seed: int, warned: set | None = None) -> dict:
    ill = resolve_illness(task)
    reps, images = _aligned([table])
    y = _labels(table, reps, images, ill) if images else np.zeros(0)
    if images and y.min(initial=1) == y.max(initial=0) and (warned is None or ill.name not in warned):
        if warned is not None:
            warned.add(ill.name)
        log.warning("AUROC of %s is undefined: all %d evaluated images have label %d; reported as NaN", ill.name, len(y), int(y[0]))
    p = _scores(table, reps, images, [t], ill)[:, 0] if images else np.zeros((1, 0))  # (R, n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # reported once above
        s = summarize(y, p, n_boot=n_boot, seed=seed)
    return s.to_dict()


def metric_rows(records: Sequence[dict], tasks: Sequence[str], scans: int, n_boot: int = 1000, seed: int = 0) -> list[dict]:
    """One row per (method, task, t): each method scored on ``task`` with ``task``'s own locations."""
    rows, warned = [], set()
    for task in tasks:
        task = resolve_illness(task).name
        for method in _order(r["method"] for r in records):
            table = _by_repeat(records, method, task)
            if not table:
                continue
            for t in range(scans + 1):
                rows.append({"method": method, "illness": task, "t": t, **_score(table, task, t, n_boot, seed, warned)})
    return rows


def mean_label(scans: int, first: int = 2) -> str:
    """The ``t`` value of the rows averaged over t = first..T."""
    return f"{first}-{scans}"


def paired_rows(records: Sequence[dict], tasks: Sequence[str], scans: int, method: str = "eig-ipa",
                n_boot: int = 1000, seed: int = 0) -> list[dict]:
    """``AUROC(method) - AUROC(baseline)`` for every other method, on the images and repeats both scored.

    One row per (baseline, task, t) for t = 1..T, then (when T >= 2) one with ``t =
    mean_label(T)`` = "2-T": the difference averaged over t = 2..T (t = 1 is shared by
    construction among the EIG methods; its own row shows it).
    """
    rows = []
    for task in tasks:
        task = resolve_illness(task).name
        ill = resolve_illness(task)
        ours = _by_repeat(records, method, task)
        for base in _order(r["method"] for r in records):
            theirs = _by_repeat(records, base, task)
            if base == method or not ours or not theirs or scans < 1:
                continue
            reps, common = _aligned([ours, theirs])
            if not common:
                continue
            y = _labels(ours, reps, common, ill)  # (n,)
            spans = [([t], t) for t in range(1, scans + 1)]
            if scans >= 2:
                spans.append((list(range(2, scans + 1)), mean_label(scans)))
            for ts, label in spans:
                d = paired_auroc_diff(y, _scores(ours, reps, common, ts, ill), _scores(theirs, reps, common, ts, ill),
                                      n_boot=n_boot, seed=seed)
                rows.append({"method": method, "baseline": base, "illness": task, "t": label, "diff": d.diff,
                             "diff_lo": d.lo, "diff_hi": d.hi, "diff_sd_repeats": d.sd_repeats, "p_above": d.p_above,
                             "n": d.n, "repeats": d.repeats})
    return rows


CAPTURE_COLUMNS = ["method", "base", "reference", "illness", "t", "gain", "gain_lo", "gain_hi", "room", "room_lo",
                   "room_hi", "capture", "capture_lo", "capture_hi", "n", "repeats"]


def capture_rows(records: Sequence[dict], tasks: Sequence[str], scans: int, method: str = "eig-ipa",
                 base: str = "uncond", reference: str = "clairvoyant", n_boot: int = 1000, seed: int = 0) -> list[dict]:
    """How much of the room ``reference - base`` the ``method`` recovers (:func:`.metrics.capture_ratio`),
    over t = 2..T (t = 1 is shared by the EIG methods and Uncond), on the images and repeats all
    three scored; one row per task. Empty unless all three methods were evaluated."""
    rows = []
    if scans < 2:
        return rows
    for task in tasks:
        ill = resolve_illness(task)
        tables = [_by_repeat(records, m, ill.name) for m in (method, base, reference)]
        if not all(tables):
            continue
        reps, common = _aligned(tables)
        if not common:
            continue
        ts = list(range(2, scans + 1))
        y = _labels(tables[0], reps, common, ill)  # (n,)
        c = capture_ratio(y, *(_scores(tb, reps, common, ts, ill) for tb in tables), n_boot=n_boot, seed=seed)
        rows.append({"method": method, "base": base, "reference": reference, "illness": ill.name,
                     "t": mean_label(scans), **{k: v for k, v in c.to_dict().items()}})
    return rows


PAIRED_CAPTION = ("bars: paired 95 % bootstrap interval of the difference (repeats, then images), each method "
                  "shifted a little along t; above 0: EIG-IPA scores the better AUROC, 0 = a tie")


def plot_paired(rows: Sequence[dict], path: str | Path) -> Path:
    """AUROC(EIG-IPA) - AUROC(baseline) against t with paired 95 % intervals; 0 = a tie. The
    intervals are error bars dodged along t (filled bands of five baselines pile up into one grey
    area), explained by a caption."""
    curves = [{"method": r["baseline"], "illness": r["illness"], "t": r["t"], "diff": r["diff"], "diff_lo": r["diff_lo"],
               "diff_hi": r["diff_hi"]} for r in rows if isinstance(r["t"], int)]
    return plot_curves(curves, "diff", path, zero_line=True, bands="bars", caption=PAIRED_CAPTION)


def cross_task_rows(records: Sequence[dict], tasks: Sequence[str], scans: int, n_boot: int = 1000, seed: int = 0) -> list[dict]:
    """One row per (task-dependent method, scan task A, score task B) after ``scans`` scans (fig. 9)."""
    tasks = [resolve_illness(t).name for t in tasks]
    rows, warned = [], set()
    for method in _order(r["method"] for r in records if r["task"] is not None):
        for a in tasks:
            table = _by_repeat(records, method, a, own_task_only=True)
            if not table:
                continue
            for b in tasks:
                rows.append({"method": method, "scan_task": a, "score_task": b, "t": scans,
                             **_score(table, b, scans, n_boot, seed, warned)})
    return rows


def to_csv(rows: Sequence[dict], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow([f"{r[c]:.6f}" if isinstance(r[c], float) else r[c] for c in columns])
    return buf.getvalue()


def format_table(rows: Sequence[dict], t: int | None = None) -> str:
    """A plain-text table of AUROC [CI], its between-repeat sd and NLL, for the terminal."""
    lines = [f"{'method':<13} {'illness':<14} {'t':>2}  {'AUROC':>6} {'95% CI':>15} {'sd(R)':>6}  {'NLL':>6}  {'n':>5} {'R':>3}"]
    for r in rows:
        if t is not None and r["t"] != t:
            continue
        lines.append(f"{r['method']:<13} {r['illness']:<14} {r['t']:>2}  {r['auroc']:6.3f} "
                     f"[{r['auroc_lo']:.3f}, {r['auroc_hi']:.3f}] {r.get('auroc_sd_repeats', float('nan')):6.3f}  "
                     f"{r['nll']:6.3f}  {r['n']:>5} {r.get('repeats', 1):>3}")
    return "\n".join(lines)


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


METRIC_LABELS = {"auroc": "AUROC", "nll": "NLL (nats)", "diff": "AUROC(EIG-IPA) - AUROC(method)"}


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def curves_figure(rows: Sequence[dict], metric: str, zero_line: bool = False, bands: str = "fill", caption: str | None = None):
    """The figure of :func:`plot_curves`. ``bands``: "fill" (shaded 95 % bands) or "bars" (error
    bars, each method shifted a little along t so that they never cover each other). A panel (or a
    figure) with no finite value says so in words instead of being empty; a method with none is
    marked "(no data)" in the legend."""
    name = METRIC_LABELS.get(metric, metric)
    tasks = list(dict.fromkeys(r["illness"] for r in rows))
    fig = Figure(figsize=(3.6 * max(1, len(tasks)), 3.2 + (0.3 if caption else 0)), layout="constrained")
    axes = fig.subplots(1, max(1, len(tasks)), squeeze=False)[0]
    lo, hi = f"{metric}_lo", f"{metric}_hi"
    for ax, task in zip(axes, tasks):
        methods = _order(r["method"] for r in rows if r["illness"] == task)
        for j, method in enumerate(methods):
            rs = sorted((r for r in rows if r["illness"] == task and r["method"] == method), key=lambda r: r["t"])
            t = np.asarray([r["t"] for r in rs], dtype=float)
            y = [r[metric] for r in rs]
            color, ls = METHOD_STYLE.get(method, (None, "-"))
            label = METHOD_LABELS.get(method, method) + ("" if any(_finite(v) for v in y) else " (no data)")
            has_band = bool(rs) and lo in rs[0] and all(_finite(r[lo]) and _finite(r[hi]) for r in rs)
            if bands == "bars":
                t = t + 0.5 * (j - (len(methods) - 1) / 2) / max(len(methods), 1)  # dodge: never on top of each other
                if has_band:
                    err = np.array([[r[metric] - r[lo] for r in rs], [r[hi] - r[metric] for r in rs]])  # (2, T)
                    ax.errorbar(t, y, yerr=np.abs(err), fmt=ls, color=color, marker="o", ms=3, lw=1, elinewidth=0.8,
                                capsize=2, label=label)
                    continue
            ax.plot(t, y, ls, color=color, marker="o", ms=3, label=label)
            if has_band and bands == "fill":
                ax.fill_between(t, [r[lo] for r in rs], [r[hi] for r in rs], color=color, alpha=0.15, lw=0)
        if not any(_finite(r[metric]) for r in rows if r["illness"] == task):
            ax.text(0.5, 0.5, f"no data: no finite {name}\n(a test set with one class only?\nsee metrics.csv)",
                    ha="center", va="center", transform=ax.transAxes, fontsize=8, color="0.3")
        if zero_line:
            ax.axhline(0.0, color="0.3", lw=0.8)
        ax.set_title(task)
        ax.set_xlabel("scans t")
        ax.set_xticks(range(min((r["t"] for r in rows), default=0), max((r["t"] for r in rows), default=0) + 1))
        ax.grid(alpha=0.3)
    if not tasks:
        axes[0].text(0.5, 0.5, f"no data: no {name} values to plot", ha="center", va="center",
                     transform=axes[0].transAxes, fontsize=8, color="0.3")
    axes[0].set_ylabel(name)
    if any(ax.get_legend_handles_labels()[0] for ax in axes):
        axes[-1].legend(fontsize=7, loc="best")
    if caption:
        fig.suptitle(caption, fontsize=6.5, wrap=True)
    return fig


def plot_curves(rows: Sequence[dict], metric: str, path: str | Path, zero_line: bool = False, bands: str = "fill",
                caption: str | None = None) -> Path:
    """AUROC or NLL (or any ``metric`` with ``_lo``/``_hi``) against t, one panel per illness, one
    line (with CI band) per method (:func:`curves_figure`)."""
    _save(curves_figure(rows, metric, zero_line, bands, caption), Path(path))
    return Path(path)


def plot_cross_task(rows: Sequence[dict], method: str, path: str | Path) -> Path:
    """Fig. 9: AUROC of score task (rows) with scan task's locations (columns).

    As in the paper, colour intensity is the cell's distance below the best cell of its row (white = best).
    """
    rs = [r for r in rows if r["method"] == method]
    scan = list(dict.fromkeys(r["scan_task"] for r in rs))
    score = list(dict.fromkeys(r["score_task"] for r in rs))
    M = np.full((len(score), len(scan)), np.nan)  # (rows = score task, cols = scan task)
    for r in rs:
        M[score.index(r["score_task"]), scan.index(r["scan_task"])] = r["auroc"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # rows of NaN (a task with one class)
        gap = M - np.nanmax(M, axis=1, keepdims=True)  # 0 at the best cell of each row
    fig = Figure(figsize=(1.2 * len(scan) + 2, 1.0 * len(score) + 1.5), layout="constrained")
    ax = fig.subplots()
    finite = np.isfinite(gap)
    vmax = max(1e-3, float(-gap[finite].min())) if finite.any() else 1.0
    ax.imshow(np.where(finite, -gap, np.nan), cmap="Reds", aspect="auto", vmin=0, vmax=vmax)  # white = row best
    for i in range(len(score)):
        for j in range(len(scan)):
            dark = finite[i, j] and -gap[i, j] > 0.6 * vmax
            ax.text(j, i, f"{M[i, j]:.3f}", ha="center", va="center", fontsize=8, color="white" if dark else "black")
    ax.set_xticks(range(len(scan)), scan, rotation=30, ha="right")
    ax.set_yticks(range(len(score)), score)
    ax.set_xlabel("locations chosen for task")
    ax.set_ylabel("classification task")
    t = rs[0]["t"] if rs else 0
    ax.set_title(f"{METHOD_LABELS.get(method, method)}: AUROC after {t} scans", fontsize=9)
    _save(fig, Path(path))
    return Path(path)


def write_report(out_dir: str | Path, records: Sequence[dict], tasks: Sequence[str], scans: int,
                 n_boot: int = 1000, seed: int = 0, cross_task: bool = False) -> list[dict]:
    """Write metrics.csv, auroc.png, nll.png, paired.{csv,png} (when EIG-IPA and another method were
    evaluated), capture.csv (when EIG-IPA, Uncond and the clairvoyant reference were) and the
    cross-task files; returns the metric rows."""
    out = Path(out_dir)
    rows = metric_rows(records, tasks, scans, n_boot, seed)
    atomic_write_text(out / "metrics.csv", to_csv(rows, CSV_COLUMNS))
    plot_curves(rows, "auroc", out / "auroc.png")
    plot_curves(rows, "nll", out / "nll.png")
    paired = paired_rows(records, tasks, scans, n_boot=n_boot, seed=seed)
    if paired:
        atomic_write_text(out / "paired.csv", to_csv(paired, PAIRED_COLUMNS))
        plot_paired(paired, out / "paired.png")
    capture = capture_rows(records, tasks, scans, n_boot=n_boot, seed=seed)
    if capture:
        atomic_write_text(out / "capture.csv", to_csv(capture, CAPTURE_COLUMNS))
    if cross_task and len(tasks) > 1:
        cross = cross_task_rows(records, tasks, scans, n_boot, seed)
        atomic_write_text(out / "cross_task.csv", to_csv(cross, CROSS_COLUMNS))
        for method in _order(r["method"] for r in cross):
            plot_cross_task(cross, method, out / f"cross_task_{method}.png")
    return rows
