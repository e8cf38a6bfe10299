"""Receptive-field arithmetic, written once for both engines (one axis at a time).

A windowed op (conv or pool: kernel K, stride st, padding pd) maps n input positions to
``n_out = (n + 2 pd - K) // st + 1``. When the input changes only on ``[x0, x1)``, the outputs
that can change are those whose field ``[o st - pd, o st - pd + K)`` reaches it:
``o0 = ceil((x0 + pd - K + 1) / st)`` to ``o1 - 1 = (x1 - 1 + pd) // st`` (clamped into the map;
``(0, 0)``, nothing, when the input interval or the result is empty). Per grid position the
changed interval differs; the engines recompute a window of one fixed size W (the largest
interval, at least 1) whose start is the interval's, clamped so the window stays in the map.
"""

from __future__ import annotations


def out_size(n: int, kernel: int, stride: int, padding: int, what: str = "a conv") -> int:
    """Output positions of a windowed op on ``n`` input positions (ValueError when none)."""
    n_out = (n + 2 * padding - kernel) // stride + 1
    if n_out < 1:
        raise ValueError(f"{what} (kernel {kernel}, stride {stride}, padding {padding}) gets {n} positions: input too small")
    return n_out


def changed_interval(x0: int, x1: int, n_out: int, kernel: int, stride: int, padding: int) -> tuple[int, int]:
    """The outputs ``[o0, o1)`` whose receptive field reaches the changed inputs ``[x0, x1)``; (0, 0) when none."""
    o0 = max(0, -(-(x0 + padding - kernel + 1) // stride))
    o1 = min(n_out - 1, (x1 - 1 + padding) // stride) + 1
    return (o0, o1) if (x1 > x0 and o1 > o0) else (0, 0)


def window(n: int, lo: list[int], hi: list[int], size: int | None = None) -> tuple[int, list[int]]:
    """``(W, starts)``: the fixed window size over all grid positions (``size`` overrides it) and
    each position's window start (its interval's start, clamped so the window fits the map)."""
    W = min(n, size if size is not None else max([1] + [b - a for a, b in zip(lo, hi)]))
    return W, [min(a if b > a else 0, n - W) for a, b in zip(lo, hi)]


class Axis:
    """One axis of one map: size ``n``, changed interval ``[lo, hi)`` per grid position (``lo ==
    hi``: unchanged), window size ``W`` and window starts ``ws``."""

    def __init__(self, n: int, lo: list[int], hi: list[int], size: int | None = None):
        self.n, self.lo, self.hi = n, lo, hi
        self.W, self.ws = window(n, lo, hi, size)

    def through(self, kernel: int, stride: int, padding: int, what: str = "a conv", size: int | None = None) -> "Axis":
        """The axis of a windowed op's output when this axis is its input."""
        n_out = out_size(self.n, kernel, stride, padding, what)
        lo, hi = zip(*(changed_interval(a, b, n_out, kernel, stride, padding) for a, b in zip(self.lo, self.hi))) \
            if self.lo else ((), ())
        return Axis(n_out, list(lo), list(hi), size)


def patch_axis(size: int, starts: list[int], patch: int) -> Axis:
    """The input axis: the P-wide patch of each grid position changes."""
    return Axis(size, [max(0, s) for s in starts], [min(size, s + patch) for s in starts])
