"""`boed run` end to end, in-process, with tiny models saved to tmp dirs."""

import dataclasses
import json
import logging
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from boed.cli import main
from boed.commands import run as run_cmd
from tests.boed.test_samplers import ImageSet

S = 64


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from boed.classifier import AVPClassifier, AVPConfig
    from ipa_core.config import get_config
    from ipa_core.ipa import IPA, IPAConfig

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    AVPClassifier(AVPConfig(arch="tiny", image_size=S)).save_pretrained(root / "avp")
    IPA(IPAConfig.from_vae(dataclasses.replace(get_config("tiny"), shift=-127.5, scale=1 / 64))).save_pretrained(root / "ipa" / "model")  # a run dir
    small = AVPClassifier(AVPConfig(arch="tiny", image_size=128))
    small.save_pretrained(root / "avp128")
    return root


@pytest.fixture
def image_png(tmp_path):
    yy, xx = np.mgrid[0:100, 0:90]
    arr = (127 + 120 * np.sin(xx / 9.0) * np.cos(yy / 13.0)).astype(np.uint8)
    path = tmp_path / "xray.png"
    Image.fromarray(arr).save(path)
    return path


def run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", *argv])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_run_on_png_prints_choices_and_writes_figures(models, image_png, tmp_path, capsys):
    out = tmp_path / "scan"
    code, stdout, err = run(["--illness", "Effusion", "--scans", "2", "--image", str(image_png), "--ipa", str(models / "ipa"),
                             "--avp", str(models / "avp"), "--n-samples", "3", "--first-draws", "ipa", "--out", str(out),
                             "--seed", "1", "--show", "2"], capsys)
    assert code == 0, err
    lines = [l for l in stdout.splitlines() if l.startswith("t=")]
    assert len(lines) == 3 and "EIG" in lines[1] and "row" in lines[1] and "p(Effusion)" in lines[2]
    rec = json.loads((out / "scans.json").read_text())
    assert rec["illness"] == "Effusion" and len(rec["steps"]) == 2 and len(rec["locations"]) == 2
    assert len(set(rec["locations"])) == 2 and all(0 <= l < 289 for l in rec["locations"])
    for s in rec["steps"]:
        assert s["eig"] >= 0 and 0 <= s["prob"] <= 1 and s["box"][2] - s["box"][0] == 16
    assert {"step_1.png", "step_2.png", "summary.png", "scans.json"} <= {p.name for p in out.iterdir()}
    assert rec["temperature"] == 1.0 and set(rec["models"]) == {"ipa", "avp"} and all(rec["models"].values())
    # a rerun into the same folder with fewer scans leaves no figure of the earlier run
    code, _, err = run(["--illness", "Effusion", "--scans", "1", "--image", str(image_png), "--ipa", str(models / "ipa"),
                        "--avp", str(models / "avp"), "--n-samples", "3", "--first-draws", "ipa", "--out", str(out),
                        "--seed", "1", "--no-figures"], capsys)
    assert code == 0, err
    assert {p.name for p in out.iterdir()} == {"scans.json"}


