"""Bad input through every console script: exit 2, one line on stderr, no traceback, nothing created.

Each case runs in-process (``main(argv)`` of the console script, as the installed command does),
from an empty working folder with HOME pointing into it, so that any file or folder a refused
command leaves behind (in the working folder, the output folder, the cache, or next to the inputs)
is caught by comparing snapshots before and after. Two cases from the issue also run as real
subprocesses (``python -m ...``), where logging and warnings reach stderr as a user sees them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import boed.cli
import ipa_core.cli
import xray.cli

SCRIPTS = {"boed": boed.cli.main, "ipa_core": ipa_core.cli.main, "xray": xray.cli.main}
S = 64
NO_CUDA = not torch.cuda.is_available()


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Tiny trained-shape models (random weights), damaged copies, a prepared NIH-format set, a PNG."""
    from boed.classifier import AVPClassifier, AVPConfig
    from ipa_core.config import get_config
    from ipa_core.ipa import IPA, IPAConfig
    from tests.xray.conftest import make_nih
    from xray.dataset import open_dataset

    w = tmp_path_factory.mktemp("world")
    torch.manual_seed(0)
    AVPClassifier(AVPConfig(arch="tiny", image_size=S)).save_pretrained(w / "avp")
    AVPClassifier(AVPConfig(arch="tiny", image_size=128)).save_pretrained(w / "avp128")
    IPA(IPAConfig.from_vae(dataclasses.replace(get_config("tiny"), shift=-127.5, scale=1 / 64))).save_pretrained(w / "ipa")
    for name in ("avp", "ipa"):  # same config, weights cut short: a damaged download
        shutil.copytree(w / name, w / f"corrupt-{name}")
        weights = next(p for p in (w / f"corrupt-{name}").iterdir() if p.name != "config.json")
        weights.write_bytes(weights.read_bytes()[:100])
    nan_avp = AVPClassifier(AVPConfig(arch="tiny", image_size=S))
    with torch.no_grad():
        next(nan_avp.parameters()).view(-1)[0] = float("nan")  # flipped bytes in a weights file
    nan_avp.save_pretrained(w / "nan-avp")
    nan_ipa = IPA.from_pretrained(w / "ipa")
    with torch.no_grad():
        next(nan_ipa.parameters()).view(-1)[0] = float("inf")
    nan_ipa.save_pretrained(w / "nan-ipa")
    for name, edit in (("banana", lambda d: {**d, "image_size": "banana"}), ("list", lambda d: [1, 2])):
        shutil.copytree(w / "ipa", w / f"{name}-ipa")
        cfg = next((w / f"{name}-ipa").rglob("config.json"))
        cfg.write_text(json.dumps(edit(json.loads(cfg.read_text()))))
        (cfg.parent / "digest.json").unlink()  # a folder of an older boed: the type checks, not the digest, must catch it
    make_nih(w / "nih", n=40, px=S)
    open_dataset("chestxray", w / "nih", size=S, split="all", cache_dir=w / "cache", progress=False)
    Image.fromarray(np.full((80, 70), 120, np.uint8)).save(w / "xray.png")
    (w / "not-an-image.png").write_text("hello")
    return w


MODELS = ["--ipa", "{w}/ipa", "--avp", "{w}/avp"]
DATA = ["--data", "chestxray", "--data-root", "{w}/nih", "--cache-dir", "{w}/cache"]
D = "{t}/D"  # an output folder that must not appear
SAMPLE = ["sample", "--run", "{w}/ipa", "--index", "0", "--out", "{t}/grid.png", *DATA]

