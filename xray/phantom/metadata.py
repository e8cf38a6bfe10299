"""Phantom metadata: real NIH rows (labels, age, sex, view) resampled to chosen prevalences.

Rows come from the real ``Data_Entry_2017_v2020.csv.gz`` shipped by torchxrayvision, so label
co-occurrence, ages, sexes and views are real. ``prevalence`` targets are met by raking
(iterative proportional fitting) of per-row importance weights, then rows are drawn i.i.d. and
grouped into synthetic patients with 1-6 follow-up images each.
"""

from __future__ import annotations

import functools
import gzip
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..labels import NO_FINDING, PATHOLOGIES

log = logging.getLogger(__name__)

HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
          "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
BBOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"
TARGET_NAMES: tuple[str, ...] = PATHOLOGIES + (NO_FINDING,)

#: Raised prevalences for small demo sets (real v2020 marginals in brackets): enough positives of
#: the demo illnesses in a few thousand images, co-occurrence still real.
DEMO_PREVALENCE: dict[str, float] = {
    "Effusion": 0.30,       # (0.119)
    "Infiltration": 0.30,   # (0.177)
    "Edema": 0.15,          # (0.021)
    "Cardiomegaly": 0.10,   # (0.025)
    "Pneumothorax": 0.10,   # (0.047)
    "No Finding": 0.35,     # (0.538)
}


def tx_data_dir() -> Path:
    """Folder of the real annotation files shipped by torchxrayvision."""
    try:
        import torchxrayvision  # here, not at the top: +8 s on `xray --help` (measured); only its data folder is needed
    except ImportError:  # pragma: no cover - it is a declared dependency
        raise UserError("the phantom generator needs torchxrayvision (it ships the real NIH annotations); "
                        "pip install torchxrayvision") from None
    return Path(torchxrayvision.__file__).parent / "data"


@dataclass(frozen=True)
class RealTable:
    """The real rows, as numpy columns. ``y`` is ``(R, 15)``: 14 pathologies + No Finding."""

    labels: np.ndarray  # (R,) str, e.g. "Cardiomegaly|Effusion"
    y: np.ndarray  # (R, 15) bool
    age: np.ndarray  # (R,) int
    sex: np.ndarray  # (R,) "M"/"F"
    view: np.ndarray  # (R,) "PA"/"AP"
    orig: np.ndarray  # (R, 4) str: width, height, spacing x, spacing y (real strings)


@functools.lru_cache(maxsize=1)
def real_table() -> RealTable:
    path = tx_data_dir() / "Data_Entry_2017_v2020.csv.gz"
    with gzip.open(path, "rt") as f:
        f.readline()  # header
        rows = [line.rstrip("\n").split(",") for line in f if line.strip()]
    cols = list(zip(*rows))
    labels = np.array(cols[1])
    y = np.zeros((len(rows), len(TARGET_NAMES)), dtype=bool)
    for k, name in enumerate(TARGET_NAMES):
        y[:, k] = [name in s.split("|") for s in labels]
    return RealTable(labels=labels, y=y, age=np.array(cols[4], dtype=np.int64), sex=np.array(cols[5]),
                     view=np.array(cols[6]), orig=np.stack([np.array(c) for c in cols[7:11]], axis=1))


def _canonical_target(name: str) -> str:
    key = "".join(ch for ch in name.lower() if ch.isalnum())
    for n in TARGET_NAMES:
        if "".join(ch for ch in n.lower() if ch.isalnum()) == key:
            return n
    raise UserError(f"unknown prevalence label {name!r}; valid: {', '.join(TARGET_NAMES)}")


def rake_weights(y: np.ndarray, targets: dict[str, float], iters: int = 200, tol: float = 1e-4) -> np.ndarray:
    """Importance weights ``(R,)`` (sum 1) whose weighted marginals of ``y`` hit ``targets``."""
    w = np.full(len(y), 1.0 / len(y))
    idx = {}
    for name, p in targets.items():
        canon = _canonical_target(name)
        if not (0.0 < float(p) < 1.0):
            raise UserError(f"prevalence of {canon} is {p}; expected a number strictly between 0 and 1")
        idx[TARGET_NAMES.index(canon)] = float(p)
    if not idx:
        return w
    err = 1.0
    for _ in range(iters):
        for k, p in idx.items():
            cur = w[y[:, k]].sum()
            w = np.where(y[:, k], w * (p / cur), w * ((1 - p) / (1 - cur)))
        err = max(abs(w[y[:, k]].sum() - p) for k, p in idx.items())
        if err < tol:
            break
    if err > 0.01:
        log.warning("prevalence targets %s are not jointly reachable with real rows (max error %.3f)", targets, err)
    return w / w.sum()


