"""Synthetic chest x-ray phantoms written in the exact NIH ChestX-ray14 on-disk format.

Labels, ages, sexes and views come from real NIH rows (resampled to ``prevalence``); lung shapes
from 435 real lung masks; finding locations from the real NIH box file. ``generate`` writes::

    out_dir/images/00000001_000.png ...          8-bit grayscale, size x size
    out_dir/Data_Entry_2017_v2020.csv             official header, 11 fields per row
    out_dir/BBox_List_2017.csv                    a box per rendered finding, 1024-px coordinates
    out_dir/train_val_list.txt, test_list.txt     split by patient (~20 % of patients in test)

Boxes use the real file's 1024 x 1024 coordinate system whatever ``size`` is (multiply by
``size / 1024`` for output pixels); ``Finding Label`` spells Infiltration as ``Infiltrate`` like
the real file. The folder is assembled under a hidden temporary name and renamed at the end, so a
killed run never leaves a folder that looks complete. Same ``seed`` gives the same bytes whatever
``workers`` is.

``difficulty`` (``default``, ``realistic``, ``hard`` or a :class:`Difficulty`) sets how hard the
films are: pose spread, finding size and contrast, effusion laterality, look-alike distractors
and film noise (:mod:`xray.phantom.difficulty`, which says why each preset is what it is).
``default`` writes exactly the images this generator always wrote.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..errors import UserError
from ..io import atomic_write_text
from .anatomy import PHANTOM_VERSION, lung_bank
from .difficulty import DEFAULT_DIFFICULTY, PRESETS, Difficulty, resolve_difficulty
from .metadata import DEMO_PREVALENCE, ImageMeta, bbox_text, data_entry_text, real_boxes, real_table, \
    sample_metadata, split_patients
from .render import Rendered, render_image
from .sheet import contact_sheet

__all__ = ["generate", "DEMO_PREVALENCE", "PHANTOM_VERSION", "contact_sheet", "render_meta", "Difficulty", "PRESETS",
           "DEFAULT_DIFFICULTY", "resolve_difficulty"]

log = logging.getLogger(__name__)
_MAX_CHUNK = 64


def render_meta(meta: ImageMeta, seed: int, index: int, size: int, labels: tuple[str, ...] | None = None,
                difficulty: str | Difficulty = DEFAULT_DIFFICULTY) -> Rendered:
    """Render row ``index`` of a set; ``labels`` overrides the findings drawn (same patient, pose, noise)."""
    return render_image(seed, index, meta.patient_id, meta.labels if labels is None else labels, meta.sex,
                        meta.view, size, resolve_difficulty(difficulty))


def _render_chunk(args: tuple[list[tuple[int, ImageMeta]], int, int, str, Difficulty]) -> list[list[tuple[str, tuple]]]:
    items, seed, size, img_dir, difficulty = args
    out = []
    for index, meta in items:
        r = render_meta(meta, seed, index, size, difficulty=difficulty)
        Image.fromarray(r.image, mode="L").save(os.path.join(img_dir, meta.name), compress_level=4)
        out.append(r.boxes)
    return out


def _check(n: int, size: int, seed: int, workers: int | None) -> None:
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise UserError(f"--n is {n}; expected a positive number of images")
    if not isinstance(size, (int, np.integer)) or not 32 <= size <= 1024:
        raise UserError(f"--size is {size}; expected an image side between 32 and 1024 pixels (e.g. 64, 128, 256)")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UserError(f"--seed is {seed}; expected a non-negative integer")
    if workers is not None and (not isinstance(workers, (int, np.integer)) or workers < 1):
        raise UserError(f"--workers is {workers}; expected a positive integer (or leave it out)")


def generate(out_dir: str | os.PathLike, n: int, size: int, seed: int, workers: int | None = None,
             prevalence: dict[str, float] | None = None, progress: bool = True,
             difficulty: str | Difficulty = DEFAULT_DIFFICULTY) -> Path:
    """Write ``n`` phantom images of ``size x size`` in NIH format to ``out_dir``; return its path.

    ``prevalence`` maps labels (the 14 pathologies or "No Finding") to target marginal
    frequencies, e.g. :data:`DEMO_PREVALENCE`; ``None`` keeps the real NIH frequencies.
    ``workers`` processes render in parallel (default: all CPU cores). ``difficulty``: a preset
    name of :data:`PRESETS` or a :class:`Difficulty` (default: the default phantom).
    """
    _check(n, size, seed, workers)
    diff = resolve_difficulty(difficulty)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"output folder {out} already exists and is not empty; choose a new --out or delete it")
    out.parent.mkdir(parents=True, exist_ok=True)
    metas = sample_metadata(int(n), np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2,))), prevalence)
    train_val, test = split_patients(metas, np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(3,))))
    lung_bank(), real_boxes(), real_table()  # load once before forking workers

    try:
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    except OSError as e:
        raise UserError(f"cannot write to {out.parent}: {e.strerror or e}; choose a writable --out") from None
    try:
        img_dir = tmp / "images"
        img_dir.mkdir()
        items = list(enumerate(metas))
        workers = workers or os.cpu_count() or 1
        step = max(1, min(_MAX_CHUNK, -(-len(items) // (4 * workers))))
        chunks = [(items[i:i + step], int(seed), int(size), str(img_dir), diff) for i in range(0, len(items), step)]
        bar = tqdm(total=len(metas), desc="phantoms", unit="img", disable=None if progress else True)
        boxes: list[list] = []
        if workers == 1 or len(chunks) == 1:
            for c in chunks:
                boxes += _render_chunk(c)
                bar.update(len(c[0]))
        else:
            ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
            with ProcessPoolExecutor(max_workers=min(workers, len(chunks)), mp_context=ctx) as pool:
                for c, res in zip(chunks, pool.map(_render_chunk, chunks)):
                    boxes += res
                    bar.update(len(c[0]))
        bar.close()
        scale = 1024.0 / size
        rows = [(m.name, lab, tuple(float(t) * scale for t in b)) for m, bs in zip(metas, boxes) for lab, b in bs]
        atomic_write_text(tmp / "BBox_List_2017.csv", bbox_text(rows))
        atomic_write_text(tmp / "train_val_list.txt", "".join(f"{s}\n" for s in train_val))
        atomic_write_text(tmp / "test_list.txt", "".join(f"{s}\n" for s in test))
        atomic_write_text(tmp / "Data_Entry_2017_v2020.csv", data_entry_text(metas))
        for p in [tmp, img_dir, *tmp.glob("*.*")]:  # mkdtemp/mkstemp create owner-only files
            p.chmod(0o755 if p.is_dir() else 0o644)
        os.replace(tmp, out)  # an empty existing folder is replaced atomically
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %d phantom images (%d boxes, difficulty %s) to %s", len(metas), len(rows), diff.name, out)
    return out