# (id, script, argv, a piece of the expected error line)
CASES = [
    # xray
    ("phantom-size", "xray", ["phantom", "--out", D, "--n", "4", "--size", "30", "--seed", "0"], "multiple of 4"),
    ("phantom-n", "xray", ["phantom", "--out", D, "--n", "0", "--size", "64", "--seed", "0"], "--n"),
    ("phantom-missing-flag", "xray", ["phantom", "--out", D, "--n", "4", "--seed", "0"], "--size"),
    ("prepare-missing-root", "xray", ["prepare", "--root", "{t}/nowhere", "--size", "64", "--out", D], "nowhere"),
    ("info-missing", "xray", ["info", "{t}/nowhere"], "nowhere"),
    ("unknown-command", "xray", ["bogus"], "bogus"),
    # ipa_core
    ("sample-device-gpu", "ipa_core", [*SAMPLE, "--device", "gpu"], "--device"),
    ("sample-no-run", "ipa_core", ["sample", "--run", "{t}/nonexistent", "--index", "0", "--out", "{t}/g.png"], "ipa_core train"),
    ("sample-corrupt-run", "ipa_core", ["sample", "--run", "{w}/corrupt-ipa", "--index", "0", "--out", "{t}/g.png"], "corrupt-ipa"),
    ("sample-missing-image", "ipa_core", ["sample", "--run", "{w}/ipa", "--image", "{t}/missing.png", "--out", "{t}/g.png"], "missing.png"),
    ("sample-not-an-image", "ipa_core", ["sample", "--run", "{w}/ipa", "--image", "{w}/not-an-image.png", "--out", "{t}/g.png"], "not-an-image.png"),
    ("sample-n", "ipa_core", [*SAMPLE, "--n", "0"], "--n"),
    ("sample-bad-mask", "ipa_core", [*SAMPLE, "--mask", "bogus"], "mask"),
    ("sample-index", "ipa_core", [*SAMPLE[:4], "999", *SAMPLE[5:]], "999"),
    ("train-device-gpu", "ipa_core", ["train", "--out", D, "--device", "gpu"], "--device"),
    ("train-ipa-without-vae", "ipa_core", ["train", "--stage", "ipa", "--out", D], "--vae"),
    ("train-missing-vae", "ipa_core", ["train", "--stage", "ipa", "--vae", "{t}/novae", "--out", D], "novae"),
    ("train-unknown-config", "ipa_core", ["train", "--stage", "vae", "--config", "nope", "--out", D], "nope"),
    ("train-missing-official", "ipa_core", ["train", "--stage", "vae", "--config", "tiny", "--import-official", "{t}/x.th", "--out", D], "x.th"),
    ("train-bad-int", "ipa_core", ["train", "--out", D, "--steps", "many"], "--steps"),
    ("train-sample-n", "ipa_core", ["train", "--out", D, "--sample-n", "-1"], "--sample-n"),
    # boed run
    ("run-near-miss", "boed", ["run", "--illness", "Effusions", *MODELS, "--out", D], "'effusion'"),
    ("run-device-gpu", "boed", ["run", *MODELS, "--device", "gpu", "--out", D], "--device"),
    ("run-no-models", "boed", ["run", "--ipa", "{t}/no-ipa", "--avp", "{t}/no-avp", "--out", D], "no-avp"),
    ("run-corrupt-avp", "boed", ["run", "--ipa", "{w}/ipa", "--avp", "{w}/corrupt-avp", "--out", D], "corrupt-avp"),
    ("run-sizes-differ", "boed", ["run", "--ipa", "{w}/ipa", "--avp", "{w}/avp128", "--out", D], "px"),
    ("run-scans", "boed", ["run", *MODELS, "--scans", "0", "--out", D], "--scans"),
    ("run-missing-image", "boed", ["run", *MODELS, "--image", "{t}/missing.png", "--out", D], "missing.png"),
    ("run-index", "boed", ["run", *MODELS, *DATA, "--index", "999", "--out", D], "999"),
    ("run-bad-choice", "boed", ["run", "-v", "--estimator", "foo"], "--estimator"),
    # boed evaluate
    ("evaluate-unknown-method", "boed", ["evaluate", "--methods", "eig,foo", *MODELS, "--out", D], "foo"),
    ("evaluate-shard", "boed", ["evaluate", "--shard", "4/4", *MODELS, "--out", D], "4/4"),
    ("evaluate-device-gpu", "boed", ["evaluate", "--device", "gpu", *MODELS, "--out", D], "--device"),
    ("evaluate-near-miss", "boed", ["evaluate", "--illness", "Effusions", *MODELS, "--out", D], "'effusion'"),
    ("evaluate-n-samples", "boed", ["evaluate", "--n-samples", "0", *MODELS, "--out", D], "--n-samples"),
    ("evaluate-temperature-nan", "boed", ["evaluate", "--temperature", "nan", *MODELS, "--out", D], "not finite"),
    ("evaluate-nan-weights", "boed", ["evaluate", "--ipa", "{w}/ipa", "--avp", "{w}/nan-avp", "--methods", "random",
                                      "--data-root", "{w}/nih", "--cache-dir", "{w}/cache", "--out", D], "non-finite weights"),
    ("evaluate-corrupt-avp", "boed", ["evaluate", "--ipa", "{w}/ipa", "--avp", "{w}/corrupt-avp", "--out", D], "corrupt-avp"),
    ("evaluate-merge-nothing", "boed", ["evaluate", "--merge", "--out", D], "boed evaluate"),
    ("evaluate-no-out", "boed", ["evaluate", *MODELS], "--out"),
    # boed train-avp, demo
    ("train-avp-device-gpu", "boed", ["train-avp", "--out", D, "--device", "gpu"], "--device"),
    ("train-avp-missing-data", "boed", ["train-avp", "--out", D, "--data", "chestxray", "--data-root", "{t}/nowhere"], "nowhere"),
    ("demo-unknown-illness", "boed", ["demo", "--illness", "effusion,foo", "--out", D], "foo"),
    ("demo-device-gpu", "boed", ["demo", "--device", "gpu", "--out", D], "--device"),
    ("demo-max-steps", "boed", ["demo", "--max-steps", "0", "--out", D], "--max-steps"),
    ("demo-eval-images", "boed", ["demo", "--eval-images", "0", "--out", D], "--eval-images"),
    ("demo-missing-data-root", "boed", ["demo", "--data-root", "{t}/nowhere", "--out", D], "nowhere"),
    ("demo-chestmnist-no-file", "boed", ["demo", "--data", "chestmnist", "--data-root", "{t}", "--out", D], "chestmnist_64.npz"),
    ("demo-chestxray-no-root", "boed", ["demo", "--data", "chestxray", "--out", D], "--data-root"),
    ("train-avp-chestmnist-no-file", "boed", ["train-avp", "--out", D, "--data", "chestmnist", "--data-root", "{t}"], "chestmnist_64.npz"),
    # float flags: finite and in range, refused by the parser (issue 23 item 4)
    ("run-temperature-nan", "boed", ["run", *MODELS, "--temperature", "nan", "--out", D], "--temperature"),
    ("run-temperature-inf", "boed", ["run", *MODELS, "--temperature", "inf", "--out", D], "not finite"),
    ("sample-t-nan", "ipa_core", [*SAMPLE, "--t", "nan"], "--t"),
    ("sample-t-negative", "ipa_core", [*SAMPLE, "--t", "-1"], "out of range"),
    ("train-lr-inf", "ipa_core", ["train", "--out", D, "--lr", "inf"], "--lr"),
    ("train-ema-rate-1", "ipa_core", ["train", "--out", D, "--ema-rate", "1"], "--ema-rate"),
    ("train-grad-clip-nan", "ipa_core", ["train", "--out", D, "--grad-clip", "nan"], "--grad-clip"),
    ("train-weight-decay-negative", "ipa_core", ["train", "--out", D, "--weight-decay", "-1"], "--weight-decay"),
    ("train-avp-lr-inf", "boed", ["train-avp", "--out", D, "--lr", "inf"], "--lr"),
    ("train-avp-p-full", "boed", ["train-avp", "--out", D, "--p-full", "1.5"], "--p-full"),
    ("train-policy-temperature-nan", "boed", ["train-policy", "--out", D, "--temperature", "nan"], "--temperature"),
    ("train-policy-one-shard", "boed", ["train-policy", "--method", "distill", "--teacher-images", "8", "--shard-size", "8",
                                        *MODELS, "--out", D], "make 1 shard"),
    ("train-policy-tau-zero", "boed", ["train-policy", "--out", D, "--tau", "0"], "--tau"),
    ("download-timeout-inf", "xray", ["download", "--out", D, "--timeout", "inf"], "--timeout"),
    # no tracebacks (issue 23 item 5)
    ("phantom-out-under-a-file", "xray", ["phantom", "--out", "{w}/xray.png/sub", "--n", "4", "--size", "64", "--seed", "0"], "is a file, not a folder"),
    ("train-official-text-file", "ipa_core", ["train", "--stage", "vae", "--config", "tiny", "--import-official", "{w}/not-an-image.png", "--out", D], "not a PyTorch checkpoint"),
    ("sample-out-is-a-folder", "ipa_core", [*SAMPLE[:5], "--out", "{w}", *DATA], "is a folder"),
    ("sample-out-under-a-file", "ipa_core", [*SAMPLE[:5], "--out", "{w}/xray.png/g.png", *DATA], "is a file, not a folder"),
    ("sample-n-huge", "ipa_core", [*SAMPLE, "--n", "100000"], "--n is 100000"),
    ("sample-config-banana", "ipa_core", ["sample", "--run", "{w}/banana-ipa", *SAMPLE[3:]], "image_size is \"banana\""),
    ("sample-config-list", "ipa_core", ["sample", "--run", "{w}/list-ipa", *SAMPLE[3:]], "holds a JSON list"),
    ("run-path-with-a-space", "boed", ["run", "--ipa", "{t}/my runs/ipa", "--avp", "{t}/my runs/avp", "--out", D], "--out '"),
    ("run-nan-weights", "boed", ["run", "--ipa", "{w}/ipa", "--avp", "{w}/nan-avp", "--out", D], "non-finite weights"),
    ("sample-nan-weights", "ipa_core", ["sample", "--run", "{w}/nan-ipa", *SAMPLE[3:]], "non-finite weights"),
    ("train-eval-images-negative", "ipa_core", ["train", "--out", D, "--eval-images", "-1"], "--eval-images"),
    ("train-avp-eval-images-negative", "boed", ["train-avp", "--out", D, "--eval-images", "-1"], "--eval-images"),
    ("run-config-banana", "boed", ["run", "--ipa", "{w}/banana-ipa", "--avp", "{w}/avp", "--out", D], "expected an integer"),
    ("run-show-negative", "boed", ["run", *MODELS, "--show", "-3", "--out", D], "--show"),
    ("run-n-samples-huge", "boed", ["run", *MODELS, "--n-samples", "1000000", "--out", D], "--n-samples"),
    # conflicting flags are refused, not ignored (issue 23 item 10), and a network that cannot fit (item 5)
    ("demo-quick-and-paper", "boed", ["demo", "--quick", "--profile", "paper", "--out", D], "--quick"),
    ("train-vae-stage-with-vae", "ipa_core", ["train", "--stage", "vae", "--vae", "{w}/ipa", "--out", D], "--vae"),
    ("train-avp-width-resnet", "boed", ["train-avp", "--arch", "resnet18", "--width", "99", "--out", D], "--width 99"),
    ("train-avp-pool-huge", "boed", ["train-avp", "--pool", "1000", "--device", "cpu", "--out", D], "GiB"),
    ("demo-publish-file", "boed", ["demo", "--publish", "{w}/xray.png", "--out", D], "--publish"),
]
if NO_CUDA:
    CASES += [("run-cuda-absent", "boed", ["run", *MODELS, "--device", "cuda", "--out", D], "CUDA"),
              ("train-cuda-absent", "ipa_core", ["train", "--out", D, "--device", "cuda:0"], "CUDA")]


