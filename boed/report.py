"""From evaluation records to the paper's numbers and figures.

- ``metrics.csv`` (columns exactly ``method,illness,t,auroc,auroc_lo,auroc_hi,nll,n``): every
  method scored on each task with that task's own scan locations, t = 0..T, bootstrap 95 % CIs.
- ``auroc.png`` (paper fig. 5 left) and ``nll.png`` (fig. 8 top): one panel per task, one line per
  method with its interval band.
- ``paired.csv`` + ``paired.png``: EIG-IPA minus every other method on the same images, per t and
  averaged over t = 1..T, with paired bootstrap 95 % CIs (columns ``PAIRED_COLUMNS``).
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

from xray.io import atomic_path, atomic_write_text
from xray.labels import resolve_illness

from .metrics import paired_auroc_diff, summarize

log = logging.getLogger(__name__)

CSV_COLUMNS = ("method", "illness", "t", "auroc", "auroc_lo", "auroc_hi", "nll", "n")
PAIRED_COLUMNS = ("method", "baseline", "illness", "t", "diff", "diff_lo", "diff_hi", "p_above", "n")
CROSS_COLUMNS = ("method", "scan_task", "score_task", "t", "auroc", "auroc_lo", "auroc_hi", "nll", "n")
METHOD_ORDER = ("eig-ipa", "epe-ipa", "uncond", "nongreedy", "random", "full")
METHOD_LABELS = {"eig-ipa": "EIG-IPA", "epe-ipa": "EPE-IPA", "uncond": "Uncond", "nongreedy": "Non-greedy uncond",
                 "random": "Random", "full": "Full image"}
METHOD_STYLE = {"eig-ipa": ("C0", "-"), "epe-ipa": ("C1", "-"), "uncond": ("C2", "--"), "nongreedy": ("C4", "--"),
                "random": ("C5", ":"), "full": ("k", "-.")}


def _order(methods: Iterable[str]) -> list[str]:
    ms = list(dict.fromkeys(methods))
    return sorted(ms, key=lambda m: (METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER), m))


def _score(recs: Sequence[dict], task: str, t: int, n_boot: int, seed: int, warned: set | None = None) -> dict:
    ill = resolve_illness(task)
    probs = np.array([r["probs"][t] for r in recs], dtype=np.float64).reshape(len(recs), -1)  # (n, K)
    labels = np.array([r["labels"] for r in recs], dtype=np.float64).reshape(len(recs), -1)  # (n, K)
    y = ill.target(labels)
    if y.min(initial=1) == y.max(initial=0) and (warned is None or ill.name not in warned):
        if warned is not None:
            warned.add(ill.name)
        log.warning("AUROC of %s is undefined: all %d evaluated images have label %d; reported as NaN", ill.name, len(y), int(y[0]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # reported once above
        s = summarize(y, ill.prob(probs), n_boot=n_boot, seed=seed)
    return s.to_dict()


def metric_rows(records: Sequence[dict], tasks: Sequence[str], scans: int, n_boot: int = 1000, seed: int = 0) -> list[dict]:
    """One row per (method, task, t): each method scored on ``task`` with ``task``'s own locations."""
    rows, warned = [], set()
    for task in tasks:
        task = resolve_illness(task).name
        for method in _order(r["method"] for r in records):
            recs = sorted((r for r in records if r["method"] == method and r["task"] in (task, None)), key=lambda r: r["index"])
            if not recs:
                continue
            for t in range(scans + 1):
                rows.append({"method": method, "illness": task, "t": t, **_score(recs, task, t, n_boot, seed, warned)})
    return rows


def _by_index(records: Sequence[dict], method: str, task: str) -> dict[int, dict]:
    return {r["index"]: r for r in records if r["method"] == method and r["task"] in (task, None)}


def mean_label(scans: int) -> str:
    """The ``t`` value of the rows averaged over t = 1..T."""
    return f"1-{scans}"


def paired_rows(records: Sequence[dict], tasks: Sequence[str], scans: int, method: str = "eig-ipa",
                n_boot: int = 1000, seed: int = 0) -> list[dict]:
    """``AUROC(method) - AUROC(baseline)`` for every other method, on the images both scored.

    One row per (baseline, task, t) for t = 1..T, then one with ``t = mean_label(T)``: the
    difference of the AUROCs averaged over t = 1..T (the paper's "above on average over t").
    """
    rows = []
    for task in tasks:
        task = resolve_illness(task).name
        ill = resolve_illness(task)
        ours = _by_index(records, method, task)
        for base in _order(r["method"] for r in records):
            theirs = _by_index(records, base, task)
            common = sorted(set(ours) & set(theirs))
            if base == method or not common or scans < 1:
                continue
            labels = np.array([ours[i]["labels"] for i in common], dtype=np.float64)  # (n, K)
            y = ill.target(labels)  # (n,)

            def scores(recs: dict, ts) -> np.ndarray:
                probs = np.array([[recs[i]["probs"][t] for i in common] for t in ts], dtype=np.float64)  # (T, n, K)
                return ill.prob(probs)  # (T, n)

            for ts, label in [([t], t) for t in range(1, scans + 1)] + [(list(range(1, scans + 1)), mean_label(scans))]:
                d = paired_auroc_diff(y, scores(ours, ts), scores(theirs, ts), n_boot=n_boot, seed=seed)
                rows.append({"method": method, "baseline": base, "illness": task, "t": label, "diff": d.diff,
                             "diff_lo": d.lo, "diff_hi": d.hi, "p_above": d.p_above, "n": d.n})
    return rows


