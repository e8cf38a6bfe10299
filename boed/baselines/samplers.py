"""Other completion samplers behind the :class:`boed.samplers.Sampler` protocol.

:class:`RetrievalSampler` is the completer of Harvey et al. 2019 in spirit: instead of generating
completions, it retrieves database images whose pixels best match what has been observed (masked
squared distance), then pastes the observations back. Diverse, but they can match the observed
values poorly (paper appendix I.1); with it, ``GreedyPolicy`` gives an "EIG-retrieval" method.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from boed.samplers import check_sampler_inputs, dataset_images, paste_observed
from xray.errors import UserError


class RetrievalSampler:
    """N completions per image: draws among the ``top_k`` database images nearest on observed pixels.

    Distances ``sum_observed (x_obs - d)^2 / #observed`` are computed for the whole pool at once as
    matrix products. With ``temperature`` > 0 the N images are drawn without replacement from the
    ``top_k`` nearest with weights ``softmax(-dist / temperature)``; with 0 the N nearest are taken.
    With nothing observed every pool image is equally near (a uniform draw from the pool).
    ``pool_size`` caps the database (a random subset, fixed at construction by ``seed``).
    """

    def __init__(self, dataset: Any, top_k: int = 50, temperature: float = 0.0, paste: bool = True,
                 pool_size: int | None = 4096, seed: int = 0):
        n = len(dataset)
        if n < 1:
            raise UserError("the retrieval database is empty; point --data/--cache-dir at a prepared split")
        if top_k < 1 or temperature < 0:
            raise UserError(f"top_k must be >= 1 and temperature >= 0, got {top_k} and {temperature}")
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(n, generator=g)[:pool_size] if pool_size and pool_size < n else torch.arange(n)
        self.pool = dataset_images(dataset, idx)  # (P, C, S, S) uint8
        flat = self.pool.flatten(1).float() / 255  # (P, C*S*S)
        self._flat, self._sq = flat, flat * flat  # (P, D) each
        self.top_k, self.temperature, self.paste = int(top_k), float(temperature), paste

    def distances(self, x_obs: Tensor, m: Tensor) -> Tensor:
        """Mean squared difference on observed pixels, ``(B, P)``."""
        B, C = x_obs.shape[:2]
        mm = m.expand(B, C, *m.shape[-2:]).flatten(1).float().cpu()  # (B, D)
        x = x_obs.flatten(1).float().cpu() / 255 * mm  # (B, D)
        d = (x * x).sum(1, keepdim=True) - 2 * x @ self._flat.T + mm @ self._sq.T  # (B, P)
        return d.clamp_min(0) / mm.sum(1, keepdim=True).clamp_min(1)

    def sample(self, x_obs: Tensor, m: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
        check_sampler_inputs(x_obs, m, n)
        B, C, S, _ = x_obs.shape
        if self.pool.shape[1:] != (C, S, S):
            raise UserError(f"database images are {tuple(self.pool.shape[1:])} but the scanned images are {(C, S, S)}; "
                            "use data prepared at the models' image size")
        P = self.pool.shape[0]
        d = self.distances(x_obs, m)  # (B, P)
        d = d + 1e-9 * torch.rand(B, P, generator=generator)  # random order among exact ties
        k = min(P, max(self.top_k, n))
        near_d, near = d.topk(k, dim=1, largest=False)  # (B, k) nearest first
        if self.temperature > 0 and n < k:
            w = torch.softmax(-near_d / self.temperature, dim=1)  # (B, k)
            pick = torch.multinomial(w, n, replacement=False, generator=generator)  # (B, N)
        else:
            pick = torch.arange(n).remainder(k).expand(B, n)  # (B, N) the N nearest (cycled if P < N)
        idx = near.gather(1, pick)  # (B, N) pool indices
        out = self.pool[idx.reshape(-1)].reshape(B, n, C, S, S).to(x_obs.device)  # (B, N, C, S, S)
        return paste_observed(out, x_obs, m) if self.paste else out
