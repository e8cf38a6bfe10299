"""boed/adaptivity.py: the power study's table from known records, its files, and the sweep's refusals."""

import csv
from pathlib import Path

import numpy as np
import pytest

from boed.adaptivity import (POWER_COLUMNS, POWER_METHODS, TARGET_HALF_WIDTH, power_row, render_power_md,
                             run_variability_sweep, write_power_outputs)
from boed.cli import main as boed_main
from boed.demo import PROFILES
from xray.errors import UserError
from xray.labels import LABELS

EFF = LABELS.index("Effusion")


def _records(n=60, T=3, R=2, seed=0):
    """Effusion records of the five methods: clairvoyant and eig-ipa rank perfectly from t = 2 on,
    uncond and random from nothing (p = 0.5), full perfectly at every t."""
    rng = np.random.default_rng(seed)
    recs = []
    for i in range(n):
        y = [0] * 15
        y[EFF] = int(rng.random() < 0.4) if i > 1 else i  # both classes present
        for method in POWER_METHODS:
            for r in ([None] if method == "full" else range(R)):
                probs = []
                for t in range(T + 1):
                    p = [0.5] * 15
                    good = method == "full" or (method in ("eig-ipa", "clairvoyant") and t >= 2)
                    p[EFF] = 0.2 + 0.6 * y[EFF] if good else 0.5
                    probs.append(p)
                recs.append({"method": method, "task": None if method in ("random", "full") else "Effusion",
                             "repeat": r, "index": i, "locations": [], "probs": probs, "labels": y})
    return recs


def test_power_row_known_answers():
    recs = _records()
    row = power_row(recs, "effusion", scans=3, n_boot=100, level="default")
    assert row["t"] == "2-3" and row["n"] == 60 and row["repeats"] == 2 and row["level"] == "default"
    assert row["positives"] == sum(r["labels"][EFF] for r in recs if r["method"] == "eig-ipa" and r["repeat"] == 0)
    assert row["gain_uncond"] == 0.5 and row["room"] == 0.5 and row["capture"] == 1.0
    assert row["half_width"] == pytest.approx((row["gain_uncond_hi"] - row["gain_uncond_lo"]) / 2)
    assert row["eig_minus_random"] == 0.5 and row["eig_minus_full"] == 0.0
    assert row["gain_uncond_sd_repeats"] == 0.0  # the repeats agree exactly
    assert set(row) == set(POWER_COLUMNS)
    with pytest.raises(UserError, match="clairvoyant"):
        power_row([r for r in recs if r["method"] != "clairvoyant"], "effusion", scans=3, n_boot=0)


def test_power_outputs_written_and_say_the_aim(tmp_path):
    rows = [power_row(_records(seed=s), "effusion", scans=3, n_boot=50, level=lv) for s, lv in ((0, "default"), (1, "hard"))]
    paths = write_power_outputs(rows, tmp_path, "variability", notes="tiny")
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths.values())
    back = list(csv.DictReader(paths["csv"].open()))
    assert [r["level"] for r in back] == ["default", "hard"] and float(back[0]["capture"]) == 1.0
    md = render_power_md(rows)
    assert str(TARGET_HALF_WIDTH) in md and md.count("| Effusion |") == 2


def test_variability_sweep_refuses_unknown_or_single_levels(tmp_path):
    for levels in (["default"], ["default", "extreme"]):
        with pytest.raises(UserError, match="--levels"):
            run_variability_sweep(levels, tmp_path / "v", PROFILES["quick"], 200, 10)
    assert not (tmp_path / "v").exists()  # refused before anything was made


@pytest.mark.slow  # trains the quick profile's models, then evaluates the five methods
def test_power_study_end_to_end_quick(tmp_path, capsys):
    out = tmp_path / "power"
    argv = ["study", "power", "--profile", "quick", "--illness", "effusion", "--n-test", "24", "--repeats", "1",
            "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--out", str(out)]
    with pytest.raises(SystemExit) as e:
        boed_main(argv)
    assert e.value.code == 0, capsys.readouterr().err
    rows = list(csv.DictReader((out / "power.csv").open()))
    assert len(rows) == 1 and rows[0]["illness"] == "Effusion" and int(rows[0]["n"]) == 24
    assert np.isfinite(float(rows[0]["room"])) and (out / "power.png").is_file()


