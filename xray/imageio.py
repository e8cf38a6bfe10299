"""Read one x-ray image file as float32 ``(H, W)`` in [0, 1], bright = dense.

PNG/JPEG/TIFF via Pillow (8- or 16-bit, grayscale or with extra channels), DICOM via
:func:`xray.dicom.read_dicom` (chosen by the ``DICM`` magic, whatever the suffix).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .dicom import read_dicom
from .errors import UserError


def is_dicom(path: str | os.PathLike) -> bool:
    """True for a DICOM Part-10 file (``DICM`` at byte 128) or a ``.dcm`` suffix."""
    p = Path(path)
    if p.suffix.lower() == ".dcm":
        return True
    try:
        with open(p, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _to_gray(im: Image.Image) -> np.ndarray:
    """Pillow image -> float32 (H, W) in [0, 1]; colour -> luminance, alpha dropped."""
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return np.asarray(im, dtype=np.uint16).astype(np.float32) / 65535.0
    if mode == "I":  # 32-bit signed container: Pillow uses it for 16-bit PNGs in some versions
        a = np.asarray(im, dtype=np.int64)
        peak = 65535.0 if a.max(initial=0) <= 65535 else float(2**31 - 1)
        return (np.clip(a, 0, None) / peak).astype(np.float32)
    if mode == "F":
        return np.clip(np.asarray(im, dtype=np.float32), 0.0, 1.0)
    if mode in ("LA", "La"):
        im = im.getchannel("L")
    elif mode != "L":  # RGB, RGBA, P, 1, CMYK, ...: luminance (alpha dropped)
        im = im.convert("L")
    return np.asarray(im, dtype=np.uint8).astype(np.float32) / 255.0


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read a PNG (8/16-bit, any channels) or DICOM file as float32 ``(H, W)`` in [0, 1].

    Missing, corrupt or unreadable files raise :class:`UserError`.
    """
    p = Path(path)
    if p.is_dir():
        raise UserError(f"image {p} is a folder; expected one image file (PNG, JPEG or DICOM) inside it")
    if not p.is_file():
        raise UserError(f"image {p} does not exist; check the path")
    if is_dicom(p):
        return read_dicom(p)
    try:
        with Image.open(p) as im:
            im.load()
            arr = _to_gray(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UserError(f"cannot read image {p}: {e}; the file is corrupt or not an image") from None
    if arr.ndim != 2 or min(arr.shape) == 0:
        raise UserError(f"image {p} has shape {arr.shape}; expected a 2-D picture")
    return arr
