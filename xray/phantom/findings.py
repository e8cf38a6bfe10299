"""Finding renderers. Each draws one finding on a :class:`Canvas` and returns its pixel boxes.

Opacities are written as ``canvas.opac`` (fraction of lung air replaced by fluid or tissue, so
they only show inside aerated lung), other changes as ``extra`` (density added anywhere),
``lucent`` (density removed) and ``mark_gain`` (vascular markings kept). Where the real NIH box
file has the class (Atelectasis, Infiltration, Mass, Nodule, Pneumonia, Pneumothorax), the
location and size are drawn from a real box, mapped into the patient's lung frame.

The canvas's :class:`~xray.phantom.difficulty.Difficulty` scales finding sizes (``finding_size``)
and how much a finding changes the film (``contrast``), and sets the share of bilateral effusions
(``bilateral``); :func:`distractors` draws its look-alike normal variants. Neutral knobs leave every
operation (and every random draw) as in the default phantom.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from scipy import ndimage

from .anatomy import (CANON_H, CANON_W, CANON_X0, CANON_Y0, Anatomy, Pose, ellipse, lowpass_noise, sample_lungs,
                      sigmoid)
from .difficulty import DEFAULT, Difficulty
from .metadata import real_boxes

Box = tuple[float, float, float, float]  # x, y, w, h in output pixels


@dataclass
class Canvas:
    size: int
    u: np.ndarray  # (S, S) lung frame
    v: np.ndarray  # (S, S)
    lungs: np.ndarray  # (2, S, S): image-left (patient right), image-right lung
    template: np.ndarray  # (2, 64, 64)
    anat: Anatomy
    pose: Pose
    heart: np.ndarray  # (S, S) heart shadow in [0, 1]
    difficulty: Difficulty = DEFAULT
    opac: np.ndarray = field(init=False)
    extra: np.ndarray = field(init=False)
    lucent: np.ndarray = field(init=False)
    mark_gain: np.ndarray = field(init=False)

    def __post_init__(self):
        z = np.zeros((self.size, self.size), np.float32)
        self.opac, self.extra, self.lucent, self.mark_gain = z.copy(), z.copy(), z.copy(), z + 1.0

    @property
    def air(self) -> np.ndarray:
        """Aerated lung in [0, 1], ``(S, S)``."""
        return np.clip(self.lungs.sum(0), 0, 1) * (1 - 0.85 * self.heart)

    def add_opacity(self, m: np.ndarray, finding: bool = True) -> None:
        """Replace a fraction ``m`` of the lung air; a finding's is scaled by the difficulty's ``contrast``."""
        if finding:
            m = contrast(self, m)
        self.opac = 1 - (1 - self.opac) * (1 - np.clip(m, 0, 1))


def contrast(cv: Canvas, x):
    """``x`` scaled by the difficulty's ``contrast`` (``x`` itself when neutral: no float change)."""
    c = cv.difficulty.contrast
    return x if c == 1.0 else x * c


def sized(cv: Canvas, x):
    """``x`` scaled by the difficulty's ``finding_size`` (``x`` itself when neutral)."""
    f = cv.difficulty.finding_size
    return x if f == 1.0 else x * f


def box_of(m: np.ndarray, thr: float) -> Box | None:
    rows = np.nonzero((m > thr).any(1))[0]
    cols = np.nonzero((m > thr).any(0))[0]
    if len(rows) == 0:
        return None
    return float(cols[0]), float(rows[0]), float(cols[-1] + 1 - cols[0]), float(rows[-1] + 1 - rows[0])


