from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.xray.conftest import image_for, make_nih
from xray import cache, nih
from xray.errors import UserError
from xray.imageio import read_image
from xray.labels import LABELS

S = 16


def images_of(out, n):
    return np.fromfile(out / "images.u8", dtype=np.uint8).reshape(n, S, S)  # (n, S, S)


def test_prepare_writes_images_labels_manifest(tiny_nih, tmp_path):
    out = cache.prepare(tiny_nih, S, out=tmp_path / "c", workers=0, progress=False)
    m = json.loads((out / "manifest.json").read_text())
    labels = nih.read_labels(nih.find_csv(tiny_nih))
    n = len(labels)
    assert (m["image_size"], m["n_rows"], m["n_images"], m["bad_images"]) == (S, n, n, [])
    assert (out / "images.u8").stat().st_size == n * S * S
    imgs = images_of(out, n)
    files = nih.find_images(tiny_nih)
    for r in (0, 7, n - 1):
        expect = cache.resize_square(read_image(files[labels.index[r]]), S)
        np.testing.assert_array_equal(imgs[r], expect)
    assert len({imgs[r].tobytes() for r in range(n)}) == n  # rows are not mixed up
    table = pd.read_csv(out / "labels.csv", index_col="image")
    assert table.index.tolist() == labels.index.tolist() and table["row"].tolist() == list(range(n))
    sp = nih.split(tiny_nih, labels)
    for s in ("train", "val", "test"):
        assert table.index[table["split"] == s].tolist() == sp[s]
        assert m["splits"][s] == len(sp[s])
    assert m["counts"]["Effusion"] == int(labels["Effusion"].sum())
    assert m["counts"][LABELS[-1]] == int((labels["No Finding"] == 0).sum())
    assert not (out / "progress.json").exists()


def test_default_location_and_idempotent(tiny_nih, monkeypatch):
    out = cache.prepare(tiny_nih, S, workers=0, progress=False)
    assert out == tiny_nih / f"prepared-{S}"
    before = (out / "manifest.json").read_text()
    monkeypatch.setattr(cache, "_load_one", lambda *a: pytest.fail("complete cache must not decode again"))
    assert cache.prepare(tiny_nih, S, workers=0, progress=False) == out
    assert (out / "manifest.json").read_text() == before


def test_resize_square_known_answers():
    np.testing.assert_array_equal(cache.resize_square(np.full((40, 40), 0.5, np.float32), 8), np.full((8, 8), 128))
    wide = np.zeros((8, 16), np.float32)
    wide[:, 4:12] = 1.0  # the centre square is all ones, the sides are cropped away
    np.testing.assert_array_equal(cache.resize_square(wide, 4), np.full((4, 4), 255))
    half = np.zeros((64, 64), np.float32)
    half[:, 32:] = 1.0
    small = cache.resize_square(half, 8)
    assert (small[:, :3] <= 3).all() and (small[:, 5:] >= 252).all()  # Lanczos: edge (and tiny ringing) mid-image
    assert (small[:, 3] < small[:, 4]).all()


def test_resume_after_interruption_equals_uninterrupted(tmp_path, monkeypatch):
    root = make_nih(tmp_path / "nih", n=37)
    monkeypatch.setattr(cache, "CHUNK", 8)
    ref = cache.prepare(root, S, out=tmp_path / "ref", workers=0, progress=False)

    real = cache._load_one
    calls = {"n": 0}

    def dies_after_20(path, size):
        calls["n"] += 1
        if calls["n"] > 20:
            raise KeyboardInterrupt  # like Ctrl-C / a kill mid-chunk
        return real(path, size)

    monkeypatch.setattr(cache, "_load_one", dies_after_20)
    with pytest.raises(KeyboardInterrupt):
        cache.prepare(root, S, out=tmp_path / "c", workers=0, progress=False)
    progress = json.loads((tmp_path / "c" / "progress.json").read_text())
    assert progress["done"] == [0, 1]  # two whole chunks of 8 recorded, the third was cut
    assert not (tmp_path / "c" / "manifest.json").exists()

    def counting(path, size):
        calls["n"] += 1
        return real(path, size)

    calls["n"] = 0
    monkeypatch.setattr(cache, "_load_one", counting)
    cache.prepare(root, S, out=tmp_path / "c", workers=0, progress=False)
    assert calls["n"] == 37 - 16  # continued, did not start over
    assert (tmp_path / "c" / "images.u8").read_bytes() == (ref / "images.u8").read_bytes()
    assert (tmp_path / "c" / "labels.csv").read_text() == (ref / "labels.csv").read_text()