def test_run_by_index_uses_dataset_draws_at_t1(models, tmp_path, capsys, monkeypatch):
    ds = ImageSet(6, S=S)
    ds.images = torch.randint(0, 256, (6, 1, S, S), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ds.labels = torch.zeros(6, 15)
    ds.labels[2, 4] = 1  # Effusion
    ds.get_batch = lambda idx: ds.images[torch.as_tensor(idx)]
    asked = []

    def fake(args, split):
        asked.append((split, args.image_size))
        return ds

    monkeypatch.setattr(run_cmd, "dataset_from_args", fake)
    out = tmp_path / "idx"
    code, stdout, err = run(["--illness", "effusion", "--scans", "1", "--index", "2", "--ipa", str(models / "ipa"),
                             "--avp", str(models / "avp"), "--n-samples", "2", "--out", str(out), "--no-figures",
                             "--data", "phantom"], capsys)
    assert code == 0, err
    assert ("test", S) in asked and ("train", S) in asked
    assert "label: 1" in stdout
    rec = json.loads((out / "scans.json").read_text())
    assert rec["target"] == 1.0 and rec["first_draws"] == "dataset"
    assert not list(out.glob("*.png"))
    code, _, err = run(["--scans", "1", "--index", "9", "--ipa", str(models / "ipa"), "--avp", str(models / "avp"),
                        "--out", str(out), "--data", "phantom"], capsys)
    assert code == 2 and "outside the test split" in err


@pytest.mark.parametrize("extra, message", [
    (["--scans", "0"], "--scans must be in 1..289"),
    (["--scans", "290"], "--scans must be in 1..289"),
    (["--illness", "flu"], "unknown illness 'flu'; valid names"),
    (["--image", "MISSING.png"], "does not exist"),
    (["--image", "CORRUPT"], "corrupt"),
    (["--avp", "AVP128"], "works at 64 px but the AVP classifier"),
    (["--avp", "NOWHERE"], "no AVP model at"),
    (["--ipa", "NOWHERE"], "ipa_core train --stage ipa"),
    (["--n-samples", "1"], "--n-samples is 1; expected 2 to 1000"),
    (["--n-samples", "1000000"], "--n-samples is 1000000"),
    (["--chunk-size", "0"], "--chunk-size is 0"),
    (["--show", "-3"], "--show is -3"),
])
def test_run_bad_input_is_one_line_error(models, tmp_path, capsys, extra, message):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG not really")
    args = {"--ipa": str(models / "ipa"), "--avp": str(models / "avp"), "--image": str(tmp_path / "ok.png")}
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "ok.png")
    subst = {"MISSING.png": str(tmp_path / "missing.png"), "CORRUPT": str(bad), "AVP128": str(models / "avp128"),
             "NOWHERE": str(tmp_path / "nowhere")}
    extra = [subst.get(a, a) for a in extra]
    args["--n-samples"] = "2"
    for i in range(0, len(extra), 2):
        args[extra[i]] = extra[i + 1]
    argv = [a for kv in args.items() for a in kv] + ["--first-draws", "ipa", "--out", str(tmp_path / "o")]
    if "--scans" not in args:
        argv += ["--scans", "1"]
    code, _, err = run(argv, capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_default_model_paths_name_the_demo_command(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(["--scans", "1"], capsys)
    assert code == 2 and "boed demo" in err


def _fake_data(monkeypatch, fingerprint="fp-train"):
    """Replace dataset_from_args; returns the list of (split, data, data_root, cache_dir) asked for."""
    ds = ImageSet(6, S=S)
    ds.images = torch.randint(0, 256, (6, 1, S, S), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ds.labels = torch.zeros(6, 15)
    ds.get_batch = lambda idx: ds.images[torch.as_tensor(idx)]
    ds.fingerprint = fingerprint
    asked = []

    def fake(args, split):
        asked.append((split, args.data, None if args.data_root is None else str(args.data_root), args.cache_dir))
        return ds

    monkeypatch.setattr(run_cmd, "dataset_from_args", fake)
    return asked


@pytest.fixture
def recorded(models, tmp_path):
    """Copies of the tiny models whose run folders record NIH-folder training data (as data.json)."""
    import shutil

    root = tmp_path / "nih"
    root.mkdir()
    runs = tmp_path / "runs"
    shutil.copytree(models / "ipa", runs / "ipa")
    shutil.copytree(models / "avp", runs / "avp" / "model")
    rec = {"data": "chestxray", "data_root": str(root), "cache_dir": str(tmp_path / "cache"), "image_size": S,
           "fingerprint": "fp-train"}
    for d in ("ipa", "avp"):
        (runs / d / "data.json").write_text(json.dumps(rec))
    return runs, rec


def test_run_draws_t1_images_from_the_recorded_training_data(recorded, image_png, tmp_path, capsys, monkeypatch, caplog):
    runs, rec = recorded
    asked = _fake_data(monkeypatch)
    out = tmp_path / "scan"
    code, _, err = run(["--scans", "1", "--image", str(image_png), "--ipa", str(runs / "ipa"), "--avp", str(runs / "avp" / "model"),
                        "--n-samples", "2", "--out", str(out), "--no-figures", "--device", "cpu"], capsys)
    assert code == 0, err
    assert asked == [("train", "chestxray", rec["data_root"], rec["cache_dir"])]  # never the default phantom set
    saved = json.loads((out / "scans.json").read_text())["data"]
    assert saved["data"] == "chestxray" and saved["data_root"] == rec["data_root"]
    # the recorded folder whose content changed since: the fingerprint check warns
    asked = _fake_data(monkeypatch, fingerprint="fp-other")
    with pytest.warns(UserWarning, match="not the one the models were trained on"):
        code, _, err = run(["--scans", "1", "--image", str(image_png), "--ipa", str(runs / "ipa"), "--avp", str(runs / "avp"),
                            "--n-samples", "2", "--out", str(out), "--no-figures"], capsys)
    assert code == 0, err
    # explicit flags win over the record, and other data than the models saw gives one warning
    asked = _fake_data(monkeypatch, fingerprint="fp-other")
    with caplog.at_level(logging.INFO, logger="xray.dataset"):
        code, _, err = run(["--scans", "1", "--image", str(image_png), "--ipa", str(runs / "ipa"), "--avp", str(runs / "avp"),
                            "--n-samples", "2", "--out", str(out), "--no-figures", "--data", "phantom"], capsys)
    assert code == 0, err
    assert asked == [("train", "phantom", None, None)]
    assert [r.levelno for r in caplog.records if "the models were trained on" in r.getMessage()] == [logging.WARNING]


def test_run_without_recorded_data_needs_data_root(models, image_png, tmp_path, capsys, monkeypatch):
    asked = _fake_data(monkeypatch)
    base = ["--scans", "1", "--ipa", str(models / "ipa"), "--avp", str(models / "avp"), "--n-samples", "2",
            "--out", str(tmp_path / "o"), "--no-figures"]
    for src in (["--image", str(image_png)], ["--index", "0"]):
        code, _, err = run(base + src, capsys)
        assert code == 2 and "--data-root" in err and "do not record" in err and len(err.strip().splitlines()) == 1
    assert asked == [] and not (tmp_path / "o").exists()  # nothing opened, nothing written
    code, _, err = run(base + ["--image", str(image_png), "--data-root", str(tmp_path / "data")], capsys)
    assert code == 0, err
    assert asked == [("train", "chestxray", str(tmp_path / "data"), None)]
    code, _, err = run(base + ["--image", str(image_png), "--first-draws", "ipa"], capsys)  # no data needed
    assert code == 0, err


def test_run_refuses_models_trained_on_different_data(recorded, image_png, tmp_path, capsys, monkeypatch, caplog):
    runs, rec = recorded
    _fake_data(monkeypatch)
    (runs / "avp" / "data.json").write_text(json.dumps({**rec, "data_root": str(tmp_path / "elsewhere")}))
    code, _, err = run(["--scans", "1", "--image", str(image_png), "--ipa", str(runs / "ipa"), "--avp", str(runs / "avp"),
                        "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "data_root" in err and "--data-root" in err
    # an explicit --data-root wins, with a warning that the models were trained on other data
    asked = _fake_data(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="xray.dataset"):
        code, _, err = run(["--scans", "1", "--image", str(image_png), "--ipa", str(runs / "ipa"), "--avp", str(runs / "avp"),
                            "--n-samples", "2", "--data-root", rec["data_root"], "--out", str(tmp_path / "o"), "--no-figures"], capsys)
    assert code == 0, err
    assert asked == [("train", "chestxray", rec["data_root"], None)]
    assert any("the IPA run was trained on data_root" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("device, message", [("gpu9", "is not a device"), ("cuda:7", "CUDA")])
def test_run_device_uses_the_shared_parser(models, image_png, tmp_path, capsys, device, message):
    if device.startswith("cuda") and __import__("torch").cuda.is_available():
        pytest.skip("a CUDA machine")
    code, _, err = run(["--scans", "1", "--image", str(image_png), "--ipa", str(models / "ipa"), "--avp", str(models / "avp"),
                        "--first-draws", "ipa", "--device", device, "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and message in err and not (tmp_path / "o").exists()


def test_scan_output_folder_is_cleared_of_an_earlier_run_and_never_inside_data(tmp_path):
    from boed.heatmaps import scan_out_dir
    from tests.xray.conftest import make_nih
    from xray.errors import UserError

    out = tmp_path / "scan"
    out.mkdir()
    for name in ("step_1.png", "step_5.png", "summary.png", "scans.json", "notes.txt"):
        (out / name).write_text("old")
    assert scan_out_dir(out) == out
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # only what a run owns is removed
    nih = make_nih(tmp_path / "nih", n=2, px=8)
    for bad, root in ((nih / "images", None), (tmp_path / "elsewhere" / "x", tmp_path / "elsewhere")):
        with pytest.raises(UserError, match="inside the data folder"):
            scan_out_dir(bad, root)
    assert not (tmp_path / "elsewhere").exists()