def real_location(label: str, rng: np.random.Generator) -> tuple[float, float, float, float]:
    """(u, v, half-width, half-height) in the lung frame, from one real NIH box of ``label``."""
    boxes = real_boxes()[label]
    x, y, w, h = boxes[rng.integers(len(boxes))]
    u = (x + w / 2 - CANON_X0) / CANON_W + rng.normal(0, 0.03)
    v = (y + h / 2 - CANON_Y0) / CANON_H + rng.normal(0, 0.03)
    return (float(np.clip(u, 0.08, 0.92)), float(np.clip(v, 0.08, 0.92)),
            float(np.clip(w / 2 / CANON_W, 0.03, 0.35)), float(np.clip(h / 2 / CANON_H, 0.03, 0.35)))


def _side_of(u: float) -> int:
    return 0 if u < 0.5 else 1


def _patchy(cv: Canvas, rng: np.random.Generator, sigma: float, keep: float) -> np.ndarray:
    n = lowpass_noise(rng, (cv.size, cv.size), sigma)
    return sigmoid((n - keep) * 3.0)


# ---------------------------------------------------------------- anatomical findings

def effusion(cv: Canvas, rng: np.random.Generator, s: float) -> list[Box]:
    """Fluid at the lung base: meniscus rising laterally, blunted costophrenic angle; 1 or 2 sides."""
    sides = [0, 1] if rng.random() < cv.difficulty.bilateral else [int(rng.integers(2))]
    out = []
    rows = np.arange(cv.size, dtype=np.float32)[:, None]  # (S, 1)
    _, hpx = cv.pose.box_px(cv.anat, cv.size)
    for side in sides:
        lung = cv.lungs[side]
        inside = lung > 0.5
        cols = np.nonzero(inside.any(0))[0]
        if len(cols) < 3:
            continue
        bottom = (cv.size - 1 - np.argmax(inside[::-1], axis=0)).astype(np.float32)  # (S,) lowest lung row
        c = np.arange(cv.size, dtype=np.float32)
        lat = (cols[-1] - c) / (cols[-1] - cols[0]) if side == 0 else (c - cols[0]) / (cols[-1] - cols[0])
        lat = np.clip(lat, 0, 1)
        height = sized(cv, hpx * (0.02 + 0.28 * s * rng.uniform(0.7, 1.3)))
        top = bottom - height * (0.25 + 1.1 * lat ** 2)  # meniscus: higher along the lateral wall
        soft = 1.0 + 1.5 * (1 - s)
        fluid = sigmoid((rows - top[None, :]) / soft)  # (S, S)
        region = ndimage.gaussian_filter(lung, 0.8 + cv.size / 128) > 0.3
        m = fluid * region * (0.35 + 0.55 * s)
        cv.add_opacity(m)
        cv.extra += contrast(cv, 0.05 * s * fluid * region)  # fluid slightly denser than soft tissue over it
        b = box_of(fluid * region, 0.5)  # the fluid's extent, however faint
        if b:
            out.append(b)
    return out


def cardiomegaly_scale(rng: np.random.Generator, s: float) -> tuple[float, float]:
    """Heart enlargement (u, v) for the shadow; cardiothoracic ratio goes from ~0.45 to 0.55-0.7."""
    k = 1.22 + 0.3 * s * rng.uniform(0.8, 1.2)
    return k, 1.0 + 0.45 * (k - 1.0)


def cardiomegaly(cv: Canvas, rng: np.random.Generator, s: float) -> list[Box]:
    b = box_of(cv.heart * (cv.v > 0.35), 0.5)
    return [b] if b else []