def test_parallel_workers_match_serial(tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "CHUNK", 8)
    root = make_nih(tmp_path / "nih", n=24, layout="nested")
    a = cache.prepare(root, S, out=tmp_path / "a", workers=0, progress=False)
    b = cache.prepare(root, S, out=tmp_path / "b", workers=2, progress=False)
    assert (a / "images.u8").read_bytes() == (b / "images.u8").read_bytes()


def test_few_bad_images_are_skipped_and_reported(tmp_path):
    root = make_nih(tmp_path / "nih", n=120, px=8, skip_images=(5,))
    out = cache.prepare(root, 8, out=tmp_path / "c", workers=0, progress=False)
    m = json.loads((out / "manifest.json").read_text())
    missing = nih.read_labels(nih.find_csv(root)).index[5]
    assert m["n_images"] == 119 and m["n_rows"] == 120 and m["bad_images"][0]["image"] == missing
    assert (out / "bad_images.txt").read_text().startswith(f"{missing}\tmissing")
    table = pd.read_csv(out / "labels.csv", index_col="image")
    assert missing not in table.index and len(table) == 119


def test_too_many_bad_images_fail_then_recover_when_fixed(tmp_path):
    root = make_nih(tmp_path / "nih", n=20, px=8)
    victim = sorted((root / "images").iterdir())[3]
    good_bytes = victim.read_bytes()
    victim.write_bytes(b"not a png at all")
    with pytest.raises(UserError, match=r"1 of 20 images .*bad_images.txt"):
        cache.prepare(root, 8, out=tmp_path / "c", workers=0, progress=False)
    assert "unreadable" in (tmp_path / "c" / "bad_images.txt").read_text()
    assert not (tmp_path / "c" / "manifest.json").exists()
    victim.write_bytes(good_bytes)  # user fixes the file and reruns: the bad chunk is retried
    out = cache.prepare(root, 8, out=tmp_path / "c", workers=0, progress=False)
    assert json.loads((out / "manifest.json").read_text())["n_images"] == 20
    row = nih.read_labels(nih.find_csv(root)).index.get_loc(victim.name)
    np.testing.assert_array_equal(images_of_size(out, 20, 8)[row], cache.resize_square(image_for(row, 8) / 255.0, 8))


def images_of_size(out, n, s):
    return np.fromfile(out / "images.u8", dtype=np.uint8).reshape(n, s, s)  # (n, s, s)


def test_bad_size_and_unwritable_output(tiny_nih, tmp_path):
    with pytest.raises(UserError, match="multiple of 4"):
        cache.prepare(tiny_nih, 30, out=tmp_path / "c", workers=0, progress=False)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="cannot write"):
        cache.prepare(tiny_nih, S, out=blocker / "sub", workers=0, progress=False)
    with pytest.raises(UserError, match="not a folder"):
        cache.prepare(tmp_path / "missing", S, workers=0, progress=False)


def test_16bit_source_images(tmp_path):
    root = make_nih(tmp_path / "nih", n=4, px=8)
    for p in (root / "images").iterdir():
        a = np.asarray(Image.open(p), dtype=np.uint16) * 257  # same picture in 16 bits
        Image.fromarray(a).save(p)
    out = cache.prepare(root, 8, out=tmp_path / "c", workers=0, progress=False)
    for r in range(4):
        np.testing.assert_array_equal(images_of_size(out, 4, 8)[r], image_for(r, 8))


def test_changed_labels_rewrite_table_without_decoding(tiny_nih, tmp_path, monkeypatch):
    out = cache.prepare(tiny_nih, S, out=tmp_path / "c", workers=0, progress=False)
    csv = tiny_nih / "Data_Entry_2017_v2020.csv"
    first = nih.read_labels(csv).index[0]
    lines = csv.read_text().splitlines()
    lines[1] = lines[1].replace("No Finding", "Hernia")  # row 0 is a "No Finding" image
    csv.write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(cache, "_load_one", lambda *a: pytest.fail("pixels did not change"))
    cache.prepare(tiny_nih, S, out=out, workers=0, progress=False)
    table = pd.read_csv(out / "labels.csv", index_col="image")
    assert table.loc[first, "Hernia"] == 1 and table.loc[first, "No Finding"] == 0
    assert json.loads((out / "manifest.json").read_text())["counts"]["Hernia"] == int(table["Hernia"].sum())


