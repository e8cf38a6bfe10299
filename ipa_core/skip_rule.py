"""Update skipping on non-finite or huge gradient norms, with a rule that cannot deadlock."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np


@dataclass
class SkipRule:
    """Decide whether to apply an update, given its (pre-clip) gradient norm.

    Skip when the norm is non-finite, or when it is above ``max(threshold, margin x quantile q of
    the last `window` finite norms)`` - unless the last ``max_skips`` steps were all skipped, in
    which case the (clipped) update is applied anyway. The official rule (a fixed threshold)
    skips every step forever once the norm settles above it; here the threshold follows the norm
    level within a few steps and the cap bounds any run of skips. Non-finite norms are always
    skipped; ``max_nonfinite`` of them in a row raise (the run has diverged).
    """

    threshold: float | None
    max_skips: int = 10
    window: int = 200
    quantile: float = 0.95
    margin: float = 2.0
    max_nonfinite: int = 50
    history: deque = field(default_factory=deque)
    consecutive: int = 0
    nonfinite_run: int = 0
    skipped: int = 0

    MIN_HISTORY = 8

    @classmethod
    def from_config(cls, cfg) -> "SkipRule":
        """The rule a :class:`~ipa_core.train_config.TrainConfig` asks for."""
        return cls(cfg.skip_threshold, cfg.max_skips, cfg.skip_window, cfg.skip_quantile, cfg.skip_margin, cfg.max_nonfinite)

    def current_threshold(self) -> float:
        if self.threshold is None:
            return math.inf
        if len(self.history) < self.MIN_HISTORY:
            return self.threshold
        return max(self.threshold, self.margin * float(np.quantile(np.asarray(self.history), self.quantile)))

    def __call__(self, norm: float) -> bool:
        """True = skip this update. Updates the state."""
        if not math.isfinite(norm):
            self.nonfinite_run += 1
            self.skipped += 1
            if self.nonfinite_run >= self.max_nonfinite:
                raise FloatingPointError(f"loss or gradient non-finite for {self.nonfinite_run} steps in a row: training diverged; lower the learning rate or check the data")
            return True
        self.nonfinite_run = 0
        skip = norm > self.current_threshold() and self.consecutive < self.max_skips
        self.history.append(norm)
        while len(self.history) > self.window:
            self.history.popleft()
        self.consecutive = self.consecutive + 1 if skip else 0
        self.skipped += int(skip)
        return skip

    def state_dict(self) -> dict:
        return {"history": [float(h) for h in self.history], "consecutive": self.consecutive,
                "nonfinite_run": self.nonfinite_run, "skipped": self.skipped}

    def load_state_dict(self, d: dict) -> None:
        self.history = deque(float(h) for h in d["history"])
        self.consecutive, self.nonfinite_run, self.skipped = int(d["consecutive"]), int(d["nonfinite_run"]), int(d["skipped"])