def edema(cv: Canvas, rng: np.random.Generator, s: float) -> list[Box]:
    """Bilateral perihilar (bat-wing) haze plus septal (Kerley B) lines at the lateral bases."""
    haze = np.zeros_like(cv.u)
    for hu in (0.3, 0.7):
        r2 = ((cv.u - hu) / 0.2) ** 2 + ((cv.v - 0.5) / 0.26) ** 2
        haze += np.exp(-r2)
    haze = np.clip(haze, 0, 1) * (0.7 + 0.3 * _patchy(cv, rng, cv.size / 40, 0.0))
    cv.add_opacity(haze * (0.2 + 0.4 * s))
    cv.mark_gain *= 1.0 + 0.8 * s * haze  # vascular congestion
    t = np.abs(cv.u - 0.5) * 2
    lines = np.zeros_like(cv.u)
    for _ in range(int(3 + 5 * s)):
        vj = rng.uniform(0.55, 0.9)
        lines += np.exp(-((cv.v - vj) / 0.006) ** 2) * (t > rng.uniform(0.72, 0.85)) * (t < 1.0)
    cv.add_opacity(np.clip(lines, 0, 1) * (0.3 + 0.4 * s))
    b = box_of((haze * (0.2 + 0.4 * s) + lines * 0.3) * (cv.air > 0.3), 0.15)
    return [b] if b else []


def pneumothorax(cv: Canvas, rng: np.random.Generator, s: float) -> list[Box]:
    """Collapsed lung: a lucent rim without markings between chest wall and a thin pleural line."""
    u0, v0, _, _ = real_location("Pneumothorax", rng)
    side = _side_of(u0)
    # collapse towards the lower hilum: the rim is widest at the apex and along the lateral wall
    hu, hv = (0.38 if side == 0 else 0.62), 0.7
    g = 0.05 + 0.25 * s * rng.uniform(0.7, 1.3)
    # the collapsed lung is the template seen through a zoom-out about the hilum
    uc, vc = hu + (cv.u - hu) * (1 + g), hv + (cv.v - hv) * (1 + g)
    collapsed = sample_lungs(cv.template, uc, vc)[side]
    lung = cv.lungs[side]
    rim = np.clip(lung - collapsed, 0, 1)
    line = np.exp(-((collapsed - 0.5) / 0.18) ** 2) * (lung > 0.5)
    cv.mark_gain *= 1 - rim
    cv.lucent += contrast(cv, (0.04 + 0.05 * s) * rim)
    cv.extra += contrast(cv, (0.05 + 0.05 * s) * line * rim.max())
    b = box_of(rim, 0.5)
    return [b] if b else []


def emphysema_stretch(rng: np.random.Generator, s: float) -> float:
    return 1.0 + 0.1 * s * rng.uniform(0.7, 1.3)  # hyperinflated, flat diaphragm


def emphysema(cv: Canvas, rng: np.random.Generator, s: float) -> list[Box]:
    cv.lucent += contrast(cv, (0.03 + 0.05 * s) * cv.air)
    cv.mark_gain *= 1 - 0.5 * s
    b = box_of(cv.air, 0.5)
    return [b] if b else []


# ---------------------------------------------------------------- focal opacities

def _blob_finding(label: str, where: str, density: tuple[float, float], patch_sigma: float | None,
                  n: tuple[int, int] = (1, 1), scale: float = 1.0) -> Callable:
    def render(cv: Canvas, rng: np.random.Generator, s: float) -> list[Box]:
        out = []
        for _ in range(int(rng.integers(n[0], n[1] + 1))):
            u0, v0, ru, rv = real_location(where, rng)
            ru, rv = ru * scale * rng.uniform(0.6, 1.0), rv * scale * rng.uniform(0.6, 1.0)
            ru, rv = sized(cv, ru), sized(cv, rv)
            m = ellipse(cv.u, cv.v, u0, v0, ru, rv, edge=0.12)
            if patch_sigma is not None:
                m = m * _patchy(cv, rng, cv.size * patch_sigma, 0.3)
            m = m * (density[0] + density[1] * s)
            cv.add_opacity(m)
            b = box_of(m * (cv.air > 0.3), 0.15)
            if b:
                out.append(b)
        return out
    render.__name__ = label.lower()
    return render


infiltration = _blob_finding("Infiltration", "Infiltration", (0.25, 0.45), 1 / 45, n=(1, 3), scale=0.9)
pneumonia = _blob_finding("Pneumonia", "Pneumonia", (0.35, 0.45), 1 / 30)
consolidation_blob = _blob_finding("Consolidation", "Pneumonia", (0.55, 0.4), None, scale=0.8)


