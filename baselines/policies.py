"""Baseline scan policies of the paper (appendix I.2), behind :class:`boed.policies.Policy`.

- :class:`RandomPolicy`: a uniformly random location not yet fully observed, each step.
- :class:`UncondPolicy`: greedy EIG (eq. 67) with x(n) drawn from the dataset, not conditioned on
  the observations: one fixed sequence per task, computed once and cached.
- :class:`NonGreedyUncondPolicy`: the best of ``n_sequences`` random whole sequences under eq. 68.
- :class:`FullImagePolicy`: the classifier sees the whole image (upper bound).
"""

from __future__ import annotations

import torch
from torch import Tensor

from boed import estimators
from boed.geometry import ScanGeometry
from boed.policies import ScanState, select
from boed.scoring import candidate_probs, model_device, prepare_classifier, sequence_probs
from xray.errors import UserError
from xray.labels import Illness, resolve_illness


def _illness(illness) -> Illness:
    return illness if isinstance(illness, Illness) else resolve_illness(illness)


class RandomPolicy:
    """Uniformly random location among those not yet fully observed."""

    observes_everything = False

    def __init__(self, geometry: ScanGeometry, name: str = "random"):
        self.geometry = geometry
        self.name = name

    def next_locations(self, state: ScanState, generator: torch.Generator | None = None) -> Tensor:
        skip = self.geometry.fully_observed(state.mask).cpu()  # (B, L)
        u = torch.rand(skip.shape, generator=generator)  # (B, L) uniform keys: argmax is a uniform pick
        return select(u, skip, maximize=True)


class _UncondBase:
    observes_everything = False

    def __init__(self, classifier, dataset_sampler, illness, geometry: ScanGeometry, n_samples: int,
                 chunk_size: int | None, device, channels_last: bool, amp: bool):
        if n_samples < 1:
            raise UserError(f"n_samples must be >= 1, got {n_samples}")
        self.illness = _illness(illness)
        self.geometry = geometry
        self.sampler = dataset_sampler
        self.n_samples = int(n_samples)
        self.device = torch.device(device) if device is not None else model_device(classifier)
        self.classifier = prepare_classifier(classifier, self.device, channels_last)  # an inference copy
        self.chunk_size, self.channels_last, self.amp = chunk_size, channels_last, amp
        config = getattr(classifier, "config", None)
        self.channels = int(getattr(config, "in_channels", 1))  # C of the images the sampler returns

    def _draw(self, generator) -> Tensor:
        """N dataset images ``(N, C, S, S)``."""
        S = self.geometry.image_size
        empty = ScanState.empty(1, self.channels, S, self.device)
        return self.sampler.sample(empty.x_obs, empty.mask, self.n_samples, generator)[0]  # (N, C, S, S)

    def sequence(self, T: int, generator: torch.Generator | None = None) -> list[int]:
        raise NotImplementedError

    def next_locations(self, state: ScanState, generator: torch.Generator | None = None) -> Tensor:
        steps = {len(l) for l in state.locations}
        if len(steps) != 1:
            raise ValueError(f"{self.name}: images of one batch must have taken the same number of scans, got {sorted(steps)}")
        t = steps.pop()
        seq = self.sequence(t + 1, generator)
        return torch.full((state.batch_size,), seq[t], dtype=torch.long)


class UncondPolicy(_UncondBase):
    """Greedy EIG with unconditional dataset draws (eq. 67); the sequence ignores the test image."""

    def __init__(self, classifier, dataset_sampler, illness, geometry: ScanGeometry, n_samples: int = 10,
                 chunk_size: int | None = None, device=None, *, name: str = "uncond", channels_last: bool = True,
                 amp: bool = True):
        super().__init__(classifier, dataset_sampler, illness, geometry, n_samples, chunk_size, device, channels_last, amp)
        self.name = name
        self._seq: list[int] = []

    def sequence(self, T: int, generator: torch.Generator | None = None) -> list[int]:
        """The first T locations (extends the cached sequence with fresh dataset draws per step)."""
        g = self.geometry
        while len(self._seq) < T:
            mask = g.mask(self._seq, device=self.device)[None]  # (1, 1, S, S)
            x = self._draw(generator)[None]  # (1, N, C, S, S)
            skip = g.fully_observed(mask)  # (1, L)
            p = candidate_probs(self.classifier, x, mask, g, self.illness, self.chunk_size, skip,
                                channels_last=self.channels_last, amp=self.amp)  # (1, L, N)
            u = estimators.eig(p).masked_fill(skip.to(p.device), 0.0)  # (1, L)
            self._seq.append(int(select(u, skip.to(p.device))[0]))
        return self._seq[:T]


