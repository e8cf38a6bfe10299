"""Observation masks ``(B, 1, S, S)`` float, 1 = observed. Every sampler takes a torch.Generator.

- :func:`freeform_masks`: strokes and boxes in the style of Zhao et al. 2021 (CoModGAN, built on
  Yu et al. 2018), optionally conditioned on an observed-fraction bin (0-20 %, ..., 80-100 %).
- :func:`random_patch_masks`: 0-5 square patches (35 % of the width for IPA, 25 % for the
  classifier), corners drawn so that patches may be clipped at the border.
- :class:`MaskMixture`: the training mixture of the two (``IPA_TRAINING_MASKS``: 35 % patches;
  ``CLASSIFIER_TRAINING_MASKS``: 25 % patches, paper appendix I.4; free-form share 1/2 in both).
- :class:`MaskBank`: the same mixture with free-form masks drawn once and reused under random
  flips (a free-form mask costs ~10 ms of Python; a small CNN's training step less).
- :func:`parse_mask_spec`: the CLI's ``patches:K``, ``freeform``, ``box:top,left,h,w``, ``none``, ``full``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from xray.errors import UserError

OBSERVED_BINS: tuple[tuple[float, float], ...] = ((0.0, 0.2), (0.2, 0.4), (0.4, 0.6), (0.6, 0.8), (0.8, 1.0))


def bin_name(b: tuple[float, float]) -> str:
    return f"{round(100 * b[0])}-{round(100 * b[1])}%"


def observed_fraction(m: Tensor) -> Tensor:
    """Fraction of observed pixels per mask: ``(B,)``."""
    return m.flatten(1).float().mean(dim=1)


def observed_bin(frac: float, bins: tuple[tuple[float, float], ...] = OBSERVED_BINS) -> int:
    """Index of the bin holding an observed fraction (the last bin includes 1.0)."""
    for i, (lo, hi) in enumerate(bins):
        if lo <= frac < hi or (i == len(bins) - 1 and frac == hi):
            return i
    raise ValueError(f"observed fraction {frac} is outside the bins {bins}")


def numpy_rng(generator: torch.Generator | None) -> np.random.Generator:
    """A numpy Generator seeded from ``generator`` (for the PIL-drawn strokes)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return np.random.default_rng(seed)


# ----------------------------------------------------------------------------------------------
# free-form masks


def _brush_holes(rng: np.random.Generator, S: int, max_tries: int) -> np.ndarray:
    """Up to ``max_tries`` random polyline strokes with round joints: uint8 (S, S), 1 = hole."""
    img = Image.new("L", (S, S), 0)
    draw = ImageDraw.Draw(img)
    radius = math.sqrt(2) * S / 8  # mean stroke segment length
    mean_angle, angle_range = 2 * math.pi / 5, 2 * math.pi / 15
    min_w, max_w = max(1, round(12 * S / 512)), max(2, round(48 * S / 512))  # CoModGAN widths at 512 px, scaled
    for _ in range(rng.integers(max_tries) if max_tries > 0 else 0):
        n_vertex = int(rng.integers(4, 18))
        a_min = mean_angle - rng.uniform(0, angle_range)
        a_max = mean_angle + rng.uniform(0, angle_range)
        pts = [(float(rng.integers(0, S)), float(rng.integers(0, S)))]
        for i in range(n_vertex):
            angle = rng.uniform(a_min, a_max)
            angle = 2 * math.pi - angle if i % 2 == 0 else angle
            r = min(max(float(rng.normal(radius, radius / 2)), 0.0), 2 * radius)  # scalar clips (np.clip costs ~10 us a call)
            x = min(max(pts[-1][0] + r * math.cos(angle), 0.0), float(S))
            y = min(max(pts[-1][1] + r * math.sin(angle), 0.0), float(S))
            pts.append((x, y))
        w = int(rng.uniform(min_w, max_w))
        draw.line(pts, fill=1, width=w)
        for x, y in pts:
            draw.ellipse((x - w / 2, y - w / 2, x + w / 2, y + w / 2), fill=1)
    holes = np.asarray(img, dtype=np.uint8)
    if rng.random() > 0.5:
        holes = holes[::-1]
    if rng.random() > 0.5:
        holes = holes[:, ::-1]
    return holes