def plot_paired(rows: Sequence[dict], path: str | Path) -> Path:
    """AUROC(EIG-IPA) - AUROC(baseline) against t with paired 95 % bands; 0 = a tie."""
    curves = [{"method": r["baseline"], "illness": r["illness"], "t": r["t"], "diff": r["diff"], "diff_lo": r["diff_lo"],
               "diff_hi": r["diff_hi"]} for r in rows if isinstance(r["t"], int)]
    return plot_curves(curves, "diff", path, zero_line=True)


def cross_task_rows(records: Sequence[dict], tasks: Sequence[str], scans: int, n_boot: int = 1000, seed: int = 0) -> list[dict]:
    """One row per (task-dependent method, scan task A, score task B) after ``scans`` scans (fig. 9)."""
    tasks = [resolve_illness(t).name for t in tasks]
    rows, warned = [], set()
    for method in _order(r["method"] for r in records if r["task"] is not None):
        for a in tasks:
            recs = sorted((r for r in records if r["method"] == method and r["task"] == a), key=lambda r: r["index"])
            if not recs:
                continue
            for b in tasks:
                rows.append({"method": method, "scan_task": a, "score_task": b, "t": scans,
                             **_score(recs, b, scans, n_boot, seed, warned)})
    return rows


def to_csv(rows: Sequence[dict], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow([f"{r[c]:.6f}" if isinstance(r[c], float) else r[c] for c in columns])
    return buf.getvalue()


def format_table(rows: Sequence[dict], t: int | None = None) -> str:
    """A plain-text table of AUROC [CI] and NLL, for the terminal."""
    lines = [f"{'method':<10} {'illness':<14} {'t':>2}  {'AUROC':>6} {'95% CI':>15}  {'NLL':>6}  {'n':>5}"]
    for r in rows:
        if t is not None and r["t"] != t:
            continue
        lines.append(f"{r['method']:<10} {r['illness']:<14} {r['t']:>2}  {r['auroc']:6.3f} "
                     f"[{r['auroc_lo']:.3f}, {r['auroc_hi']:.3f}]  {r['nll']:6.3f}  {r['n']:>5}")
    return "\n".join(lines)


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def plot_curves(rows: Sequence[dict], metric: str, path: str | Path, zero_line: bool = False) -> Path:
    """AUROC or NLL (or any ``metric`` with ``_lo``/``_hi``) against t, one panel per illness, one
    line (with CI band) per method."""
    from matplotlib.figure import Figure

    tasks = list(dict.fromkeys(r["illness"] for r in rows))
    fig = Figure(figsize=(3.6 * max(1, len(tasks)), 3.2), layout="constrained")
    axes = fig.subplots(1, max(1, len(tasks)), squeeze=False)[0]
    for ax, task in zip(axes, tasks):
        for method in _order(r["method"] for r in rows if r["illness"] == task):
            rs = sorted((r for r in rows if r["illness"] == task and r["method"] == method), key=lambda r: r["t"])
            t = [r["t"] for r in rs]
            color, ls = METHOD_STYLE.get(method, (None, "-"))
            ax.plot(t, [r[metric] for r in rs], ls, color=color, marker="o", ms=3, label=METHOD_LABELS.get(method, method))
            lo, hi = f"{metric}_lo", f"{metric}_hi"
            if rs and lo in rs[0] and all(math.isfinite(r[lo]) for r in rs):
                ax.fill_between(t, [r[lo] for r in rs], [r[hi] for r in rs], color=color, alpha=0.15, lw=0)
        if zero_line:
            ax.axhline(0.0, color="0.3", lw=0.8)
        ax.set_title(task)
        ax.set_xlabel("scans t")
        ax.set_xticks(range(min((r["t"] for r in rows), default=0), max((r["t"] for r in rows), default=0) + 1))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel({"auroc": "AUROC", "nll": "NLL (nats)", "diff": "AUROC(EIG-IPA) - AUROC(method)"}.get(metric, metric))
    axes[-1].legend(fontsize=7, loc="best")
    _save(fig, Path(path))
    return Path(path)


def plot_cross_task(rows: Sequence[dict], method: str, path: str | Path) -> Path:
    """Fig. 9: AUROC of score task (rows) with scan task's locations (columns).

    As in the paper, colour intensity is the cell's distance below the best cell of its row (white = best).
    """
    from matplotlib.figure import Figure

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
    evaluated) and the cross-task files; returns the metric rows."""
    out = Path(out_dir)
    rows = metric_rows(records, tasks, scans, n_boot, seed)
    atomic_write_text(out / "metrics.csv", to_csv(rows, CSV_COLUMNS))
    plot_curves(rows, "auroc", out / "auroc.png")
    plot_curves(rows, "nll", out / "nll.png")
    paired = paired_rows(records, tasks, scans, n_boot=n_boot, seed=seed)
    if paired:
        atomic_write_text(out / "paired.csv", to_csv(paired, PAIRED_COLUMNS))
        plot_paired(paired, out / "paired.png")
    if cross_task and len(tasks) > 1:
        cross = cross_task_rows(records, tasks, scans, n_boot, seed)
        atomic_write_text(out / "cross_task.csv", to_csv(cross, CROSS_COLUMNS))
        for method in _order(r["method"] for r in cross):
            plot_cross_task(cross, method, out / f"cross_task_{method}.png")
    return rows
