"""DICOM radiographs -> float32 ``(H, W)`` in [0, 1], bright = dense.

Order (DICOM PS3.3 C.11): stored values -> modality LUT (rescale slope/intercept or a Modality LUT
Sequence) -> VOI LUT (window centre/width or a VOI LUT Sequence) -> invert ``MONOCHROME1``. The
result is normalised by the output range the standard defines for that chain (from ``BitsStored``
and ``PixelRepresentation``, not from the container's 16 bits), so a faint image stays faint.
"""

from __future__ import annotations

import os
import warnings

import numpy as np

from .errors import UserError

MONOCHROME = ("MONOCHROME1", "MONOCHROME2")


def _stored_range(ds) -> tuple[float, float]:
    bits = int(ds.BitsStored)
    if int(getattr(ds, "PixelRepresentation", 0)) == 1:
        return -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
    return 0.0, 2.0**bits - 1


def _lut_range(item) -> tuple[float, float]:
    """Output range of a LUT Sequence item: [0, 2**bits - 1] with bits from LUTDescriptor[2]."""
    bits = int(item.LUTDescriptor[2])
    return 0.0, 2.0**bits - 1


def _modality_range(ds) -> tuple[float, float]:
    """Range of values after the modality LUT (matches pydicom's windowing output range)."""
    if ds.get("ModalityLUTSequence"):
        return _lut_range(ds.ModalityLUTSequence[0])
    lo, hi = _stored_range(ds)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        lo, hi = sorted((lo * float(slope) + float(intercept), hi * float(slope) + float(intercept)))
    return lo, hi


def read_dicom(path: str | os.PathLike) -> np.ndarray:
    """Read a single-frame grayscale DICOM as float32 ``(H, W)`` in [0, 1], bright = dense.

    Colour, multi-frame and unreadable files raise :class:`UserError`.
    """
    import pydicom  # here, not at the top: +0.55 s on `ipa_core --help` (measured; xray.cache imports this module)
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    forced = False
    try:
        with warnings.catch_warnings():  # pydicom warns per odd element; one error line is enough
            warnings.simplefilter("ignore")
            try:
                ds = pydicom.dcmread(path)
            except pydicom.errors.InvalidDicomError:  # no preamble/meta header: still readable raw
                forced = True
                ds = pydicom.dcmread(path, force=True)
    except Exception as e:  # pydicom raises many types for damaged files
        raise UserError(f"cannot read DICOM {path}: {e}; expected a valid DICOM file") from None
    if "PixelData" not in ds or "BitsStored" not in ds:
        if forced:  # no DICM header and nothing that parses as an image: not a DICOM file at all
            raise UserError(f"{path} is not a DICOM file (no DICM header, no image elements); expected a DICOM radiograph, "
                            "or a PNG/JPEG file")
        raise UserError(f"DICOM {path} has no pixel data (a report or structured document?); expected an image")
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    spp = int(ds.get("SamplesPerPixel", 1))
    if photometric not in MONOCHROME or spp != 1:
        raise UserError(f"DICOM {path} is colour ({photometric or '?'}, {spp} samples/pixel); expected a grayscale "
                        "MONOCHROME1/MONOCHROME2 radiograph")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise UserError(f"DICOM {path} has {frames} frames; expected a single-frame radiograph (export one frame)")
    try:
        raw = ds.pixel_array
    except Exception as e:
        raise UserError(f"cannot decode pixels of DICOM {path}: {e}; install the decoder it names or convert it") from None
    if raw.ndim != 2:
        raise UserError(f"DICOM {path} decodes to shape {raw.shape}; expected one 2-D grayscale frame")

    arr = apply_modality_lut(raw, ds).astype(np.float64)
    lo, hi = _modality_range(ds)
    if ds.get("VOILUTSequence"):
        arr = apply_voi_lut(arr, ds, index=0, prefer_lut=True)
        lo, hi = _lut_range(ds.VOILUTSequence[0])
    elif ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        arr = apply_voi_lut(arr, ds, index=0, prefer_lut=False)  # window output spans [lo, hi]
    out = (np.asarray(arr, dtype=np.float64) - lo) / max(hi - lo, 1e-12)
    out = np.clip(out, 0.0, 1.0)
    if photometric == "MONOCHROME1":  # low values are bright: flip so bright = dense everywhere
        out = 1.0 - out
    return out.astype(np.float32)
