"""End-to-end checks of `boed demo` (slow: run by CI with `make test-slow`)."""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

import pytest
import torch

from boed.cli import main as boed_main
from boed.demo import PROFILES


def _run(argv):
    with pytest.raises(SystemExit) as e:
        boed_main(argv)
    return e.value.code


@pytest.mark.slow
def test_quick_demo_end_to_end_and_rerun(tmp_path, capsys):
    out, pub = tmp_path / "demo", tmp_path / "results"
    assert _run(["demo", "--quick", "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--publish", str(pub)]) == 0
    for f in ["vae/model/config.json", "ipa/model/config.json", "avp/model/config.json", "summary.json", "summary.md",
              "eval/effusion/metrics.csv", "eval/edema/metrics.csv", "eval/effusion/paired.csv",
              "scans/effusion-0/summary.png"]:
        assert (out / f).is_file(), f
    rows = list(csv.DictReader(open(out / "eval" / "effusion" / "metrics.csv")))
    assert {r["method"] for r in rows} == {"eig-ipa", "epe-ipa", "random", "uncond", "nongreedy", "full"}
    scans = PROFILES["quick"].scans
    assert {int(r["t"]) for r in rows} == set(range(scans + 1))
    for r in rows:
        assert 0.0 <= float(r["auroc_lo"]) <= float(r["auroc"]) <= float(r["auroc_hi"]) <= 1.0 or r["auroc"] == "nan"
        assert float(r["nll"]) > 0
    for f in ["metrics.csv", "auroc.png", "nll.png", "paired.csv", "paired.png", "README.md"]:
        assert (pub / f).is_file(), f
    assert "EIG-IPA minus each method" in (pub / "README.md").read_text()
    # a second run only re-prints the results: every stage is skipped
    first = json.loads((out / "summary.json").read_text())["timings_s"]
    capsys.readouterr()
    assert _run(["demo", "--quick", "--out", str(out), "--cache-dir", str(tmp_path / "cache")]) == 0
    assert json.loads((out / "summary.json").read_text())["timings_s"] == first  # no stage ran again
    assert "AUROC" in capsys.readouterr().out


def test_summary_and_publish_show_paired_differences(tmp_path):
    """summary.md and the published README carry the paired EIG-IPA differences of every illness."""
    import numpy as np

    from boed.demo import DemoOptions, summarize
    from boed.demo_publish import publish
    from boed.evaluation.report import write_report
    from xray.labels import LABELS

    rng = np.random.default_rng(0)
    eff = LABELS.index("Effusion")
    recs = []
    for i in range(60):
        y = [0] * 15
        y[eff] = i % 2
        for method, noise in (("eig-ipa", 0.1), ("uncond", 0.4), ("random", 2.0)):
            probs = [[0.5] * 15 for _ in range(3)]
            for t in (1, 2):
                probs[t][eff] = float(np.clip(0.5 + 0.3 * (2 * y[eff] - 1) + rng.normal(0, noise), 0, 1))
            recs.append({"method": method, "task": "Effusion" if method != "random" else None, "index": i,
                         "locations": [], "probs": probs, "labels": y})
    out = tmp_path / "run"
    write_report(out / "eval" / "effusion", recs, ["effusion"], scans=2, n_boot=200)
    write_report(out / "eval" / "edema", recs, ["effusion"], scans=2, n_boot=20)  # an earlier run's illness
    opts = DemoOptions(out=out, profile=PROFILES["quick"], illnesses=("Effusion",))
    summary = summarize(opts, {"eval/effusion": 1.0, "total": 1.0})
    md = (out / "summary.md").read_text()
    assert "EIG-IPA minus each method" in md and "| Effusion | random | +" in md
    assert {r["baseline"] for r in summary["paired"]} == {"uncond", "random"}
    pub = publish(out, tmp_path / "pub")
    assert (pub / "paired.png").is_file() and "paired.png" in (pub / "README.md").read_text()
    rows = list(csv.DictReader(open(pub / "paired.csv")))
    assert [r["t"] for r in rows if r["baseline"] == "random"] == ["1", "2", "2-2"]
    assert float(next(r for r in rows if r["baseline"] == "random" and r["t"] == "2-2")["diff"]) > 0.1
    assert len(list(csv.DictReader(open(pub / "metrics.csv")))) == len(summary["metrics"])  # eval/edema left out
    assert "Data: not recorded" in (pub / "README.md").read_text()


