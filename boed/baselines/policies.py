"""Baseline scan policies of the paper (appendix I.2), subclasses of :class:`boed.policies.Policy`.

- :class:`RandomPolicy`: a uniformly random location not yet fully observed, each step.
- :class:`UncondPolicy`: greedy EIG (eq. 67) with x(n) drawn from the dataset, not conditioned on
  the observations: one fixed sequence per task, computed once and cached (until ``reset``). Its
  first step is the t = 1 computation of greedy EIG: with the same first generator and a shared
  :class:`boed.policies.FirstChoiceCache` it takes the same first location as EIG-IPA.
- :class:`NonGreedyUncondPolicy`: for each budget t = 1..T, the best of ``n_sequences`` random
  sets of t locations under eq. 68 (one search per budget).
- :class:`FullImagePolicy`: the classifier sees the whole image (upper bound).
- :class:`ClairvoyantPolicy`: greedy on the true test image instead of completions (what greedy
  EIG would do with a perfect completer; a reference for how much room adaptivity has).

Ties between equally good candidates are broken uniformly with the injected generator.
"""

from __future__ import annotations

import torch
from torch import Tensor

from boed import estimators
from boed.geometry import ScanGeometry
from boed.policies import FirstChoiceCache, Policy, ScanState, first_choice_key, select
from boed.scoring import DEFAULT_AMP, candidate_probs, model_device, prepare_classifier, sequence_probs
from xray.errors import UserError
from xray.labels import Illness, resolve_illness


def _illness(illness) -> Illness:
    return illness if isinstance(illness, Illness) else resolve_illness(illness)


class RandomPolicy(Policy):
    """Uniformly random location among those not yet fully observed."""

    def __init__(self, geometry: ScanGeometry, name: str = "random"):
        self.geometry = geometry
        self.name = name

    def next_locations(self, state: ScanState, generator: torch.Generator | None = None) -> Tensor:
        skip = self.geometry.fully_observed(state.mask).cpu()  # (B, L)
        u = torch.rand(skip.shape, generator=generator)  # (B, L) uniform keys: argmax is a uniform pick
        return select(u, skip, maximize=True)


class _UncondBase(Policy):
    """What Uncond and non-greedy Uncond share: N unconditional dataset draws scored by the classifier."""

    def __init__(self, classifier, dataset_sampler, illness, geometry: ScanGeometry, n_samples: int,
                 chunk_size: int | None, device, channels_last: bool, amp: bool,
                 first_cache: FirstChoiceCache | None = None):
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
        self._classifier_id = id(classifier)
        self.first_cache = first_cache if first_cache is not None else FirstChoiceCache()

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
                 amp: bool = DEFAULT_AMP, first_cache: FirstChoiceCache | None = None):
        super().__init__(classifier, dataset_sampler, illness, geometry, n_samples, chunk_size, device, channels_last,
                         amp, first_cache)
        self.name = name
        self._seq: list[int] = []

    def reset(self) -> None:
        """Forget the cached sequence (a new repeat draws it again)."""
        self._seq = []

    def prime(self, scans: int, first_generator: torch.Generator | None = None,
              generator: torch.Generator | None = None) -> None:
        self.sequence(scans, generator, first_generator=first_generator)

    def _step(self, generator) -> int:
        g = self.geometry
        mask = g.mask(self._seq, device=self.device)[None]  # (1, 1, S, S)
        x = self._draw(generator)[None]  # (1, N, C, S, S)
        skip = g.fully_observed(mask).to(self.device)  # (1, L)
        p = candidate_probs(self.classifier, x, mask, g, self.illness, self.chunk_size, skip,
                            channels_last=self.channels_last, amp=self.amp)  # (1, L, N)
        u = estimators.eig(p).masked_fill(skip.to(p.device), 0.0)  # (1, L)
        return int(select(u, skip.to(p.device), generator=generator)[0])

    def sequence(self, T: int, generator: torch.Generator | None = None,
                 first_generator: torch.Generator | None = None) -> list[int]:
        """The first T locations (extends the cached sequence with fresh dataset draws per step).

        Step 1 draws from ``first_generator`` (default ``generator``): the t = 1 computation of
        greedy EIG, shared through :attr:`first_cache`; later steps draw from ``generator``.
        """
        if not self._seq and T > 0:
            g1 = first_generator if first_generator is not None else generator
            key = first_choice_key(self._classifier_id, self.illness, "eig", self.n_samples, self.sampler,
                                   self.geometry, g1)
            self._seq.append(self.first_cache.get_or_compute(key, lambda: self._step(g1)))
        while len(self._seq) < T:
            self._seq.append(self._step(generator))
        return self._seq[:T]


