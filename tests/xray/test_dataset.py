from __future__ import annotations

import argparse
import pickle
import sys
import types

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from tests.xray.conftest import make_nih
from xray import cache, dataset, nih, phantom
from xray.dataset import XrayDataset, add_data_args, dataset_from_args, open_dataset
from xray.errors import UserError
from xray.labels import LABELS, PATHOLOGIES

S = 16


@pytest.fixture
def prepared(tiny_nih, tmp_path):
    return cache.prepare(tiny_nih, S, out=tmp_path / "c", workers=0, progress=False)


def test_items_labels_and_splits(prepared, tiny_nih):
    labels = nih.read_labels(nih.find_csv(tiny_nih))
    sp = nih.split(tiny_nih, labels)
    parts = {s: XrayDataset(prepared, s) for s in ("train", "val", "trainval", "test", "all")}
    for s in ("train", "val", "test"):
        assert parts[s].names == sp[s]
    assert len(parts["all"]) == len(labels) == len(parts["trainval"]) + len(parts["test"])
    ds = parts["all"]
    assert ds.image_size == S and ds.label_names == LABELS and ds.labels.dtype == np.float32
    img, y = ds[5]
    assert img.dtype == torch.uint8 and img.shape == (1, S, S)
    assert y.dtype == torch.float32 and y.shape == (15,)
    row = labels.loc[ds.names[5]]
    np.testing.assert_array_equal(y[:14].numpy(), row[list(PATHOLOGIES)].to_numpy(dtype=np.float32))
    assert y[14] == 1 - row["No Finding"]
    raw = np.fromfile(prepared / "images.u8", dtype=np.uint8).reshape(-1, S, S)  # (n, S, S)
    np.testing.assert_array_equal(img[0].numpy(), raw[ds.indices[5]])


def test_get_batch_matches_getitem_in_any_order(prepared):
    ds = XrayDataset(prepared, "all")
    idx = [7, 2, 2, 30, 0]
    batch = ds.get_batch(idx)
    assert batch.shape == (5, 1, S, S) and batch.dtype == torch.uint8
    for b, i in enumerate(idx):
        assert torch.equal(batch[b], ds[i][0])
    assert torch.equal(ds.get_labels(idx), torch.stack([ds[i][1] for i in idx]))


def test_pickles_without_pixels_and_works_in_dataloader(prepared):
    ds = XrayDataset(prepared, "train")
    ds[0]  # opens the memmap
    assert len(pickle.dumps(ds)) < 20_000 + len(ds) * 200  # metadata only, no image bytes
    loader = DataLoader(ds, batch_size=4, shuffle=False)
    x, y = next(iter(loader))
    assert x.shape == (4, 1, S, S) and y.shape == (4, 15)
    assert torch.equal(x, ds.get_batch(range(4)))


def test_bad_split_and_not_a_cache(prepared, tmp_path):
    with pytest.raises(UserError, match="unknown split"):
        XrayDataset(prepared, "training")
    with pytest.raises(UserError, match="not a prepared cache"):
        XrayDataset(tmp_path, "train")


def test_open_dataset_chestxray_prepares_once_then_reuses(tiny_nih, tmp_path, monkeypatch):
    ds = open_dataset("chestxray", data_root=tiny_nih, size=S, split="test", cache_dir=tmp_path / "cc", workers=0, progress=False)
    assert ds.cache_dir == dataset.prepared_dir(tiny_nih, S, tmp_path / "cc")
    assert ds.cache_dir.parent == tmp_path / "cc" / "prepared" and ds.cache_dir.name.endswith(f"-{S}")
    monkeypatch.setattr(cache, "_load_one", lambda *a: pytest.fail("must reuse the cache"))
    monkeypatch.setattr(cache, "_start_build", lambda *a: pytest.fail("must reuse the cache"))
    again = open_dataset("chestxray", data_root=tiny_nih, size=S, split="test", cache_dir=tmp_path / "cc")
    assert again.names == ds.names


def test_open_dataset_errors(tmp_path):
    with pytest.raises(UserError, match="needs --data-root"):
        open_dataset("chestxray", cache_dir=tmp_path)
    with pytest.raises(UserError, match="not a folder"):
        open_dataset("chestxray", data_root=tmp_path / "nope", cache_dir=tmp_path)
    with pytest.raises(UserError, match="unknown data 'mnist'"):
        open_dataset("mnist", cache_dir=tmp_path)
    with pytest.raises(UserError, match="multiple of 4"):
        open_dataset("phantom", size=30, cache_dir=tmp_path)  # checked before generating anything
    assert not any(tmp_path.glob("phantom-default*"))


