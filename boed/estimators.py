"""EIG / EPE estimators for a binary target from a table of classifier probabilities.

Every function takes ``p (..., L, N)``: ``p[..., l, n] = g(v=1 | f_{prev, l}(x(n)))`` for candidate
location l and sampled completion n, and reduces over the last (sample) axis. Entropies are in
nats. All are safe at p = 0 and p = 1 (``xlogy``: 0 log 0 = 0) and computed in float64, so
probabilities that round to 1 in float32 do not produce NaN or negative gains.

- :func:`eig`  paper eq. 10: ``H(mean_n p) - mean_n H(p)``; >= 0 by Jensen. Choose the argmax.
- :func:`epe`  eq. 65 (Harvey 2019): ``mean_n H(p)``, expected posterior entropy. Choose the argmin.
- :func:`information_gain`  eq. 69: ``KL(Bern(p_n) || Bern(mean_n p))`` per sample; its mean over
  n is exactly :func:`eig`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _as_prob(p: Tensor) -> Tensor:
    if not torch.is_tensor(p):
        p = torch.as_tensor(p)
    return p.to(torch.float64).clamp(0.0, 1.0)


def _out_dtype(p: Tensor) -> torch.dtype:
    return p.dtype if p.dtype in (torch.float32, torch.float64) else torch.float32


def binary_entropy(p: Tensor) -> Tensor:
    """``H(p) = -p log p - (1-p) log(1-p)`` in nats, elementwise; H(0) = H(1) = 0."""
    q = _as_prob(p)
    h = -torch.special.xlogy(q, q) - torch.special.xlogy(1 - q, 1 - q)
    return h.to(_out_dtype(torch.as_tensor(p)))


def _entropy64(q: Tensor) -> Tensor:
    return -torch.special.xlogy(q, q) - torch.special.xlogy(1 - q, 1 - q)


def eig(p: Tensor) -> Tensor:
    """Expected information gain ``H(mean_n p) - mean_n H(p)``: ``(..., L, N) -> (..., L)``, >= 0."""
    q = _as_prob(p)
    gain = _entropy64(q.mean(-1)) - _entropy64(q).mean(-1)
    return gain.clamp_min(0.0).to(_out_dtype(torch.as_tensor(p)))  # clamp: float rounding only


def epe(p: Tensor) -> Tensor:
    """Expected posterior entropy ``mean_n H(p)``: ``(..., L, N) -> (..., L)``. Lower is better."""
    q = _as_prob(p)
    return _entropy64(q).mean(-1).to(_out_dtype(torch.as_tensor(p)))


def information_gain(p: Tensor) -> Tensor:
    """Per-sample gain ``KL(Bern(p_n) || Bern(mean_n p))``: ``(..., L, N) -> (..., L, N)``, >= 0.

    Its mean over the last axis equals :func:`eig` (paper eq. 69).
    """
    q = _as_prob(p)
    qbar = q.mean(-1, keepdim=True).expand_as(q)  # (..., L, N)
    # KL = p log p/pbar + (1-p) log (1-p)/(1-pbar); where p > 0 we have pbar > 0 (it averages p).
    kl = (torch.special.xlogy(q, q) - torch.special.xlogy(q, qbar)
          + torch.special.xlogy(1 - q, 1 - q) - torch.special.xlogy(1 - q, 1 - qbar))
    return kl.clamp_min(0.0).to(_out_dtype(torch.as_tensor(p)))


def belief_shift(p: Tensor, q: Tensor) -> Tensor:
    """``KL(Bern(p) || Bern(q))``: how far an observation moves the belief ``q`` to ``p``.

    ``p (..., L)`` after each candidate, ``q (...)`` the current belief (broadcast over L). With
    ``p`` computed on the true image this is the clairvoyant criterion (eq. 69 with x* the true
    image and the current predictive as reference); averaged over completions ``x(n)`` in place of
    the true image and with the mean prediction as reference it is :func:`eig`.
    """
    a, b = _as_prob(p), _as_prob(torch.as_tensor(q))[..., None].expand_as(_as_prob(p))  # (..., L) each
    kl = (torch.special.xlogy(a, a) - torch.special.xlogy(a, b)
          + torch.special.xlogy(1 - a, 1 - a) - torch.special.xlogy(1 - a, 1 - b))
    return kl.clamp_min(0.0).to(_out_dtype(torch.as_tensor(p)))


ESTIMATORS = ("eig", "epe")
