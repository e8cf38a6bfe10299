"""MedMNIST's ChestMNIST as ``--data chestmnist``: a small ``.npz`` in the MedMNIST layout, built here."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from xray import chestmnist
from xray.dataset import add_data_args, dataset_from_args, open_dataset
from xray.errors import UserError
from xray.labels import LABELS, resolve_illness

N = {"train": 24, "val": 6, "test": 10}  # 40 images


def make_npz(path: Path, px: int = 64, seed: int = 0, compressed: bool = True) -> Path:
    """A ChestMNIST-layout file: image i of a split is filled with its global row (mod 256); labels
    cycle one MedMNIST label per row (row % 15 == 14: no finding)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    splits, row = {}, 0
    for split, n in N.items():
        x = np.empty((n, px, px), np.uint8)
        y = np.zeros((n, 14), np.uint8)
        for i in range(n):
            x[i] = (row + seed) % 256
            x[i, 0, 0] = rng.integers(0, 256)
            if row % 15 < 14:
                y[i, row % 15] = 1
            row += 1
        splits[split] = (x, y)
    return chestmnist.write_npz(path, splits, compressed=compressed)


def test_labels_map_onto_the_toolkit_list_and_official_split_is_kept(tmp_path):
    make_npz(tmp_path / "d" / "chestmnist_64.npz")
    ds = open_dataset("chestmnist", tmp_path / "d", size=64, split="all", progress=False)
    assert len(ds) == 40 and ds.image_size == 64 and ds.label_names == LABELS
    assert [len(open_dataset("chestmnist", tmp_path / "d", 64, s, progress=False)) for s in ("train", "val", "test")] == [24, 6, 10]
    assert len(open_dataset("chestmnist", tmp_path / "d", 64, "trainval", progress=False)) == 30
    for row in range(40):
        labels = ds.labels[row]  # (15,)
        if row % 15 == 14:
            assert labels.sum() == 0 and resolve_illness("no finding").target(labels) == 1
        else:
            name = chestmnist.MEDMNIST_LABELS[row % 15]
            want = "Pleural_Thickening" if name == "pleural" else name.capitalize()
            assert labels[LABELS.index(want)] == 1 and labels[LABELS.index("Any Finding")] == 1 and labels.sum() == 2
        assert int(ds[row][0][0, 1, 1]) == row % 256  # pixels in file order: train, val, test


def test_size_picks_the_exact_file_else_the_smallest_larger_one(tmp_path):
    make_npz(tmp_path / "d" / "chestmnist_128.npz", px=128)
    make_npz(tmp_path / "d" / "chestmnist_224.npz", px=224, seed=1)
    assert chestmnist.find_npz(tmp_path / "d", 64).name == "chestmnist_128.npz"
    assert chestmnist.find_npz(tmp_path / "d", 224).name == "chestmnist_224.npz"
    ds = open_dataset("chestmnist", tmp_path / "d", size=64, split="test", progress=False)
    assert ds[0][0].shape == (1, 64, 64) and int(ds[0][0][0, 32, 32]) == 30  # resized, values kept
    make_npz(tmp_path / "e" / "chestmnist_64.npz")
    with pytest.raises(UserError, match="found only chestmnist_64.npz.*download chestmnist_128.npz"):
        chestmnist.find_npz(tmp_path / "e", 128, fetch=False)
    assert chestmnist.find_npz(tmp_path / "e" / "chestmnist_64.npz", 32).name == "chestmnist_64.npz"  # the file itself