class NonGreedyUncondPolicy(_UncondBase):
    """Non-greedy Uncond (eq. 68), searched separately for every budget t = 1..``scans``.

    For budget t: ``U(l_1..l_t) = H(mean_n g(f_empty(x_n))) - mean_n H(g(f_{l_1..l_t}(x_n)))`` for
    ``n_sequences`` random sets of t distinct locations; the best set (ties broken uniformly with
    the generator) is the policy's scan set for that budget. The N images x_n are drawn once (from
    the first generator: the same t = 1 draws as greedy EIG) and shared by every budget and
    candidate. The order inside a set means nothing, so the evaluator scores budget t with the
    budget-t set (:attr:`per_budget`, :meth:`budget_set`); :meth:`next_locations` walks the
    budget-``scans`` set for callers that scan step by step.
    """

    per_budget = True

    def __init__(self, classifier, dataset_sampler, illness, geometry: ScanGeometry, n_samples: int = 10,
                 n_sequences: int = 289, scans: int = 5, chunk_size: int | None = None, device=None, *,
                 name: str = "nongreedy", channels_last: bool = True, amp: bool = DEFAULT_AMP,
                 first_cache: FirstChoiceCache | None = None):
        super().__init__(classifier, dataset_sampler, illness, geometry, n_samples, chunk_size, device, channels_last,
                         amp, first_cache)
        if not 1 <= scans <= geometry.num_locations:
            raise UserError(f"scans must be in 1..{geometry.num_locations}, got {scans}")
        if n_sequences < 1:
            raise UserError(f"n_sequences must be >= 1, got {n_sequences}")
        self.name = name
        self.scans, self.n_sequences = int(scans), int(n_sequences)
        self.reset()

    def reset(self) -> None:
        """Forget the searched sets (a new repeat searches again)."""
        self._best: dict[int, list[int]] = {}
        self.utilities: dict[int, Tensor] = {}  # budget t -> (n_sequences,) eq. 68 of each candidate
        self.candidates: dict[int, Tensor] = {}  # budget t -> (n_sequences, t) candidate sets
        self.draws: Tensor | None = None  # (N, C, S, S) the dataset images of the search

    def prime(self, scans: int, first_generator: torch.Generator | None = None,
              generator: torch.Generator | None = None) -> None:
        self.search(generator, first_generator=first_generator)

    def search(self, generator: torch.Generator | None = None,
               first_generator: torch.Generator | None = None) -> dict[int, list[int]]:
        """Draw the N images (from ``first_generator``, default ``generator``), then for each budget
        t sample ``n_sequences`` sets of t locations from ``generator``, score them, keep the best."""
        g = self.geometry
        L, M = g.num_locations, self.n_sequences
        x = self._draw(first_generator if first_generator is not None else generator)  # (N, C, S, S)
        pm = g.patch_masks(self.device)  # (L, 1, S, S)
        empty = torch.zeros(1, 1, g.image_size, g.image_size, device=self.device)
        kw = dict(channels_last=self.channels_last, amp=self.amp)
        p0 = sequence_probs(self.classifier, x, empty, self.illness, self.chunk_size, **kw)  # (1, N)
        prior = estimators.binary_entropy(p0[0].mean())  # H(mean_n g(f_empty(x_n)))
        self.reset()
        self.draws = x
        for t in range(1, self.scans + 1):
            seqs = torch.rand(M, L, generator=generator).argsort(dim=1)[:, :t]  # (M, t) distinct locations per row
            masks = pm[seqs.to(self.device)].amax(dim=1)  # (M, 1, S, S) union of each set's patches
            p = sequence_probs(self.classifier, x, masks, self.illness, self.chunk_size, **kw)  # (M, N)
            u = (prior - estimators.binary_entropy(p).mean(-1)).float()  # (M,)
            best = int(select(u[None], torch.zeros(1, M, dtype=torch.bool, device=u.device), generator=generator)[0])
            self.utilities[t], self.candidates[t], self._best[t] = u, seqs, seqs[best].tolist()
        return dict(self._best)

    def budget_set(self, t: int, generator: torch.Generator | None = None) -> list[int]:
        """The chosen set of t locations (eq. 68 at budget t), searching first if needed."""
        if not 1 <= t <= self.scans:
            raise UserError(f"the non-greedy sets were searched for budgets 1..{self.scans} but {t} was requested; "
                            f"construct NonGreedyUncondPolicy with scans={t}")
        if not self._best:
            self.search(generator)
        return list(self._best[t])

    def sequence(self, T: int, generator: torch.Generator | None = None) -> list[int]:
        """The budget-``scans`` set in its sampled order, first T (step-by-step callers)."""
        if T > self.scans:
            raise UserError(f"the non-greedy sequence was searched for {self.scans} scans but {T} were requested; "
                            f"construct NonGreedyUncondPolicy with scans={T}")
        return self.budget_set(self.scans, generator)[:T]


