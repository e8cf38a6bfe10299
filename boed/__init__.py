"""Bayesian optimal experimental design for chest x-ray scanning (EIG with IPA completions).

The public API (imported lazily, so ``import boed`` and the CLI stay fast)::

    from boed import AVPClassifier, GreedyPolicy, IPASampler, ScanGeometry, ScanState, resolve_illness

- :class:`AVPClassifier` / :class:`AVPConfig`: the classifier of partially observed images
  (``from_pretrained(run_or_model_dir)``, ``predict_proba(x_u8, mask) -> (B, K)``).
- :class:`GreedyPolicy`: greedy EIG (or EPE) scan selection; ``next_locations(state, generator)``
  -> ``(B,)``, the scores of the last decision in ``last_result`` (``eig (B, L)``, ``p (B, L, N)``).
- :class:`IPASampler` (completions from an :class:`ipa_core.IPA`), :class:`DatasetSampler`.
- :class:`ScanState` (what has been observed), :class:`ScanGeometry` (the 17 x 17 grid of
  S/4 px patches), :func:`observe`.
- :func:`resolve_illness` (a name -> ``Illness`` with ``.prob(probs)`` and ``.target(labels)``),
  :data:`LABELS`; :func:`eig`, :func:`epe`, :func:`information_gain` (the estimators).
"""

from __future__ import annotations

import importlib
from typing import Any

from xray import __version__

_EXPORTS = {
    "AVPClassifier": "boed.classifier",
    "AVPConfig": "boed.classifier",
    "GreedyPolicy": "boed.policies",
    "ScanState": "boed.policies",
    "IPASampler": "boed.samplers",
    "DatasetSampler": "boed.samplers",
    "ScanGeometry": "boed.geometry",
    "observe": "boed.geometry",
    "eig": "boed.estimators",
    "epe": "boed.estimators",
    "information_gain": "boed.estimators",
    "resolve_illness": "xray.labels",
    "LABELS": "xray.labels",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'boed' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
