"""The completer study and the seed study: tables, figures and orchestration on synthetic inputs."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pandas as pd
import pytest
import torch

from boed import study
from boed.geometry import ScanGeometry
from xray.errors import UserError

S = 64
PAIRED_HEAD = "method,baseline,illness,t,diff,diff_lo,diff_hi,p_above,n\n"


def _quality_csv(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [("eig-ipa", 0.010, 0.09), ("eig-ipar", 0.030, 0.02), ("eig-ipa-under", 0.050, 0.12),
            ("eig-retrieval", 0.020, 0.10), ("uncond", 0.060, 0.15)]
    path.write_text("completer,n_images,n_samples,best_mse,best_mse_se,mean_mse,pairwise,pairwise_se,pixel_std\n" + "".join(
        f"{c},50,10,{b},0.001,{b * 2},{p},0.01,{p / 2}\n" for c, b, p in rows))


def _paired_csv(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(PAIRED_HEAD + "".join(f"{m},{b},Effusion,{t},{d},{lo},{hi},0.5,100\n" for m, b, t, d, lo, hi in rows))


def test_completer_table_reads_gains_both_ways_and_publishes(tmp_path):
    _quality_csv(tmp_path / "quality" / "quality.csv")
    _paired_csv(tmp_path / "study-eval" / "effusion" / "paired.csv", [
        ("eig-ipa", "uncond", "2", 0.5, 0.4, 0.6),  # a per-t row: not the average
        ("eig-ipa", "uncond", "1-3", 0.9, 0.8, 1.0),  # the old t = 1..T average: only used when 2..T is absent
        ("eig-ipa", "uncond", "2-3", 0.04, 0.01, 0.07),
        ("uncond", "eig-ipar", "2-3", 0.02, -0.01, 0.05),  # uncond minus eig-ipar: negated and flipped
        ("eig-ipa-under", "uncond", "2-3", -0.03, -0.05, -0.01),
    ])
    rows = study.publish_completers(tmp_path, ["effusion"], notes="synthetic")
    by = {r["completer"]: r for r in rows}
    assert [r["completer"] for r in rows] == [*study.COMPLETERS, "uncond"]
    assert (by["eig-ipa"]["gain"], by["eig-ipa"]["gain_lo"], by["eig-ipa"]["gain_hi"]) == (0.04, 0.01, 0.07)
    assert (by["eig-ipar"]["gain"], by["eig-ipar"]["gain_lo"], by["eig-ipar"]["gain_hi"]) == (-0.02, -0.05, 0.01)
    assert pd.isna(by["eig-retrieval"]["gain"])  # not in paired.csv and no records to compute it from
    assert by["eig-ipa"]["best_mse"] == 0.01 and by["eig-ipar"]["pairwise"] == 0.02 and by["uncond"]["gain"] == 0
    assert all(r["t"] == "2-3" for r in rows)
    table = pd.read_csv(tmp_path / "completers.csv")
    assert list(table.columns) == list(study.TABLE_COLUMNS) and len(table) == 5
    md = (tmp_path / "completers.md").read_text()
    assert "t = 2..3" in md and "+0.040 [+0.010, +0.070]" in md and "synthetic" in md
    assert "eig-ipa: interval above 0" in md and "eig-ipar: interval contains 0" in md and "eig-ipa-under: interval below 0" in md
    assert (tmp_path / "completers.png").read_bytes()[:4] == b"\x89PNG"


def test_completer_table_needs_an_averaged_row_and_the_inputs(tmp_path):
    _quality_csv(tmp_path / "quality" / "quality.csv")
    _paired_csv(tmp_path / "study-eval" / "effusion" / "paired.csv", [("eig-ipa", "uncond", "2", 0.5, 0.4, 0.6)])
    with pytest.raises(UserError, match="averaged row"):
        study.publish_completers(tmp_path, ["effusion"])
    with pytest.raises(UserError, match="paired.csv is missing"):
        study.publish_completers(tmp_path, ["edema"])
    (tmp_path / "quality" / "quality.csv").unlink()
    with pytest.raises(UserError, match="quality stage"):
        study.publish_completers(tmp_path, ["effusion"])


def _seed_tables(diffs: dict[int, list[tuple]]):
    """Per seed: rows (baseline, t, diff, lo, hi) of EIG-IPA minus baseline (Effusion)."""
    head = PAIRED_HEAD.strip().split(",")
    return {k: pd.DataFrame([["eig-ipa", b, "Effusion", t, d, lo, hi, 0.5, 100] for b, t, d, lo, hi in rows], columns=head)
            .astype({"t": str}) for k, rows in diffs.items()}


def test_seed_pooling_known_answers():
    tables = _seed_tables({
        0: [("uncond", "2-5", 0.03, 0.01, 0.05), ("random", "2-5", 0.02, -0.01, 0.05), ("nongreedy", "2-5", -0.04, -0.06, -0.02),
            ("uncond", "2", 0.01, -0.02, 0.04), ("epe-ipa", "2-5", 0.5, 0.4, 0.6)],
        1: [("uncond", "2-5", 0.05, 0.02, 0.08), ("random", "2-5", 0.04, 0.01, 0.07), ("nongreedy", "2-5", -0.02, -0.03, -0.01),
            ("uncond", "2", 0.02, 0.00, 0.04)],
        2: [("uncond", "2-5", 0.04, 0.02, 0.06), ("random", "2-5", 0.03, 0.01, 0.05), ("nongreedy", "2-5", -0.03, -0.05, -0.01)],
    })
    rows = study.seed_rows(tables)
    by = {(r["baseline"], r["t"]): r for r in rows}
    assert set(by) == {("uncond", "2-5"), ("random", "2-5"), ("nongreedy", "2-5"), ("uncond", "2")}  # headline baselines only
    u = by[("uncond", "2-5")]
    assert u["holds"] == "+" and u["n_seeds"] == 3 and u["pooled"] == pytest.approx(0.04)
    assert u["between_seed_sd"] == pytest.approx(0.01)
    half = 4.302652729911275 * 0.01 / 3 ** 0.5  # t_{0.975, 2} sd / sqrt(K)
    assert (u["pooled_lo"], u["pooled_hi"]) == (pytest.approx(0.04 - half), pytest.approx(0.04 + half))
    assert (u["seed1"], u["seed1_lo"], u["seed1_hi"]) == (0.05, 0.02, 0.08)
    assert by[("random", "2-5")]["holds"] == "no"  # seed 0's interval contains 0
    assert by[("nongreedy", "2-5")]["holds"] == "-"
    assert by[("uncond", "2")]["holds"] == "no" and by[("uncond", "2")]["n_seeds"] == 2  # seed 2 lacks the row
    assert pd.isna(by[("uncond", "2")]["seed2"])
    assert [r["t"] for r in rows if r["baseline"] == "uncond"] == ["2", "2-5"]  # per t first, then the average
    md = study.render_seed_md(rows, [0, 1, 2], wall_s=600)
    assert "Effusion vs uncond: holds (+)" in md and "Effusion vs nongreedy: holds (-)" in md and "10 min" in md
    assert "random: holds" not in md


def test_seed_study_runs_demo_per_seed_and_pools(tmp_path, monkeypatch):
    import boed.demo

    calls = []

    def fake_run_command(module, argv):
        argv = [str(a) for a in argv]
        calls.append((module, argv))
        k, out = int(argv[argv.index("--seed") + 1]), tmp_path / argv[argv.index("--out") + 1]
        shift = 0.01 * k
        _paired_csv(out / "eval" / "effusion" / "paired.csv", [
            ("eig-ipa", "uncond", "2-3", 0.03 + shift, 0.01 + shift, 0.05 + shift),
            ("eig-ipa", "random", "2-3", 0.0, -0.02, 0.02), ("eig-ipa", "nongreedy", "2", 0.01, -0.01, 0.03)])
        (out / "summary.json").write_text(json.dumps({"timings_s": {"total": 120.0}}))

    monkeypatch.setattr(boed.demo, "run_command", fake_run_command)
    monkeypatch.chdir(tmp_path)
    rows = study.run_seed_study([0, 1, 2], tmp_path / "seeds", ["--quick", "--illness", "effusion"])
    assert [c[0] for c in calls] == ["boed.commands.demo"] * 3
    assert calls[1][1] == ["--seed", "1", "--out", str(tmp_path / "seeds" / "seed-1"), "--quick", "--illness", "effusion"]
    assert {(r["baseline"], r["t"], r["holds"]) for r in rows} == {("uncond", "2-3", "+"), ("random", "2-3", "no"), ("nongreedy", "2", "no")}
    table = pd.read_csv(tmp_path / "seeds" / "seeds.csv", dtype={"t": str})
    assert {"seed0", "seed2_hi", "pooled_lo", "holds"} <= set(table.columns) and len(table) == 3
    assert "6 min" in (tmp_path / "seeds" / "seeds.md").read_text()  # 3 demos x 120 s
    assert (tmp_path / "seeds" / "seeds.png").is_file()


def _cli(argv, capsys):
    from xray.cli_base import make_main

    main = make_main("boed", "test", {"study": "boed.commands.study"})
    with pytest.raises(SystemExit) as e:
        main(["study", *argv])
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["seeds", "--seeds", "0", "--out", "X"], "at least 2 distinct seeds"),
    (["seeds", "--seeds", "0,a", "--out", "X"], "comma list of integers"),
    (["seeds", "--out", "X", "--", "--seed", "3"], "not after --"),
    (["seeds", "--out", "X", "--", "--quick", "--bogus"], "does not take --bogus"),
    (["completers", "--out", "X", "--repeats", "0"], "--repeats must be >= 1"),
    (["completers", "--out", "X", "--states", "0"], "--states must be >= 1"),
    (["completers", "--out", "X", "--device", "gpu9"], "is not a device"),
    (["completers", "--out", "X", "--illness", "flu"], "unknown illness"),
    (["completers", "--out", "X", "--data-root", "NOWHERE"], "does not exist"),
    (["completers", "--out", "X", "--data", "chestxray"], "--data chestxray needs --data-root"),
    (["completers", "--out", "X", "--quick", "--profile", "paper"], "pass one of them"),
    (["power", "--out", "X", "--data", "chestxray"], "--data chestxray needs --data-root"),
    (["power", "--out", "X", "--data-root", "NOWHERE"], "does not exist"),
])
def test_study_cli_bad_input(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    code, err = _cli(argv, capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "X").exists()


@pytest.mark.parametrize("which", ["completers", "power"])
def test_a_study_into_a_demo_folder_of_another_profile_is_refused_up_front(tmp_path, capsys, monkeypatch, which):
    """`boed demo --quick` then `boed study completers --out runs/demo`: refused in one line naming
    the demo's profile (the study would move the quick demo aside and train for an hour); with the
    same --profile the study runs on it."""
    import json

    from boed import adaptivity, study

    demo_dir = tmp_path / "runs" / "demo"
    demo_dir.mkdir(parents=True)
    (demo_dir / "summary.json").write_text(json.dumps({"profile": {"name": "quick"}}))
    ran = []
    monkeypatch.setattr(study, "run_completer_study", lambda opts: ran.append(opts))
    monkeypatch.setattr(adaptivity, "run_power_study", lambda opts: ran.append(opts))
    code, err = _cli([which, "--out", str(demo_dir)], capsys)
    assert code == 2 and "profile quick" in err and "--profile quick" in err and len(err.strip().splitlines()) == 1
    assert ran == [] and sorted(p.name for p in demo_dir.iterdir()) == ["summary.json"]
    with pytest.raises(FileNotFoundError):  # it runs (the stub writes no tables to print)
        _cli([which, "--profile", "quick", "--out", str(demo_dir)], capsys)
    assert len(ran) == 1 and ran[0].profile.name == "quick" and ran[0].data is None


def test_scan_state_masks_are_unions_of_1_to_T_grid_patches():
    geom = ScanGeometry(S)
    m = study.scan_state_masks(200, geom, 4, torch.Generator().manual_seed(0))  # (200, 1, S, S)
    assert m.shape == (200, 1, S, S)
    area = m.flatten(1).sum(1) / geom.patch_size ** 2  # (200,) in patch units
    assert bool((area >= 1).all()) and bool((area <= 4 + 1e-6).all())
    assert int((area == 1).sum()) > 20 and int((area > 3).sum()) > 20  # 1 patch and (almost surely distinct) 4 patches both occur
    again = study.scan_state_masks(200, geom, 4, torch.Generator().manual_seed(0))
    assert torch.equal(m, again)


def _tiny_ipa(path):
    from ipa_core.config import get_config
    from ipa_core.ipa import IPA, IPAConfig

    IPA(IPAConfig.from_vae(dataclasses.replace(get_config("tiny"), shift=-127.5, scale=1 / 64))).save_pretrained(path / "model")


@pytest.fixture(scope="module")
def nih(tmp_path_factory):
    from tests.xray.conftest import make_nih

    return make_nih(tmp_path_factory.mktemp("nih") / "data", n=40, px=S)


def test_completer_study_orchestration_skips_done_stages_and_resumes(tmp_path, nih, monkeypatch):
    """The stage list, arguments and skip/resume logic, with the training and evaluation commands
    replaced by a fake that writes what they would; the quality stage runs for real on tiny models."""
    import boed.demo
    from boed.demo import PROFILES

    calls = []

    def fake(module, argv, procs=None):
        argv = [str(a) for a in argv]
        calls.append((module, argv))
        out = tmp_path / "run"
        o = argv[argv.index("--out") + 1]
        if module == "ipa_core.commands.train" and "ipa" in argv:
            _tiny_ipa(tmp_path / o)
        elif module == "boed.commands.evaluate":
            _paired_csv(tmp_path / o / "paired.csv", [(m, "uncond", "2-3", 0.01 * i, -0.01, 0.02 * i + 0.01)
                                                      for i, m in enumerate(study.COMPLETERS)])
        assert out.is_dir()

    monkeypatch.setattr(boed.demo, "run_command", fake)
    monkeypatch.setattr(boed.demo, "run_sharded", fake)
    monkeypatch.chdir(tmp_path)
    profile = dataclasses.replace(PROFILES["quick"], phantom_n=None)
    opts = study.StudyOptions(out=tmp_path / "run", profile=profile, illnesses=("Effusion",), repeats=2, n_states=4,
                              data_root=nih, cache_dir=tmp_path / "cache", device="cpu", seed=0)
    summary = study.run_completer_study(opts)
    stages = [c[1][c[1].index("--out") + 1] for c in calls]
    assert stages == [str(tmp_path / "run" / s) for s in ("vae", "ipa", "ipar", "ipa-under", "avp", "study-eval/effusion")]
    args = {s.split("/")[-1]: c[1] for s, c in zip(stages, calls)}
    assert "--objective" in args["ipar"] and args["ipar"][args["ipar"].index("--objective") + 1] == "reverse"
    assert args["ipa-under"][args["ipa-under"].index("--steps") + 1] == str(profile.ipa_steps // 8)
    ev = args["effusion"]
    assert ev[ev.index("--methods") + 1] == "eig-ipa,eig-ipar,eig-ipa-under,eig-retrieval,uncond"
    assert ev[ev.index("--repeats") + 1] == "2" and ev[ev.index("--ipar") + 1] == str(tmp_path / "run" / "ipar")
    assert ev[ev.index("--ipa-under") + 1] == str(tmp_path / "run" / "ipa-under")
    quality = pd.read_csv(tmp_path / "run" / "quality" / "quality.csv")
    assert list(quality["completer"]) == list(study.QUALITY_NAMES) and (quality["n_images"] == 4).all()
    assert (quality["best_mse"] <= quality["mean_mse"] + 1e-9).all() and (quality["pairwise"] > 0).all()
    assert [r["completer"] for r in summary["rows"]] == [*study.COMPLETERS, "uncond"]
    assert summary["rows"][1]["gain"] == pytest.approx(0.01)
    assert (tmp_path / "run" / "completers.png").is_file()
    calls.clear()
    study.run_completer_study(opts)  # every stage done: nothing reruns
    assert calls == []
    (tmp_path / "run" / "ipa-under" / "done.json").unlink()  # a stage killed before it finished reruns, and
    study.run_completer_study(opts)  # its new model (other weights: another digest) reruns what reads it
    assert [c[1][c[1].index("--out") + 1] for c in calls] == [str(tmp_path / "run" / s)
                                                              for s in ("ipa-under", "study-eval/effusion")]


def test_study_evaluate_arguments_parse_with_the_evaluate_command(tmp_path):
    """The evaluation stage's argv is valid for `boed evaluate` (which has --ipar/--ipa-under/--repeats)."""
    from boed.commands import evaluate
    from boed.demo import PROFILES, DemoOptions

    parser = argparse.ArgumentParser()
    evaluate.configure(parser)
    known = {a for act in parser._actions for a in act.option_strings}
    assert {"--ipar", "--ipa-under", "--repeats"} <= known
    opts = study.StudyOptions(out=tmp_path, profile=PROFILES["quick"])
    dopts = DemoOptions(out=tmp_path, profile=PROFILES["quick"], illnesses=opts.illnesses)
    (argv,) = [st.argv for st in study.study_stages(opts, dopts) if st.name.startswith("study-eval/")]
    args = parser.parse_args([str(a) for a in argv])
    assert args.repeats == study.DEFAULT_REPEATS