def consolidation(cv: Canvas, rng: np.random.Generator, s: float) -> list[Box]:
    """Dense homogeneous opacity with air bronchograms (dark branching streaks)."""
    before = cv.opac.copy()
    boxes = consolidation_blob(cv, rng, s)
    added = cv.opac - before
    br = np.abs(lowpass_noise(rng, (cv.size, cv.size), cv.size / 30)) < 0.12
    cv.opac = np.where(br & (added > 0.3), before + 0.6 * added, cv.opac)
    return boxes


def atelectasis(cv: Canvas, rng: np.random.Generator, s: float) -> list[Box]:
    """Plate-like (thin, tilted band) or lobar/basal wedge opacity."""
    u0, v0, ru, rv = real_location("Atelectasis", rng)
    ru, rv = sized(cv, ru), sized(cv, rv)
    if rng.random() < 0.5:
        a = rng.normal(0, 0.25)
        du, dv = cv.u - u0, cv.v - v0
        along = np.cos(a) * du + np.sin(a) * dv
        across = -np.sin(a) * du + np.cos(a) * dv
        m = np.exp(-(across / (0.012 + 0.012 * s)) ** 2) * (np.abs(along) < ru * 1.2)
    else:
        m = ellipse(cv.u, cv.v, u0, max(v0, 0.6), ru, rv * 0.7, edge=0.15)
    m = m * (0.45 + 0.45 * s)
    cv.add_opacity(m)
    b = box_of(m * (cv.air > 0.3), 0.15)
    return [b] if b else []


def _round(label: str, radius: tuple[float, float], lobulated: float) -> Callable:
    def render(cv: Canvas, rng: np.random.Generator, s: float) -> list[Box]:
        u0, v0, _, _ = real_location(label, rng)
        r = sized(cv, rng.uniform(*radius) * (0.7 + 0.6 * s))
        du, dv = cv.u - u0, (cv.v - v0) * 0.8
        th = np.arctan2(dv, du)
        rr = r * (1 + lobulated * np.sin(3 * th + rng.uniform(0, 6.3)) + 0.5 * lobulated * np.sin(5 * th))
        d = np.sqrt(du ** 2 + dv ** 2) / rr
        m = sigmoid((1.0 - d) / 0.08) * (0.55 + 0.4 * s)
        cv.add_opacity(m)
        cv.extra += contrast(cv, 0.04 * m)
        b = box_of(m, 0.2)
        return [b] if b else []
    render.__name__ = label.lower()
    return render


nodule = _round("Nodule", (0.025, 0.045), 0.05)
mass = _round("Mass", (0.07, 0.12), 0.15)


def fibrosis(cv: Canvas, rng: np.random.Generator, s: float) -> list[Box]:
    """Reticular pattern in the peripheral lower zones."""
    t = np.abs(cv.u - 0.5) * 2
    zone = np.clip((t - 0.4) / 0.4, 0, 1) * np.clip((cv.v - 0.35) / 0.3, 0, 1)
    net = np.abs(lowpass_noise(rng, (cv.size, cv.size), max(0.7, cv.size / 150))) < 0.35
    m = zone * net * (0.2 + 0.35 * s)
    cv.add_opacity(m)
    cv.lucent += contrast(cv, 0.02 * s * cv.air)  # volume loss / honeycombing
    b = box_of(zone * (cv.air > 0.3), 0.3)
    return [b] if b else []


