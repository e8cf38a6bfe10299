"""Classification metrics with bootstrap intervals: AUROC (scikit-learn), NLL, and their 95 % CIs.

Repeated evaluations: a method evaluated with R policy seeds ("repeats") on the same n test images
gives scores ``(R, n)``. Its metric is the mean over repeats of the per-repeat metric, and every
interval is a **two-level bootstrap** (:func:`two_level_counts`): each resample first draws R
repeats with replacement, then n test images with replacement; the image weights are applied to
every drawn repeat, because the repeats score the same images (a crossed design: drawing images
independently per repeat would divide the images' variance by R and make the intervals too
narrow). With R = 1 this is exactly the image bootstrap. ``auroc_sd_repeats`` is the
between-repeat spread (sample sd, ddof 1, of the per-repeat AUROC; NaN for R = 1).

The bootstrap is vectorised: ``R`` resamples are drawn at once as multinomial counts ``(R, n)``
and AUROC is computed from per-score-value positive/negative weights (the Mann-Whitney form, ties
counted 1/2), so 1 000 resamples of 5 000 images take well under a second. The same ``seed`` and
``n`` give the same resamples, so intervals of different methods are paired.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import numpy as np

EPS = 1e-7


def _as_arrays(y_true, p) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true, dtype=np.float64).reshape(-1)
    s = np.asarray(p, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.shape[0]} vs {s.shape[0]}")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 or 1")
    return y, s


def auroc(y_true, scores) -> float:
    """Area under the ROC curve (``sklearn.metrics.roc_auc_score``); NaN (with a warning) if one class only."""
    from sklearn.metrics import roc_auc_score  # +2.3 s on `boed --help` at the top (measured)

    y, s = _as_arrays(y_true, scores)
    if y.min(initial=1.0) == y.max(initial=0.0):
        warnings.warn(f"AUROC undefined: all {y.size} labels are {y[0] if y.size else 'missing'}; reporting NaN", stacklevel=2)
        return float("nan")
    return float(roc_auc_score(y, s))


def bce(y_true, p) -> np.ndarray:
    """Per-item binary cross-entropy (natural log) of probabilities ``p`` clipped to [EPS, 1 - EPS]."""
    y, q = _as_arrays(y_true, p)
    q = np.clip(q, EPS, 1 - EPS)
    return -(y * np.log(q) + (1 - y) * np.log1p(-q))


def nll(y_true, p) -> float:
    """Mean binary cross-entropy of the illness probability (nats per image)."""
    return float(bce(y_true, p).mean()) if np.size(y_true) else float("nan")


def bootstrap_counts(n: int, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """Multinomial resample counts ``(R, n)`` (each row sums to n); deterministic in (n, n_boot, seed)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))  # (R, n) resampled item indices
    offsets = (np.arange(n_boot) * n)[:, None]
    return np.bincount((idx + offsets).ravel(), minlength=n_boot * n).reshape(n_boot, n)  # (R, n)


