"""NIH ChestX-ray14 folders: the label CSV, bounding boxes, image files and the patient split.

A folder in NIH format holds ``Data_Entry_2017_v2020.csv`` (or the 2017 variant, optionally
``.gz``), images under ``images/`` or ``images_*/images/`` (PNG, or DICOM ``.dcm``) and optionally
the official ``train_val_list.txt`` / ``test_list.txt``. The phantom generator writes the same
layout, so everything below works on both.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import UserError
from .io import atomic_path
from .labels import NO_FINDING, PATHOLOGIES

CSV_NAMES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
IMAGE_SUFFIXES = (".png", ".dcm")
LABEL_COLUMNS: tuple[str, ...] = PATHOLOGIES + (NO_FINDING,)
META_COLUMNS = ("patient_id", "age", "sex", "view", "follow_up")

# The CSV columns read_labels needs, and the metadata column each becomes.
_NEEDED = {
    "Image Index": None,
    "Finding Labels": None,
    "Follow-up #": "follow_up",
    "Patient ID": "patient_id",
    "Patient Age": "age",
    "Patient Gender": "sex",
    "View Position": "view",
}
_AGE = re.compile(r"^\s*(\d+)\s*([YMWD]?)\s*$", re.IGNORECASE)
_AGE_PER_YEAR = {"": 1, "Y": 1, "M": 12, "W": 52, "D": 365}
VAL_FRACTION = 0.05
TEST_FRACTION = 0.2  # fallback split only; the official split holds out about 23 %


def _open_text(path: Path):
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def _split_header(line: str) -> list[str]:
    """Split a header on commas outside brackets: ``a,B[x,y]`` -> ``["a", "B[x]", "B[y]"]``.

    The NIH header packs several columns into one bracketed name (``OriginalImage[Width,Height]``)
    so a plain CSV reader sees fewer names than fields; expanding them realigns names and fields.
    """
    names, depth, cur = [], 0, ""
    for ch in line.rstrip("\r\n"):
        if ch == "," and depth == 0:
            names.append(cur)
            cur = ""
            continue
        depth += (ch == "[") - (ch == "]")
        cur += ch
    names.append(cur)
    out = []
    for name in names:
        m = re.fullmatch(r"\s*(.*?)\s*\[(.*)\]\s*", name)
        if m:
            out.extend(f"{m.group(1)}[{part.strip()}]" for part in m.group(2).split(","))
        else:
            out.append(name.strip())
    return out


def _read_table(path: Path) -> tuple[list[str], pd.DataFrame]:
    """The expanded header and all fields as strings (columns named by position)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"label file {path} does not exist; pass the NIH Data_Entry CSV")
    try:
        with _open_text(path) as f:
            first = f.readline()
            if not first.strip():
                raise UserError(f"{path} is empty (no header, no rows); expected the NIH Data_Entry CSV: a header line "
                                "and one row per image")
            header = _split_header(first)
            df = pd.read_csv(f, header=None, dtype=str, keep_default_na=False, skip_blank_lines=True)
    except pd.errors.EmptyDataError:
        raise UserError(f"{path} has a header but no rows; expected one row per image") from None
    except (OSError, UnicodeDecodeError, EOFError, pd.errors.ParserError) as e:
        raise UserError(f"cannot read {path} as CSV: {e}; expected the NIH Data_Entry CSV") from None
    return header, df