@pytest.mark.parametrize("data, expected, absent", [
    ({"kind": "nih", "source": "the NIH ChestX-ray14-format folder /data/nih", "root": "/data/nih", "images": 112120,
      "train": 86524, "test": 25596, "image_size": 256, "fingerprint": "ab"},
     "Data: real chest x-rays from the NIH ChestX-ray14-format folder /data/nih, 112120 images (86524 train, 25596 test) at 256 px.",
     "phantom"),
    ({"kind": "phantom", "source": "the embedded phantom set", "root": None, "images": 2000, "train": 1600, "test": 400,
      "image_size": 64, "fingerprint": "cd"},
     "Data: the embedded phantom set, 2000 images (1600 train, 400 test) at 64 px: synthetic phantoms, not real patients.",
     "real chest x-rays"),
])
def test_publish_says_what_data_the_run_used(tmp_path, data, expected, absent):
    from boed.demo import DemoOptions, summarize
    from boed.demo_publish import publish

    out = tmp_path / "run"
    summarize(DemoOptions(out=out, profile=PROFILES["quick"], illnesses=("Effusion",)), {"total": 0.0}, data=data)
    text = (publish(out, tmp_path / "pub") / "README.md").read_text()
    assert expected in text and absent not in text.split("## ")[0].split("Written by")[0]


def _fingerprints(opts):
    from boed.demo import plan, stage_fingerprint

    fps = {}
    for st in plan(opts):
        fps[st.name] = stage_fingerprint(opts, st, fps, result={"fingerprint": "data"} if st.name == "data" else None)
    return fps


def test_stage_fingerprints_follow_their_inputs_downstream(tmp_path):
    """A changed input changes the fingerprint of its stage and of every stage after it, nothing else."""
    import dataclasses

    from boed.demo import DemoOptions

    def opts(**kw):
        base = dict(out=tmp_path / "run", profile=PROFILES["cpu"], illnesses=("Effusion",), data_root=tmp_path / "nih", cache_dir=tmp_path / "c")
        return DemoOptions(**{**base, **kw})

    ref = _fingerprints(opts())
    assert set(ref) == {"data", "vae", "ipa", "avp", "scans/effusion-0", "scans/effusion-1", "eval/effusion"}
    assert _fingerprints(opts()) == ref
    assert _fingerprints(opts(cache_dir=tmp_path / "elsewhere")) == ref  # where the cache lives is not what it holds
    moved = _fingerprints(DemoOptions(out=tmp_path / "moved", profile=PROFILES["cpu"], illnesses=("Effusion",),
                                      data_root=tmp_path / "nih", cache_dir=tmp_path / "c"))
    assert moved == ref  # paths inside the run folder are relative to it

    def changed(**kw):
        new = _fingerprints(opts(**kw))
        return {k for k in ref if new.get(k) != ref[k]}

    everything = set(ref)
    assert changed(data_root=tmp_path / "other") == everything
    assert changed(seed=1) == everything - {"data"}
    assert changed(device="cuda:0") == everything - {"data"}
    assert changed(profile=dataclasses.replace(PROFILES["cpu"], vae_steps=5)) == {"vae", "ipa", "scans/effusion-0", "scans/effusion-1", "eval/effusion"}
    assert changed(profile=dataclasses.replace(PROFILES["cpu"], avp_steps=5)) == {"avp", "scans/effusion-0", "scans/effusion-1", "eval/effusion"}
    assert changed(profile=dataclasses.replace(PROFILES["cpu"], n_test=5)) == {"eval/effusion"}
    assert changed(profile=dataclasses.replace(PROFILES["cpu"], repeats=5)) == {"eval/effusion"}
    assert changed(max_images=50) == everything


