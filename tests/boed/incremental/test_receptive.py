"""boed/incremental/receptive.py: the receptive-field arithmetic both engines use (known answers)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from boed.incremental.receptive import Axis, changed_interval, out_size, patch_axis, window


def test_out_size_known_answers_and_too_small_input():
    assert out_size(64, 3, 1, 1) == 64 and out_size(64, 3, 2, 1) == 32 and out_size(7, 7, 1, 0) == 1
    with pytest.raises(ValueError, match="input too small"):
        out_size(4, 7, 1, 0, "layer1.conv")


@pytest.mark.parametrize("n, K, st, pd", [(16, 3, 1, 1), (16, 3, 2, 1), (17, 5, 2, 2), (12, 2, 2, 0), (9, 7, 1, 3)])
def test_changed_interval_is_exactly_the_outputs_a_change_reaches(n, K, st, pd):
    """Brute force: change inputs [x0, x1) of a 1-D conv with all-ones weights and see which outputs move."""
    n_out = out_size(n, K, st, pd)
    w = torch.ones(1, 1, K)
    for x0 in range(n):
        for x1 in range(x0, n + 1):
            x = torch.zeros(1, 1, n)
            y0 = F.conv1d(x, w, stride=st, padding=pd)
            x[..., x0:x1] = 1.0
            moved = (F.conv1d(x, w, stride=st, padding=pd) != y0).reshape(-1).nonzero().reshape(-1).tolist()
            o0, o1 = changed_interval(x0, x1, n_out, K, st, pd)
            assert list(range(o0, o1)) == moved, (x0, x1)


def test_window_is_the_largest_interval_clamped_into_the_map():
    assert window(10, [0, 3, 8], [2, 7, 10]) == (4, [0, 3, 6])  # the last start is clamped: 8 + 4 > 10
    assert window(10, [5, 0], [5, 0]) == (1, [0, 0])  # nothing changes: a 1-wide window at 0
    assert window(3, [0], [2], size=8) == (3, [0])  # an override never exceeds the map


def test_axis_through_a_conv_stack_matches_the_patch_footprint():
    a = patch_axis(64, [0, 24, 48], 16)  # three grid positions of 16-px patches
    assert (a.lo, a.hi) == ([0, 24, 48], [16, 40, 64])
    b = a.through(3, 2, 1)  # a stride-2 conv: outputs 32
    assert b.n == 32 and (b.lo, b.hi) == ([0, 12, 24], [9, 21, 32]) and b.W == 9  # output 8 still sees input 15
    assert isinstance(b, Axis) and b.ws == [0, 12, 23]  # the last window is clamped into the map