def pleural_thickening(cv: Canvas, rng: np.random.Generator, s: float) -> list[Box]:
    """Apical cap or lateral pleural band along the lung edge."""
    side = int(rng.integers(2))
    hu = 0.3 if side == 0 else 0.7
    g = 0.04 + 0.05 * s
    inner = sample_lungs(cv.template, hu + (cv.u - hu) * (1 + g), 0.55 + (cv.v - 0.55) * (1 + g))[side]
    band = np.clip(cv.lungs[side] - inner, 0, 1)
    zone = (cv.v < 0.25) if rng.random() < 0.5 else (np.abs(cv.u - 0.5) > 0.3) & (cv.v > 0.3)
    m = band * zone * (0.6 + 0.35 * s)
    cv.add_opacity(m)
    b = box_of(m, 0.3)
    return [b] if b else []


def hernia(cv: Canvas, rng: np.random.Generator, s: float) -> list[Box]:
    """Hiatal hernia: retrocardiac round density with an air-fluid level."""
    r = sized(cv, 0.06 + 0.05 * s)
    m = ellipse(cv.u, cv.v, 0.53, 0.86, r, r * 0.8, edge=0.1)
    cv.extra += contrast(cv, 0.08 * m)
    cv.lucent += contrast(cv, 0.1 * m * (cv.v < 0.86 - 0.2 * r))
    b = box_of(m, 0.5)
    return [b] if b else []


#: label -> renderer, applied in this order (anatomy-changing ones are handled in render.py).
RENDERERS: dict[str, Callable[[Canvas, np.random.Generator, float], list[Box]]] = {
    "Cardiomegaly": cardiomegaly, "Emphysema": emphysema, "Edema": edema, "Effusion": effusion,
    "Infiltration": infiltration, "Consolidation": consolidation, "Pneumonia": pneumonia,
    "Atelectasis": atelectasis, "Nodule": nodule, "Mass": mass, "Fibrosis": fibrosis,
    "Pleural_Thickening": pleural_thickening, "Pneumothorax": pneumothorax, "Hernia": hernia,
}


# ---------------------------------------------------------------- look-alike normal variants

def distractors(cv: Canvas, rng: np.random.Generator) -> int:
    """Draw Poisson(``difficulty.distractors``) look-alikes of findings on any film; return how many.

    - basal: a smooth dome-topped density at one lung base (subpulmonic fat, raised hemidiaphragm,
      breast shadow); like a small effusion it brightens the base, but it has no lateral meniscus;
    - round: a small round density (nipple shadow, bone island) in the lower lateral zones, nodule-like;
    - linear: a thin tilted band (an old linear scar), like plate atelectasis.

    They change ``opac`` without the ``contrast`` scaling (they are not findings) and get no box.
    """
    n = int(rng.poisson(cv.difficulty.distractors))
    for _ in range(n):
        kind = rng.random()
        side = int(rng.integers(2))
        uc = rng.uniform(0.15, 0.35) if side == 0 else rng.uniform(0.65, 0.85)
        if kind < 0.45:  # basal dome, centred low so only its top shows inside the lung
            m = ellipse(cv.u, cv.v, uc, rng.uniform(0.98, 1.06), rng.uniform(0.12, 0.22), rng.uniform(0.08, 0.14), edge=0.2)
            m = m * rng.uniform(0.3, 0.6) * (cv.lungs[side] > 0.05)
        elif kind < 0.8:  # round density
            r = rng.uniform(0.02, 0.04)
            m = ellipse(cv.u, cv.v, uc, rng.uniform(0.55, 0.9), r, r * 1.1, edge=0.15) * rng.uniform(0.4, 0.7)
        else:  # linear scar
            u0, v0, a = uc, rng.uniform(0.45, 0.85), rng.normal(0, 0.3)
            du, dv = cv.u - u0, cv.v - v0
            along = np.cos(a) * du + np.sin(a) * dv
            across = -np.sin(a) * du + np.cos(a) * dv
            m = np.exp(-(across / 0.014) ** 2) * (np.abs(along) < rng.uniform(0.06, 0.14)) * rng.uniform(0.4, 0.7)
        cv.add_opacity(m, finding=False)
    return n
