"""boed.evaluation.config: the class counts of each task among the selected test images."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from boed.evaluation.config import check_task_classes, select_test_indices
from xray.errors import UserError
from xray.labels import LABELS


def table(**positives) -> np.ndarray:
    """A (10, 15) label table: the named labels positive at the given image indices."""
    y = np.zeros((10, len(LABELS)), dtype=np.float32)
    for name, idx in positives.items():
        y[idx, LABELS.index(name)] = 1
    return y


def test_no_positive_among_the_selected_images_is_one_line():
    y = table(Effusion=[0, 1, 2, 3, 4], Edema=[9])
    with pytest.raises(UserError) as e:
        check_task_classes(y, [0, 1, 5, 6], ["Effusion", "Edema"])
    assert str(e.value) == ("Edema has 0 positives among the 4 test images (of 1 positives in the test split); "
                            "raise --n-test, draw with --draw stratified, or drop the task")
    with pytest.raises(UserError, match="^Edema has 0 positives among the 10 test images \\(of 0 positives in the "
                                        "test split\\); the split has none: drop the task or use other data$"):
        check_task_classes(table(), range(10), ["edema"])
    # "No Finding" is the negation of "Any Finding": all images without a finding hold no negative
    with pytest.raises(UserError, match="^No Finding has 0 negatives among the 3 test images"):
        check_task_classes(table(Effusion=[0]), [1, 2, 3], ["no finding"])


def test_few_of_a_class_warns_once_and_counts(caplog):
    y = table(Effusion=[0, 1, 2, 3, 4, 5], Edema=[0, 9])
    with caplog.at_level(logging.WARNING, logger="boed.evaluation.config"):
        counts = check_task_classes(y, range(10), ["Effusion", "Edema"])
    assert counts == {"Effusion": (6, 4), "Edema": (2, 8)}
    [rec] = caplog.records
    assert "Effusion: 4 negatives of 10" in rec.getMessage() and "Edema: 2 positives of 10" in rec.getMessage()
    assert "AUROC interval will be wide" in rec.getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="boed.evaluation.config"):
        check_task_classes(np.repeat(table(Effusion=[0, 1, 2, 3, 4]), 2, axis=0), range(20), ["Effusion"])
    assert not caplog.records  # 10 of each: no warning


def test_the_draw_is_unchanged():
    """The published results depend on the draw: the check selects nothing itself."""
    assert select_test_indices(10, 4, 0) == np.random.default_rng(0).permutation(10)[:4].tolist()


def test_a_stratified_draw_keeps_the_prevalence_and_both_classes():
    y = np.zeros(1000, dtype=bool)
    y[np.random.default_rng(5).choice(1000, 30, replace=False)] = True  # 3 % positives
    for seed in range(20):
        idx = select_test_indices(1000, 20, seed, strata=y)
        assert len(idx) == len(set(idx)) == 20 and int(y[idx].sum()) == 1  # round(0.6) = 1: never 0
        assert select_test_indices(1000, 20, seed, strata=y) == idx  # deterministic
        idx = select_test_indices(1000, 200, seed, strata=y)
        assert int(y[idx].sum()) == 6
    assert int(y[select_test_indices(1000, 2, 0, strata=~y)].sum()) == 1  # 97 % positives: still one negative
    one = np.zeros(50, dtype=bool)
    one[7] = True
    assert 7 in select_test_indices(50, 3, 0, strata=one)
    assert sorted(select_test_indices(10, None, 0, strata=np.arange(10) < 5)) == list(range(10))  # all: unchanged


def test_a_stratified_draw_is_the_uniform_one_when_that_already_has_the_prevalence():
    """Both draws walk one permutation: a uniform draw with the proportional count of positives is kept as is."""
    n, k = 100, 10
    perm = np.random.default_rng(0).permutation(n)
    y = np.zeros(n, dtype=bool)
    y[perm[:3]] = True  # 3 of the first 10 drawn ...
    y[perm[50:77]] = True  # ... and 30 % overall
    assert select_test_indices(n, k, 0, strata=y) == select_test_indices(n, k, 0) == perm[:k].tolist()
    y[perm[2]] = False  # now 2 of the first 10: the stratified draw takes the next positive instead of the 10th image
    y[perm[49]] = True
    strat = select_test_indices(n, k, 0, strata=y)
    assert int(y[strat].sum()) == 3 and strat[:9] == perm[:9].tolist() and strat[9] == perm[49]