def snapshot(*roots: Path) -> set[str]:
    return {str(p) for root in roots for p in root.rglob("*")}


def expand(argv, w: Path, t: Path) -> list[str]:
    return [a.format(w=w, t=t) for a in argv]


@pytest.fixture
def sandbox(tmp_path, tmp_path_factory, monkeypatch) -> Path:
    """An empty working folder that is also HOME (so ~/.cache/boed lands inside it)."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path_factory.mktemp("mpl")))  # matplotlib's own font cache
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def test_every_command_has_a_hand_written_case():
    """The table above covers every command that exists today (new ones get the generic case)."""
    covered = {(script, argv[0]) for _, script, argv, _ in CASES}
    known = {("xray", "prepare"), ("xray", "phantom"), ("xray", "info"), ("ipa_core", "train"), ("ipa_core", "sample"),
             ("boed", "run"), ("boed", "train-avp"), ("boed", "evaluate"), ("boed", "demo")}
    assert known <= covered


# Generic case for every command the console scripts list (new commands included): an unknown flag.
CASES += [(f"{name}-unknown-flag", script, [name, "--no-such-flag", "1"], f"{script} {name}: ")
          for script, main in SCRIPTS.items() for name in main.commands]


@pytest.mark.parametrize("script,argv,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_one_line_exit_2_nothing_created(script, argv, expected, world, sandbox, capsys):
    before = snapshot(sandbox, world)
    with pytest.raises(SystemExit) as e:
        SCRIPTS[script](expand(argv, world, sandbox))
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert e.value.code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    assert expected in lines[0], lines[0]
    assert snapshot(sandbox, world) == before, f"left behind: {sorted(snapshot(sandbox, world) - before)}"


@pytest.mark.parametrize("argv", [
    ["ipa_core.cli", "sample", "--run", "{w}/ipa", "--index", "0", "--out", "{t}/g.png", "--device", "gpu"],
    ["boed.cli", "evaluate", "--device", "gpu", "--out", "{t}/D"],
], ids=["sample-device-gpu", "evaluate-device-gpu"])
def test_console_script_subprocess(argv, world, sandbox):
    """The same contract as a user sees it: a fresh interpreter, real stderr (logging included)."""
    before = snapshot(sandbox)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "HOME": str(sandbox / "home")}
    res = subprocess.run([sys.executable, "-m", *expand(argv, world, sandbox)], capture_output=True, text=True,
                         cwd=sandbox, env=env, timeout=120)
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines() == [res.stderr.strip()] and res.stderr.startswith("error: --device")
    assert res.stdout == ""
    assert snapshot(sandbox) == before
