import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from boed.evaluation.metrics import auroc, bootstrap_counts, capture_ratio, nll, paired_auroc_diff, summarize, weighted_auroc


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
    with pytest.raises(ValueError, match="must be"):
        paired_auroc_diff(y, a, b[:10])
    with pytest.raises(ValueError, match="must both be"):
        paired_auroc_diff(y, np.stack([a, a]), b)


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


# ----------------------------------------------------------------------------- repeats: two-level bootstrap
def test_two_level_counts_shapes_and_one_repeat_is_the_image_bootstrap():
    from boed.evaluation.metrics import two_level_counts

    reps, imgs = two_level_counts(4, 30, 50, seed=2)
    assert reps.shape == (50, 4) and (reps.sum(1) == 4).all() and imgs.shape == (50, 30) and (imgs.sum(1) == 30).all()
    np.testing.assert_array_equal(imgs, bootstrap_counts(30, 50, seed=2))
    one, imgs1 = two_level_counts(1, 30, 50, seed=2)
    assert (one == 1).all()
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p = np.clip(0.5 + 0.2 * (y - 0.5) + 0.2 * rng.standard_normal(200), 0.01, 0.99)
    a, b = summarize(y, p, n_boot=300, seed=4), summarize(y, p[None], n_boot=300, seed=4)
    assert (a.auroc_lo, a.auroc_hi, a.nll_lo, a.nll_hi) == (b.auroc_lo, b.auroc_hi, b.nll_lo, b.nll_hi)
    assert b.repeats == 1 and math.isnan(b.auroc_sd_repeats)


def test_two_level_bootstrap_known_answer_repeats_shifted():
    # repeat 0 ranks perfectly (AUROC 1 on every image resample), repeat 1 gives every image the
    # same score (AUROC 0.5 on every resample): the image level adds nothing, so the bootstrap of
    # the mean over 2 resampled repeats is {1.0: 1/4, 0.75: 1/2, 0.5: 1/4}
    y = np.array([0, 1] * 20)
    perfect = 0.2 + 0.6 * y
    flat = np.full(40, 0.3)
    s = summarize(y, np.stack([perfect, flat]), n_boot=2000, seed=0)
    assert s.auroc == pytest.approx(0.75) and s.repeats == 2 and s.n == 40
    assert s.auroc_sd_repeats == pytest.approx(np.std([1.0, 0.5], ddof=1))
    assert (s.auroc_lo, s.auroc_hi) == (0.5, 1.0)
    # the same through the paired difference against a flat baseline: 0.25 +- the repeats' spread
    d = paired_auroc_diff(y, np.stack([perfect, flat])[:, None], np.stack([flat, flat])[:, None], n_boot=2000, seed=0)  # (R, T, n)
    assert d.diff == pytest.approx(0.25) and (d.lo, d.hi) == (0.0, 0.5) and d.repeats == 2
    assert d.p_above == pytest.approx(0.75, abs=0.03)  # P(at least one perfect repeat drawn) = 3/4
    # repeats that are constant shifts of each other in score give identical AUROCs: no spread at all
    same = summarize(y, np.stack([perfect, perfect + 0.1, perfect - 0.1]), n_boot=200)
    assert same.auroc_sd_repeats == 0.0 and (same.auroc_lo, same.auroc_hi) == (1.0, 1.0)


def test_two_level_interval_widens_with_between_repeat_spread():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 300)
    base = y + rng.normal(0, 1.0, 300)
    close = np.stack([base + rng.normal(0, 0.05, 300) for _ in range(4)])  # (4, n) repeats that barely differ
    spread = np.stack([y * w + rng.normal(0, 1.0, 300) for w in (0.2, 0.6, 1.2, 2.0)])  # repeats of very different quality
    a, b = summarize(y, close, n_boot=400), summarize(y, spread, n_boot=400)
    assert b.auroc_sd_repeats > 5 * a.auroc_sd_repeats
    assert (b.auroc_hi - b.auroc_lo) > 1.5 * (a.auroc_hi - a.auroc_lo)
    # images are shared by the repeats (crossed): with near-identical repeats the interval is the
    # image bootstrap's, not narrowed by averaging over repeats
    single = summarize(y, close[0], n_boot=400)
    assert (a.auroc_hi - a.auroc_lo) > 0.8 * (single.auroc_hi - single.auroc_lo)


# ----------------------------------------------------------------------------- adaptivity: room and capture
def _scores_for(y, rng, strength):
    """Scores whose AUROC grows with ``strength`` (labels plus noise)."""
    return strength * y + rng.normal(size=y.shape)


def test_capture_is_exactly_one_for_the_reference_itself_and_zero_for_the_base():
    rng = np.random.default_rng(0)
    y = (rng.random(300) < 0.3).astype(float)
    base = np.stack([_scores_for(y, rng, 0.5) for _ in range(4)])  # (T, n)
    ref = np.stack([_scores_for(y, rng, 2.0) for _ in range(4)])  # (T, n)
    same = capture_ratio(y, ref + 0.1, base, ref, n_boot=200, seed=1)  # a constant shift: the same AUROC
    assert same.capture == 1.0 and same.capture_lo == 1.0 and same.capture_hi == 1.0
    assert same.room > 0.2 and same.room_lo > 0 and same.gain == pytest.approx(same.room)
    none = capture_ratio(y, base * 3.0, base, ref, n_boot=200, seed=1)  # a monotone map of the base
    assert none.capture == 0.0 and none.gain == 0.0
    half = capture_ratio(y, np.stack([_scores_for(y, rng, 1.0) for _ in range(4)]), base, ref, n_boot=200, seed=1)
    assert 0 < half.capture < 1 and half.capture_lo < half.capture < half.capture_hi


def test_paired_interval_width_shrinks_as_one_over_sqrt_n():
    """The power study's claim: 4x the test images halve the paired interval (synthetic records)."""
    rng = np.random.default_rng(3)
    widths = {}
    for n in (400, 1600):
        y = (rng.random(n) < 0.25).astype(float)
        common = rng.normal(size=(3, 4, n))  # (R, T, n) shared by both methods: the paired part
        a = 1.2 * y + common + 0.6 * rng.normal(size=(3, 4, n))
        b = 1.0 * y + common + 0.6 * rng.normal(size=(3, 4, n))
        d = paired_auroc_diff(y, a, b, n_boot=400, seed=0)
        widths[n] = d.hi - d.lo
    assert widths[400] / widths[1600] == pytest.approx(2.0, rel=0.25)
