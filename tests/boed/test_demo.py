"""End-to-end checks of `boed demo` (slow: run by CI with `make test-slow`)."""

from __future__ import annotations

import csv
import json
import os

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
