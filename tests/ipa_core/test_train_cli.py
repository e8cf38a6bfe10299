"""``ipa_core train``: flags and per-config defaults, stages, resume, one-line errors."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from ipa_core import CONFIGS, VAE, VAEConfig, get_config
from ipa_core.cli import main
from ipa_core.commands import train as train_cmd
from ipa_core.trainer import checkpoint_paths, train_config_from_args
from ipa_core.vae_task import TRAIN_DEFAULTS
from tests.ipa_core.test_official import random_official_state
from tests.ipa_core.test_trainer import ImageSet

torch.set_num_threads(1)


MICRO = VAEConfig(image_size=16, image_channels=1, width=8, zdim=2, num_mixtures=2,
                  enc_blocks="16x1,16d2,8x1,8d4,2x1,2d2,1x1", dec_blocks="1x1,2m1,8m2,8x1,16m8")


@pytest.fixture
def fake_data(monkeypatch):
    """The CLI's --data flags give small in-memory sets (no phantom generation), and a fast
    ``micro`` model config joins the named ones."""
    monkeypatch.setitem(CONFIGS, "micro", MICRO)
    monkeypatch.setitem(TRAIN_DEFAULTS, "micro", TRAIN_DEFAULTS["tiny"])
    calls = []

    def dataset_from_args(args, split):
        calls.append((args.data, args.image_size, split))
        return ImageSet(n=24 if split == "train" else 6, size=args.image_size, seed=0 if split == "train" else 1)

    monkeypatch.setattr(train_cmd, "dataset_from_args", dataset_from_args)  # the name the command calls
    return calls


def run(argv, capsys=None):
    with pytest.raises(SystemExit) as e:
        main(["train", *argv])
    return e.value.code


FAST = ["--steps", "2", "--batch-size", "2", "--log-every", "1", "--sample-every", "2", "--ckpt-every", "2", "--eval-images", "4",
        "--device", "cpu"]


def test_vae_stage_trains_and_resumes(tmp_path, fake_data, capsys):
    out = tmp_path / "run"
    assert run(["--stage", "vae", "--config", "micro", "--out", str(out), *FAST]) == 0
    assert fake_data[0] == ("phantom", 16, "train")
    model = VAE.from_pretrained(out)
    assert model.config.shift is not None  # measured on the training data
    assert (out / "eval.json").is_file() and "bits_per_dim" in capsys.readouterr().out
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["lr"] == TRAIN_DEFAULTS["tiny"].lr and saved["steps"] == 2
    data = json.loads((out / "data.json").read_text())  # what `boed run` draws its t = 1 images from
    assert data["data"] == "phantom" and data["data_root"] is None and "fingerprint" in data
    # rerun with more steps: resumes at 2
    assert run(["--stage", "vae", "--config", "micro", "--out", str(out), *FAST[2:], "--steps", "3"]) == 0
    assert checkpoint_paths(out)[0].name == "ckpt-00000003.pt"
    assert "resumed from" in (out / "train.log").read_text()


def test_defaults_per_config():
    p = argparse.ArgumentParser()
    train_cmd.configure(p)
    for name in ("tiny", "xray256", "cifar10", "imagenet64", "ffhq256"):
        args = p.parse_args(["--out", "x", "--config", name])
        cfg = train_config_from_args(args, TRAIN_DEFAULTS[name])
        assert cfg == TRAIN_DEFAULTS[name]
    x = TRAIN_DEFAULTS["xray256"]
    assert (x.batch_size, x.lr, x.skip_threshold) == (8, 1.5e-4, 15000.0)  # the paper's x-ray VAE
    f = TRAIN_DEFAULTS["ffhq256"]
    assert (f.lr, f.grad_clip, f.skip_threshold, f.ema_rate, f.warmup, f.betas, f.weight_decay) == (1.5e-4, 130.0, 180.0, 0.999, 100, (0.9, 0.9), 0.01)
    c = TRAIN_DEFAULTS["cifar10"]
    assert (c.lr, c.grad_clip, c.skip_threshold, c.ema_rate) == (2e-4, 200.0, 400.0, 0.9999)
    i = TRAIN_DEFAULTS["imagenet64"]
    assert (i.lr, i.grad_clip, i.skip_threshold) == (1.5e-4, 220.0, 380.0)
    args = p.parse_args(["--out", "x", "--config", "xray256", "--lr", "1e-3", "--skip-threshold", "none"])
    cfg = train_config_from_args(args, TRAIN_DEFAULTS["xray256"])
    assert (cfg.lr, cfg.skip_threshold, cfg.batch_size) == (1e-3, None, 8)


def test_one_line_errors(tmp_path, fake_data, capsys, monkeypatch):
    assert run(["--stage", "ipa", "--out", str(tmp_path / "a")]) == 2
    assert "--stage ipa needs --vae" in capsys.readouterr().err
    assert run(["--stage", "vae", "--config", "nope", "--out", str(tmp_path / "b")]) == 2
    assert "unknown config 'nope'" in capsys.readouterr().err
    assert run(["--stage", "vae", "--config", "tiny", "--image-size", "128", "--out", str(tmp_path / "c")]) == 2
    assert "--image-size 128 does not match" in capsys.readouterr().err
    assert run(["--stage", "vae", "--config", "tiny", "--out", str(tmp_path / "d"), "--import-official", str(tmp_path / "none.th")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --import-official") and "does not exist" in err and len(err.strip().splitlines()) == 1
    # resuming a run folder with another model config
    assert run(["--stage", "vae", "--config", "micro", "--out", str(tmp_path / "e"), *FAST]) == 0
    capsys.readouterr()
    monkeypatch.setitem(CONFIGS, "micro", VAEConfig(**{**MICRO.to_dict(), "zdim": 3}))
    assert run(["--stage", "vae", "--config", "micro", "--out", str(tmp_path / "e"), *FAST]) == 2
    assert "different model config (zdim = 2, now 3)" in capsys.readouterr().err


def test_import_official_starts_from_the_checkpoint(tmp_path, fake_data, monkeypatch):
    # a 1-channel official-format file for the micro architecture, with a module. prefix
    cfg = get_config("micro")
    sd = random_official_state(cfg, scale=0.3)
    path = tmp_path / "micro-model.th"
    torch.save({f"module.{k}": v for k, v in sd.items()}, path)
    cfg.shift, cfg.scale = -128.0, 1 / 64.0
    monkeypatch.setitem(train_cmd.__dict__, "_vae_model", lambda args: VAE.from_official(args.import_official, cfg))
    out = tmp_path / "ft"
    assert run(["--stage", "vae", "--config", "micro", "--out", str(out), "--import-official", str(path), *FAST, "--steps", "1", "--lr", "1e-12"]) == 0
    model = VAE.from_pretrained(out)
    torch.testing.assert_close(model.state_dict()["decoder.gain"], sd["decoder.gain"], atol=1e-6, rtol=0)
    assert model.config.shift == -128.0  # the imported standardisation is kept, not re-measured


def test_ipa_stage_uses_the_trained_vae(tmp_path, fake_data):
    vae_run = tmp_path / "vae"
    assert run(["--stage", "vae", "--config", "micro", "--out", str(vae_run), *FAST]) == 0
    assert run(["--stage", "ipa", "--vae", str(vae_run), "--out", str(tmp_path / "ipa"), *FAST]) == 0
    assert json.loads((tmp_path / "ipa" / "model" / "config.json").read_text())["model_type"] == "ipa"
    # no --stage: the VAE stage in RUN/vae, then the IPA stage in RUN/ipa
    both = tmp_path / "both"
    assert run(["--config", "micro", "--out", str(both), *FAST]) == 0
    assert (both / "vae" / "model").is_dir() and (both / "ipa" / "model").is_dir()


KILL_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {repo!r})
import ipa_core.commands.train as train_cmd
from ipa_core import CONFIGS
from ipa_core.cli import main
from ipa_core.vae_task import TRAIN_DEFAULTS
from tests.ipa_core.test_train_cli import MICRO
from tests.ipa_core.test_trainer import ImageSet
CONFIGS["micro"] = MICRO
TRAIN_DEFAULTS["micro"] = TRAIN_DEFAULTS["tiny"]
train_cmd.dataset_from_args = lambda args, split: ImageSet(n=24, size=16, seed=0 if split == "train" else 1)
main(["train", "--stage", "vae", "--config", "micro", "--out", sys.argv[1], "--steps", "40", "--batch-size", "2",
      "--ckpt-every", "2", "--sample-every", "100", "--eval-images", "0"])
"""


