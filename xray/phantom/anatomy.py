"""Phantom anatomy: real lung shapes, per-patient warps, and the analytic chest around them.

Everything is drawn in the patient's *lung frame* ``(u, v)``: the lung bounding box is
``[0, 1]^2``, ``u`` grows to the image right (the patient's left), ``v`` downwards. A pose maps
image pixels to ``(u, v)`` (affine + smooth elastic warp), so anatomy and findings written in
``(u, v)`` follow each patient. Lung fields are sampled from the 518 real v7labs lung masks shipped
by torchxrayvision (435 usable ones with two lungs), cropped to their lung box and split into the
image-left (patient right) and image-right (patient left) lung.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from ..io import atomic_path
from .difficulty import DEFAULT, Difficulty
from .metadata import tx_data_dir

log = logging.getLogger(__name__)

TEMPLATE = 64  # lung templates are (2, 64, 64) in the lung frame
# Where the lung box sits in an average NIH image (fractions of the image side).
CANON_X0, CANON_W, CANON_Y0, CANON_H = 0.13, 0.74, 0.10, 0.68


BANK_VERSION = 1
# Bump when rendering changes: the default phantom set is cached under a versioned name.
PHANTOM_VERSION = 2


def _cache_file() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "boed" / f"phantom_lungs_v{BANK_VERSION}_{TEMPLATE}.npz"


@functools.lru_cache(maxsize=1)
def lung_bank() -> tuple[np.ndarray, np.ndarray]:
    """Real lung templates ``(M, 2, 64, 64)`` float32 in [0, 1] and their aspect ratios ``(M,)`` (w/h).

    Decoding the 518 masks takes ~6-15 s, so the result is cached in ``~/.cache/boed/``.
    """
    cache = _cache_file()
    if cache.exists():
        try:
            with np.load(cache) as z:
                return z["templates"], z["aspects"]
        except (OSError, ValueError, KeyError):
            log.warning("ignoring unreadable lung-mask cache %s", cache)
    temps, aspects = _decode_bank()
    try:
        with atomic_path(cache) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, templates=temps, aspects=aspects)
    except OSError as e:
        log.warning("could not cache lung masks at %s: %s", cache, e)
    return temps, aspects


def _decode_bank() -> tuple[np.ndarray, np.ndarray]:
    path = tx_data_dir() / "semantic_masks_v7labs_lungs.zip"
    temps, aspects = [], []
    with zipfile.ZipFile(path) as z:
        for name in sorted(z.namelist()):
            if name.endswith("/"):
                continue
            im = Image.open(io.BytesIO(z.read(name)))
            im.draft("L", (256, 256))
            im = im.convert("L")
            im.thumbnail((256, 256))
            mask = np.asarray(im) > 127
            if mask.sum() < 200:
                continue
            lab, n = ndimage.label(mask)
            sizes = ndimage.sum(mask, lab, range(1, n + 1))
            big = np.argsort(sizes)[::-1][:2]
            if n < 2 or sizes[big[1]] < 0.15 * sizes[big[0]]:
                continue  # not two lungs
            ys, xs = np.nonzero(np.isin(lab, big + 1))
            y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
            chans = []
            for comp in sorted(big + 1, key=lambda c: ndimage.center_of_mass(lab == c)[1]):
                crop = ((lab == comp)[y0:y1, x0:x1] * 255).astype(np.uint8)
                chans.append(np.asarray(Image.fromarray(crop).resize((TEMPLATE, TEMPLATE), Image.BILINEAR)))
            temps.append(np.stack(chans).astype(np.float32) / 255.0)  # (2, 64, 64)
            aspects.append((x1 - x0) / (y1 - y0))
    if not temps:  # pragma: no cover - the zip ships with torchxrayvision
        raise RuntimeError(f"no usable lung masks in {path}")
    return np.stack(temps), np.asarray(aspects, dtype=np.float32)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Overflow-free logistic function."""
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def lowpass_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Smooth unit-variance noise with correlation length ``sigma`` pixels."""
    n = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    return n / (n.std() + 1e-8)


@dataclass(frozen=True)
class Anatomy:
    """Per-patient constants (the same for every follow-up image of one patient)."""

    template: int
    aspect: float  # lung box w/h in the image
    width: float  # lung box width, fraction of the image
    elastic: np.ndarray  # (2, 5, 5) displacement field in lung-frame units
    heart: tuple[float, float, float, float]  # centre u, v, radius u, v
    body: float  # half-width of the torso in u
    rib_v0: float
    rib_dv: float
    female: bool
    mark_phase: float
    bubble: bool


def sample_anatomy(rng: np.random.Generator, sex: str, n_templates: int, aspects: np.ndarray) -> Anatomy:
    t = int(rng.integers(n_templates))
    aspect = float(np.clip(aspects[t] * rng.normal(1.0, 0.04), 0.9, 1.5))
    return Anatomy(
        template=t, aspect=aspect, width=float(np.clip(rng.normal(CANON_W, 0.035), 0.62, 0.84)),
        elastic=rng.normal(0, 0.025, size=(2, 5, 5)).astype(np.float32),
        heart=(float(rng.normal(0.58, 0.02)), float(rng.normal(0.74, 0.02)),
               float(rng.normal(0.21, 0.015)), float(rng.normal(0.17, 0.012))),
        body=float(rng.uniform(0.60, 0.74)), rib_v0=float(rng.normal(-0.06, 0.02)),
        rib_dv=float(rng.normal(0.105, 0.006)), female=sex == "F", mark_phase=float(rng.uniform(0, 2 * np.pi)),
        bubble=bool(rng.random() < 0.6))


@dataclass(frozen=True)
class Pose:
    """Per-image placement and breath: lung box centre (fractions), scale, rotation (radians), and
    inspiration (lung height relative to the patient's own, apex fixed: < 1 a shallow breath with
    high domes, as on many supine AP films).

    The spreads are those of real NIH films, where positioning, patient size and inspiration move
    the costophrenic angles by several percent of the image from one film to the next (more on
    portable AP films than on PA): where a basal finding sits is patient- and film-specific.
    """

    cx: float
    cy: float
    scale: float
    angle: float
    inspiration: float = 1.0

    @staticmethod
    def sample(rng: np.random.Generator, anat: Anatomy, view: str, difficulty: Difficulty = DEFAULT) -> "Pose":
        """One film's pose. ``difficulty`` multiplies each spread (and widens its clip range by the
        same factor); its neutral values draw exactly the default phantom's poses."""
        ap, k = view == "AP", difficulty
        wp, ws, wi = k.position - 1.0, k.scale - 1.0, k.inspiration - 1.0  # 0 for the default: same clip bounds
        return Pose(cx=float(np.clip(rng.normal(0.5, (0.03 if ap else 0.02) * k.position), 0.42 - 0.08 * wp, 0.58 + 0.08 * wp)),
                    cy=float(np.clip(rng.normal(CANON_Y0 + CANON_H / 2 + (0.02 if ap else 0.0), (0.035 if ap else 0.025) * k.position),
                                     0.36 - 0.08 * wp, 0.52 + 0.08 * wp)),
                    scale=float(np.clip(rng.normal(0.97 if ap else 1.0, (0.08 if ap else 0.06) * k.scale),
                                        0.8 - 0.12 * ws, 1.16 + 0.12 * ws)),
                    angle=float(rng.normal(0.0, (0.06 if ap else 0.035) * k.rotation)),
                    inspiration=float(np.clip(rng.normal((0.92 if ap else 1.0) - k.shallow, (0.07 if ap else 0.05) * k.inspiration),
                                              0.78 - 0.12 * wi - k.shallow, 1.12 + 0.12 * wi)))

    def box_px(self, anat: Anatomy, size: int) -> tuple[float, float]:
        """Lung box (width, height) in pixels."""
        w = anat.width * self.scale * size
        return w, w / anat.aspect * self.inspiration