def _freeform_once(rng: np.random.Generator, S: int, coef: float) -> np.ndarray:
    """One CoModGAN-style mask: random boxes plus strokes removed from an all-observed image."""
    m = np.ones((S, S), dtype=np.uint8)

    def fill(max_size: int) -> None:
        w, h = int(rng.integers(max_size)), int(rng.integers(max_size))
        x = int(rng.integers(-(w // 2), S - w + w // 2 + 1))
        y = int(rng.integers(-(h // 2), S - h + h // 2 + 1))
        m[max(y, 0):min(y + h, S), max(x, 0):min(x + w, S)] = 0

    for tries, size in ((int(10 * coef), S // 2), (int(5 * coef), S)):
        for _ in range(rng.integers(tries) if tries > 0 else 0):
            fill(size)
    return m & (1 - _brush_holes(rng, S, int(20 * coef)))


def freeform_mask_np(rng: np.random.Generator, S: int, observed_range: tuple[float, float] = (0.0, 1.0),
                     max_tries: int = 10_000) -> np.ndarray:
    """A free-form mask (S, S) uint8 (1 = observed) whose observed fraction lies in ``observed_range``.

    Rejection sampling as in CoModGAN (``hole_range`` there = 1 - observed range here); the number
    of boxes and strokes grows with the hole fraction asked for.
    """
    lo, hi = observed_range
    if not 0.0 <= lo < hi <= 1.0:
        raise UserError(f"observed range {observed_range} is not a sub-interval of [0, 1]")
    hole_lo, hole_hi = 1.0 - hi, 1.0 - lo
    coef = min(hole_lo + hole_hi, 1.0)
    for _ in range(max_tries):
        m = _freeform_once(rng, S, coef)
        frac = float(m.mean())
        if lo <= frac < hi or frac == hi == 1.0:  # half-open bins, as observed_bin; 1.0 in the last
            return m
    raise RuntimeError(f"no free-form mask with observed fraction in {observed_range} after {max_tries} draws at S={S}")


def freeform_masks(B: int, S: int, generator: torch.Generator | None = None,
                   observed_range: tuple[float, float] | None = None) -> Tensor:
    """``(B, 1, S, S)`` free-form masks; each in ``observed_range``, or (default) in a uniformly drawn bin of :data:`OBSERVED_BINS`."""
    rng = numpy_rng(generator)
    out = np.empty((B, 1, S, S), dtype=np.float32)
    for b in range(B):
        rng_b = observed_range if observed_range is not None else OBSERVED_BINS[int(rng.integers(len(OBSERVED_BINS)))]
        out[b, 0] = freeform_mask_np(rng, S, rng_b)
    return torch.from_numpy(out)


# ----------------------------------------------------------------------------------------------
# patch masks


def random_patch_masks(B: int, S: int, frac: float, max_patches: int = 5, min_patches: int = 0,
                       generator: torch.Generator | None = None) -> Tensor:
    """``(B, 1, S, S)``: a uniform number in [min_patches, max_patches] of observed square patches.

    Side ``round(frac * S)``; each patch centre is uniform over the image, so patches near the
    border are clipped. Zero patches gives an all-zero (nothing observed) mask.
    """
    if not 0 < frac <= 1:
        raise UserError(f"patch fraction must be in (0, 1], got {frac}")
    if not 0 <= min_patches <= max_patches:
        raise UserError(f"need 0 <= min_patches <= max_patches, got {min_patches}, {max_patches}")
    P = max(1, round(frac * S))
    counts = torch.randint(min_patches, max_patches + 1, (B,), generator=generator)
    centres = torch.randint(0, S, (B, max_patches, 2), generator=generator)  # (B, max_patches, 2) row, col
    tops = centres - P // 2
    grid = torch.arange(S)
    rows = (grid[None, None] >= tops[..., :1]) & (grid[None, None] < tops[..., :1] + P)  # (B, max_patches, S)
    cols = (grid[None, None] >= tops[..., 1:]) & (grid[None, None] < tops[..., 1:] + P)  # (B, max_patches, S)
    active = torch.arange(max_patches)[None] < counts[:, None]  # (B, max_patches)
    boxes = rows[..., :, None] & cols[..., None, :] & active[..., None, None]  # (B, max_patches, S, S)
    return boxes.any(dim=1, keepdim=True).float()  # (B, 1, S, S)


# ----------------------------------------------------------------------------------------------
# mixtures and specs


@dataclass
class MaskMixture:
    """Training masks: free-form with probability ``p_freeform`` (observed-fraction bin uniform), else random patches."""

    p_freeform: float = 0.5
    patch_frac: float = 0.35
    max_patches: int = 5
    min_patches: int = 0

    def sample(self, B: int, S: int, generator: torch.Generator | None = None) -> Tensor:
        """``(B, 1, S, S)`` float, 1 = observed."""
        use_ff = torch.rand(B, generator=generator) < self.p_freeform  # (B,)
        out = random_patch_masks(B, S, self.patch_frac, self.max_patches, self.min_patches, generator)
        n_ff = int(use_ff.sum())
        if n_ff:
            out[use_ff] = freeform_masks(n_ff, S, generator)
        return out


IPA_TRAINING_MASKS = MaskMixture(patch_frac=0.35)
CLASSIFIER_TRAINING_MASKS = MaskMixture(p_freeform=IPA_TRAINING_MASKS.p_freeform, patch_frac=0.25)  # appendix I.4


class MaskBank:
    """:class:`MaskMixture` sampling with the free-form masks taken from a fixed bank.

    ``size`` free-form masks (each in a uniformly drawn observed-fraction bin) are drawn once from
    ``seed``; every free-form draw picks one uniformly and flips it vertically and/or horizontally
    at random (the free-form distribution is symmetric under both flips), so the bank offers
    ``4 * size`` distinct masks. The patch masks and the free-form/patch coin are drawn fresh, in
    the same order as :meth:`MaskMixture.sample`.
    """

    def __init__(self, mixture: MaskMixture, S: int, size: int, seed: int = 0):
        if size < 1:
            raise UserError(f"mask bank size must be >= 1, got {size}")
        self.mixture, self.S, self.size, self.seed = mixture, S, size, seed
        self.freeform = freeform_masks(size, S, torch.Generator().manual_seed(seed)) if mixture.p_freeform > 0 else None  # (size, 1, S, S)

    def sample(self, B: int, generator: torch.Generator | None = None) -> Tensor:
        """``(B, 1, S, S)`` float, 1 = observed."""
        mx = self.mixture
        use_ff = torch.rand(B, generator=generator) < mx.p_freeform  # (B,)
        out = random_patch_masks(B, self.S, mx.patch_frac, mx.max_patches, mx.min_patches, generator)
        n_ff = int(use_ff.sum())
        if n_ff:
            idx = torch.randint(self.size, (n_ff,), generator=generator)
            flips = torch.rand(n_ff, 2, generator=generator) < 0.5  # (n_ff, 2): vertical, horizontal
            ff = self.freeform[idx]  # (n_ff, 1, S, S)
            ff = torch.where(flips[:, 0, None, None, None], ff.flip(2), ff)
            ff = torch.where(flips[:, 1, None, None, None], ff.flip(3), ff)
            out[use_ff] = ff
        return out

MASK_SPEC_HELP = "patches:K (K random 35%% patches), freeform, box:top,left,h,w, none (nothing observed), full"


def parse_mask_spec(spec: str, S: int, generator: torch.Generator | None = None) -> Tensor:
    """One mask ``(1, 1, S, S)`` from a spec: ``patches:K``, ``freeform``, ``box:top,left,h,w``, ``none``, ``full``."""
    kind, _, arg = spec.partition(":")
    try:
        if kind == "none" and not arg:
            return torch.zeros(1, 1, S, S)
        if kind == "full" and not arg:
            return torch.ones(1, 1, S, S)
        if kind == "freeform" and not arg:
            return freeform_masks(1, S, generator, observed_range=(0.0, 1.0))
        if kind == "patches":
            k = int(arg)
            if k < 0:
                raise ValueError
            return random_patch_masks(1, S, IPA_TRAINING_MASKS.patch_frac, max_patches=k, min_patches=k, generator=generator)
        if kind == "box":
            top, left, h, w = (int(v) for v in arg.split(","))
            if h <= 0 or w <= 0 or not (0 <= top < S and 0 <= left < S):
                raise ValueError
            m = torch.zeros(1, 1, S, S)
            m[..., top:top + h, left:left + w] = 1
            return m
    except ValueError:
        pass
    raise UserError(f"bad mask spec {spec!r} for a {S}x{S} image; expected {MASK_SPEC_HELP.replace('%%', '%')}")