# --- the cache knows its source (issue 12, item 3) ------------------------------------------------

def _manifest(out):
    return json.loads((out / "manifest.json").read_text())


def _decoded(monkeypatch):
    """Record every image the cache decodes from here on."""
    seen = []
    real = cache._load_one

    def spy(path, size):
        seen.append(path)
        return real(path, size)

    monkeypatch.setattr(cache, "_load_one", spy)
    return seen


def test_regenerated_in_place_with_more_images_is_noticed(tmp_path):
    root = make_nih(tmp_path / "nih", n=12, px=8)
    out = cache.prepare(root, 8, workers=0, progress=False)
    assert _manifest(out)["n_images"] == 12
    import shutil
    shutil.rmtree(root / "images")
    (root / "Data_Entry_2017_v2020.csv").unlink()
    make_nih(root, n=18, px=8)  # same folder, regenerated: more rows, rewritten files
    out2 = cache.prepare(root, 8, workers=0, progress=False)
    assert out2 == out and _manifest(out)["n_images"] == 18
    names = nih.read_labels(nih.find_csv(root)).index
    imgs = images_of_size(out, 18, 8)
    for r in (0, 13, 17):
        np.testing.assert_array_equal(imgs[r], image_for(r, 8))
    assert pd.read_csv(out / "labels.csv", index_col="image").index.tolist() == names.tolist()


def test_added_images_reuse_unchanged_rows(tmp_path, monkeypatch):
    n = 3 * cache.CHUNK
    root = make_nih(tmp_path / "nih", n=n, px=8, skip_images=tuple(range(2 * cache.CHUNK, n)))
    out = cache.prepare(root, 8, workers=0, progress=False, present_only=True)
    m = _manifest(out)
    assert (m["n_images"], m["n_absent"], m["present_only"]) == (2 * cache.CHUNK, cache.CHUNK, True)
    before = images_of_size(out, 2 * cache.CHUNK, 8).copy()
    for i in range(2 * cache.CHUNK, n):  # the next part arrives
        Image.fromarray(image_for(i, 8)).save(root / "images" / f"{i // 2 + 1:08d}_{i % 2:03d}.png")
    seen = _decoded(monkeypatch)
    cache.prepare(root, 8, workers=0, progress=False)  # mode inherited from the cache: present_only
    assert len(seen) == cache.CHUNK  # only the new chunk is decoded
    m = _manifest(out)
    assert (m["n_images"], m["n_absent"]) == (n, 0)
    imgs = images_of_size(out, n, 8)
    np.testing.assert_array_equal(imgs[:2 * cache.CHUNK], before)
    np.testing.assert_array_equal(imgs[n - 1], image_for(n - 1, 8))


def test_touched_or_replaced_image_is_redecoded(tmp_path, monkeypatch):
    root = make_nih(tmp_path / "nih", n=2 * cache.CHUNK, px=8)
    out = cache.prepare(root, 8, workers=0, progress=False)
    fp = _manifest(out)["fingerprint"]
    victim = root / "images" / "00000050_001.png"  # row 99: the second chunk
    row = nih.read_labels(nih.find_csv(root)).index.get_loc(victim.name)
    new = np.full((8, 8), 200, np.uint8)
    Image.fromarray(new).save(victim)
    st = victim.stat()
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # newer, whatever the clock resolution
    seen = _decoded(monkeypatch)
    cache.prepare(root, 8, workers=0, progress=False)
    assert _manifest(out)["fingerprint"] != fp
    assert len(seen) == cache.CHUNK and str(victim) in seen  # that chunk only
    np.testing.assert_array_equal(images_of_size(out, 2 * cache.CHUNK, 8)[row], new)
    # touching alone (same bytes, new mtime) is noticed, its content compared, and nothing decoded
    m = _manifest(out)
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 2 * 10**9))
    seen.clear()
    cache.prepare(root, 8, workers=0, progress=False)
    assert _manifest(out)["fingerprint"] != m["fingerprint"] and _manifest(out)["identity"] == m["identity"]
    assert seen == []
    assert cache._unchanged(root, 8, out, False)  # the new mtime is recorded: the next open is the quick one


