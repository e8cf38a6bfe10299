"""Render one phantom chest x-ray at ``S x S`` from its metadata row (bright = dense).

Randomness is split into independent streams derived from ``(seed, ...)`` so that the same
patient keeps the same anatomy across follow-ups, and removing one finding leaves everything
else (pose, other findings, exposure, noise) unchanged:

- anatomy: ``SeedSequence(seed, spawn_key=(1, patient_id))``
- pose/exposure/noise/devices: ``(0, index, 0)``; finding ``k``: ``(0, index, 1 + k)``;
  look-alike distractors (:mod:`xray.phantom.difficulty`): ``(0, index, 99)``, drawn only when
  ``difficulty.distractors > 0``, so the default phantom's streams are untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..labels import PATHOLOGIES
from .anatomy import (Pose, clavicles, ellipse, lung_bank, lung_frame, ribs, sample_anatomy, sample_lungs, sigmoid,
                      spine, vessel_markings)
from .difficulty import DEFAULT, Difficulty
from .findings import RENDERERS, Box, Canvas, cardiomegaly_scale, distractors, emphysema_stretch

DISTRACTOR_STREAM = 99  # spawn key of the distractors' stream (findings use 1..14)

_LETTERS = {  # 5 x 7 bitmaps for side markers
    "L": ["10000", "10000", "10000", "10000", "10000", "10000", "11111"],
    "R": ["11110", "10001", "10001", "11110", "10100", "10010", "10001"],
}


@dataclass(frozen=True)
class Rendered:
    image: np.ndarray  # (S, S) uint8
    boxes: list[tuple[str, Box]]  # (label, (x, y, w, h) in output pixels)


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=tuple(key)))


def severity(rng: np.random.Generator) -> float:
    """Finding severity in (0, 1); Beta(1.2, 1.6): many mild, some subtle, few florid."""
    return float(rng.beta(1.2, 1.6))


def render_image(seed: int, index: int, patient_id: int, labels: tuple[str, ...], sex: str, view: str,
                 size: int, difficulty: Difficulty = DEFAULT) -> Rendered:
    """Render image ``index`` of the set with ``seed`` showing ``labels`` (any subset of PATHOLOGIES).

    ``difficulty`` (:mod:`xray.phantom.difficulty`) sets pose spread, finding size and contrast,
    distractors and film noise; the default gives the default phantom byte for byte.
    """
    k = difficulty
    templates, aspects = lung_bank()
    anat = sample_anatomy(_rng(seed, 1, patient_id), sex, len(templates), aspects)
    img_rng = _rng(seed, 0, index, 0)
    pose = Pose.sample(img_rng, anat, view, k)
    frng = {lab: _rng(seed, 0, index, 1 + PATHOLOGIES.index(lab)) for lab in labels if lab in RENDERERS}
    sev = {lab: severity(r) for lab, r in frng.items()}

    stretch = emphysema_stretch(frng["Emphysema"], sev["Emphysema"]) if "Emphysema" in frng else 1.0
    hk = cardiomegaly_scale(frng["Cardiomegaly"], sev["Cardiomegaly"]) if "Cardiomegaly" in frng else (1.0, 1.0)
    if k.contrast != 1.0:  # subtler findings: less enlargement / hyperinflation
        stretch = 1.0 + (stretch - 1.0) * k.contrast
        hk = (1.0 + (hk[0] - 1.0) * k.contrast, 1.0 + (hk[1] - 1.0) * k.contrast)
    if view == "AP":  # AP projection magnifies the heart
        hk = (hk[0] * 1.06, hk[1] * 1.03)
    u, v = lung_frame(size, anat, pose, stretch)
    template = templates[anat.template]
    lungs = sample_lungs(template, u, v)
    hcu, hcv, hru, hrv = anat.heart
    heart = ellipse(u, v, hcu + 0.25 * hru * (hk[0] - 1), hcv - 0.3 * hrv * (hk[1] - 1), hru * hk[0], hrv * hk[1],
                    edge=0.06)
    cv = Canvas(size=size, u=u, v=v, lungs=lungs, template=template, anat=anat, pose=pose, heart=heart, difficulty=k)
    boxes: list[tuple[str, Box]] = []
    for lab in RENDERERS:
        if lab in frng:
            boxes += [(lab, b) for b in RENDERERS[lab](cv, frng[lab], sev[lab])]
    if k.distractors > 0:
        distractors(cv, _rng(seed, 0, index, DISTRACTOR_STREAM))

    # density: soft tissue, heart, mediastinum, abdomen, bones, minus lung air
    x = np.abs(u - 0.5)
    hw = anat.body + 0.05 * np.clip(v, 0, 1.2)  # torso half-width in u
    body = sigmoid((hw - x) / 0.025)
    thick = np.sqrt(np.clip(1 - (x / (hw + 0.05)) ** 2, 0, 1))  # a cylinder: thicker in the middle
    d = 0.04 + body * (0.38 + 0.16 * thick)
    d += 0.05 * body * sigmoid((v - 0.97) / 0.04)  # abdomen below the domes
    medi = np.exp(-(x / 0.11) ** 4) * sigmoid((0.8 - v) / 0.05)
    d += 0.07 * np.maximum(heart, medi) + 0.03 * ellipse(u, v, 0.6, 0.2, 0.06, 0.05)
    if anat.female:
        d += 0.06 * (ellipse(u, v, 0.16, 0.95, 0.28, 0.2, 0.15) + ellipse(u, v, 0.84, 0.95, 0.28, 0.2, 0.15))
    air = cv.air * (1 - cv.opac)
    d -= 0.34 * air * (1.1 - 0.25 * np.clip(v, 0, 1))  # apices darker than the bases
    d += 0.07 * air * vessel_markings(u, v, anat) * cv.mark_gain
    chest = sigmoid((hw - 0.06 - x) / 0.02)
    d += body * (0.045 * ribs(u, v, anat) * chest + 0.09 * clavicles(u, v) + 0.04 * spine(u, v, anat))
    d -= 0.08 * np.exp(-((u - 0.5) / 0.025) ** 2) * sigmoid((0.3 - v) / 0.03)  # trachea
    if anat.bubble:
        d -= 0.08 * ellipse(u, v, 0.74, 1.07, 0.07, 0.04, 0.25)  # gastric bubble under the left dome
    d += cv.extra - cv.lucent

    # exposure, blur, noise, devices
    lo, hi = 0.04 + img_rng.normal(0, 0.02 * k.noise), 0.72 + img_rng.normal(0, 0.04 * k.noise)
    img = np.clip((d - lo) / (hi - lo), 0, 1) ** img_rng.uniform(0.8, 1.25)
    img = ndimage.gaussian_filter(img, max(0.3, size / 256))
    img = img + img_rng.normal(0, img_rng.uniform(0.005, 0.025) * k.noise, img.shape)
    _devices(img, img_rng, view, u, v)
    return Rendered(image=(np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), boxes=boxes)


def _devices(img: np.ndarray, rng: np.random.Generator, view: str, u: np.ndarray, v: np.ndarray) -> None:
    """Side marker letters, tubes and ECG leads (drawn in place, bright = radio-opaque)."""
    s = img.shape[0]
    if rng.random() < 0.5:
        letter = _LETTERS["L" if rng.random() < 0.5 else "R"]
        k = max(1, s // 64)
        glyph = np.kron(np.array([[c == "1" for c in row] for row in letter]), np.ones((k, k), bool))  # (7k, 5k)
        gy, gx = glyph.shape
        y0 = int(rng.integers(1, max(2, s // 10)))
        margin = int(rng.integers(1, max(2, s // 10)))
        x0 = margin if rng.random() < 0.5 else s - gx - margin
        img[y0:y0 + gy, x0:x0 + gx][glyph] = 0.97
    if rng.random() < (0.45 if view == "AP" else 0.08):
        rows = np.arange(s, dtype=np.float32)
        cols = np.arange(s, dtype=np.float32)[None, :]  # (1, S)
        mid = np.argmin(np.abs(u[s // 2] - 0.5))
        for _ in range(int(rng.integers(1, 4))):
            kind = rng.random()
            if kind < 0.5:  # endotracheal / nasogastric tube: a wavy near-vertical line
                end = int(s * rng.uniform(0.3, 1.0))
                xs = mid + rng.normal(0, s * 0.03) + s * 0.03 * np.sin(rows / s * rng.uniform(2, 6) + rng.uniform(0, 6))
                line = (np.abs(cols - xs[:, None]) < max(0.6, s / 200)) & (rows[:, None] < end)
            else:  # ECG lead: a ring and its wire to the image edge
                cy, cx = rng.uniform(0.1, 0.8) * s, rng.uniform(0.1, 0.9) * s
                r = max(1.5, s * 0.018)
                dist = np.sqrt((rows[:, None] - cy) ** 2 + (cols - cx) ** 2)
                xs = cx + (rows - cy) * rng.normal(0, 0.4) + s * 0.04 * np.sin(rows / s * 5 + rng.uniform(0, 6))
                line = (np.abs(dist - r) < 0.7) | ((np.abs(cols - xs[:, None]) < 0.5) & (rows[:, None] < cy))
            img[line] = np.maximum(img[line], rng.uniform(0.75, 0.95))