def lung_frame(size: int, anat: Anatomy, pose: Pose, v_stretch: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Pixel grid -> lung frame ``(u, v)``, each ``(S, S)`` float32 (affine + elastic)."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    y, x = np.meshgrid(c, c, indexing="ij")  # (S, S) each
    w = anat.width * pose.scale
    h = w / anat.aspect
    v_stretch = v_stretch * pose.inspiration
    ca, sa = np.cos(pose.angle), np.sin(pose.angle)
    dx, dy = x - pose.cx, y - pose.cy
    u = (ca * dx + sa * dy) / w + 0.5
    v = ((-sa * dx + ca * dy) / h + 0.5) / v_stretch  # v_stretch > 1: taller lungs, same apex
    # elastic: a 5x5 field over [-0.25, 1.25]^2, bilinear
    gu = np.clip((u + 0.25) / 1.5 * 4, 0, 4)
    gv = np.clip((v + 0.25) / 1.5 * 4, 0, 4)
    du = ndimage.map_coordinates(anat.elastic[0], [gv, gu], order=1)
    dv = ndimage.map_coordinates(anat.elastic[1], [gv, gu], order=1)
    return (u + du).astype(np.float32), (v + dv).astype(np.float32)


def sample_lungs(template: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Lung fields ``(2, S, S)`` in [0, 1] at lung-frame coordinates ``u, v``."""
    gu = u * TEMPLATE - 0.5
    gv = v * TEMPLATE - 0.5
    return np.stack([ndimage.map_coordinates(template[k], [gv, gu], order=1, cval=0.0) for k in range(2)])


def ellipse(u: np.ndarray, v: np.ndarray, cu: float, cv: float, ru: float, rv: float, edge: float = 0.08
            ) -> np.ndarray:
    """Soft ellipse in [0, 1]; ``edge`` is the soft margin as a fraction of the radius."""
    e = np.sqrt(((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2)
    return sigmoid((1.0 - e) / edge)


def ribs(u: np.ndarray, v: np.ndarray, anat: Anatomy) -> np.ndarray:
    """Posterior (curved bands, bright) and anterior (fainter, sloping) ribs, in [0, ~1.4]."""
    t = np.abs(u - 0.5) * 2.0  # 0 at the spine, 1 at the lateral lung edge
    lateral = (t > 0.12) & (t < 1.25)
    post = (v - anat.rib_v0 - 0.16 * t ** 2 + 0.04 * t) / anat.rib_dv  # rib index, fractional
    f = post - np.floor(post)
    band = np.exp(-((f - 0.5) / 0.2) ** 2) * ((post > 0) & (post < 10)) * lateral
    ant = (v - anat.rib_v0 - 0.05 - 0.22 * (1.0 - t)) / (anat.rib_dv * 1.1)
    fa = ant - np.floor(ant)
    band_a = np.exp(-((fa - 0.5) / 0.16) ** 2) * ((ant > 0) & (ant < 6)) * (t > 0.3) * (t < 1.2)
    return band + 0.4 * band_a


def clavicles(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    t = np.abs(u - 0.5) * 2.0
    vc = 0.05 - 0.14 * t + 0.05 * t ** 2
    return np.exp(-((v - vc) / 0.03) ** 2) * (t > 0.1) * (t < 1.15)


def spine(u: np.ndarray, v: np.ndarray, anat: Anatomy) -> np.ndarray:
    band = np.exp(-((u - 0.5) / 0.055) ** 4)
    seg = 0.75 + 0.25 * np.cos((v - anat.rib_v0) / anat.rib_dv * 2 * np.pi)  # vertebral bodies
    return band * seg


def vessel_markings(u: np.ndarray, v: np.ndarray, anat: Anatomy) -> np.ndarray:
    """Branching-like streaks radiating from both hila, fading to the periphery, in [0, 1]."""
    out = np.zeros_like(u)
    for hu, sgn in ((0.32, -1.0), (0.66, 1.0)):
        du, dv = u - hu, v - 0.48
        r = np.sqrt(du ** 2 + dv ** 2) + 1e-3
        th = np.arctan2(dv, du * sgn)
        wig = 0.35 * np.sin(9.0 * r + anat.mark_phase)
        streak = np.maximum(0.0, np.cos(28.0 * th + wig + anat.mark_phase)) ** 6
        out += streak * np.exp(-r / 0.28) + 0.8 * np.exp(-(r / 0.09) ** 2)
    return np.clip(out, 0.0, 1.0)