def test_a_byte_identical_copy_is_the_same_data_without_decoding(tmp_path, monkeypatch):
    """`cp -r data D2` (new mtimes): the copied cache is restamped after a content check, the
    dataset fingerprint is unchanged; a fresh cache of the copy elsewhere has the same identity."""
    import shutil

    from xray.dataset import XrayDataset

    root = make_nih(tmp_path / "nih", n=12, px=8)
    out = cache.prepare(root, 8, workers=0, progress=False)
    fp = XrayDataset(out, "train").fingerprint
    copy = tmp_path / "D2"
    shutil.copytree(root, copy, copy_function=shutil.copy)  # contents alike, mtimes not
    for f in copy.rglob("*.png"):
        os.utime(f, (1_000_000_000, 1_000_000_000))
    assert not cache._unchanged(copy, 8, copy / "prepared-8", False)  # the quick stat check sees other mtimes
    seen = _decoded(monkeypatch)
    out2 = cache.prepare(copy, 8, workers=0, progress=False)
    assert out2 == copy / "prepared-8" and seen == []
    assert XrayDataset(out2, "train").fingerprint == fp
    assert _manifest(out2)["source_root"] == str(copy.resolve())
    assert cache._unchanged(copy, 8, out2, False)  # the copy's mtimes are recorded: the next open is the quick one
    fresh = cache.prepare(copy, 8, out=tmp_path / "elsewhere", workers=0, progress=False)
    assert XrayDataset(fresh, "train").fingerprint == fp and len(seen) == 12


def test_a_copy_with_one_image_changed_at_the_same_size_is_other_data(tmp_path, monkeypatch):
    """The content check is what decides: in a copy (new mtimes everywhere), one image rewritten
    with other pixels at the same byte size is found, re-decoded alone, and changes the identity."""
    import shutil

    from xray.dataset import XrayDataset

    root = make_nih(tmp_path / "nih", n=12, px=8)
    for f in (root / "images").glob("*.png"):  # uncompressed: the byte size depends on the shape only
        Image.fromarray(np.asarray(Image.open(f))).save(f, format="PNG", compress_level=0)
    out = cache.prepare(root, 8, workers=0, progress=False)
    fp = XrayDataset(out, "train").fingerprint
    copy = tmp_path / "D2"
    shutil.copytree(root, copy, copy_function=shutil.copy)
    victim = sorted((copy / "images").glob("*.png"))[3]
    size = victim.stat().st_size
    img = np.asarray(Image.open(victim)).copy()
    img[:4] = 255 - img[:4]
    Image.fromarray(img).save(victim, format="PNG", compress_level=0)
    assert victim.stat().st_size == size
    seen = _decoded(monkeypatch)
    out2 = cache.prepare(copy, 8, workers=0, progress=False)
    assert XrayDataset(out2, "train").fingerprint != fp
    assert str(victim) in seen and len(seen) <= cache.CHUNK  # its chunk only
    row = pd.read_csv(out2 / "labels.csv", index_col="image").loc[victim.name, "row"]
    np.testing.assert_array_equal(images_of_size(out2, 12, 8)[row], cache.resize_square(read_image(victim), 8))


def test_edited_label_is_noticed_through_open_dataset(tmp_path):
    from xray.dataset import open_dataset

    root = make_nih(tmp_path / "nih", n=12, px=8)
    ds = open_dataset("chestxray", data_root=root, size=8, split="all", workers=0, progress=False)
    csv = root / "Data_Entry_2017_v2020.csv"
    lines = csv.read_text().splitlines()
    assert "No Finding" in lines[1]
    lines[1] = lines[1].replace("No Finding", "Hernia")
    csv.write_text("\n".join(lines) + "\n")
    again = open_dataset("chestxray", data_root=root, size=8, split="all", workers=0, progress=False)
    assert again.cache_dir == ds.cache_dir == root / "prepared-8"
    assert again.labels[0, LABELS.index("Hernia")] == 1 and ds.labels[0, LABELS.index("Hernia")] == 0
    assert again.fingerprint != ds.fingerprint


