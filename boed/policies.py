"""Scan policies: the state of a batch being scanned, the policy protocol, and the greedy BOED policy.

A policy looks at a :class:`ScanState` (what has been scanned so far for B test images) and
returns the next location for each image, ``LongTensor (B,)``. The evaluator calls
``state = state.scan(x_full, policy.next_locations(state, generator), geometry)`` T times.

Every policy subclasses :class:`Policy` (``next_locations`` abstract; the optional hooks
``reset``, ``prime``, ``per_budget``/``budget_set`` and ``observes_everything`` are documented
no-op defaults there).
Ties between equally good candidates are broken uniformly with the injected generator
(:func:`select`).
"""

from __future__ import annotations

import abc
import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from boed import estimators
from boed.estimators import ESTIMATORS
from boed.geometry import ScanGeometry
from boed.scoring import DEFAULT_AMP, candidate_probs, model_device, prepare_classifier
from xray.errors import UserError
from xray.labels import Illness, resolve_illness


def patch_masks_of(geometry: ScanGeometry, locs: Tensor, dtype=torch.float32) -> Tensor:
    """Masks of one patch per entry of ``locs (B,)``: ``(B, 1, S, S)`` (without building all L masks)."""
    S, P, G = geometry.image_size, geometry.patch_size, geometry.grid
    if locs.numel() and (int(locs.min()) < 0 or int(locs.max()) >= geometry.num_locations):
        raise ValueError(f"scan locations must be in 0..{geometry.num_locations - 1}, got {locs.tolist()}")
    top, left = (locs // G) * geometry.stride, (locs % G) * geometry.stride  # (B,) each
    ar = torch.arange(S, device=locs.device)
    rows = (ar >= top[:, None]) & (ar < top[:, None] + P)  # (B, S)
    cols = (ar >= left[:, None]) & (ar < left[:, None] + P)  # (B, S)
    return (rows[:, :, None] & cols[:, None, :])[:, None].to(dtype)  # (B, 1, S, S)


@dataclass
class ScanState:
    """A batch of B test images being scanned."""

    x_obs: Tensor  # uint8 (B, C, S, S): scanned pixels, zero elsewhere
    mask: Tensor  # float (B, 1, S, S), 1 = observed
    locations: list[list[int]] = field(default_factory=list)  # per image, in scan order
    truth: Tensor | None = None  # uint8 (B, C, S, S): the whole images, set only for a policy with reads_truth

    def __post_init__(self):
        if not self.locations:
            self.locations = [[] for _ in range(self.x_obs.shape[0])]

    @property
    def batch_size(self) -> int:
        return self.x_obs.shape[0]

    @property
    def steps(self) -> int:
        """Scans done so far (the same for every image of the batch)."""
        return len(self.locations[0]) if self.locations else 0

    @classmethod
    def empty(cls, B: int, C: int, S: int, device: torch.device | str | None = None) -> "ScanState":
        """Nothing observed yet."""
        return cls(
            x_obs=torch.zeros(B, C, S, S, dtype=torch.uint8, device=device),
            mask=torch.zeros(B, 1, S, S, device=device),
            locations=[[] for _ in range(B)],
        )

    def scan(self, x_full: Tensor, locs: Tensor, geometry: ScanGeometry) -> "ScanState":
        """New state with patch ``locs[b]`` of ``x_full[b]`` observed (``x_full`` uint8 (B, C, S, S))."""
        locs = torch.as_tensor(locs).reshape(-1).long()
        if locs.numel() != self.batch_size or x_full.shape != self.x_obs.shape:
            raise ValueError(f"scan got {locs.numel()} locations and images {tuple(x_full.shape)}; "
                             f"expected {self.batch_size} and {tuple(self.x_obs.shape)}")
        mask = torch.maximum(self.mask, patch_masks_of(geometry, locs.to(self.mask.device), self.mask.dtype))  # (B, 1, S, S)
        x_obs = x_full.to(self.x_obs.device) * mask.to(torch.uint8)  # (B, C, S, S) uint8
        locations = [prev + [int(l)] for prev, l in zip(self.locations, locs.tolist())]
        return ScanState(x_obs=x_obs, mask=mask, locations=locations, truth=self.truth)

    def row(self, j: int) -> "ScanState":
        """The one-image state of image ``j``."""
        truth = None if self.truth is None else self.truth[j:j + 1]
        return ScanState(self.x_obs[j:j + 1], self.mask[j:j + 1], [list(self.locations[j])], truth)

    def to(self, device: torch.device | str) -> "ScanState":
        truth = None if self.truth is None else self.truth.to(device)
        return ScanState(self.x_obs.to(device), self.mask.to(device), [list(l) for l in self.locations], truth)


def scan_start(classifier, illness: Illness, labels, C: int, S: int, device) -> tuple:
    """The start of a one-image scan loop (``boed run``): ``(prob, state, target)``, where
    ``prob(state)`` is the classifier's illness probability, ``state`` is empty (1, C, S, S) and
    ``target`` the image's label (None when unknown)."""

    def prob(state: ScanState) -> float:
        return float(illness.prob(classifier.predict_proba(state.x_obs, state.mask))[0])

    target = None if labels is None else float(illness.target(torch.as_tensor(labels)))
    return prob, ScanState.empty(1, C, S, device), target


class Policy(abc.ABC):
    """A scan policy: chooses the next scan location of every image in a batch.

    ``next_locations(state, generator) -> LongTensor (B,)`` in ``0..L-1`` is the one method a
    policy must write. The evaluator (:func:`boed.evaluation.loop.evaluate`) calls the hooks
    below for every policy; their defaults do nothing, so a policy overrides only what it uses:

    - :meth:`reset`: forget cached, test-image-independent choices (a new repeat starts);
    - :meth:`prime`: compute them (the t = 1 choice from ``first_generator``'s dataset draws,
      shared by every method through the same generator; sequences from ``generator``);
    - :attr:`observes_everything` (False): True only for the full-image upper bound (the
      evaluator classifies the whole image at every t, :meth:`next_locations` is never called);
    - :attr:`per_budget` (False) with :meth:`budget_set`: budget t is scored with a set chosen for
      that budget (non-greedy), not with the first t scans of one sequence;
    - :attr:`reads_truth` (False): True only for a reference that may look at the whole test image
      (the clairvoyant bound); the evaluator then sets :attr:`ScanState.truth`. No policy ever
      gets the labels.
    """

    name: str = "policy"  # CSV method name: eig-ipa, epe-ipa, random, uncond, nongreedy, full, ...
    observes_everything: bool = False
    per_budget: bool = False
    reads_truth: bool = False

    @abc.abstractmethod
    def next_locations(self, state: ScanState, generator: torch.Generator | None = None) -> Tensor:
        """``LongTensor (B,)`` of locations in ``0..L-1``."""

    def reset(self) -> None:
        """Forget cached choices (no-op by default)."""

    def prime(self, scans: int, first_generator: torch.Generator | None = None,
              generator: torch.Generator | None = None) -> None:
        """Compute test-image-independent choices before a repeat (no-op by default)."""

    def budget_set(self, t: int, generator: torch.Generator | None = None) -> list[int]:
        """The scan set of budget t (only for :attr:`per_budget` policies)."""
        raise NotImplementedError(f"{type(self).__name__} is not a per-budget policy")


@dataclass
class ScoreResult:
    """Everything one greedy decision computed (for figures and inspection)."""

    eig: Tensor  # (B, L), exactly 0 where skip
    epe: Tensor  # (B, L)
    p: Tensor  # (B, L, N) g(v=1 | f_{prev, l}(x(n)))
    samples: Tensor  # uint8 (B, N, C, S, S) the completions used
    info_gain: Tensor  # (B, L, N) per-sample gain (eq. 69), 0 where skip
    skip: Tensor  # (B, L) bool, candidates already fully observed (never chosen)

    def choose(self, estimator: str = "eig", generator: torch.Generator | None = None) -> Tensor:
        """Best candidate per image, ``(B,)``: argmax EIG or argmin EPE; ties broken uniformly with
        ``generator`` (lowest index when it is None)."""
        return select(self.eig if estimator == "eig" else self.epe, self.skip, maximize=estimator == "eig",
                      generator=generator)


TIE_ATOL = 1e-12  # scores this close to the best count as tied (float dust on exact ties, e.g. EIG 0)


def select(scores: Tensor, skip: Tensor, maximize: bool = True, generator: torch.Generator | None = None) -> Tensor:
    """Argmax (or argmin) of ``scores (B, L)`` over candidates not in ``skip``, ``(B,)``.

    Candidates within :data:`TIE_ATOL` of the best share it; with a ``generator`` one of them is
    chosen uniformly (one ``torch.rand(B, L)`` draw per call, whether or not there are ties), so a
    saturated classifier (EIG 0 everywhere) does not always scan location 0. Without a generator
    the lowest tied index is returned.
    """
    fill = float("-inf") if maximize else float("inf")
    s = scores.masked_fill(skip, fill)
    if generator is None:
        return (s.argmax(dim=1) if maximize else s.argmin(dim=1)).long()  # torch returns the first extremum
    best = s.amax(dim=1, keepdim=True) if maximize else s.amin(dim=1, keepdim=True)  # (B, 1)
    tied = ((s - best).abs() <= TIE_ATOL) & ~skip  # (B, L); all False when every candidate is skipped
    keys = torch.rand(s.shape, generator=generator).to(s.device)  # (B, L) uniform keys
    keys = keys.masked_fill(~tied, -1.0)
    return keys.argmax(dim=1).long()


def generator_state_key(generator: torch.Generator | None) -> str:
    """A digest of a generator's current state (equal states give equal draws); "none" for None."""
    if generator is None:
        return "none"
    return hashlib.blake2b(generator.get_state().numpy().tobytes(), digest_size=8).hexdigest()


def sampler_key(sampler) -> Any:
    """What makes two samplers draw the same images from the same generator state: their ``key``
    attribute when they define one (e.g. :class:`boed.samplers.DatasetSampler`), else their identity."""
    key = getattr(sampler, "key", None)
    return key if key is not None else ("object", id(sampler))


class FirstChoiceCache:
    """t = 1 choices shared by every policy that makes the same computation (common random numbers).

    At t = 1 nothing is observed, so EIG-IPA, Uncond and every other EIG completer apply eq. 10 to
    N images drawn from the dataset: given the same draws (the same generator state and the same
    dataset sampler), the same classifier and N, they must choose the same first location. The
    key holds all of these, so a hit is the identical computation. ``hits``/``misses`` count uses.
    """

    def __init__(self):
        self._choices: dict[tuple, int] = {}
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._choices)

    def get_or_compute(self, key: tuple, compute) -> int:
        if key in self._choices:
            self.hits += 1
        else:
            self.misses += 1
            self._choices[key] = int(compute())
        return self._choices[key]