def read_labels(csv_path: str | os.PathLike) -> pd.DataFrame:
    """Read an NIH ``Data_Entry`` CSV into one row per image.

    Returns a DataFrame indexed by image name (index name ``"image"``) with one int 0/1 column per
    name in ``LABEL_COLUMNS`` (the 14 pathologies, then ``"No Finding"``) and the metadata columns
    ``patient_id`` (int), ``age`` (int years), ``sex`` ("M"/"F"), ``view`` ("PA"/"AP"),
    ``follow_up`` (int). Accepts the v2020 file, the 2017 variant (trailing empty column, ages
    like ``058Y``) and gzip. Unknown label strings and missing columns raise :class:`UserError`.
    """
    path = Path(csv_path)
    header, raw = _read_table(path)
    missing = [c for c in _NEEDED if c not in header]
    if missing:
        raise UserError(f"{path} lacks column(s) {', '.join(missing)} (header: {', '.join(h for h in header if h)});"
                        f" expected the NIH Data_Entry header")
    pos = {name: header.index(name) for name in _NEEDED}
    if raw.shape[1] <= max(pos.values()):
        raise UserError(f"{path} rows have {raw.shape[1]} fields but the header needs {max(pos.values()) + 1}; the file is truncated or not NIH format")
    col = {name: raw.iloc[:, i].str.strip() for name, i in pos.items()}

    names = col["Image Index"]
    if (names == "").any():
        line = int(np.flatnonzero((names == "").to_numpy())[0]) + 2
        raise UserError(f"{path} line {line} has an empty Image Index; every row must name an image")
    dup = names[names.duplicated()]
    if len(dup):
        raise UserError(f"{path} lists image {dup.iloc[0]!r} more than once ({len(dup)} duplicates); each image must appear once")

    onehot = col["Finding Labels"].str.get_dummies(sep="|")
    onehot.columns = [c.strip() for c in onehot.columns]
    onehot = onehot.T.groupby(level=0).max().T if onehot.columns.duplicated().any() else onehot
    unknown = sorted(set(onehot.columns) - set(LABEL_COLUMNS) - {""})
    if unknown:
        raise UserError(f"{path} has unknown label(s) {', '.join(map(repr, unknown))}; expected '|'-separated names from: "
                        f"{', '.join(LABEL_COLUMNS)}")
    empty = (col["Finding Labels"] == "").to_numpy()
    if empty.any():
        raise UserError(f"{path} image {names.iloc[int(np.flatnonzero(empty)[0])]!r} has no Finding Labels; use 'No Finding' for normal images")
    labels = onehot.reindex(columns=list(LABEL_COLUMNS), fill_value=0).astype(np.int8)

    out = pd.DataFrame(labels.to_numpy(), columns=list(LABEL_COLUMNS), index=pd.Index(names.to_numpy(), name="image"))
    out["patient_id"] = _ints(col["Patient ID"], "Patient ID", names, path)
    out["age"] = _ages(col["Patient Age"], names, path)
    out["sex"] = col["Patient Gender"].str.upper().to_numpy()
    out["view"] = col["View Position"].str.upper().to_numpy()
    out["follow_up"] = _ints(col["Follow-up #"], "Follow-up #", names, path)
    return out


def _ints(values: pd.Series, what: str, names: pd.Series, path: Path) -> np.ndarray:
    num = pd.to_numeric(values, errors="coerce")
    bad = num.isna().to_numpy()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise UserError(f"{path}: {what} of {names.iloc[i]!r} is {values.iloc[i]!r}; expected an integer")
    return num.to_numpy().astype(np.int64)