@dataclass(frozen=True)
class ImageMeta:
    """One phantom image's row of ``Data_Entry_2017_v2020.csv``."""

    name: str
    labels: tuple[str, ...]  # empty = No Finding
    follow_up: int
    patient_id: int
    age: int
    sex: str
    view: str
    orig: tuple[str, str, str, str]

    def csv_row(self) -> str:
        finding = "|".join(self.labels) if self.labels else NO_FINDING
        return ",".join([self.name, finding, str(self.follow_up), str(self.patient_id), str(self.age),
                         self.sex, self.view, *self.orig])


def sample_metadata(n: int, rng: np.random.Generator, prevalence: dict[str, float] | None = None,
                    max_follow_ups: int = 6) -> list[ImageMeta]:
    """``n`` image rows grouped by synthetic patient (ids 1.., follow-ups 0..), ordered by name."""
    table = real_table()
    w = rake_weights(table.y, prevalence or {})
    rows = rng.choice(len(w), size=n, p=w)
    metas: list[ImageMeta] = []
    i, pid = 0, 0
    while i < n:
        pid += 1
        k = min(int(rng.geometric(0.55)), max_follow_ups, n - i)
        first = rows[i]
        age = int(table.age[first])
        for fu in range(k):
            r = rows[i + fu]
            labels = tuple(s for s in table.labels[r].split("|") if s != NO_FINDING)
            metas.append(ImageMeta(name=f"{pid:08d}_{fu:03d}.png", labels=labels, follow_up=fu, patient_id=pid,
                                   age=age, sex=str(table.sex[first]), view=str(table.view[r]),
                                   orig=tuple(str(v) for v in table.orig[r])))
            age += int(rng.random() < 0.3)
        i += k
    return metas


def split_patients(metas: list[ImageMeta], rng: np.random.Generator, test_fraction: float = 0.2
                   ) -> tuple[list[str], list[str]]:
    """(train_val names, test names), split by patient."""
    pids = sorted({m.patient_id for m in metas})
    test = set(np.asarray(pids)[rng.random(len(pids)) < test_fraction].tolist())
    train_val = [m.name for m in metas if m.patient_id not in test]
    test_names = [m.name for m in metas if m.patient_id in test]
    return train_val, test_names


def data_entry_text(metas: list[ImageMeta]) -> str:
    return "\n".join([HEADER] + [m.csv_row() for m in metas]) + "\n"


def bbox_text(boxes: list[tuple[str, str, tuple[float, float, float, float]]]) -> str:
    """``BBox_List_2017.csv`` text; boxes ``(image, label, (x, y, w, h))`` in 1024-px coordinates."""
    lines = [BBOX_HEADER]
    for name, label, (x, y, w, h) in boxes:
        label = "Infiltrate" if label == "Infiltration" else label  # the real file's spelling
        lines.append(f"{name},{label},{x:.4f},{y:.4f},{w:.4f},{h:.4f}")
    return "\n".join(lines) + "\n"


@functools.lru_cache(maxsize=1)
def real_boxes() -> dict[str, np.ndarray]:
    """Real NIH boxes per class (spelling as in LABELS: Infiltration) as ``(n, 4)`` fractions of 1024."""
    path = tx_data_dir() / "BBox_List_2017.csv.gz"
    with gzip.open(path, "rt") as f:
        text = f.read()
    out: dict[str, list[list[float]]] = {}
    for line in io.StringIO(text).readlines()[1:]:
        parts = line.strip().split(",")
        if len(parts) < 6:
            continue
        label = "Infiltration" if parts[1] == "Infiltrate" else parts[1]
        out.setdefault(label, []).append([float(v) / 1024.0 for v in parts[2:6]])
    return {k: np.asarray(v) for k, v in out.items()}