def _fake_phantom(monkeypatch, fail=False):
    calls = []

    def generate(out_dir, n, size, seed, workers=None, prevalence=None, progress=True):
        calls.append((n, size, seed, prevalence))
        make_nih(out_dir, n=12, px=size // 8)
        if fail:
            raise RuntimeError("killed half-way")
        return out_dir

    mod = types.SimpleNamespace(generate=generate, DEMO_PREVALENCE={"Effusion": 0.5}, PHANTOM_VERSION=7)
    monkeypatch.setitem(sys.modules, "xray.phantom", mod)
    monkeypatch.setattr(sys.modules["xray"], "phantom", mod, raising=False)
    return calls


def test_open_phantom_generates_once_atomically(tmp_path, monkeypatch):
    calls = _fake_phantom(monkeypatch, fail=True)
    with pytest.raises(RuntimeError):
        open_dataset("phantom", size=S, cache_dir=tmp_path, progress=False)
    assert not any(tmp_path.glob("phantom-default*"))
    assert [p.name for p in tmp_path.iterdir()] == []  # the temp folder is gone too

    calls = _fake_phantom(monkeypatch)
    ds = open_dataset("phantom", size=S, split="all", cache_dir=tmp_path, workers=0, progress=False)
    assert calls == [(dataset.DEFAULT_PHANTOM_N, dataset.DEFAULT_PHANTOM_SIZE, 0, {"Effusion": 0.5})]
    assert (tmp_path / "phantom-default-v7" / "Data_Entry_2017_v2020.csv").is_file() and len(ds) == 12  # versioned
    open_dataset("phantom", size=S, cache_dir=tmp_path, workers=0, progress=False)
    assert len(calls) == 1  # generated once


def test_shared_cli_flags(tiny_nih, tmp_path):
    p = argparse.ArgumentParser()
    add_data_args(p)
    args = p.parse_args([])
    assert (args.data, args.data_root, args.cache_dir, args.image_size) == ("phantom", None, None, 64)
    args = p.parse_args(["--data", "chestxray", "--data-root", str(tiny_nih), "--cache-dir", str(tmp_path), "--image-size", "8"])
    args.workers, args.progress = 0, False
    ds = dataset_from_args(args, "train")
    assert ds.image_size == 8 and ds.split == "train"
    with pytest.raises(SystemExit):
        p.parse_args(["--data", "mnist"])


@pytest.mark.slow
def test_default_phantom_end_to_end(tmp_path):
    """The real generator: 8000 phantom images, prepared at 64 px (minutes on 2 cores)."""
    ds = open_dataset("phantom", size=64, split="train", cache_dir=tmp_path, progress=False)
    assert ds.image_size == 64 and len(ds) > 0.7 * dataset.DEFAULT_PHANTOM_N
    x = ds.get_batch(range(16))
    assert x.shape == (16, 1, 64, 64) and x.float().std() > 5  # real pictures, not zeros
    assert set(phantom.DEMO_PREVALENCE) <= set(LABELS) | {"No Finding"}


def test_batches_cover_the_epoch_once(prepared):
    ds = XrayDataset(prepared, "all")
    g = torch.Generator().manual_seed(0)
    seen = []
    for x, y in ds.batches(8, generator=g):
        assert x.shape[1:] == (1, S, S) and y.shape[1:] == (15,) and len(x) == len(y) <= 8
        seen += [x[b].numpy().tobytes() for b in range(len(x))]
    assert sorted(seen) == sorted(ds[i][0].numpy().tobytes() for i in range(len(ds)))
    assert sum(len(x) for x, _ in ds.batches(8, drop_last=True)) == len(ds) // 8 * 8
    first = [next(ds.batches(4, generator=torch.Generator().manual_seed(1)))[0] for _ in range(2)]
    assert torch.equal(*first)  # the injected generator fixes the order
    x, _ = next(ds.batches(4, shuffle=False))
    assert torch.equal(x, ds.get_batch([0, 1, 2, 3]))


def test_max_images_is_a_deterministic_nested_patient_subset(prepared):
    full = XrayDataset(prepared, "trainval")
    small, big = XrayDataset(prepared, "trainval", max_images=5), XrayDataset(prepared, "trainval", max_images=11)
    assert len(small) == 5 and len(big) == 11
    assert set(small.names) < set(big.names) < set(full.names)  # nested
    assert small.names == XrayDataset(prepared, "trainval", max_images=5).names  # deterministic
    assert small.names == [n for n in full.names if n in set(small.names)]  # table order kept
    per_full = full.table["patient_id"].value_counts()
    per_small = small.table["patient_id"].value_counts()
    assert (per_small != per_full[per_small.index]).sum() <= 1  # whole patients; at most the last one cut
    assert len(set(small.fingerprint for _ in range(2))) == 1
    assert small.fingerprint != big.fingerprint != full.fingerprint
    assert len(XrayDataset(prepared, "test", max_images=10_000)) == len(XrayDataset(prepared, "test"))
    np.testing.assert_array_equal(small.get_batch([0])[0, 0].numpy(), full.get_batch([full.names.index(small.names[0])])[0, 0].numpy())
    for bad in (0, -3):
        with pytest.raises(UserError, match="--max-images is"):
            XrayDataset(prepared, "train", max_images=bad)


def test_flags_reach_open_dataset_and_prepare_cli_cache_is_what_commands_read(tmp_path):
    from xray.cli import main

    root = make_nih(tmp_path / "nih", n=30, px=8, skip_images=(3, 4, 5))
    with pytest.raises(SystemExit) as e:
        main(["prepare", "--root", str(root), "--size", "8", "--present-only", "--workers", "0", "--no-progress"])
    assert e.value.code == 0
    made = (root / "prepared-8" / "manifest.json").stat().st_mtime_ns
    p = argparse.ArgumentParser()
    add_data_args(p)
    args = p.parse_args(["--data", "chestxray", "--data-root", str(root), "--image-size", "8", "--max-images", "7"])
    args.workers, args.progress = 0, False
    ds = dataset_from_args(args, "train")
    assert ds.cache_dir == root / "prepared-8" and len(ds) == 7  # what `xray prepare` wrote, not a second copy
    assert (root / "prepared-8" / "manifest.json").stat().st_mtime_ns == made  # reused as is
    assert ds.manifest["n_absent"] == 3
    assert p.parse_args([]).max_images is None and p.parse_args([]).present_only is None


@pytest.mark.slow
def test_partial_nih_folder_runs_training_and_evaluation(tmp_path):
    """A generated NIH-format folder whose full CSV lists more images than are present (a partial
    download): `xray prepare --present-only`, then training and `boed evaluate` open it (~1 min)."""
    from boed.cli import main as boed_main
    from ipa_core.cli import main as ipa_main
    from xray.cli import main as xray_main

    root = phantom.generate(tmp_path / "nih", n=60, size=32, seed=0, workers=1, progress=False,
                            prevalence={"Effusion": 0.5})  # positives and negatives in the test split (checked before work)
    gone = sorted((root / "images").iterdir())[::3]
    for p in gone:
        p.unlink()

    def ok(main, argv):
        with pytest.raises(SystemExit) as e:
            main([str(a) for a in argv])
        assert e.value.code == 0, argv

    ok(xray_main, ["prepare", "--root", root, "--size", 64, "--present-only", "--workers", 0, "--no-progress"])
    m = cache.read_manifest(root / "prepared-64")
    assert (m["n_images"], m["n_absent"]) == (40, 20)
    data = ["--data", "chestxray", "--data-root", root, "--image-size", 64, "--max-images", 16, "--device", "cpu"]
    runs = tmp_path / "runs"
    ok(ipa_main, ["train", "--stage", "vae", "--config", "tiny", "--steps", 2, "--batch-size", 4, "--out", runs / "vae", *data])
    ok(ipa_main, ["train", "--stage", "ipa", "--vae", runs / "vae", "--steps", 2, "--batch-size", 4, "--out", runs / "ipa", *data])
    ok(boed_main, ["train-avp", "--arch", "tiny", "--steps", 2, "--batch-size", 4, "--eval-images", 8, "--out", runs / "avp", *data])
    ok(boed_main, ["evaluate", "--illness", "effusion", "--scans", 1, "--methods", "random,eig", "--n-test", 8,
                   "--n-samples", 2, "--ipa", runs / "ipa", "--avp", runs / "avp", "--out", runs / "eval", *data])
    assert (runs / "eval" / "metrics.csv").is_file()
    assert not any((root / "prepared-64").parent.glob("prepared-64?*"))  # one cache, the one prepare wrote


def test_data_summary_counts_what_a_run_uses(tmp_path):
    root = make_nih(tmp_path / "nih", n=30, px=8, skip_images=(1, 2))
    d = dataset.data_summary("chestxray", root, size=8, present_only=True, max_images=5)
    assert (d["listed"], d["prepared"], d["absent"], d["train_images"]) == (30, 28, 2, 5)
    assert d["test_images"] == min(5, len(XrayDataset(root / "prepared-8", "test")))
    assert d["text"].startswith("5 training and ") and "real images at 8 px" in d["text"] and "2 absent" in d["text"]


def test_order_key_ignores_when_files_were_written_but_not_what_they_are(prepared, tiny_nih, tmp_path):
    """The same images written again (a regenerated phantom set, a copy: new mtimes) get the same
    fingerprint (identity is content) and the same training order key, so the same seed trains the
    same model; other labels change the key."""
    import os
    import shutil

    from ipa_core.batch_order import BatchOrder, data_order_key

    copy = tmp_path / "copy"
    shutil.copytree(tiny_nih, copy, copy_function=shutil.copy)  # contents alike, mtimes not
    for f in copy.rglob("*.png"):
        os.utime(f, (1_000_000_000, 1_000_000_000))
    a, b = XrayDataset(prepared, "train"), XrayDataset(cache.prepare(copy, S, out=tmp_path / "c2", workers=0, progress=False), "train")
    assert a.fingerprint == b.fingerprint
    assert a.order_key == b.order_key == data_order_key(b)
    n = len(a)
    assert np.array_equal(BatchOrder(n, 2, seed=0, fingerprint=data_order_key(a)).permutation(0),
                          BatchOrder(n, 2, seed=0, fingerprint=data_order_key(b)).permutation(0))
    b.labels = b.labels.copy()
    b.labels[0, 0] = 1 - b.labels[0, 0]
    assert b.order_key != a.order_key
