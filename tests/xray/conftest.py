"""Fixtures: tiny NIH-format folders written by the tests themselves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xray.labels import PATHOLOGIES
from xray.nih import write_labels_csv

TINY_N = 40
TINY_PX = 48


def finding_for(i: int) -> str:
    """Deterministic label string: every 3rd image normal, others one or two findings."""
    if i % 3 == 0:
        return "No Finding"
    a, b = PATHOLOGIES[i % 14], PATHOLOGIES[(i * 5) % 14]
    return a if a == b or i % 2 else f"{a}|{b}"


def image_for(i: int, px: int) -> np.ndarray:
    """A distinct deterministic uint8 picture per index: a gradient plus an index-dependent square."""
    y, x = np.mgrid[0:px, 0:px]
    img = (x * 255 // max(px - 1, 1)).astype(np.uint8)
    s = 4 + i % (px // 3)
    img[s:2 * s, s:2 * s] = (37 * i) % 256
    return img


def make_nih(root: Path, n: int = TINY_N, px: int = TINY_PX, layout: str = "flat",
             official_split: bool = False, skip_images: tuple[int, ...] = (), findings=finding_for) -> Path:
    """Write an NIH-format folder: v2020 CSV + PNGs (layout "flat": images/, "nested": images_00k/images/).

    ``findings(i)``: the "Finding Labels" of image ``i`` (default :func:`finding_for`).
    """
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        pid = i // 2 + 1  # two images per patient
        name = f"{pid:08d}_{i % 2:03d}.png"
        rows.append({"Image Index": name, "Finding Labels": findings(i), "Follow-up #": i % 2,
                     "Patient ID": pid, "Patient Age": 20 + i, "Patient Gender": "MF"[i % 2],
                     "View Position": ("PA", "AP")[i % 3 == 1]})
        if i in skip_images:
            continue
        folder = root / "images" if layout == "flat" else root / f"images_{1 + i % 2:03d}" / "images"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image_for(i, px)).save(folder / name)
    write_labels_csv(root / "Data_Entry_2017_v2020.csv", rows)
    if official_split:
        names = [r["Image Index"] for r in rows]
        test = [nm for nm in names if int(nm[:8]) % 4 == 0]
        (root / "test_list.txt").write_text("\n".join(test) + "\n")
        (root / "train_val_list.txt").write_text("\n".join(nm for nm in names if nm not in test) + "\n")
    return root


@pytest.fixture
def tiny_nih(tmp_path) -> Path:
    return make_nih(tmp_path / "nih")


@pytest.fixture(scope="session")
def xrv_data() -> Path:
    txrv = pytest.importorskip("torchxrayvision")
    return Path(txrv.__file__).parent / "data"