def test_power_study_on_a_finished_demo_runs_only_the_evaluations(tmp_path, monkeypatch):
    """`boed study power --out RUN` on a finished demo folder adopts its data, VAE, IPA and AVP-CNN
    stages: the stage fingerprints are the demo's own, model digests included (a study that
    fingerprinted without them retrained the IPA of a published run)."""
    import dataclasses

    import boed.adaptivity as adaptivity
    import boed.demo as demo
    from tests.boed.test_study import _tiny_ipa
    from tests.xray.conftest import make_nih

    calls = []

    def fake(module, argv, procs=None):
        argv = [str(a) for a in argv]
        calls.append(argv[argv.index("--out") + 1])
        if module != "boed.commands.evaluate":
            _tiny_ipa(Path(argv[argv.index("--out") + 1]))  # every trained stage leaves a model with a digest

    monkeypatch.setattr(demo, "run_command", fake)
    monkeypatch.setattr(demo, "run_sharded", fake)
    monkeypatch.setattr(adaptivity, "load_records", lambda out: [])
    monkeypatch.setattr(adaptivity, "power_row", lambda recs, ill, T, level="": {"illness": ill})
    nih = make_nih(tmp_path / "data", n=40, px=16)
    profile = dataclasses.replace(PROFILES["quick"], phantom_n=None, image_size=16)
    run = tmp_path / "run"
    demo.run_demo(demo.DemoOptions(out=run, profile=profile, illnesses=("Effusion",), data_root=nih,
                                   cache_dir=tmp_path / "cache", device="cpu", until="avp"))
    assert calls == [str(run / s) for s in ("vae", "ipa", "avp")]
    calls.clear()
    opts = adaptivity.PowerOptions(out=run, profile=profile, illnesses=("Effusion",), n_test=10, repeats=1,
                                   data_root=nih, cache_dir=tmp_path / "cache", device="cpu")
    adaptivity.run_power_study(opts, publish=False)
    assert calls == [str(run / "power-eval" / "effusion")]
    assert not list(run.glob("*.old-*"))  # nothing moved aside


def test_variability_sweep_reuses_finished_power_studies_per_level(tmp_path):
    """--reuse LEVEL=RUN: a level's rows come from RUN/power.json (nothing is generated or trained
    for it); bad or missing summaries are refused before anything is made."""
    import json

    runs = {}
    for k, level in enumerate(("default", "realistic")):
        row = power_row(_records(seed=k), "Effusion", 3)
        runs[level] = tmp_path / f"power-{level}"
        runs[level].mkdir()
        (runs[level] / "power.json").write_text(json.dumps({"rows": [row]}))
    rows = run_variability_sweep(["default", "realistic"], tmp_path / "v", PROFILES["quick"], 200, 10,
                                 illnesses=["effusion"], reuse=runs)
    assert [r["level"] for r in rows] == ["default", "realistic"] and rows[0]["room"] == pytest.approx(
        power_row(_records(seed=0), "Effusion", 3)["room"])
    assert sorted(p.name for p in (tmp_path / "v").iterdir()) == ["variability.csv", "variability.md", "variability.png"]
    assert "Level default: the rows of the power study in" in (tmp_path / "v" / "variability.md").read_text()
    for levels, reuse, match in ((["default", "realistic"], {"hard": runs["default"]}, "--reuse names level hard"),
                                 (["default", "realistic"], {"default": tmp_path / "none"}, "cannot read"),
                                 (["default", "realistic"], {"default": runs["default"]}, None)):
        if match is None:  # Edema was not in that power study
            with pytest.raises(UserError, match="holds no Edema row"):
                run_variability_sweep(levels, tmp_path / "w", PROFILES["quick"], 200, 10, illnesses=["effusion", "edema"],
                                      reuse=reuse)
        else:
            with pytest.raises(UserError, match=match):
                run_variability_sweep(levels, tmp_path / "w", PROFILES["quick"], 200, 10, reuse=reuse)
    (runs["realistic"] / "power.json").write_text(json.dumps({"rows": [{"illness": "Effusion", "room": 0.1}]}))
    with pytest.raises(UserError, match="holds no Effusion row"):  # a row without the table's fields
        run_variability_sweep(["default", "realistic"], tmp_path / "w", PROFILES["quick"], 200, 10, illnesses=["effusion"],
                              reuse=runs)
    assert not (tmp_path / "w").exists()