@pytest.mark.slow  # three fresh processes
def test_kill_9_then_rerun_resumes_exactly(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    script = tmp_path / "train.py"
    script.write_text(KILL_SCRIPT.format(repo=str(Path(__file__).resolve().parents[2])))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(script), str(killed)], env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not (killed / "checkpoints" / "ckpt-00000010.pt").exists():
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # at an arbitrary point, maybe mid-write
    proc.wait()
    assert not (killed / "model").exists()
    subprocess.run([sys.executable, str(script), str(killed)], env=env, check=True, timeout=240)
    subprocess.run([sys.executable, str(script), str(tmp_path / "clean")], env=env, check=True, timeout=240)
    a, b = VAE.from_pretrained(killed), VAE.from_pretrained(tmp_path / "clean")
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert not list((killed / "checkpoints").glob(".*.tmp"))


def _frozen_equal(ipa_dir, vae_dir) -> bool:
    from ipa_core.ipa import IPA

    ipa, vae = IPA.from_pretrained(ipa_dir).state_dict(), VAE.from_pretrained(vae_dir).state_dict()
    return all(torch.equal(ipa[k], v) for k, v in vae.items())


def test_ipa_resume_after_further_vae_training(tmp_path, fake_data, capsys, caplog):
    """`ipa_core train --out R --steps 3` after a 2-step run trains the VAE on; the combined run
    then restarts IPA on the new VAE (old IPA moved aside): R/ipa/model wraps R/vae/model."""
    both = tmp_path / "both"
    assert run(["--config", "micro", "--out", str(both), *FAST]) == 0
    assert _frozen_equal(both / "ipa", both / "vae")
    assert run(["--config", "micro", "--out", str(both), *FAST[2:], "--steps", "3"]) == 0
    assert checkpoint_paths(both / "vae")[0].name == "ckpt-00000003.pt"
    assert checkpoint_paths(both / "ipa")[0].name == "ckpt-00000003.pt"
    assert _frozen_equal(both / "ipa", both / "vae")
    assert len(list(both.glob("ipa.old-*"))) == 1 and "IPA stage restarts on the new VAE" in caplog.text
    # an unchanged VAE: the IPA stage resumes (nothing moved aside)
    assert run(["--config", "micro", "--out", str(both), *FAST[2:], "--steps", "3"]) == 0
    assert len(list(both.glob("ipa.old-*"))) == 1
    # --stage ipa on a VAE that changed since: refused, with the field and the way out
    capsys.readouterr()
    vae2 = tmp_path / "vae2"
    assert run(["--stage", "vae", "--config", "micro", "--out", str(vae2), *FAST, "--seed", "1"]) == 0
    assert run(["--stage", "ipa", "--vae", str(vae2), "--out", str(both / "ipa"), *FAST[2:], "--steps", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "task.vae=" in err[0] and "--restart" in err[0]
    assert checkpoint_paths(both / "ipa")[0].name == "ckpt-00000003.pt"
    assert run(["--stage", "ipa", "--vae", str(vae2), "--out", str(both / "ipa"), *FAST[2:], "--steps", "4", "--restart"]) == 0
    assert _frozen_equal(both / "ipa", vae2)


def test_changed_seed_on_resume_is_refused_and_restart_works(tmp_path, fake_data, capsys):
    out = tmp_path / "run"
    assert run(["--stage", "vae", "--config", "micro", "--out", str(out), *FAST]) == 0
    capsys.readouterr()
    opened = len(fake_data)
    assert run(["--stage", "vae", "--config", "micro", "--out", str(out), *FAST, "--seed", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --seed changed: the run in {out} was made with 0, this run has 5; ") and "--restart" in err
    assert len(err.splitlines()) == 1
    assert len(fake_data) == opened  # refused before any data is opened (no prepared cache is built)
    assert run(["--stage", "vae", "--config", "micro", "--out", str(out), *FAST, "--lr", "0.01"]) == 2
    assert capsys.readouterr().err.startswith("error: --lr changed: ") and len(fake_data) == opened
    assert json.loads((out / "train_config.json").read_text())["seed"] == 0
    assert run(["--stage", "vae", "--config", "micro", "--out", str(out), *FAST, "--seed", "5", "--restart"]) == 0
    assert json.loads((out / "train_config.json").read_text())["seed"] == 5
    assert len(list(tmp_path.glob("run.old-*"))) == 1
