"""The generic trainer: exact resume, robust update skipping, checkpoints, outputs, bad input."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ipa_core import VAE, VAEConfig
from ipa_core.trainer import (CKPT_DIR, BatchOrder, SkipRule, TrainConfig, add_train_args, checkpoint_paths, fit,
                              iterate_batches, train_config_from_args, warmup_lr)
from ipa_core.vae_task import VAETask, measure_standardisation
from xray.errors import UserError
from xray.integrity import write_sidecar
from xray.io import run_lock

torch.set_num_threads(1)


def micro_cfg(**kw) -> VAEConfig:
    return VAEConfig(image_size=8, image_channels=1, width=8, zdim=2, num_mixtures=2,
                     enc_blocks="8x1,8d2,4x1,4d4,1x1", dec_blocks="1x1,4m1,4x1,8m4,8x1", **kw)


class ImageSet(torch.utils.data.Dataset):
    """In-memory (uint8 (1, S, S), float (15,)) items: blobs of varying brightness."""

    def __init__(self, n=48, size=8, seed=0, labels=None):
        g = torch.Generator().manual_seed(seed)
        base = torch.linspace(0, 1, size)
        blob = torch.exp(-((base[:, None] - 0.5) ** 2 + (base[None] - 0.5) ** 2) / 0.05)  # (S, S)
        amp = torch.rand(n, 1, 1, 1, generator=g)
        noise = torch.rand(n, 1, size, size, generator=g) * 40
        self.x = (amp * 200 * blob + noise).clamp(0, 255).to(torch.uint8)  # (n, 1, S, S)
        self.y = labels if labels is not None else (torch.rand(n, 15, generator=g) > 0.5).float()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def new_vae(**kw) -> VAE:
    torch.manual_seed(0)  # the same initial weights every time
    return VAE(micro_cfg(**kw))


def tcfg(**kw) -> TrainConfig:
    base = dict(steps=6, batch_size=4, lr=3e-3, warmup=2, ema_rate=0.9, grad_clip=100.0, skip_threshold=1e4,
                log_every=2, sample_every=3, ckpt_every=3, seed=0, device="cpu")  # exact resume: CPU maths
    return TrainConfig(**{**base, **kw})


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([v.flatten().float() for v in model.state_dict().values()])


def test_resume_matches_uninterrupted_run(tmp_path):
    data = ImageSet()
    ref = fit(VAETask(new_vae()), data, tcfg(steps=8, ckpt_every=4), tmp_path / "a")
    ref_raw = torch.load(checkpoint_paths(tmp_path / "a")[0], weights_only=False)["model"]

    class Crash(VAETask):  # dies inside step 7, after the checkpoint at step 4 (like a kill)
        calls = 0

        def loss(self, model, batch, generator):
            Crash.calls += 1
            if Crash.calls == 7:
                raise KeyboardInterrupt
            return super().loss(model, batch, generator)

    run = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        fit(Crash(new_vae()), data, tcfg(steps=8, ckpt_every=4), run)
    assert [p.name for p in checkpoint_paths(run)] == ["ckpt-00000004.pt"]
    resumed = fit(VAETask(new_vae()), data, tcfg(steps=8, ckpt_every=4), run)
    assert torch.equal(flat(resumed), flat(ref))  # EMA weights
    raw = torch.load(checkpoint_paths(run)[0], weights_only=False)["model"]
    assert all(torch.equal(raw[k], ref_raw[k]) for k in ref_raw)
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6, 8]  # no duplicated rows after the resume
    # extending the same run later continues from step 8
    fit(VAETask(new_vae()), data, tcfg(steps=10, ckpt_every=4), run)
    assert checkpoint_paths(run)[0].name == "ckpt-00000010.pt"


def test_outputs_and_checkpoint_rotation(tmp_path):
    data = ImageSet()
    model = new_vae()
    out = fit(VAETask(model), data, tcfg(steps=9, ckpt_every=2), tmp_path, test_set=ImageSet(n=10, seed=1))
    assert [p.name for p in checkpoint_paths(tmp_path)] == ["ckpt-00000009.pt", "ckpt-00000008.pt"]
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step-00000003.png", "step-00000006.png", "step-00000009.png"]
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 9]
    for key in ("loss", "distortion", "rate", "grad_norm", "skipped", "images_per_s", "lr"):
        assert key in rows[0] and math.isfinite(rows[0][key])
    assert rows[0]["lr"] == pytest.approx(3e-3)  # warmup over 2 steps: the 2nd step has the full lr
    ev = json.loads((tmp_path / "eval.json").read_text())
    assert ev["bits_per_dim"] == pytest.approx(ev["elbo"] / math.log(2))
    assert "step 9" in (tmp_path / "train.log").read_text()
    loaded = VAE.from_pretrained(tmp_path)
    assert torch.equal(flat(loaded), flat(out))
    assert not any(p.name.endswith(".tmp") for p in tmp_path.rglob("*"))
    # the model learned something: the loss went down
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_standardisation_measured_before_step0(tmp_path):
    data = ImageSet()
    model = new_vae()
    assert model.config.shift is None
    fit(VAETask(model), data, tcfg(steps=1), tmp_path)
    x = data.x.double()
    assert model.config.shift == pytest.approx(-x.mean().item())
    assert model.config.scale == pytest.approx(1 / x.std(unbiased=False).item())
    saved = json.loads((tmp_path / "model" / "config.json").read_text())
    assert saved["shift"] == pytest.approx(model.config.shift)
    # given values are kept
    m2 = new_vae(shift=-1.0, scale=0.5)
    fit(VAETask(m2), data, tcfg(steps=1), tmp_path / "b")
    assert (m2.config.shift, m2.config.scale) == (-1.0, 0.5)
    with pytest.raises(UserError, match="constant"):
        measure_standardisation(torch.utils.data.TensorDataset(torch.full((4, 1, 8, 8), 7, dtype=torch.uint8), torch.zeros(4, 15)),
                                torch.Generator())


def test_resume_with_other_model_config_is_refused(tmp_path):
    fit(VAETask(new_vae()), ImageSet(), tcfg(steps=2), tmp_path)
    other = VAEConfig(**{**micro_cfg().to_dict(), "zdim": 3})
    with pytest.raises(UserError, match="different model config.*zdim"):
        fit(VAETask(VAE(other)), ImageSet(), tcfg(steps=4), tmp_path)


def test_corrupt_latest_checkpoint_falls_back(tmp_path):
    data = ImageSet()
    fit(VAETask(new_vae()), data, tcfg(steps=6, ckpt_every=3), tmp_path)
    latest = checkpoint_paths(tmp_path)[0]
    latest.write_bytes(latest.read_bytes()[:1000])  # a torn write
    with pytest.warns(UserWarning, match="ckpt-00000006.pt is damaged.*falling back"):
        out = fit(VAETask(new_vae()), data, tcfg(steps=6, ckpt_every=3), tmp_path)
    ref = fit(VAETask(new_vae()), data, tcfg(steps=6, ckpt_every=3), tmp_path / "ref")
    assert torch.equal(flat(out), flat(ref))  # redone from step 3, exactly


def test_nan_in_data_is_a_user_error(tmp_path):
    labels = torch.zeros(48, 15)
    labels[5, 3] = float("nan")
    with pytest.raises(UserError, match=r"NaN/inf labels \(dataset item 5\)"):
        fit(VAETask(new_vae()), ImageSet(labels=labels), tcfg(steps=20, batch_size=8), tmp_path)
    with pytest.raises(UserError, match="fewer than one batch"):
        fit(VAETask(new_vae()), ImageSet(n=3), tcfg(), tmp_path / "b")


def test_skip_rule_cannot_deadlock():
    # the official rule: a fixed threshold of 400 with the norm sitting at 1000 skips forever
    rule = SkipRule(threshold=400.0, max_skips=10, window=50)
    decisions = [rule(1000.0) for _ in range(200)]
    assert sum(decisions) <= 10 and not any(decisions[10:])
    assert rule.skipped == sum(decisions)
    # without the adaptive part, the cap alone bounds each run of skips
    rule = SkipRule(threshold=400.0, max_skips=3, window=50, margin=1e9)
    runs = "".join("s" if rule(1000.0) else "." for _ in range(40))
    assert "ssss" not in runs and "." in runs


def test_skip_rule_spikes_and_nonfinite():
    rule = SkipRule(threshold=400.0)
    for _ in range(100):
        assert not rule(10.0)
    assert rule(500.0) and not rule(10.0)
    assert rule(math.nan) and rule(math.inf)
    assert rule.skipped == 3
    rule = SkipRule(threshold=None, max_nonfinite=5)
    assert not rule(1e12)
    with pytest.raises(FloatingPointError, match="diverged"):
        for _ in range(5):
            rule(math.nan)


class LinearTask:
    """A tiny regression task whose gradient norm is always huge (x 1e4)."""

    def __init__(self):
        self.model = nn.Linear(64, 1)

    def trainable_parameters(self):
        return list(self.model.parameters())

    def loss(self, model, batch, generator):
        x = batch[0].flatten(1).float() / 255  # (B, 64)
        loss = 1e4 * ((model(x).squeeze(1) - batch[1][:, 0]) ** 2).mean()
        return loss, {}

    def on_sample(self, model, step, out_png):
        pass

    def evaluate(self, model, dataset):
        return {}

    def save_pretrained(self, model, out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), out_dir / "w.pt")


def test_trainer_keeps_learning_when_norm_stays_above_threshold(tmp_path):
    task = LinearTask()
    before = task.model.weight.detach().clone()
    fit(task, ImageSet(), tcfg(steps=40, skip_threshold=1.0, ema_rate=None, log_every=10, max_skips=5, lr=1e-3), tmp_path)
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["grad_norm"] > 1.0 for r in rows)
    assert 1 <= rows[-1]["skipped"] <= 5 + 20  # counted; and most steps were applied
    assert not torch.equal(task.model.weight, before)
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_warmup_and_batch_order():
    cfg = TrainConfig(lr=1.0, warmup=4)
    assert [warmup_lr(s, cfg) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    # two ranks see disjoint halves of each global batch; together the whole epoch
    r0, r1 = BatchOrder(20, 3, seed=1, rank=0, world=2), BatchOrder(20, 3, seed=1, rank=1, world=2)
    seen = np.concatenate([np.concatenate([r0.next(), r1.next()]) for _ in range(3)])
    assert len(set(seen.tolist())) == 18
    one = BatchOrder(20, 6, seed=1)
    assert np.array_equal(np.concatenate([one.next() for _ in range(3)]), seen)
    # resumable mid-epoch and across epochs
    a = BatchOrder(10, 3, seed=2)
    [a.next() for _ in range(4)]
    b = BatchOrder(10, 3, seed=2)
    b.load_state_dict(a.state_dict())
    assert all(np.array_equal(a.next(), b.next()) for _ in range(5))


def test_worker_processes_give_the_same_batches():
    data = ImageSet()
    a = list(iterate_batches(data, BatchOrder(48, 4, seed=0), 3, 5, num_workers=0))
    b = list(iterate_batches(data, BatchOrder(48, 4, seed=0), 3, 5, num_workers=1))
    assert len(a) == len(b) == 5
    assert np.array_equal(a[0][2], BatchOrder(48, 4, seed=0).indices(3))  # starts at global batch 3
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) and np.array_equal(x[2], y[2]) for x, y in zip(a, b))


def test_flags_override_defaults():
    p = argparse.ArgumentParser()
    defaults = TrainConfig(steps=10, lr=1e-3, ema_rate=0.99)
    add_train_args(p, defaults)
    cfg = train_config_from_args(p.parse_args([]), defaults)
    assert cfg == defaults
    cfg = train_config_from_args(p.parse_args(["--steps", "5", "--ema-rate", "none", "--channels-last", "--lr", "2e-4"]), defaults)
    assert (cfg.steps, cfg.ema_rate, cfg.channels_last, cfg.lr, cfg.batch_size) == (5, None, True, 2e-4, defaults.batch_size)
    with pytest.raises(UserError, match="batch_size"):
        train_config_from_args(p.parse_args(["--batch-size", "0"]), defaults)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_channels_last_and_no_ema(tmp_path):
    data = ImageSet()
    a = fit(VAETask(new_vae()), data, tcfg(steps=3, ema_rate=None), tmp_path / "a")
    b = fit(VAETask(new_vae()), data, tcfg(steps=3, ema_rate=None, channels_last=True), tmp_path / "b")
    torch.testing.assert_close(flat(a), flat(b), rtol=1e-3, atol=1e-4)


def test_nonfinite_losses_are_skipped_and_counted(tmp_path):
    class Flaky(LinearTask):
        calls = 0

        def loss(self, model, batch, generator):
            Flaky.calls += 1
            loss, m = super().loss(model, batch, generator)
            return (loss * math.nan if Flaky.calls in (2, 3) else loss / 1e4), m

    task = Flaky()
    fit(task, ImageSet(), tcfg(steps=6, ema_rate=None, log_every=6), tmp_path)
    assert all(torch.isfinite(p).all() for p in task.model.parameters())
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["skipped"] == 2


def test_bf16_autocast_keeps_the_loss_in_fp32(tmp_path):
    rows = {}
    for amp in (False, True):
        fit(VAETask(new_vae()), ImageSet(), tcfg(steps=2, amp=amp), tmp_path / str(amp))
        rows[amp] = json.loads((tmp_path / str(amp) / "metrics.jsonl").read_text().splitlines()[0])
    assert rows[True]["rate"] > 0  # KL and likelihood computed in fp32 under autocast
    assert rows[True]["loss"] == pytest.approx(rows[False]["loss"], rel=1e-2)
    assert rows[True]["rate"] == pytest.approx(rows[False]["rate"], rel=0.05)


# ----------------------------------------------------------------------------------------------
# provenance, data position, checkpoint files (issue 14)


class Fingerprinted(ImageSet):
    """An ImageSet with the ``fingerprint`` every XrayDataset has."""

    def __init__(self, fingerprint="data-a", **kw):
        super().__init__(**kw)
        self.fingerprint = fingerprint


def test_resume_with_changed_settings_or_data_is_refused(tmp_path):
    run = tmp_path / "run"
    fit(VAETask(new_vae()), Fingerprinted(), tcfg(steps=3), run)
    before = (run / "train_config.json").read_text()
    for change, data, field in [
        (dict(seed=1), "data-a", "--seed changed: checkpoint"),
        (dict(batch_size=2), "data-a", "--batch-size changed: checkpoint"),
        (dict(lr=1e-3), "data-a", "was made with 0.003, this run has 0.001"),
        (dict(), "data-b", "data.fingerprint=data-a, this run has data.fingerprint=data-b"),
    ]:
        with pytest.raises(UserError) as e:
            fit(VAETask(new_vae()), Fingerprinted(data), tcfg(steps=6, **change), run)
        msg = str(e.value)
        assert field in msg and "--restart" in msg and "\n" not in msg, msg
        assert (run / "train_config.json").read_text() == before  # the record still tells the truth
        assert [p.name for p in checkpoint_paths(run)] == ["ckpt-00000003.pt"]
    # --restart: the old run is moved aside whole and a clean one starts from step 0
    out = fit(VAETask(new_vae()), Fingerprinted("data-b"), tcfg(steps=6, seed=1, restart=True), run)
    old = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(old) == 1 and (old[0] / "checkpoints" / "ckpt-00000003.pt").is_file()
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6]
    saved = json.loads((run / "train_config.json").read_text())
    assert (saved["steps"], saved["seed"]) == (6, 1) and "restart" not in saved
    ref = fit(VAETask(new_vae()), Fingerprinted("data-b"), tcfg(steps=6, seed=1), tmp_path / "ref")
    assert torch.equal(flat(out), flat(ref))


def test_checkpoint_records_provenance_and_steps_may_grow(tmp_path):
    fit(VAETask(new_vae()), Fingerprinted(), tcfg(steps=3, log_every=100), tmp_path)
    ck = torch.load(checkpoint_paths(tmp_path)[0], weights_only=True)  # plain tensors and containers
    prov = ck["provenance"]
    assert prov["data"] == {"fingerprint": "data-a", "size": 48} and prov["world"] == 1
    assert prov["train"]["seed"] == 0 and "steps" not in prov["train"] and "num_workers" not in prov["train"]
    assert prov["task"]["task"] == "vae" and prov["task"]["model"]["shift"] is not None
    assert json.loads((tmp_path / "provenance.json").read_text())["data"]["fingerprint"] == "data-a"
    # flags that do not change the result may change: steps, logging, workers
    fit(VAETask(new_vae()), Fingerprinted(), tcfg(steps=4, log_every=1, num_workers=0, sample_every=7), tmp_path)
    assert checkpoint_paths(tmp_path)[0].name == "ckpt-00000004.pt"


def test_data_position_with_worker_processes(tmp_path):
    """Workers > 0: every checkpoint stores the position of the next batch (not the end of the
    run), metrics show each row's epoch, and a killed run resumes exactly."""
    data = ImageSet(n=16)  # 4 batches of 4 per epoch

    class Crash(VAETask):  # dies inside step 5, after the checkpoint at step 3
        calls = 0

        def loss(self, model, batch, generator):
            Crash.calls += 1
            if Crash.calls == 5:
                raise KeyboardInterrupt
            return super().loss(model, batch, generator)

    cfg = tcfg(steps=6, ckpt_every=3, log_every=1, num_workers=1)
    with pytest.raises(KeyboardInterrupt):
        fit(Crash(new_vae()), data, cfg, tmp_path / "w")
    ck = torch.load(checkpoint_paths(tmp_path / "w")[0], weights_only=True)
    assert ck["step"] == 3 and ck["data"] == {"epoch": 0, "pos": 3, "batch": 3}
    resumed = fit(VAETask(new_vae()), data, cfg, tmp_path / "w")
    ref = fit(VAETask(new_vae()), data, tcfg(steps=6, ckpt_every=3, log_every=1, num_workers=0), tmp_path / "ref")
    assert torch.equal(flat(resumed), flat(ref))
    rows = [json.loads(l) for l in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["epoch"]) for r in rows] == [(1, 0), (2, 0), (3, 0), (4, 0), (5, 1), (6, 1)]
    ck = torch.load(checkpoint_paths(tmp_path / "w")[0], weights_only=True)
    assert ck["data"] == {"epoch": 1, "pos": 2, "batch": 6}


