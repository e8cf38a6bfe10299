from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from xray.dicom import read_dicom
from xray.errors import UserError
from xray.imageio import read_image

FILES = Path(pydicom.__file__).parent / "data" / "test_files"  # shipped files, read by path


def write_dicom(path: Path, pixels: np.ndarray, photometric="MONOCHROME2", bits_stored=12, signed=False,
                frames=1, **extra) -> Path:
    """A minimal valid single-file DICOM (CR) holding ``pixels`` (H, W) or (F, H, W)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR image storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = int(signed)
    if frames > 1:
        ds.NumberOfFrames = frames
    for k, v in extra.items():
        setattr(ds, k, v)
    ds.PixelData = pixels.astype(np.int16 if signed else np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_monochrome1_cr_with_rescale_is_inverted_and_normalised_by_bits_stored(tmp_path):
    raw = np.array([[0, 1000, 2000], [3000, 4000, 4095]], dtype=np.uint16)
    p = write_dicom(tmp_path / "cr.dcm", raw, "MONOCHROME1", bits_stored=12, RescaleSlope=2, RescaleIntercept=-100)
    got = read_dicom(p)
    lo, hi = 0 * 2 - 100, 4095 * 2 - 100  # modality range of 12-bit stored values
    expect = 1 - ((raw * 2.0 - 100) - lo) / (hi - lo)
    assert got.dtype == np.float32 and got.shape == (2, 3)
    np.testing.assert_allclose(got, expect, atol=1e-6)
    assert got[0, 0] == pytest.approx(1.0) and got[1, 2] == pytest.approx(0.0)  # low value = bright in MONO1


def test_monochrome1_window_then_invert(tmp_path):
    raw = np.array([[0, 500, 1000, 1500, 2000, 4095]], dtype=np.uint16)
    p = write_dicom(tmp_path / "w.dcm", raw, "MONOCHROME1", WindowCenter=1000, WindowWidth=1001)
    c, w = 1000.0, 1001.0  # DICOM LINEAR window: ((x - (c - 0.5)) / (w - 1) + 0.5), clipped
    expect = 1 - np.clip((raw - (c - 0.5)) / (w - 1) + 0.5, 0, 1)
    np.testing.assert_allclose(read_dicom(p), expect, atol=1e-6)


def test_signed_pixels_use_signed_range(tmp_path):
    raw = np.array([[-2048, 0, 2047]], dtype=np.int16)
    got = read_dicom(write_dicom(tmp_path / "s.dcm", raw, bits_stored=12, signed=True))
    np.testing.assert_allclose(got, (raw + 2048.0) / 4095.0, atol=1e-6)


def test_real_ct_rescale_against_numpy():
    ds = pydicom.dcmread(FILES / "CT_small.dcm")
    raw = ds.pixel_array.astype(np.float64)
    slope, icpt = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    lo, hi = -(2.0**15) * slope + icpt, (2.0**15 - 1) * slope + icpt  # signed 16 bits stored
    np.testing.assert_allclose(read_dicom(FILES / "CT_small.dcm"), (raw * slope + icpt - lo) / (hi - lo), atol=1e-6)


def test_real_mr_window_against_numpy():
    ds = pydicom.dcmread(FILES / "MR_small.dcm")
    raw = ds.pixel_array.astype(np.float64)
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    expect = np.clip((raw - (c - 0.5)) / (w - 1) + 0.5, 0, 1)
    got = read_dicom(FILES / "MR_small.dcm")
    np.testing.assert_allclose(got, expect, atol=1e-6)
    assert 0 < got.mean() < 1


def test_read_image_dispatches_dicom_by_magic(tmp_path):
    target = tmp_path / "scan.png"  # wrong suffix, DICOM content
    target.write_bytes((FILES / "MR_small.dcm").read_bytes())
    np.testing.assert_array_equal(read_image(target), read_dicom(FILES / "MR_small.dcm"))


@pytest.mark.parametrize("name, match", [
    ("SC_rgb_small_odd.dcm", "colour"),
    ("examples_palette.dcm", "colour"),
    ("rtdose.dcm", "15 frames"),
    ("MR_truncated.dcm", "cannot decode"),
])
def test_rejects_colour_multiframe_and_truncated(name, match):
    with pytest.raises(UserError, match=match):
        read_dicom(FILES / name)


def test_rejects_synthetic_multiframe_and_garbage(tmp_path):
    raw = np.zeros((2, 4, 4), dtype=np.uint16)
    with pytest.raises(UserError, match="2 frames"):
        read_dicom(write_dicom(tmp_path / "mf.dcm", raw, frames=2))
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\x00not a dicom" * 40)
    with pytest.raises(UserError):
        read_dicom(junk)
