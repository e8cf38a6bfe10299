from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from xray.errors import UserError
from xray.imageio import read_image


def test_8bit_gray(tmp_path):
    a = np.arange(256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(a).save(tmp_path / "a.png")
    got = read_image(tmp_path / "a.png")
    assert got.dtype == np.float32 and got.shape == (16, 16)
    np.testing.assert_allclose(got, a / 255.0, atol=1e-7)


def test_16bit_gray_keeps_precision(tmp_path):
    a = (np.arange(64, dtype=np.uint32).reshape(8, 8) * 1000 + 7).astype(np.uint16)
    Image.fromarray(a).save(tmp_path / "a16.png")
    with Image.open(tmp_path / "a16.png") as im:
        assert im.mode.startswith("I")  # really a 16-bit PNG
    np.testing.assert_allclose(read_image(tmp_path / "a16.png"), a / 65535.0, atol=1e-7)


def test_rgba_drops_alpha_and_uses_luminance(tmp_path):
    g = np.arange(100, dtype=np.uint8).reshape(10, 10)
    rgba = np.stack([g, g, g, np.full_like(g, 17)], axis=-1)  # gray in RGB, junk alpha
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_allclose(read_image(tmp_path / "rgba.png"), g / 255.0, atol=1 / 255)
    la = np.stack([g, np.zeros_like(g)], axis=-1)
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    np.testing.assert_allclose(read_image(tmp_path / "la.png"), g / 255.0, atol=1e-7)


def test_rgb_luminance(tmp_path):
    rgb = np.zeros((2, 2, 3), dtype=np.uint8)
    rgb[0, 0] = (255, 0, 0)
    rgb[1, 1] = (0, 255, 0)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    got = read_image(tmp_path / "rgb.png")
    assert got[0, 0] == pytest.approx(0.299, abs=0.01) and got[1, 1] == pytest.approx(0.587, abs=0.01)
    assert got[0, 1] == 0


def test_corrupt_truncated_and_missing(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    with pytest.raises(UserError, match="corrupt"):
        read_image(tmp_path / "bad.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="trunc.png"):
        read_image(tmp_path / "trunc.png")
    with pytest.raises(UserError, match="does not exist"):
        read_image(tmp_path / "nope.png")


def test_a_folder_or_a_missing_file_says_which(tmp_path):
    from xray.errors import UserError
    from xray.imageio import read_image

    with pytest.raises(UserError, match="is a folder; expected one image file"):
        read_image(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        read_image(tmp_path / "missing.png")
