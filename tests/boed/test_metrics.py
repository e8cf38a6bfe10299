import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from boed.metrics import auroc, bootstrap_counts, nll, paired_auroc_diff, summarize, weighted_auroc


def test_auroc_known_answers():
    y = np.array([0, 0, 1, 1, 0, 1])
    s = np.array([0.1, 0.2, 0.8, 0.9, 0.3, 0.7])
    assert auroc(y, s) == 1.0
    assert auroc(y, 1 - s) == 0.0
    assert auroc(y, np.full(6, 0.3)) == 0.5


def test_auroc_single_class_is_nan_with_warning():
    with pytest.warns(UserWarning, match="undefined"):
        assert math.isnan(auroc([1, 1, 1], [0.1, 0.2, 0.3]))


def test_nll_known_answers():
    assert nll([0, 1, 1, 0], [0.5] * 4) == pytest.approx(math.log(2))
    assert nll([1, 0], [1.0, 0.0]) == pytest.approx(0.0, abs=1e-6)
    assert nll([1], [0.25]) == pytest.approx(-math.log(0.25))


def test_weighted_auroc_matches_sklearn_with_ties_and_weights():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.random(300) + 0.3 * y, 1)  # many ties
    assert weighted_auroc(y, s, np.ones((1, 300)))[0] == pytest.approx(roc_auc_score(y, s))
    counts = bootstrap_counts(300, 5, seed=1)
    for c in counts:  # a resample = sklearn on the repeated items
        idx = np.repeat(np.arange(300), c)
        assert weighted_auroc(y, s, c[None])[0] == pytest.approx(roc_auc_score(y[idx], s[idx]))


def test_bootstrap_counts_are_resamples_and_deterministic():
    c = bootstrap_counts(50, 20, seed=3)
    assert c.shape == (20, 50) and (c.sum(1) == 50).all()
    np.testing.assert_array_equal(c, bootstrap_counts(50, 20, seed=3))
    assert not np.array_equal(c, bootstrap_counts(50, 20, seed=4))


def test_summarize_interval_contains_estimate_and_is_deterministic():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    p = np.clip(0.5 + 0.2 * (y - 0.5) + 0.2 * rng.standard_normal(400), 0.01, 0.99)
    a = summarize(y, p, n_boot=500, seed=0)
    assert a.n == 400
    assert a.auroc_lo <= a.auroc <= a.auroc_hi and a.auroc_hi - a.auroc_lo < 0.2
    assert a.nll_lo <= a.nll <= a.nll_hi
    assert repr(a) == repr(summarize(y, p, n_boot=500, seed=0))  # (sd over repeats is NaN: one repeat)
    assert a.auroc == pytest.approx(roc_auc_score(y, p))


def test_summarize_interval_narrows_with_more_data():
    rng = np.random.default_rng(1)

    def width(n):
        y = rng.integers(0, 2, n)
        p = np.clip(0.5 + 0.3 * (y - 0.5) + 0.2 * rng.standard_normal(n), 0.01, 0.99)
        s = summarize(y, p, n_boot=300)
        return s.auroc_hi - s.auroc_lo

    assert width(2000) < width(100)


def test_paired_diff_known_answers():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    a = y + rng.normal(0, 0.8, 300)
    b = y + rng.normal(0, 2.0, 300)
    d = paired_auroc_diff(y, a, b, n_boot=300)
    assert d.diff == pytest.approx(roc_auc_score(y, a) - roc_auc_score(y, b))
    assert d.lo < d.diff < d.hi and d.n == 300 and 0.9 < d.p_above <= 1.0  # a is clearly better
    same = paired_auroc_diff(y, a, a, n_boot=100)
    assert (same.diff, same.lo, same.hi, same.p_above) == (0.0, 0.0, 0.0, 0.0)
    # rows: the mean over t of the per-t differences
    two = paired_auroc_diff(y, np.stack([a, b]), np.stack([b, b]), n_boot=0)
    assert two.diff == pytest.approx(d.diff / 2) and np.isnan(two.lo)
    assert np.isnan(paired_auroc_diff(np.ones(5), a[:5], b[:5]).diff)  # one class: undefined
    with pytest.raises(ValueError, match="must both be"):
        paired_auroc_diff(y, a, b[:10])


def test_paired_interval_is_tighter_than_the_marginal_ones():
    # two methods that differ by a little noise on the same images: their marginal CIs overlap
    # widely, the paired CI of the difference is far narrower and still covers the truth
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 400)
    a = y + rng.normal(0, 1.0, 400)
    b = a + rng.normal(0, 0.3, 400)
    ma, mb = summarize(y, a, n_boot=400), summarize(y, b, n_boot=400)
    d = paired_auroc_diff(y, a, b, n_boot=400)
    assert (d.hi - d.lo) < 0.5 * min(ma.auroc_hi - ma.auroc_lo, mb.auroc_hi - mb.auroc_lo)
    assert d.diff == pytest.approx(ma.auroc - mb.auroc)