def test_batch_order_is_a_pure_function():
    a = BatchOrder(20, 3, seed=4, fingerprint="x")
    walked = [a.next() for _ in range(14)]  # crosses two epoch boundaries (6 batches per epoch)
    fresh = BatchOrder(20, 3, seed=4, fingerprint="x")
    assert all(np.array_equal(w, fresh.indices(k)) for k, w in reversed(list(enumerate(walked))))  # any order of calls
    assert a.state_dict() == {"epoch": 2, "pos": 2, "batch": 14} and a.epoch == 2
    other = BatchOrder(20, 3, seed=4, fingerprint="y")  # other data: another order
    assert not np.array_equal(other.indices(0), fresh.indices(0))
    assert sorted(np.concatenate([fresh.indices(k) for k in range(6)]).tolist()) == sorted(set(fresh.permutation(0)[:18].tolist()))
    with pytest.raises(UserError, match="batch size changed"):
        BatchOrder(20, 4, seed=4).load_state_dict({"epoch": 2, "pos": 2, "batch": 14})


def test_unreadable_checkpoints_and_pruning(tmp_path):
    """Stale unreadable checkpoints with high steps: training starts over with a warning, and
    pruning (by step, among readable checkpoints) never deletes the fresh ones."""
    d = tmp_path / "checkpoints"
    d.mkdir(parents=True)
    for step in (800, 900):
        (d / f"ckpt-{step:08d}.pt").write_bytes(b"not a zip file")
    (tmp_path / "metrics.jsonl").write_text('{"step": 850, "loss": 1.0}\n')
    with pytest.warns(UserWarning, match="damaged"):
        fit(VAETask(new_vae()), ImageSet(), tcfg(steps=6, ckpt_every=2), tmp_path)
    steps = sorted(int(p.name[5:13]) for p in checkpoint_paths(tmp_path))
    assert steps == [4, 6, 800, 900]  # 2 pruned as the oldest readable; the stale ones left alone
    assert [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [2, 4, 6]
    # resuming skips the unreadable ones and trains on from the newest readable one
    with pytest.warns(UserWarning, match="damaged") as caught:
        fit(VAETask(new_vae()), ImageSet(), tcfg(steps=8, ckpt_every=2), tmp_path)
    assert ["ckpt-00000900.pt" in str(w.message) for w in caught] == [True, False]  # 900, then 800, then 6 loads
    assert sorted(int(p.name[5:13]) for p in checkpoint_paths(tmp_path)) == [6, 8, 800, 900]
    # ordering is numeric, not by name
    (d / "ckpt-100000000.pt").write_bytes(b"x")
    assert checkpoint_paths(tmp_path)[0].name == "ckpt-100000000.pt"


class Payload:
    """Any class: unpickling it could run code."""


def test_checkpoint_with_a_pickled_object_is_refused(tmp_path):
    fit(VAETask(new_vae()), ImageSet(), tcfg(steps=2), tmp_path)
    path = checkpoint_paths(tmp_path)[0]
    state = torch.load(path, weights_only=True)
    state["skip"]["extra"] = Payload()
    torch.save(state, path)
    write_sidecar(path)  # a consistent digest: the file is as written, by someone else (a damaged one falls back)
    with pytest.raises(UserError) as e:
        fit(VAETask(new_vae()), ImageSet(), tcfg(steps=4), tmp_path)
    msg = str(e.value)
    assert "pickled Python objects" in msg and "--restart" in msg and "\n" not in msg
    assert [p.name for p in checkpoint_paths(tmp_path)] == ["ckpt-00000002.pt"]  # nothing trained on top


def test_restart_flag_is_shared_by_every_train_cli():
    p = argparse.ArgumentParser()
    add_train_args(p, TrainConfig())
    assert train_config_from_args(p.parse_args([]), TrainConfig()).restart is False
    assert train_config_from_args(p.parse_args(["--restart"]), TrainConfig()).restart is True
    assert TrainConfig().device == "auto"


# ----------------------------------------------------------------------------------------------
# memory of a step (issue 13): no stale gradients beside the activations, frozen weights not copied


def test_gradients_of_the_last_step_are_gone_before_the_forward(tmp_path):
    seen = []

    class Watch(VAETask):
        def loss(self, model, batch, generator):
            seen.append(sum(p.grad is not None for p in model.parameters()))
            return super().loss(model, batch, generator)

    fit(Watch(new_vae()), ImageSet(16), tcfg(steps=3, ema_rate=None), tmp_path)
    assert seen == [0, 0, 0]


def test_ema_copy_shares_only_the_frozen_weights():
    from ipa_core.ema import EMA, ema_copy

    model = new_vae()
    for p in model.encoder.parameters():
        p.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    ema = ema_copy(model, trainable)
    for (name, e), m in zip(ema.named_parameters(), model.parameters()):
        assert (e is m) == name.startswith("encoder."), name  # frozen: the model's own tensor; trainable: a copy
        assert torch.equal(e, m) and not e.requires_grad
    assert not ema.training and model.encoder.in_conv.weight.requires_grad is False
    with torch.no_grad():
        for p in trainable:
            p.add_(1.0)
    EMA(ema, model, 0.5).update()
    for (name, e), m in zip(ema.named_parameters(), model.parameters()):
        if not name.startswith("encoder."):
            torch.testing.assert_close(e, m - 0.5)  # halfway to the moved weights


def test_a_model_with_non_finite_weights_is_refused_not_saved():
    from ipa_core.trainer import check_finite_weights

    net = torch.nn.Linear(3, 2)
    check_finite_weights(net, "the model")  # finite: nothing happens
    with torch.no_grad():
        net.bias[1] = float("nan")
    with pytest.raises(UserError, match=r"non-finite weights \(bias\)"):
        check_finite_weights(net, "the model")


HOLD_LOCK = """
import sys
from xray.io import run_lock
with run_lock(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_second_training_into_one_folder_is_refused_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    fit(VAETask(new_vae()), ImageSet(), tcfg(steps=2, sample_every=2, ckpt_every=2), out)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
        assert before[Path(".lock")] == f"{holder.pid}\n".encode()
        for restart in (False, True):  # --restart does not move the other training's folder aside either
            with pytest.raises(UserError) as e:
                fit(VAETask(new_vae()), ImageSet(), tcfg(steps=4, restart=restart), out)
            msg = str(e.value)
            assert msg == f"another training is writing {out} (pid {holder.pid}); wait for it or use another --out"
            assert "\n" not in msg
            assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
            assert [p.name for p in tmp_path.iterdir()] == ["run"]
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    with run_lock(out):  # the holder exited: the OS released its lock
        pass


def test_leftovers_of_a_killed_write_are_removed_by_the_next_run(tmp_path):
    """A run killed mid-write (before its first checkpoint, or during a model save) leaves temp files
    and folders; the next training in the folder removes them, and only them."""
    leftovers = [tmp_path / ".train_config.json.k2j3.tmp", tmp_path / CKPT_DIR / ".ckpt-00000003.pt.x1.tmp",
                 tmp_path / "samples" / ".step-00000003.png.y2.tmp", tmp_path / ".model.ab12cd" / "model.safetensors",
                 tmp_path / ".model.old" / "config.json"]
    for p in leftovers:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"half")
    (tmp_path / "notes.tmp").write_text("the user's")  # not a hidden temp: kept
    fit(VAETask(new_vae()), ImageSet(), tcfg(steps=3, ckpt_every=3), tmp_path)
    assert not [p for p in leftovers if p.exists()] and not list(tmp_path.glob(".model.*"))
    assert (tmp_path / "notes.tmp").read_text() == "the user's" and (tmp_path / "model" / "model.safetensors").is_file()