def test_with_policies_adds_policy_stages_feeding_the_evaluation(tmp_path):
    """--with-policies: one distill and one gdfs stage per illness, upstream of the evaluation, whose
    argv the real `boed evaluate` parser accepts with both policy methods."""
    import argparse

    from boed.commands import evaluate as ev_cmd
    from boed.demo import DemoOptions, plan

    opts = DemoOptions(out=tmp_path / "run", profile=PROFILES["cpu"], illnesses=("Effusion",), with_policies=True)
    stages = {st.name: st for st in plan(opts)}
    assert {"policy/effusion-distill", "policy/effusion-gdfs"} <= set(stages)
    ev = stages["eval/effusion"]
    assert {"policy/effusion-distill", "policy/effusion-gdfs"} <= set(ev.upstream)
    parser = argparse.ArgumentParser()
    ev_cmd.configure(parser)
    args = parser.parse_args([str(a) for a in ev.argv])
    assert {"distilled", "gdfs"} <= set(args.methods.split(",")) and args.distilled and args.gdfs
    plain = {st.name for st in plan(DemoOptions(out=tmp_path / "run2", profile=PROFILES["cpu"], illnesses=("Effusion",)))}
    assert not any(n.startswith("policy/") for n in plain)


@pytest.mark.slow  # four short demo runs (~1 min on 2 shared cores)
def test_demo_rerun_with_another_data_root_recomputes(tmp_path, capsys):
    from tests.xray.conftest import make_nih

    a, b = make_nih(tmp_path / "a", n=40, px=64), make_nih(tmp_path / "b", n=32, px=64)
    out = tmp_path / "demo"
    base = ["demo", "--quick", "--until", "vae", "--max-steps", "2", "--max-batch", "2", "--illness", "effusion",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--device", "cpu"]

    def record(stage):
        return json.loads((out / stage / "done.json").read_text())

    assert _run([*base, "--data-root", str(a)]) == 0
    first = record("vae")
    data = record("data")["result"]
    assert data["kind"] == "nih" and data["images"] == 40 and data["root"] == str(a.resolve())
    assert (out / "vae" / "checkpoints" / "ckpt-00000002.pt").is_file()
    # the same command: every stage is skipped
    assert _run([*base, "--data-root", str(a)]) == 0
    assert record("vae") == first and not list(out.glob("vae.old-*"))
    # another data root: the data and everything after them recompute; old outputs moved aside
    assert _run([*base, "--data-root", str(b)]) == 0
    assert record("data")["result"]["images"] == 32 and record("vae")["fingerprint"] != first["fingerprint"]
    assert len(list(out.glob("vae.old-*"))) == 1
    assert json.loads((out / "summary.json").read_text())["data"]["images"] == 32
    # another step cap: the VAE reruns from scratch (not resumed on top of the 2-step run)
    assert _run([*base, "--data-root", str(b), "--max-steps", "3"]) == 0
    assert len(list(out.glob("vae.old-*"))) == 2
    rows = [json.loads(l) for l in (out / "vae" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] <= 3 and rows[-1]["step"] == 3 and json.loads((out / "vae" / "provenance.json").read_text())["step"] == 3


def test_demo_bad_input_is_one_line(tmp_path, capsys):
    assert _run(["demo", "--out", str(tmp_path / "d"), "--illness", "flu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "effusion" in err[0]
    assert _run(["demo", "--out", str(tmp_path / "d"), "--data-root", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def _ram_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


PAPER_SMOKE_RAM_GIB = 16  # one 256 px step per stage peaks at ~4-5 GB; phantom data, eval and grids a little more


@pytest.mark.slow
@pytest.mark.skipif(_ram_gib() < PAPER_SMOKE_RAM_GIB,
                    reason=f"the paper profile trains the 115 M-parameter xray256 VAE at 256 px: needs >= {PAPER_SMOKE_RAM_GIB} GB of RAM")
def test_paper_profile_starts_and_trains_on_cpu(tmp_path):
    """The paper profile (S = 256, xray256 VAE with activation checkpointing, DenseNet-121 from
    ImageNet weights) builds and runs a training step per stage.

    Batch 1 with activation checkpointing; ``--max-steps`` also shrinks each stage's end-of-run
    metrics and sample grids (``--eval-images 1 --sample-n 1``), as it would for a user's smoke
    check: about 14 CPU minutes at one thread by the measured cost of each 256 px pass (before,
    the 4-image IPA metrics alone took ~27 and the full grids ~12). The ImageNet weights come
    from a local file (tests never download): a DenseNet-121 state dict."""
    import torchvision

    from xray.phantom import generate

    root = generate(tmp_path / "nih", n=24, size=256, seed=0, workers=1, progress=False)
    weights = tmp_path / "densenet121.pth"
    torch.save(torchvision.models.densenet121(weights=None).state_dict(), weights)
    out = tmp_path / "paper"
    code = _run(["demo", "--profile", "paper", "--data-root", str(root), "--cache-dir", str(tmp_path / "cache"),
                 "--out", str(out), "--max-steps", "1", "--max-batch", "1", "--until", "avp",
                 "--avp-init-weights", str(weights)])
    assert code == 0
    vae_cfg = json.loads((out / "vae" / "model" / "config.json").read_text())
    assert vae_cfg["image_size"] == 256 and vae_cfg["width"] == 512
    avp = json.loads((out / "avp" / "model" / "config.json").read_text())
    assert avp["arch"] == "densenet121" and avp["input_norm"] == "imagenet" and avp["train_config"]["init"] == "imagenet"
    assert (out / "ipa" / "model" / "config.json").is_file()
    for stage in ("vae", "ipa"):  # the smoke check's small metrics and grids, still written
        assert json.loads((out / stage / "eval.json").read_text())["n_images"] == 1
        assert len(list((out / stage / "samples").glob("*.png"))) == 1


# ----------------------------------------------------------------------------------------------
# kills at any instant, partial runs, models retrained in place (issue 22, items 3-6)


def _tiny_opts(tmp_path, **kw):
    import dataclasses

    from boed.demo import DemoOptions

    prof = dataclasses.replace(PROFILES["quick"], phantom_n=8, phantom_size=32, image_size=32)
    return DemoOptions(**{**dict(out=tmp_path / "run", profile=prof, illnesses=("Effusion",)), **kw})


def test_phantom_stage_killed_before_done_json_is_adopted(tmp_path, caplog):
    from boed.demo import _stage, plan

    opts = _tiny_opts(tmp_path)
    opts.out.mkdir()
    st = plan(opts)[0]
    assert st.name == "phantom"
    _stage(opts, st, {}, {})
    (opts.out / "phantom" / "done.json").unlink()  # a kill between the folder's rename and done.json
    (opts.out / ".phantom.partial-xyz").mkdir()  # and a temp folder of another killed run
    fps, timings = {}, {}
    _stage(opts, st, fps, timings)  # used to fail: "output folder .../phantom already exists"
    done = json.loads((opts.out / "phantom" / "done.json").read_text())
    assert done["adopted"] and done["fingerprint"] == fps["phantom"]
    assert not list(opts.out.glob("phantom.old-*"))
    # another seed: the adopted folder is moved aside and the stage reruns
    other = _tiny_opts(tmp_path, seed=1)
    _stage(other, plan(other)[0], {}, {})
    assert len(list(opts.out.glob("phantom.old-*"))) == 1 and not list(opts.out.glob(".phantom.partial-*"))


def test_killed_demo_takes_its_shards_with_it(tmp_path):
    """A demo killed with SIGKILL: its shard children die too (never orphans holding record locks)."""
    import signal
    import subprocess
    import sys

    parent = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from boed.demo import spawn_tied\n"
        "c = spawn_tied([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print(c.pid, flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    child = int(parent.stdout.readline())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    for _ in range(100):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail("the shard outlived the killed demo")


def test_rerun_waits_for_live_orphan_shards(tmp_path):
    import subprocess
    import sys

    from boed.demo import wait_for_orphans

    marker = str(tmp_path / "eval-out")
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.0)", marker])
    while marker not in open(f"/proc/{orphan.pid}/cmdline").read():  # exec'd (not the forked test process yet)
        time.sleep(0.01)
    pid_file = tmp_path / "eval.pids"
    pid_file.write_text(json.dumps({"pids": [orphan.pid, 999999]}))
    t0 = time.perf_counter()
    assert wait_for_orphans(pid_file, marker, poll=0.05) == [orphan.pid, 999999]
    assert orphan.poll() is not None or time.perf_counter() - t0 > 0.5  # it waited for the live one
    orphan.wait()


def test_partial_run_summary_and_publish_hold_only_this_runs_stages(tmp_path):
    """`--seed 1 --until vae` on a finished seed-0 run: no seed-0 metrics in summary.json, publish refuses."""
    from boed.demo import current_stages, summarize
    from boed.demo_publish import publish
    from xray.errors import UserError

    opts = _tiny_opts(tmp_path, seed=1, until="vae")
    ev = opts.out / "eval" / "effusion"
    ev.mkdir(parents=True)
    (ev / "metrics.csv").write_text("illness,method,t,auroc,auroc_lo,auroc_hi,nll,n\nEffusion,random,0,0.9,0.8,1.0,0.5,10\n")
    (ev / "done.json").write_text(json.dumps({"fingerprint": "seed0", "seconds": 1.0}))
    (opts.out / "vae").mkdir()
    (opts.out / "vae" / "done.json").write_text(json.dumps({"fingerprint": "seed1", "seconds": 1.0}))
    current = current_stages(opts, {"vae": "seed1"})
    assert current == ["vae"]
    summary = summarize(opts, {"vae": 1.0}, current=current)
    assert summary["metrics"] == [] and summary["seed"] == 1
    with pytest.raises(UserError, match="holds no evaluation made with the last run's settings"):
        publish(opts.out, tmp_path / "pub")
    # a finished run of these settings publishes
    (ev / "done.json").write_text(json.dumps({"fingerprint": "seed1-eval", "seconds": 1.0}))
    summary = summarize(opts, {}, current=current_stages(opts, {"vae": "seed1", "eval/effusion": "seed1-eval"}))
    assert [r["auroc"] for r in summary["metrics"]] == [0.9]


def test_model_retrained_in_place_changes_downstream_fingerprints(tmp_path):
    from boed.demo import plan, stage_fingerprint, stage_model_digest
    from ipa_core import VAE
    from tests.ipa_core.test_trainer import micro_cfg

    opts = _tiny_opts(tmp_path, data_root=tmp_path / "nih")
    stages = {st.name: st for st in plan(opts)}
    torch.manual_seed(0)
    VAE(micro_cfg()).save_pretrained(opts.out / "vae" / "model")

    def fps():
        models, out = {}, {}
        for st in stages.values():
            out[st.name] = stage_fingerprint(opts, st, out, {"fingerprint": "d"} if st.name == "data" else None, models)
            d = stage_model_digest(st)
            if d is not None:
                models[st.name] = d
        return out, models

    ref, models = fps()
    assert set(models) == {"vae"}  # the only model on disk
    assert fps()[0] == ref
    torch.manual_seed(1)
    VAE(micro_cfg()).save_pretrained(opts.out / "vae" / "model")  # trained on in place
    new = fps()[0]
    # the stage reading the VAE and, through its fingerprint, every later one; not the AVP-CNN
    assert {k for k in ref if new[k] != ref[k]} == {"ipa", "scans/effusion-0", "eval/effusion"}


def test_stage_finished_by_an_older_boed_is_not_rerun_for_the_new_fingerprint(tmp_path, caplog):
    """A finished stage recorded before fingerprints held model digests is accepted (with a warning)."""
    from boed.demo import Stage, _stage, stage_fingerprint

    opts = _tiny_opts(tmp_path)
    calls = []
    st = Stage("scans/x-0", "boed run", lambda o: calls.append(1), ["--out", opts.out / "scans" / "x-0"], upstream=("ipa",))
    old = stage_fingerprint(opts, st, {"ipa": "ipa-old"})  # as an older boed computed it
    (opts.out / "scans" / "x-0").mkdir(parents=True)
    (opts.out / "scans" / "x-0" / "done.json").write_text(json.dumps({"fingerprint": old, "seconds": 2.0}))
    fps, legacy = {"ipa": "ipa-new"}, {"ipa": "ipa-old"}
    _stage(opts, st, fps, {}, {"ipa": "digest"}, legacy)
    assert calls == [] and "older boed" in caplog.text
    assert json.loads((opts.out / "scans" / "x-0" / "done.json").read_text())["fingerprint"] == fps["scans/x-0"]
    _stage(opts, st, {"ipa": "ipa-new"}, {}, {"ipa": "retrained"}, {"ipa": "ipa-old"})  # a model retrained since
    assert calls == [1]


@pytest.mark.slow  # two short demo runs up to the data stage
def test_demo_rerun_after_a_kill_before_phantom_done_json(tmp_path, capsys):
    out = tmp_path / "demo"
    base = ["demo", "--quick", "--until", "data", "--illness", "effusion", "--cache-dir", str(tmp_path / "cache"),
            "--out", str(out), "--device", "cpu"]
    assert _run(base) == 0
    (out / "phantom" / "done.json").unlink()  # the reproduction of a kill after the rename
    assert _run(base) == 0
    assert json.loads((out / "phantom" / "done.json").read_text())["adopted"]
    assert json.loads((out / "summary.json").read_text())["metrics"] == []


def test_chestmnist_data_reaches_every_stage_without_a_phantom_stage(tmp_path):
    """`boed demo --data chestmnist`: every stage gets --data chestmnist, no private phantom set is made,
    and the stages of a run without --data keep their commands (so old runs are not redone)."""
    from boed.demo import DemoOptions, plan

    mnist = plan(DemoOptions(out=tmp_path / "run", profile=PROFILES["quick"], illnesses=("Effusion",),
                             data_root=tmp_path / "mnist", data="chestmnist"))
    assert [s.name for s in mnist][0] == "data"  # no phantom stage
    for st in mnist:
        argv = [str(a) for a in st.argv]
        assert argv[argv.index("--data") + 1] == "chestmnist" and argv[argv.index("--data-root") + 1] == str(tmp_path / "mnist")
    default = plan(DemoOptions(out=tmp_path / "run", profile=PROFILES["quick"], illnesses=("Effusion",)))
    assert default[0].name == "phantom"
    argv = [str(a) for a in default[1].argv]
    assert argv == ["--image-size", "64", "--data", "chestxray", "--data-root", str(tmp_path / "run" / "phantom")]


def test_avp_stage_passes_the_profiles_training_masks(tmp_path):
    """The cpu profile's AVP recipe (issue 24: chosen by benchmarks/bench_classifier.py) reaches
    `boed train-avp` as flags; a profile without its own recipe (paper: appendix I.4) passes none."""
    import argparse

    from boed.commands import train_avp
    from boed.demo import DemoOptions, avp_stage

    def parsed(profile):
        argv = [str(a) for a in avp_stage(DemoOptions(out=tmp_path, profile=profile, illnesses=("Effusion",))).argv]
        p = argparse.ArgumentParser()
        train_avp.configure(p)
        return argv, p.parse_args(argv)

    cpu = PROFILES["cpu"]
    _, args = parsed(cpu)
    assert (args.p_full, args.p_freeform, args.patch_layout, args.input_norm) == (0.2, 0.0, "scan", "dataset")
    for flag, value in (("p_full", cpu.avp_p_full), ("p_freeform", cpu.avp_p_freeform), ("patch_layout", cpu.avp_patch_layout),
                        ("input_norm", cpu.avp_input_norm)):
        assert getattr(args, flag) == value
    argv, args = parsed(PROFILES["paper"])
    assert not {"--p-full", "--p-freeform", "--patch-layout", "--input-norm"} & set(argv)
    assert (args.p_full, args.p_freeform, args.patch_layout) == (0.0, 0.5, "uniform")  # appendix I.4
    assert args.input_norm == "none"  # the ImageNet init brings its own normalisation


def test_cpu_profile_trains_the_recipe_the_classifier_table_chose():
    """The cpu profile's AVP recipe is the classifier table's winner (benchmarks/bench_classifier.py
    CHOSEN, whose rows are in benchmarks/results/classifier.json): masks, normalisation and steps."""
    import importlib.util

    path = Path(__file__).parents[2] / "benchmarks" / "bench_classifier.py"
    spec = importlib.util.spec_from_file_location("bench_classifier", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    _, masks, model, factor = bench.RECIPES[bench.CHOSEN]
    cpu = PROFILES["cpu"]
    assert (cpu.avp_p_full, cpu.avp_p_freeform, cpu.avp_patch_layout) == (masks["p_full"], masks["p_freeform"], masks["patch_layout"])
    assert (cpu.avp_input_norm or "none") == model.get("input_norm", "none") and cpu.avp_arch == model.get("arch", "tiny")
    assert cpu.avp_steps == bench.BASE_STEPS * factor
    rows = bench.load_results(bench.RESULTS)["rows"]
    assert {r["preset"] for r in rows if r["recipe"] == bench.CHOSEN} == set(bench.PRESET_NAMES)


def test_an_evaluation_stage_grows_in_place_when_only_its_repeats_grow(tmp_path, caplog):
    """`boed study power --repeats 7` on a finished R = 3 study extends its evaluation folders (the
    evaluation keeps the records of fewer repeats) instead of moving them aside; fewer repeats or any
    other change still moves the old output aside and starts over."""
    import logging

    from boed.demo import Stage, _stage

    opts = _tiny_opts(tmp_path)
    opts.out.mkdir()
    folder = opts.out / "power-eval" / "effusion"
    calls = []

    def stage(repeats, seed=0):
        def target(_opts):
            calls.append(repeats)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"records-r{repeats}.jsonl").write_text("x")

        return Stage("power-eval/effusion", "boed evaluate", target, ["--repeats", repeats, "--seed", seed, "--out", folder])

    _stage(opts, stage(3), {}, {})
    with caplog.at_level(logging.INFO, logger="boed.demo"):
        _stage(opts, stage(7), {}, {})
    assert calls == [3, 7] and "extending its output in place" in caplog.text
    assert sorted(p.name for p in folder.iterdir()) == ["done.json", "records-r3.jsonl", "records-r7.jsonl"]
    assert not list(folder.parent.glob("effusion.old-*"))
    _stage(opts, stage(7), {}, {})  # done: not run again
    assert calls == [3, 7]
    _stage(opts, stage(5), {}, {})  # fewer repeats: the old output is moved aside
    assert len(list(folder.parent.glob("effusion.old-*"))) == 1 and not (folder / "records-r7.jsonl").exists()
    _stage(opts, stage(6, seed=1), {}, {})  # more repeats but another seed: moved aside too
    assert len(list(folder.parent.glob("effusion.old-*"))) == 2 and calls == [3, 7, 5, 6]