def _ages(values: pd.Series, names: pd.Series, path: Path) -> np.ndarray:
    parts = values.str.extract(_AGE)
    bad = parts[0].isna().to_numpy()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise UserError(f"{path}: Patient Age of {names.iloc[i]!r} is {values.iloc[i]!r}; expected years like 58 or 058Y")
    per_year = parts[1].str.upper().map(_AGE_PER_YEAR).to_numpy()
    return (parts[0].astype(np.int64).to_numpy() // per_year).astype(np.int64)


def read_bboxes(path: str | os.PathLike) -> pd.DataFrame:
    """Read ``BBox_List_2017.csv``: columns image, label (official spelling), x, y, w, h (1024 px)."""
    path = Path(path)
    _, raw = _read_table(path)
    if raw.shape[1] < 6:
        raise UserError(f"{path} has {raw.shape[1]} columns; expected Image Index, Finding Label, x, y, w, h")
    raw = raw.iloc[:, :6]
    raw.columns = ["image", "label", "x", "y", "w", "h"]
    raw["label"] = raw["label"].str.strip().replace({"Infiltrate": "Infiltration"})
    unknown = sorted(set(raw["label"]) - set(PATHOLOGIES))
    if unknown:
        raise UserError(f"{path} has unknown box label(s) {', '.join(map(repr, unknown))}; expected names from: {', '.join(PATHOLOGIES)}")
    for c in "xywh":
        num = pd.to_numeric(raw[c], errors="coerce")
        if num.isna().any():
            i = int(np.flatnonzero(num.isna().to_numpy())[0])
            raise UserError(f"{path}: box {c} of {raw['image'].iloc[i]!r} is {raw[c].iloc[i]!r}; expected a number")
        raw[c] = num.astype(np.float64)
    return raw.reset_index(drop=True)


def _check_root(root: str | os.PathLike) -> Path:
    p = Path(root).expanduser()
    if not p.is_dir():
        raise UserError(f"data root {p} is not a folder; pass the NIH-format folder holding Data_Entry_2017*.csv and images/")
    return p


def find_csv(root: str | os.PathLike) -> Path:
    """The label CSV in ``root``: the v2020 file first, then the 2017 one, then any Data_Entry*.csv[.gz]."""
    root = _check_root(root)
    for name in CSV_NAMES:
        for cand in (root / name, root / f"{name}.gz"):
            if cand.is_file():
                return cand
    others = sorted(p for p in root.glob("Data_Entry*.csv*") if p.suffix in (".csv", ".gz"))
    if others:
        return others[0]
    raise UserError(f"no label CSV in {root}; expected {CSV_NAMES[0]} (or {CSV_NAMES[1]}, optionally .gz)")


def scan_images(root: str | os.PathLike) -> dict[str, tuple[str, int, int]]:
    """Map image name -> ``(file path, size in bytes, mtime in ns)`` for ``root/images/*`` and
    ``root/images_*/images/*`` (.png or .dcm); one ``stat`` per file, no reads.

    A ``.dcm`` file also answers to the ``.png`` name the CSV lists (``x.png`` -> ``x.dcm``).
    When two folders hold the same name, ``images/`` wins, then ``images_*`` in sorted order.
    """
    root = _check_root(root)
    dirs = [root / "images"] + sorted(d / "images" for d in root.glob("images_*") if d.is_dir())
    found: dict[str, tuple[str, int, int]] = {}
    for d in dirs:
        if not d.is_dir():
            continue
        with os.scandir(d) as it:
            for e in it:
                name = e.name
                suffix = name[name.rfind("."):].lower() if "." in name else ""
                if suffix in IMAGE_SUFFIXES and e.is_file():
                    st = e.stat()
                    item = (e.path, st.st_size, st.st_mtime_ns)
                    found.setdefault(name, item)
                    if suffix == ".dcm":
                        found.setdefault(name[:-4] + ".png", item)
    return found


def find_images(root: str | os.PathLike) -> dict[str, Path]:
    """Map image name -> file for ``root/images/*`` and ``root/images_*/images/*`` (.png or .dcm).

    A ``.dcm`` file also answers to the ``.png`` name the CSV lists (``x.png`` -> ``x.dcm``).
    """
    return {name: Path(item[0]) for name, item in scan_images(root).items()}


def _read_list(path: Path) -> list[str]:
    return [s for s in (line.strip() for line in path.read_text().splitlines()) if s]


def _patient_bucket(pids: np.ndarray, salt: str) -> np.ndarray:
    """A stable uniform number in [0, 1) per patient id (same on every machine and Python run)."""
    uniq, inv = np.unique(pids, return_inverse=True)
    u = np.array([int.from_bytes(hashlib.sha1(f"{salt}:{p}".encode()).digest()[:8], "big") / 2**64 for p in uniq])
    return u[inv]


def split(root: str | os.PathLike, labels: pd.DataFrame) -> dict[str, list[str]]:
    """Patient-disjoint split: ``{"trainval", "train", "val", "test"}`` -> image names in table order.

    Uses the official ``train_val_list.txt`` / ``test_list.txt`` when ``root`` has them, else a
    deterministic hash of the patient id (about 20 % test). ``val`` is a deterministic ~5 % of
    the trainval patients, ``train`` the rest. Names not in ``labels`` are ignored.
    """
    root = _check_root(root)
    names = labels.index.to_numpy()
    pids = labels["patient_id"].to_numpy()
    tv_file, test_file = root / "train_val_list.txt", root / "test_list.txt"
    if tv_file.is_file() and test_file.is_file():
        test_set = set(_read_list(test_file))
        tv_set = set(_read_list(tv_file))
        both = tv_set & test_set
        if both:
            raise UserError(f"{next(iter(both))!r} is in both {tv_file.name} and {test_file.name}; the official lists are disjoint")
        is_test = np.isin(names, list(test_set))
        is_tv = np.isin(names, list(tv_set))
    else:
        is_test = _patient_bucket(pids, "test") < TEST_FRACTION
        is_tv = ~is_test
    is_val = is_tv & (_patient_bucket(pids, "val") < VAL_FRACTION)
    return {
        "trainval": names[is_tv].tolist(),
        "train": names[is_tv & ~is_val].tolist(),
        "val": names[is_val].tolist(),
        "test": names[is_test].tolist(),
    }


def write_labels_csv(path: str | os.PathLike, rows: list[dict]) -> None:
    """Write rows (dicts with the v2020 CSV field names) as a v2020-format Data_Entry CSV."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        f.write("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
                "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]\n")
        w = csv.writer(f)
        for r in rows:
            w.writerow([r["Image Index"], r["Finding Labels"], r.get("Follow-up #", 0), r["Patient ID"],
                        r.get("Patient Age", 50), r.get("Patient Gender", "M"), r.get("View Position", "PA"),
                        r.get("width", 1024), r.get("height", 1024), 0.143, 0.143])