def test_killed_rebuild_never_mixes(tmp_path, monkeypatch):
    root = make_nih(tmp_path / "nih", n=2 * cache.CHUNK, px=8)
    out = cache.prepare(root, 8, workers=0, progress=False)
    victim = root / "images" / "00000001_000.png"  # row 0
    Image.fromarray(np.full((8, 8), 9, np.uint8)).save(victim)
    os.utime(victim, ns=(0, victim.stat().st_mtime_ns + 10**9))

    def boom(path, size):
        raise KeyboardInterrupt

    monkeypatch.setattr(cache, "_load_one", boom)
    with pytest.raises(KeyboardInterrupt):
        cache.prepare(root, 8, workers=0, progress=False)
    assert not (out / "manifest.json").exists()  # the stale cache is not served
    monkeypatch.undo()
    cache.prepare(root, 8, workers=0, progress=False)
    imgs = images_of_size(out, 2 * cache.CHUNK, 8)
    np.testing.assert_array_equal(imgs[0], np.full((8, 8), 9))
    np.testing.assert_array_equal(imgs[-1], image_for(2 * cache.CHUNK - 1, 8))


def test_present_only_split_is_stable_and_corrupt_still_fails(tmp_path):
    full = make_nih(tmp_path / "full", n=60, px=8)
    part = make_nih(tmp_path / "part", n=60, px=8, skip_images=tuple(range(0, 60, 3)))
    a = pd.read_csv(cache.prepare(full, 8, workers=0, progress=False) / "labels.csv", index_col="image")
    with pytest.raises(UserError, match=r"20 of 60 images are missing"):
        cache.prepare(part, 8, out=tmp_path / "strict", workers=0, progress=False)
    b = pd.read_csv(cache.prepare(part, 8, workers=0, progress=False, present_only=True) / "labels.csv", index_col="image")
    assert len(b) == 40 and set(b.index) < set(a.index)
    assert (a.loc[b.index, "split"] == b["split"]).all()  # each present image keeps its split
    bad = sorted((part / "images").iterdir())[0]
    bad.write_bytes(b"garbage")
    with pytest.raises(UserError, match=r"1 of 40 images are missing or unreadable"):
        cache.prepare(part, 8, workers=0, progress=False)
    empty = make_nih(tmp_path / "empty", n=3, px=8, skip_images=(0, 1, 2))
    with pytest.raises(UserError, match="none of the 3 images"):
        cache.prepare(empty, 8, out=tmp_path / "none", workers=0, progress=False, present_only=True)
    assert not (tmp_path / "none").exists()


def test_cache_location_rule():
    from pathlib import Path
    assert cache.cache_location("/data/nih", 64) == Path("/data/nih/prepared-64")
    loc = cache.cache_location("/data/nih", 64, "/c")
    assert loc.parent == Path("/c/prepared") and loc.name == f"{cache.root_key('/data/nih')}-64"
    assert cache.cache_location("/data/other", 64, "/c") != loc


_LOCK_SCRIPT = """
import sys, time, json
from xray import cache
real = cache._load_one
def slow(path, size):
    time.sleep(0.02)
    return real(path, size)
cache._load_one = slow
orig = cache._start_build
def start(plan):
    with open(sys.argv[2], "a") as f:
        f.write("build\\n")
    return orig(plan)
cache._start_build = start
cache.prepare(sys.argv[1], 8, workers=0, progress=False)
"""


