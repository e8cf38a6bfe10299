from __future__ import annotations

import shutil
import types
from pathlib import Path

import numpy as np
import pydicom
import pytest

from tests.xray.conftest import make_nih
from tests.xray.test_dicom import write_dicom
from xray import cli
from xray.commands import phantom as phantom_cmd

FILES = Path(pydicom.__file__).parent / "data" / "test_files"
HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
          "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]\n")


def run(argv, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    out, err = capsys.readouterr()
    return e.value.code, out, err


def assert_user_error(argv, capsys, match: str, out_dir: Path | None = None) -> None:
    code, _, err = run(argv, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert match in lines[0], lines[0]
    if out_dir is not None and out_dir.exists():  # nothing half-written
        assert not (out_dir / "manifest.json").exists() and not (out_dir / "labels.csv").exists()
        assert not list(out_dir.glob(".*.tmp"))


def prep(root, out, size="8"):
    return ["prepare", "--root", str(root), "--size", size, "--out", str(out), "--workers", "0", "--no-progress"]


def test_prepare_then_info(tmp_path, capsys):
    root = make_nih(tmp_path / "nih", n=10, px=16)
    code, out, _ = run(prep(root, tmp_path / "c"), capsys)
    assert code == 0 and "10 images at 8 px, 0 skipped" in out
    code, out, _ = run(["info", str(tmp_path / "c")], capsys)
    assert code == 0 and "10 images at 8 px" in out and "bad images (skipped): 0" in out
    (root / "images" / "00000002_001.png").unlink()
    code, out, _ = run(["info", str(root)], capsys)
    assert code == 0 and "missing images: 1 of 10" in out and "00000002_001.png" in out
    assert "hash of patient id" in out and "Effusion" in out


def test_bad_inputs_exit_2_with_one_line(tmp_path, capsys):
    out = tmp_path / "out"
    assert_user_error(prep(tmp_path / "missing", out), capsys, "is not a folder", out)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_user_error(prep(empty, out), capsys, "no label CSV", out)

    cols = tmp_path / "cols"
    cols.mkdir()
    (cols / "Data_Entry_2017_v2020.csv").write_text("Image Index,Finding Labels\na.png,Mass\n")
    assert_user_error(prep(cols, out), capsys, "lacks column(s) Follow-up #", out)

    unknown = make_nih(tmp_path / "unknown", n=4)
    csv = unknown / "Data_Entry_2017_v2020.csv"
    csv.write_text(csv.read_text().replace("No Finding", "Nothing Found", 1))
    assert_user_error(prep(unknown, out), capsys, "'Nothing Found'", out)

    missing = make_nih(tmp_path / "missing_img", n=10, skip_images=(3,))
    assert_user_error(prep(missing, out), capsys, "1 of 10 images are missing or unreadable", out)

    corrupt = make_nih(tmp_path / "corrupt", n=10)
    next((corrupt / "images").iterdir()).write_bytes(b"\x89PNG\r\n\x1a\ngarbage")
    assert_user_error(prep(corrupt, tmp_path / "out2"), capsys, "corrupt or not an image", tmp_path / "out2")

    assert_user_error(prep(make_nih(tmp_path / "sz", n=2), out, size="30"), capsys, "multiple of 4", out)
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    assert_user_error(prep(make_nih(tmp_path / "w", n=2), blocker / "x"), capsys, "cannot write", None)
    assert_user_error(["info", str(tmp_path / "nope")], capsys, "is not a folder")


@pytest.mark.parametrize("kind, match", [("colour", "colour"), ("multiframe", "2 frames"), ("garbage", "has no pixel data"),
                                         ("random-bytes", "is not a DICOM file")])
def test_bad_dicom_images(tmp_path, capsys, kind, match):
    root = make_nih(tmp_path / "nih", n=4)
    name = sorted((root / "images").iterdir())[0]
    dcm = name.with_suffix(".dcm")
    name.unlink()
    if kind == "colour":
        shutil.copy(FILES / "SC_rgb_small_odd.dcm", dcm)
    elif kind == "multiframe":
        write_dicom(dcm, np.zeros((2, 4, 4), np.uint16), frames=2)
    elif kind == "random-bytes":
        dcm.write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    else:
        dcm.write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 50)
    assert_user_error(prep(root, tmp_path / "c"), capsys, match, tmp_path / "c")


def test_dicom_images_are_accepted(tmp_path, capsys):
    root = make_nih(tmp_path / "nih", n=4)
    name = sorted((root / "images").iterdir())[0]
    name.unlink()
    write_dicom(name.with_suffix(".dcm"), np.full((8, 8), 4095, np.uint16), "MONOCHROME1")
    code, out, _ = run(prep(root, tmp_path / "c"), capsys)
    assert code == 0 and "4 images" in out
    row = sorted(p.name for p in (root / "images").iterdir()).index(name.with_suffix(".dcm").name)
    img = np.fromfile(tmp_path / "c" / "images.u8", dtype=np.uint8).reshape(4, 8, 8)  # (n, S, S)
    assert (img[row] == 0).all()  # max stored value in MONOCHROME1 = black


def test_phantom_command_wiring(tmp_path, capsys, monkeypatch):
    calls = []

    def generate(out_dir, n, size, seed, workers=None, prevalence=None, progress=True, difficulty="default"):
        calls.append((n, size, seed, workers, prevalence, progress, difficulty))
        return make_nih(Path(out_dir), n=n, px=size)

    fake = types.SimpleNamespace(generate=generate, DEMO_PREVALENCE={"Mass": 0.3}, DEFAULT_DIFFICULTY="default",
                                 PRESETS={"default": None, "hard": None})
    monkeypatch.setattr(phantom_cmd, "phantom", fake)  # the module the command reads
    code, out, _ = run(["phantom", "--out", str(tmp_path / "ph"), "--n", "6", "--size", "16", "--seed", "3",
                        "--workers", "1", "--demo-prevalence", "--no-progress", "--difficulty", "hard"], capsys)
    assert code == 0 and "6 phantom images at 16 px (seed 3, difficulty hard)" in out
    assert calls == [(6, 16, 3, 1, {"Mass": 0.3}, False, "hard")]
    assert_user_error(["phantom", "--out", str(tmp_path / "p2"), "--n", "6", "--size", "30", "--seed", "0"], capsys, "multiple of 4")
    assert_user_error(["phantom", "--out", str(tmp_path / "p2"), "--n", "0", "--size", "32", "--seed", "0"], capsys, "at least 1")


@pytest.mark.slow
def test_phantom_command_real_generator(tmp_path, capsys):
    code, out, err = run(["phantom", "--out", str(tmp_path / "ph"), "--n", "6", "--size", "32", "--seed", "3",
                          "--workers", "1", "--no-progress"], capsys)
    assert code == 0, err
    code, out, _ = run(prep(tmp_path / "ph", tmp_path / "c"), capsys)
    assert code == 0 and "6 images at 8 px" in out


def test_prepare_cache_dir_and_present_only(tmp_path, capsys):
    from xray.cache import cache_location
    from xray.dataset import open_dataset

    root = make_nih(tmp_path / "nih", n=20, px=8, skip_images=(0, 1))
    base = ["prepare", "--root", str(root), "--size", "8", "--workers", "0", "--no-progress"]
    assert_user_error(base + ["--cache-dir", str(tmp_path / "cc")], capsys, "2 of 20 images are missing")
    code, out, _ = run(base + ["--cache-dir", str(tmp_path / "cc"), "--present-only"], capsys)
    where = cache_location(root, 8, tmp_path / "cc")
    assert code == 0 and out.startswith(f"{where}: 18 images at 8 px") and "2 of 20 listed images absent" in out
    ds = open_dataset("chestxray", root, 8, "all", cache_dir=tmp_path / "cc", progress=False)
    assert ds.cache_dir == where and len(ds) == 18  # what --data-root DIR --cache-dir C reads
    code, out, _ = run(["info", str(where)], capsys)
    assert "absent images (listed, not on disk; --present-only): 2" in out
    assert not (root / "prepared-8").exists()
    # a truncated label CSV: the image files it no longer lists are counted in the summary line and by `xray info`
    csv = root / "Data_Entry_2017_v2020.csv"
    csv.write_text("".join(csv.read_text().splitlines(keepends=True)[:16]))  # header + 15 of 20 rows (images 0 and 1 have no file)
    code, out, _ = run(base + ["--cache-dir", str(tmp_path / "cc"), "--present-only"], capsys)
    assert code == 0 and "13 images at 8 px" in out and "5 image files on disk not listed in Data_Entry_2017_v2020.csv and left out (e.g. " in out, out
    code, out, _ = run(["info", str(where)], capsys)
    assert "image files on disk not listed in Data_Entry_2017_v2020.csv (left out): 5" in out
    with pytest.raises(SystemExit):  # --out and --cache-dir name the same thing twice
        cli.main(base + ["--out", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "cc")])
    assert not (tmp_path / "o").exists()