class FullImagePolicy(Policy):
    """Upper bound: the evaluator classifies the whole image at every t (no locations chosen)."""

    observes_everything = True

    def __init__(self, name: str = "full"):
        self.name = name

    def next_locations(self, state: ScanState, generator: torch.Generator | None = None) -> Tensor:
        raise ValueError("FullImagePolicy observes everything; the evaluator classifies the full image instead of scanning")


class ClairvoyantPolicy(Policy):
    """Greedy on the true image: the reference for what adaptivity can gain (issue 21).

    At each t it scans the location whose observation *on the true test image x** moves the
    classifier's current belief the most,

        l_t = argmax_l KL( g(v | y_{<t} ∪ x*_l) || g(v | y_{<t}) ),

    eq. 69 with the completion x(n) replaced by x* and the reference being the current predictive
    (:func:`boed.estimators.belief_shift`). It is greedy EIG with a perfect completer, so
    ``(EIG-IPA - Uncond) / (clairvoyant - Uncond)`` says how much of the available room a
    completer recovers (:func:`boed.evaluation.metrics.capture_ratio`). It reads the whole image
    (:attr:`ScanState.truth`, set by the evaluator because :attr:`reads_truth` is True) and never
    the label; ties are broken uniformly with the injected generator.
    """

    reads_truth = True

    def __init__(self, classifier, illness, geometry: ScanGeometry, chunk_size: int | None = None, device=None,
                 channels_last: bool = True, amp: bool = DEFAULT_AMP, name: str = "clairvoyant"):
        self.illness = _illness(illness)
        self.geometry = geometry
        self.name = name
        self.device = torch.device(device) if device is not None else model_device(classifier)
        self.classifier = prepare_classifier(classifier, self.device, channels_last)  # an inference copy
        self.chunk_size, self.channels_last, self.amp = chunk_size, channels_last, amp

    def scores(self, state: ScanState) -> Tensor:
        """``(B, L)`` belief shift of every candidate on the true images; 0 where already observed."""
        if state.truth is None:
            raise UserError("the clairvoyant policy needs the true test images (ScanState.truth); "
                            "it is a reference for boed evaluate, not a policy for new patients")
        x = state.truth.to(self.device)[:, None]  # (B, 1, C, S, S): the one "completion" is the truth
        mask = state.mask.to(self.device)  # (B, 1, S, S)
        skip = self.geometry.fully_observed(mask)  # (B, L)
        kw = dict(channels_last=self.channels_last, amp=self.amp)
        p = candidate_probs(self.classifier, x, mask, self.geometry, self.illness, self.chunk_size, skip, **kw)[..., 0]  # (B, L)
        every = torch.ones_like(skip)  # all skipped: each row is the current belief, computed once per image
        q = candidate_probs(self.classifier, x, mask, self.geometry, self.illness, self.chunk_size, every, **kw)[:, 0, 0]  # (B,)
        return estimators.belief_shift(p, q).masked_fill(skip.to(p.device), 0.0)

    def next_locations(self, state: ScanState, generator: torch.Generator | None = None) -> Tensor:
        scores = self.scores(state).cpu()  # (B, L)
        skip = self.geometry.fully_observed(state.mask).cpu()  # (B, L)
        return select(scores, skip, maximize=True, generator=generator)