def weighted_auroc(y_true, scores, weights: np.ndarray) -> np.ndarray:
    """AUROC under item weights ``(R, n)`` (e.g. bootstrap counts) -> ``(R,)``; NaN where one class has 0 weight."""
    y, s = _as_arrays(y_true, scores)
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))  # (R, n)
    order = np.argsort(s, kind="stable")
    s_sorted = s[order]
    starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])  # first item of each distinct score
    w_sorted = w[:, order]  # (R, n)
    pos = np.add.reduceat(w_sorted * y[order], starts, axis=1)  # (R, U) positive weight per score value
    neg = np.add.reduceat(w_sorted * (1 - y[order]), starts, axis=1)  # (R, U)
    neg_below = np.cumsum(neg, axis=1) - neg  # (R, U) negative weight strictly below each value
    num = (pos * (neg_below + 0.5 * neg)).sum(axis=1)
    den = pos.sum(axis=1) * neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def two_level_counts(repeats: int, n: int, n_boot: int = 1000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two-level bootstrap resamples: repeat counts ``(n_boot, R)`` (each row sums to R) and image
    counts ``(n_boot, n)`` (each row sums to n), one image resample per row shared by its repeats.

    The image counts equal :func:`bootstrap_counts` ``(n, n_boot, seed)``, so R = 1 gives exactly
    the image bootstrap; the repeat counts come from an independent stream of the same seed.
    """
    images = bootstrap_counts(n, n_boot, seed)  # (B, n)
    if repeats == 1:
        return np.ones((n_boot, 1), dtype=np.int64), images
    rng = np.random.default_rng([seed, 1])
    idx = rng.integers(0, repeats, size=(n_boot, repeats))  # (B, R) drawn repeats
    offsets = (np.arange(n_boot) * repeats)[:, None]
    reps = np.bincount((idx + offsets).ravel(), minlength=n_boot * repeats).reshape(n_boot, repeats)  # (B, R)
    return reps, images


def _as_repeats(y_true, p) -> tuple[np.ndarray, np.ndarray]:
    """Labels ``(n,)`` and scores ``(R, n)`` (a 1-D ``p`` is one repeat)."""
    y = np.asarray(y_true, dtype=np.float64).reshape(-1)
    q = np.asarray(p, dtype=np.float64)
    q = q.reshape(1, -1) if q.ndim == 1 else q
    if q.ndim != 2 or q.shape[1] != y.size:
        raise ValueError(f"scores must be (n,) or (R, n) with n = {y.size} labels, got {np.shape(p)}")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 or 1")
    return y, q


def _sd(v: np.ndarray) -> float:
    v = v[np.isfinite(v)]
    return float(np.std(v, ddof=1)) if v.size > 1 else float("nan")


@dataclass
class MetricSummary:
    auroc: float
    auroc_lo: float
    auroc_hi: float
    nll: float
    nll_lo: float
    nll_hi: float
    n: int
    auroc_sd_repeats: float = float("nan")  # sd over repeats of the per-repeat AUROC (NaN for one repeat)
    repeats: int = 1

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(y_true, p, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> MetricSummary:
    """AUROC and NLL of probabilities ``p`` (``(n,)``, or ``(R, n)``: R repeats on the same images)
    for binary ``y_true``: means over repeats with two-level percentile bootstrap intervals.

    Resamples in which one class is absent are dropped from the AUROC interval.
    """
    y, q = _as_repeats(y_true, p)
    R, n = q.shape
    nan = float("nan")
    if n == 0:
        return MetricSummary(nan, nan, nan, nan, nan, nan, 0, nan, R)
    ones = np.ones((1, n))
    per_auc = np.array([weighted_auroc(y, q[r], ones)[0] for r in range(R)])  # (R,) = sklearn's AUROC (tested)
    per_bce = np.stack([bce(y, q[r]) for r in range(R)])  # (R, n)
    point_auc, point_nll, sd = float(per_auc.mean()), float(per_bce.mean()), _sd(per_auc)
    lo_q, hi_q = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    if n_boot <= 0:
        return MetricSummary(point_auc, nan, nan, point_nll, nan, nan, n, sd, R)
    reps, counts = two_level_counts(R, n, n_boot, seed)  # (B, R), (B, n)
    aucs = np.stack([weighted_auroc(y, q[r], counts) for r in range(R)], axis=1)  # (B, R)
    aucs = (reps * aucs).sum(1) / R  # (B,) NaN where a class got zero weight (the same for every repeat)
    nlls = (reps * (counts @ per_bce.T / n)).sum(1) / R  # (B,)
    aucs = aucs[np.isfinite(aucs)]
    a_lo, a_hi = (np.percentile(aucs, [lo_q, hi_q]) if aucs.size else (nan,) * 2)
    n_lo, n_hi = np.percentile(nlls, [lo_q, hi_q])
    return MetricSummary(point_auc, float(a_lo), float(a_hi), point_nll, float(n_lo), float(n_hi), n, sd, R)


@dataclass
class PairedDiff:
    """``AUROC(a) - AUROC(b)`` on the same images (and repeats) with a paired two-level bootstrap interval.

    ``p_above`` is the fraction of resamples in which ``a`` beats ``b`` (a one-sided bootstrap
    probability, not a p-value). ``sd_repeats`` is the sd over repeats of the per-repeat difference.
    """

    diff: float
    lo: float
    hi: float
    p_above: float
    n: int
    sd_repeats: float = float("nan")
    repeats: int = 1

    def to_dict(self) -> dict:
        return asdict(self)


def _as_rtn(scores, n: int) -> np.ndarray:
    """Scores ``(n,)``, ``(T, n)`` or ``(R, T, n)`` -> ``(R, T, n)``."""
    a = np.asarray(scores, dtype=np.float64)
    a = a.reshape((1,) * (3 - a.ndim) + a.shape) if a.ndim < 3 else a  # (R, T, n)
    if a.ndim != 3 or a.shape[2] != n:
        raise ValueError(f"scores {np.shape(scores)} must be (n,), (T, n) or (R, T, n) with n = {n} labels")
    return a


def paired_auroc_diff(y_true, scores_a, scores_b, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> PairedDiff:
    """Mean over repeats and rows of ``AUROC(scores_a[r, t]) - AUROC(scores_b[r, t])``, on the same images.

    ``scores_a``/``scores_b`` are ``(n,)``, ``(T, n)`` (e.g. one row per number of scans t: the
    mean over t of the difference) or ``(R, T, n)`` (R repeats; a method whose scores do not
    depend on the repeat is passed repeated R times). Every resample draws repeats (the same ones
    for both methods) and reweights the *same* images for both methods, every repeat and every
    row, so the between-image variance that dominates each marginal interval cancels.
    """
    y = np.asarray(y_true, dtype=np.float64).reshape(-1)
    n = y.size
    a, b = _as_rtn(scores_a, n), _as_rtn(scores_b, n)  # (R, T, n)
    if a.shape != b.shape:
        raise ValueError(f"scores {a.shape} and {b.shape} must both be (R, T, n) with n = {n} labels")
    R, T = a.shape[:2]
    nan = float("nan")
    if n == 0 or y.min() == y.max():
        return PairedDiff(nan, nan, nan, nan, n, nan, R)
    ones = np.ones((1, n))
    per = np.array([np.mean([weighted_auroc(y, a[r, t], ones)[0] - weighted_auroc(y, b[r, t], ones)[0]
                             for t in range(T)]) for r in range(R)])  # (R,)
    point, sd = float(per.mean()), _sd(per)
    if n_boot <= 0:
        return PairedDiff(point, nan, nan, nan, n, sd, R)
    reps, counts = two_level_counts(R, n, n_boot, seed)  # (B, R), (B, n)
    d = np.stack([np.mean([weighted_auroc(y, a[r, t], counts) - weighted_auroc(y, b[r, t], counts)
                           for t in range(T)], axis=0) for r in range(R)], axis=1)  # (B, R)
    d = (reps * d).sum(1) / R  # (B,)
    d = d[np.isfinite(d)]
    if not d.size:
        return PairedDiff(point, nan, nan, nan, n, sd, R)
    lo, hi = np.percentile(d, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return PairedDiff(point, float(lo), float(hi), float((d > 0).mean()), n, sd, R)
@dataclass
class Capture:
    """How much of the room an adaptive policy recovers, on the same images and repeats.

    ``gain = AUROC(method) - AUROC(base)`` (e.g. EIG-IPA minus Uncond), ``room = AUROC(reference) -
    AUROC(base)`` (clairvoyant minus Uncond: what greedy EIG with a perfect completer gains) and
    ``capture = gain / room``, each averaged over repeats and rows, with percentile intervals of
    one paired two-level bootstrap (the same resampled repeats and images for all three methods).
    ``capture`` is only meaningful when the room is clearly positive (``room_lo > 0``).
    """

    gain: float
    gain_lo: float
    gain_hi: float
    room: float
    room_lo: float
    room_hi: float
    capture: float
    capture_lo: float
    capture_hi: float
    n: int
    repeats: int = 1

    def to_dict(self) -> dict:
        return asdict(self)


def capture_ratio(y_true, scores_method, scores_base, scores_reference, n_boot: int = 1000, seed: int = 0,
                  level: float = 0.95) -> Capture:
    """:class:`Capture` of ``scores_method`` between ``scores_base`` (0) and ``scores_reference`` (1).

    Scores are ``(n,)``, ``(T, n)`` or ``(R, T, n)`` as in :func:`paired_auroc_diff`.
    """
    y = np.asarray(y_true, dtype=np.float64).reshape(-1)
    n = y.size
    a, b, c = (_as_rtn(s, n) for s in (scores_method, scores_base, scores_reference))  # (R, T, n) each
    if not a.shape == b.shape == c.shape:
        raise ValueError(f"scores {a.shape}, {b.shape} and {c.shape} must all be (R, T, n) with n = {n} labels")
    R, T = a.shape[:2]
    nan = float("nan")
    if n == 0 or y.min() == y.max():
        return Capture(*([nan] * 9), n, R)

    def aucs(s: np.ndarray, w: np.ndarray) -> np.ndarray:  # (R, T, W)
        return np.stack([np.stack([weighted_auroc(y, s[r, t], w) for t in range(T)]) for r in range(R)])

    ones = np.ones((1, n))
    ua, ub, uc = (aucs(s, ones)[..., 0].mean(1) for s in (a, b, c))  # (R,) each: mean over rows
    gain, room = float((ua - ub).mean()), float((uc - ub).mean())
    point = [gain, room, gain / room if room != 0 else nan]
    if n_boot <= 0:
        return Capture(point[0], nan, nan, point[1], nan, nan, point[2], nan, nan, n, R)
    reps, counts = two_level_counts(R, n, n_boot, seed)  # (B, R), (B, n)
    va, vb, vc = (aucs(s, counts).mean(1).T for s in (a, b, c))  # (B, R) each
    g = (reps * (va - vb)).sum(1) / R  # (B,)
    r = (reps * (vc - vb)).sum(1) / R  # (B,)
    with np.errstate(divide="ignore", invalid="ignore"):
        k = g / r  # (B,)
    q = [100 * (1 - level) / 2, 100 * (1 + level) / 2]

    def interval(v: np.ndarray) -> tuple[float, float]:
        v = v[np.isfinite(v)]
        return tuple(float(x) for x in np.percentile(v, q)) if v.size else (nan, nan)

    (g_lo, g_hi), (r_lo, r_hi), (k_lo, k_hi) = interval(g), interval(r), interval(k)
    return Capture(gain, g_lo, g_hi, room, r_lo, r_hi, point[2], k_lo, k_hi, n, R)