def test_two_writers_take_turns(tmp_path):
    """Two processes prepare one cache at once: one builds, the other waits and finds it done."""
    import subprocess
    import sys

    root = make_nih(tmp_path / "nih", n=30, px=8)
    log = tmp_path / "log"
    script = tmp_path / "w.py"
    script.write_text(_LOCK_SCRIPT)
    procs = [subprocess.Popen([sys.executable, str(script), str(root), str(log)]) for _ in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert log.read_text() == "build\n"  # exactly one build; no interleaving
    out = root / "prepared-8"
    assert _manifest(out)["n_images"] == 30
    for r in (0, 29):
        np.testing.assert_array_equal(images_of_size(out, 30, 8)[r], image_for(r, 8))


# --- real-file robustness (issue 12, item 4): expected pixels computed here, independently ------

def test_prepare_decodes_rgba_la_16bit_nonsquare_and_jpeg(tmp_path):
    rng = np.random.default_rng(0)
    root = make_nih(tmp_path / "nih", n=8, px=8)
    files = {n: root / "images" / n for n in nih.read_labels(nih.find_csv(root)).index}
    names = list(files)
    expect = {}
    rgb = rng.integers(0, 256, (8, 8, 3)).astype(np.uint8)
    alpha = rng.integers(0, 256, (8, 8)).astype(np.uint8)
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(files[names[0]])
    expect[0] = (rgb.astype(np.float64) @ [0.299, 0.587, 0.114], 1)  # ITU-R 601 luma; alpha ignored
    gray, a2 = rng.integers(0, 256, (8, 8)).astype(np.uint8), rng.integers(0, 256, (8, 8)).astype(np.uint8)
    Image.fromarray(np.dstack([gray, a2]), "LA").save(files[names[1]])
    expect[1] = (gray, 0)
    v16 = rng.integers(0, 65536, (8, 8)).astype(np.uint16)
    Image.fromarray(v16).save(files[names[2]])  # 16-bit grayscale PNG
    assert Image.open(files[names[2]]).mode.startswith("I")
    expect[2] = (v16 / 65535 * 255, 1)
    wide = rng.integers(0, 256, (8, 12)).astype(np.uint8)  # H=8, W=12: centre 8 columns kept
    Image.fromarray(wide).save(files[names[3]])
    expect[3] = (wide[:, 2:10], 0)
    tall = rng.integers(0, 256, (13, 8)).astype(np.uint8)  # odd excess: top (13-8)//2 = 2 rows cut
    Image.fromarray(tall).save(files[names[4]])
    expect[4] = (tall[2:10], 0)
    yy, xx = np.mgrid[0:8, 0:8]
    smooth = (60 + 10 * xx + 8 * yy).astype(np.uint8)
    Image.fromarray(smooth).save(files[names[5]], format="JPEG", quality=95)  # content decides, not the suffix
    expect[5] = (smooth, 6)
    out = cache.prepare(root, 8, out=tmp_path / "c", workers=0, progress=False)
    assert cache.read_manifest(out)["n_images"] == 8
    imgs = images_of_size(out, 8, 8)
    for r, (want, tol) in expect.items():
        diff = np.abs(imgs[r].astype(np.int64) - np.rint(np.asarray(want, dtype=np.float64)).astype(np.int64))
        assert diff.max() <= tol, (r, diff.max())
    assert np.abs(imgs[0].astype(float) - expect[0][0]).mean() < 0.6  # luma rounding, not a different formula


def test_prepare_downscale_matches_area_average_on_a_ramp(tmp_path):
    """A linear ramp stays linear under any symmetric normalised kernel: interior pixels = area means."""
    root = make_nih(tmp_path / "nih", n=2, px=8)
    yy, xx = np.mgrid[0:64, 0:64]
    ramp = (20 + 2 * xx + 1 * yy).astype(np.uint16) * 257  # 16-bit, max 20 + 126 + 63 = 209
    for p in (root / "images").iterdir():
        Image.fromarray(ramp).save(p)
    out = cache.prepare(root, 16, out=tmp_path / "c", workers=0, progress=False)
    got = images_of_size(out, 2, 16)[0].astype(np.float64)
    area = (ramp / 257.0).reshape(16, 4, 16, 4).mean(axis=(1, 3))  # (16, 16) 4x4 block means
    assert np.abs(got[2:-2, 2:-2] - area[2:-2, 2:-2]).max() <= 0.51


def test_up_to_date_check_is_cheap_but_still_sees_changes(tmp_path, monkeypatch):
    root = make_nih(tmp_path / "nih", n=12, px=8, skip_images=(5,))
    out = cache.prepare(root, 8, workers=0, progress=False, present_only=True)
    monkeypatch.setattr(nih, "read_labels", lambda *a: pytest.fail("an up-to-date cache must not parse the CSV"))
    assert cache.prepare(root, 8, workers=0, progress=False) == out
    monkeypatch.undo()
    Image.fromarray(image_for(5, 8)).save(root / "images" / "00000003_001.png")  # the absent image arrives
    cache.prepare(root, 8, workers=0, progress=False)
    assert _manifest(out)["n_images"] == 12 and _manifest(out)["n_absent"] == 0


# ----------------------------------------------------------------------------------------------
# the cache's own files are checked and repaired (issue 22, items 7-9)


def _damage_labels_flip(out):
    t = pd.read_csv(out / "labels.csv")
    col = "Effusion"
    t[col] = 1 - t[col]
    t.to_csv(out / "labels.csv", index=False)


def _damage_labels_permute(out):
    lines = (out / "labels.csv").read_text().splitlines(keepends=True)
    (out / "labels.csv").write_text(lines[0] + "".join(lines[2:3] + lines[1:2] + lines[3:]))


def _damage_labels_truncate(out):
    text = (out / "labels.csv").read_text()
    (out / "labels.csv").write_text(text[: len(text) // 2].rsplit("\n", 1)[0] + "\n")


def _damage_images_zero(out):
    f = out / "images.u8"
    f.write_bytes(bytes(f.stat().st_size))


def _damage_images_truncate(out):
    f = out / "images.u8"
    f.write_bytes(f.read_bytes()[:1000])


def _damage_manifest_size(out):
    m = json.loads((out / "manifest.json").read_text())
    m["image_size"] = 32
    (out / "manifest.json").write_text(json.dumps(m))


DAMAGE = {"labels-flipped-column": _damage_labels_flip, "labels-rows-permuted": _damage_labels_permute,
          "labels-truncated": _damage_labels_truncate, "labels-deleted": lambda o: (o / "labels.csv").unlink(),
          "images-all-zero": _damage_images_zero, "images-truncated": _damage_images_truncate,
          "images-deleted": lambda o: (o / "images.u8").unlink(), "manifest-image-size": _damage_manifest_size}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_cache_is_refused_then_repaired(tiny_nih, tmp_path, case):
    from xray.dataset import XrayDataset

    out = cache.prepare(tiny_nih, S, out=tmp_path / "c", workers=0, progress=False)
    good_labels, good_images = (out / "labels.csv").read_bytes(), (out / "images.u8").read_bytes()
    DAMAGE[case](out)
    if case != "manifest-image-size":  # (an edited manifest opens as what it says; prepare at S finds it)
        with pytest.raises(UserError, match=r"prepared cache .* is damaged: .*; run `xray prepare`") as e:
            XrayDataset(out, "all")
        assert "\n" not in str(e.value)
    assert cache.check_files(out, S) is not None
    cache.prepare(tiny_nih, S, out=out, workers=0, progress=False)  # repairs
    assert (out / "labels.csv").read_bytes() == good_labels and (out / "images.u8").read_bytes() == good_images
    assert cache.check_files(out, S, full=True) is None
    assert len(XrayDataset(out, "all")) == json.loads((out / "manifest.json").read_text())["n_images"]


def test_same_size_image_swapped_with_mtime_kept_is_found_by_the_content_check(tiny_nih, tmp_path):
    files = nih.find_images(tiny_nih)
    name = sorted(files)[0]
    a = files[name]
    img = np.asarray(Image.open(a)).copy()
    Image.fromarray(img).save(a, format="PNG", compress_level=0)  # uncompressed: the size depends on the shape only
    out = cache.prepare(tiny_nih, S, out=tmp_path / "c", workers=0, progress=False)
    st = a.stat()
    img[: img.shape[0] // 2] = 255 - img[: img.shape[0] // 2]
    Image.fromarray(img).save(a, format="PNG", compress_level=0)  # another image of the same size ...
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))  # ... with its mtime kept (cp -p, rsync -t)
    assert a.stat().st_size == st.st_size
    assert cache._unchanged(tiny_nih, S, out, False)  # the stat check cannot see it
    assert cache.check_sources(out, tiny_nih, sample=None) == [name]
    before = images_of(out, len(files)).copy()
    cache.prepare(tiny_nih, S, out=out, workers=0, progress=False, verify=True)
    after = images_of(out, len(files))
    row = pd.read_csv(out / "labels.csv", index_col="image").loc[name, "row"]
    assert [r for r in range(len(files)) if not np.array_equal(before[r], after[r])] == [row]
    np.testing.assert_array_equal(after[row], cache.resize_square(read_image(a), S))
    assert cache.check_sources(out, tiny_nih, sample=None) == []


def test_full_disk_while_preparing_is_one_line_and_leaves_nothing(tiny_nih, tmp_path, monkeypatch):
    def full(fd, offset, length):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(UserError, match=r"^no space left on /.*need about .* MB, have") as e:
        cache.prepare(tiny_nih, S, out=tmp_path / "c", workers=0, progress=False)
    assert "\n" not in str(e.value)
    assert not list((tmp_path / "c").glob("*.tmp")) and not list((tmp_path / "c").glob(".*.tmp"))
    assert not (tmp_path / "c" / "images.u8").exists() and not (tmp_path / "c" / "manifest.json").exists()


def test_temp_files_of_a_killed_prepare_are_removed(tiny_nih, tmp_path):
    out = tmp_path / "c"
    out.mkdir()
    (out / ".images.u8.abc.tmp").write_bytes(b"x" * 100)
    cache.prepare(tiny_nih, S, out=out, workers=0, progress=False)
    assert not list(out.glob(".*.tmp"))


def test_verify_adds_digests_to_a_cache_made_before_them(tiny_nih, tmp_path):
    out = cache.prepare(tiny_nih, S, out=tmp_path / "c", workers=0, progress=False)
    m = json.loads((out / "manifest.json").read_text())
    del m["files"]
    (out / "manifest.json").write_text(json.dumps(m))
    src = json.loads((out / "sources.json").read_text())
    src["rows"] = [r[:3] for r in src["rows"]]
    (out / "sources.json").write_text(json.dumps(src))
    _damage_images_zero(out)
    assert cache.check_files(out, S, full=True) is None  # nothing to check against: accepted
    cache.prepare(tiny_nih, S, out=out, workers=0, progress=False, verify=True)
    assert "files" in json.loads((out / "manifest.json").read_text())
    assert all(len(r) == 4 and r[3] for r in json.loads((out / "sources.json").read_text())["rows"])
    (out / "images.u8").write_bytes(b"\1" * (out / "images.u8").stat().st_size)
    assert cache.check_files(out, S) is not None  # from now on, damage is found


def test_labels_only_rewrite_keeps_the_chunk_digests_without_rereading(tiny_nih, tmp_path, monkeypatch):
    out = cache.prepare(tiny_nih, S, out=tmp_path / "c", workers=0, progress=False)
    before = json.loads((out / "manifest.json").read_text())["files"]["images.u8"]
    _damage_labels_flip(out)
    monkeypatch.setattr(cache, "_image_digests", lambda *a: pytest.fail("images.u8 read again for a labels-only rewrite"))
    cache.prepare(tiny_nih, S, out=out, workers=0, progress=False)
    assert json.loads((out / "manifest.json").read_text())["files"]["images.u8"] == before
    assert cache.check_files(out, S, full=True) is None


def test_image_files_the_csv_does_not_list_are_counted_and_reported(tmp_path, caplog):
    """A truncated label CSV: the images on disk it no longer lists are reported, not silently dropped."""
    root = make_nih(tmp_path / "nih", n=20, px=8)
    csv = nih.find_csv(root)
    lines = csv.read_text().splitlines(keepends=True)
    csv.write_text("".join(lines[:13]))  # header + 12 of 20 rows
    with caplog.at_level("WARNING", logger="xray.cache"):
        out = cache.prepare(root, 8, out=tmp_path / "c", workers=0, progress=False)
    m = json.loads((out / "manifest.json").read_text())
    listed = nih.read_labels(csv).index
    unlisted = sorted(set(nih.find_images(root)) - set(listed))
    assert len(listed) == 12 and len(unlisted) == 8
    assert (m["n_images"], m["n_unlisted"], m["unlisted_examples"]) == (12, 8, unlisted)
    [msg] = [r.getMessage() for r in caplog.records if "not listed" in r.getMessage()]
    assert msg.startswith(f"8 image file(s) under {root} are not listed in {csv.name} (e.g. {unlisted[0]})")
    # the full CSV again: nothing unlisted
    csv.write_text("".join(lines))
    out = cache.prepare(root, 8, out=tmp_path / "c", workers=0, progress=False)
    m = json.loads((out / "manifest.json").read_text())
    assert (m["n_images"], m["n_unlisted"], m["unlisted_examples"]) == (20, 0, [])