def test_a_copy_is_the_same_data_a_touch_rebuilds_nothing_new_content_does(tmp_path):
    make_npz(tmp_path / "a" / "chestmnist_64.npz")
    fp = open_dataset("chestmnist", tmp_path / "a", 64, "train", progress=False).fingerprint
    images = tmp_path / "a" / "prepared-chestmnist-64" / "images.u8"
    built = images.stat().st_mtime_ns
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # the copy brings its cache along (other mtimes)
    assert open_dataset("chestmnist", tmp_path / "b", 64, "train", progress=False).fingerprint == fp
    st = (tmp_path / "a" / "chestmnist_64.npz").stat()
    os.utime(tmp_path / "a" / "chestmnist_64.npz", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert open_dataset("chestmnist", tmp_path / "a", 64, "train", progress=False).fingerprint == fp
    assert images.stat().st_mtime_ns == built  # touched, not rebuilt
    make_npz(tmp_path / "a" / "chestmnist_64.npz", seed=5)  # other pixels
    again = open_dataset("chestmnist", tmp_path / "a", 64, "train", progress=False)
    assert again.fingerprint != fp and int(again[0][0][0, 1, 1]) == 5


def test_cache_dir_and_uncompressed_file(tmp_path):
    make_npz(tmp_path / "d" / "chestmnist_64.npz", compressed=False)
    ds = open_dataset("chestmnist", tmp_path / "d", 64, "val", cache_dir=tmp_path / "c", progress=False)
    assert len(ds) == 6 and ds.cache_dir.parent == tmp_path / "c" / "prepared"
    assert not (tmp_path / "d" / "prepared-chestmnist-64").exists()


def test_missing_file_one_line_says_where_to_put_it_and_creates_nothing(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError) as e:
        open_dataset("chestmnist", tmp_path / "empty", 64, "train", progress=False)
    msg = str(e.value)
    assert "chestmnist_64.npz" in msg and str(tmp_path / "empty") in msg and "\n" not in msg
    assert list((tmp_path / "empty").iterdir()) == []


@pytest.mark.parametrize("damage,expected", [
    ("text", "not a readable .npz"),
    ("missing-key", "no array 'test_labels'"),
    ("label-width", "expected (n, 14)"),
    ("rgb", "grey"),
])
def test_damaged_files_are_one_line_errors(tmp_path, damage, expected):
    f = tmp_path / "d" / "chestmnist_64.npz"
    f.parent.mkdir()
    arrays = {f"{s}_{k}": (np.zeros((2, 8, 8), np.uint8) if k == "images" else np.zeros((2, 14), np.uint8))
              for s in chestmnist.SPLITS for k in ("images", "labels")}
    if damage == "text":
        f.write_text("hello")
    else:
        if damage == "missing-key":
            del arrays["test_labels"]
        elif damage == "label-width":
            arrays["val_labels"] = np.zeros((2, 15), np.uint8)
        elif damage == "rgb":
            arrays["train_images"] = np.zeros((2, 8, 8, 3), np.uint8)
        np.savez(f, **arrays)
    with pytest.raises(UserError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        open_dataset("chestmnist", tmp_path / "d", 8, "train", progress=False)
    assert sorted(p.name for p in f.parent.iterdir()) == ["chestmnist_64.npz"]


def test_flags_and_present_only(tmp_path):
    import argparse

    make_npz(tmp_path / "d" / "chestmnist_64.npz")
    p = argparse.ArgumentParser()
    add_data_args(p)
    args = p.parse_args(["--data", "chestmnist", "--data-root", str(tmp_path / "d"), "--max-images", "5"])
    ds = dataset_from_args(args, "train")
    assert len(ds) == 5 and ds.manifest["kind"] == "chestmnist"
    with pytest.raises(UserError, match="--present-only"):
        open_dataset("chestmnist", tmp_path / "d", 64, "train", present_only=True)
    assert chestmnist.holds_chestmnist(tmp_path / "d") and not chestmnist.holds_chestmnist(tmp_path)


def test_xray_info_summarises_the_file_and_its_cache(tmp_path, capsys):
    import xray.cli

    make_npz(tmp_path / "d" / "chestmnist_64.npz")
    with pytest.raises(SystemExit) as e:
        xray.cli.main(["info", str(tmp_path / "d")])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "40 images at 64 px" in out and "Pleural_Thickening" in out
    assert [line.split()[-3] for line in out.splitlines() if line.strip().split()[0] in ("train", "val", "test")] == ["24", "6", "10"]
    assert not (tmp_path / "d" / "prepared-chestmnist-64").exists()  # info reads, never prepares


def test_a_killed_prepare_resumes_from_its_last_chunk(tmp_path, monkeypatch):
    make_npz(tmp_path / "d" / "chestmnist_64.npz")
    monkeypatch.setattr(chestmnist, "CHUNK", 8)
    real, calls = chestmnist._iter_images, []

    def dying(*args, **kwargs):
        for i, chunk in enumerate(real(*args, **kwargs)):
            if len(calls) == 2:
                raise KeyboardInterrupt
            calls.append(i)
            yield chunk

    monkeypatch.setattr(chestmnist, "_iter_images", dying)
    with pytest.raises(KeyboardInterrupt):
        open_dataset("chestmnist", tmp_path / "d", 64, "all", progress=False)
    out = tmp_path / "d" / "prepared-chestmnist-64"
    assert not (out / "manifest.json").exists()  # incomplete: never served
    assert len(json.loads((out / chestmnist.STATE_FILE).read_text())["done"]) == 2
    monkeypatch.setattr(chestmnist, "_iter_images", real)
    ds = open_dataset("chestmnist", tmp_path / "d", 64, "all", progress=False)
    assert [int(ds[i][0][0, 1, 1]) for i in range(40)] == list(range(40))
    assert not (out / chestmnist.STATE_FILE).exists()


def test_xray_prepare_takes_a_chestmnist_folder(tmp_path, capsys):
    import xray.cli

    make_npz(tmp_path / "d" / "chestmnist_64.npz")
    with pytest.raises(SystemExit) as e:
        xray.cli.main(["prepare", "--root", str(tmp_path / "d"), "--size", "32"])
    assert e.value.code == 0 and "40 images at 32 px" in capsys.readouterr().out
    assert len(open_dataset("chestmnist", tmp_path / "d", 32, "test", progress=False)) == 10  # the same cache
    with pytest.raises(SystemExit) as e:
        xray.cli.main(["prepare", "--root", str(tmp_path / "d"), "--size", "32", "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "--cache-dir" in capsys.readouterr().err and not (tmp_path / "o").exists()