class NonGreedyUncondPolicy(_UncondBase):
    """Best of ``n_sequences`` random sequences of ``scans`` distinct locations under eq. 68.

    ``U(l_1..l_T) = H(mean_n g(f_empty(x_n))) - mean_n H(g(f_{l_1..l_T}(x_n)))`` with x_n drawn
    once from the dataset and shared by all candidate sequences.
    """

    def __init__(self, classifier, dataset_sampler, illness, geometry: ScanGeometry, n_samples: int = 10,
                 n_sequences: int = 289, scans: int = 5, chunk_size: int | None = None, device=None, *,
                 name: str = "nongreedy", channels_last: bool = True, amp: bool = True):
        super().__init__(classifier, dataset_sampler, illness, geometry, n_samples, chunk_size, device, channels_last, amp)
        if not 1 <= scans <= geometry.num_locations:
            raise UserError(f"scans must be in 1..{geometry.num_locations}, got {scans}")
        if n_sequences < 1:
            raise UserError(f"n_sequences must be >= 1, got {n_sequences}")
        self.name = name
        self.scans, self.n_sequences = int(scans), int(n_sequences)
        self._best: list[int] | None = None
        self.utilities: Tensor | None = None  # (n_sequences,) after the search
        self.candidates: Tensor | None = None  # (n_sequences, scans)

    def search(self, generator: torch.Generator | None = None) -> list[int]:
        """Sample the candidate sequences, score them, keep the best (first on ties)."""
        g = self.geometry
        L, M, T = g.num_locations, self.n_sequences, self.scans
        seqs = torch.rand(M, L, generator=generator).argsort(dim=1)[:, :T]  # (M, T) distinct locations per row
        pm = g.patch_masks(self.device)  # (L, 1, S, S)
        masks = pm[seqs.to(self.device)].amax(dim=1)  # (M, 1, S, S) union of each sequence's patches
        x = self._draw(generator)  # (N, C, S, S)
        empty = torch.zeros(1, 1, g.image_size, g.image_size, device=self.device)
        p = sequence_probs(self.classifier, x, torch.cat([empty, masks]), self.illness, self.chunk_size,
                           channels_last=self.channels_last, amp=self.amp)  # (1 + M, N)
        prior = estimators.binary_entropy(p[0].mean())  # H(mean_n g(f_empty(x_n)))
        self.utilities = prior - estimators.binary_entropy(p[1:]).mean(-1)  # (M,)
        self.candidates = seqs
        best = int(self.utilities.argmax())
        self._best = seqs[best].tolist()
        return self._best

    def sequence(self, T: int, generator: torch.Generator | None = None) -> list[int]:
        if T > self.scans:
            raise UserError(f"the non-greedy sequence was searched for {self.scans} scans but {T} were requested; "
                            f"construct NonGreedyUncondPolicy with scans={T}")
        if self._best is None:
            self.search(generator)
        return self._best[:T]


class FullImagePolicy:
    """Upper bound: the evaluator classifies the whole image at every t (no locations chosen)."""

    observes_everything = True

    def __init__(self, name: str = "full"):
        self.name = name

    def next_locations(self, state: ScanState, generator: torch.Generator | None = None) -> Tensor:
        raise ValueError("FullImagePolicy observes everything; the evaluator classifies the full image instead of scanning")