def first_choice_key(classifier_id: int, illness: Illness, estimator: str, n_samples: int, sampler,
                     geometry: ScanGeometry, generator: torch.Generator | None) -> tuple:
    return (classifier_id, illness.name, estimator, int(n_samples), sampler_key(sampler), geometry.image_size,
            geometry.grid, generator_state_key(generator))


def _is_empty(mask: Tensor) -> Tensor:
    """Which images have nothing observed: ``(B, 1, S, S)`` -> ``(B,)`` bool."""
    return mask.flatten(1).amax(1) <= 0


class GreedyPolicy(Policy):
    """Greedy BOED (paper sec. 5): sample N completions, score all L candidates, scan the best.

    ``estimator="eig"`` (eq. 10, argmax) or ``"epe"`` (eq. 65, argmin). At t = 1 nothing is
    observed, the paper draws the N images from the dataset (``first_sampler``; default
    ``sampler``) and the first choice is the same for every test image: it is computed once per
    (illness, estimator) and cached in :attr:`first_choice` until :meth:`reset` (the evaluator
    resets and re-primes it for every repeat). ``first_cache`` (a :class:`FirstChoiceCache`)
    shares t = 1 choices with other policies that make the same computation (Uncond, other EIG
    completers); ties between equally good candidates are broken uniformly with the generator.

    The classifier is used through an inference copy (:func:`boed.scoring.prepare_classifier`:
    eval mode, BN folded, channels_last); ``chunk_size`` classifier inputs per forward pass
    (None: 2048 on CUDA, 256 on CPU).
    """

    def __init__(
        self,
        classifier: torch.nn.Module,
        sampler,
        illness,
        geometry: ScanGeometry,
        n_samples: int = 10,
        estimator: str = "eig",
        first_sampler=None,
        chunk_size: int | None = None,
        device: torch.device | str | None = None,
        *,
        name: str | None = None,
        channels_last: bool = True,
        amp: bool = DEFAULT_AMP,
        fold_bn: bool = True,
        progress: bool = False,
        first_cache: FirstChoiceCache | None = None,
    ):
        if estimator not in ESTIMATORS:
            raise UserError(f"unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
        if n_samples < 1:
            raise UserError(f"n_samples must be >= 1, got {n_samples}")
        self.illness = illness if isinstance(illness, Illness) else resolve_illness(illness)
        self.geometry = geometry
        self.sampler = sampler
        self.first_sampler = first_sampler if first_sampler is not None else sampler
        self.n_samples = int(n_samples)
        self.estimator = estimator
        self.name = name or f"{estimator}-ipa"
        self.device = torch.device(device) if device is not None else model_device(classifier)
        self.channels = int(getattr(getattr(classifier, "config", None), "in_channels", 1))
        self.classifier = prepare_classifier(classifier, self.device, channels_last, fold_bn)  # an inference copy
        self.chunk_size = chunk_size
        self.channels_last, self.amp, self.progress = channels_last, amp, progress
        self._classifier_id = id(classifier)
        self.first_cache = first_cache if first_cache is not None else FirstChoiceCache()
        self._first: int | None = None
        self.last_result: ScoreResult | None = None

    @property
    def first_choice(self) -> int | None:
        return self._first

    def reset(self) -> None:
        """Forget the cached t = 1 choice (a new repeat draws it again)."""
        self._first = None

    def prime(self, scans: int, first_generator: torch.Generator | None = None,
              generator: torch.Generator | None = None) -> None:
        """Compute the test-image-independent t = 1 choice from ``first_generator``'s dataset draws."""
        self.first_location(ScanState.empty(1, self.channels, self.geometry.image_size, self.device), first_generator)

    def score(self, state: ScanState, generator: torch.Generator | None = None, sampler=None) -> ScoreResult:
        """Sample completions of every image in ``state`` and score every candidate location."""
        sampler = sampler or self.sampler
        x_obs, mask = state.x_obs.to(self.device), state.mask.to(self.device)
        samples = sampler.sample(x_obs, mask, self.n_samples, generator)  # (B, N, C, S, S)
        skip = self.geometry.fully_observed(mask)  # (B, L)
        p = candidate_probs(self.classifier, samples, mask, self.geometry, self.illness, self.chunk_size, skip,
                            channels_last=self.channels_last, amp=self.amp, progress=self.progress)  # (B, L, N)
        skip = skip.to(p.device)
        gains = estimators.eig(p).masked_fill(skip, 0.0)  # (B, L)
        ig = estimators.information_gain(p).masked_fill(skip[..., None], 0.0)  # (B, L, N)
        return ScoreResult(eig=gains, epe=estimators.epe(p), p=p, samples=samples, info_gain=ig, skip=skip)

    def first_location(self, state: ScanState, generator: torch.Generator | None = None) -> int:
        """The cached t = 1 choice (computed on first use from ``first_sampler`` draws, or taken
        from :attr:`first_cache` when another policy made the same computation)."""
        if self._first is None:
            _, C, S, _ = state.x_obs.shape

            def compute() -> int:
                empty = ScanState.empty(1, C, S, self.device)
                res = self.score(empty, generator, sampler=self.first_sampler)
                self.last_result = res
                return int(res.choose(self.estimator, generator)[0])

            key = first_choice_key(self._classifier_id, self.illness, self.estimator, self.n_samples,
                                   self.first_sampler, self.geometry, generator)
            self._first = self.first_cache.get_or_compute(key, compute)
        return self._first

    def next_locations(self, state: ScanState, generator: torch.Generator | None = None) -> Tensor:
        B = state.batch_size
        out = torch.empty(B, dtype=torch.long)
        empty = _is_empty(state.mask).cpu()
        if empty.any():
            out[empty] = self.first_location(state, generator)
        rest = (~empty).nonzero().reshape(-1)
        if rest.numel():
            sub = ScanState(state.x_obs[rest], state.mask[rest], [state.locations[i] for i in rest.tolist()])
            res = self.score(sub, generator)
            out[rest] = res.choose(self.estimator, generator).cpu()
            self.last_result = res
        return out
