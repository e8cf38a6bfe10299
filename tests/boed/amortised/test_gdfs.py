"""GDFS peer: the Concrete relaxation, the temperature schedule, gradients through the rollout,
training with the project's trainer (resume continues the schedule), and the saved policy."""

import json

import pytest
import torch

from boed.amortised.gdfs import (GDFSConfig, GDFSTask, build_gdfs, concrete_sample, gumbel_noise, temperature_at)
from boed.amortised import load_policy
from boed.classifier import AVPClassifier, AVPConfig
from boed.geometry import ScanGeometry
from boed.policies import ScanState
from tests.boed.amortised.test_amortised import Images
from xray.errors import UserError

GEOM = ScanGeometry(32, 8, 5)


def test_concrete_samples_become_one_hot_as_the_temperature_falls():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 25, generator=g)
    noise = gumbel_noise(logits.shape, g, "cpu")
    peaks = []
    for temp in (10.0, 1.0, 0.1, 0.01):
        soft, hard = concrete_sample(logits, temp, noise=noise)
        assert torch.allclose(soft.sum(1), torch.ones(64))
        assert torch.equal(soft.argmax(1), hard)  # the hard choice is the soft sample's mode
        peaks.append(float(soft.max(1).values.mean()))
    assert peaks == sorted(peaks) and peaks[0] < 0.5 and peaks[-1] > 0.99
    one_hot = torch.nn.functional.one_hot(hard, 25).float()
    assert torch.allclose(concrete_sample(logits, 1e-4, noise=noise)[0], one_hot, atol=1e-3)


def test_concrete_hard_choice_follows_the_categorical():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]])).expand(20000, 3)
    _, hard = concrete_sample(logits, 1.0, generator=torch.Generator().manual_seed(1))
    freq = torch.bincount(hard, minlength=3).float() / 20000
    assert torch.allclose(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.02)


def test_concrete_gradients_flow_to_the_logits():
    logits = torch.randn(4, 25, requires_grad=True)
    soft, _ = concrete_sample(logits, 0.5, generator=torch.Generator().manual_seed(0))
    (soft * torch.arange(25.0)).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_temperature_schedule_is_geometric_in_stages():
    cfg = GDFSConfig(temp_start=2.0, temp_end=0.1, temp_stages=5)
    temps = [temperature_at(s, 100, cfg) for s in range(100)]
    assert temps[0] == pytest.approx(2.0) and temps[-1] == pytest.approx(0.1)
    levels = sorted(set(round(t, 9) for t in temps), reverse=True)
    assert len(levels) == 5 and all(a > b for a, b in zip(levels, levels[1:]))
    ratios = [b / a for a, b in zip(levels, levels[1:])]
    assert max(ratios) == pytest.approx(min(ratios))
    assert temperature_at(19, 100, cfg) == pytest.approx(2.0) and temperature_at(20, 100, cfg) < 2.0


def test_config_validates():
    with pytest.raises(UserError, match="predictor mode"):
        GDFSConfig(predictor="thaw")
    with pytest.raises(UserError):
        GDFSConfig(temp_end=0)


def _model(predictor="finetune", scans=3):
    torch.manual_seed(0)
    avp = AVPClassifier(AVPConfig(arch="tiny", image_size=32, width=4, pool=2))
    cfg = GDFSConfig(scans=scans, predictor=predictor, eval_images=8)
    return build_gdfs(avp, "effusion", GEOM, width=4, cfg=cfg), cfg


@pytest.mark.parametrize("predictor", ["finetune", "frozen"])
def test_rollout_loss_sums_bce_over_t_and_gradients_flow(predictor):
    model, cfg = _model(predictor)
    task = GDFSTask(model, cfg, total_steps=10)
    data = Images(6)
    x = data.images.float() / 255
    target = task.illness.target(data.labels)
    loss, masks = task.rollout_loss(model, x, target, temp=1.0, generator=torch.Generator().manual_seed(0))
    assert len(masks) == cfg.scans and float(loss.detach()) > 0
    # each hard step scans exactly one new, not yet observed patch
    prev = torch.zeros(6, 1, 32, 32)
    for m in masks:
        assert ((m - prev) >= 0).all() and ((m - prev).flatten(1).sum(1) > 0).all()
        prev = m
    loss.backward()
    sel = [p.grad for p in model.selector.parameters()]
    assert all(g is not None for g in sel) and sum(float(g.abs().sum()) for g in sel) > 0
    pred = [p.grad for p in model.predictor.parameters()]
    if predictor == "finetune":
        assert sum(float(g.abs().sum()) for g in pred if g is not None) > 0
    else:
        assert all(g is None for g in pred) and task.trainable_parameters() == list(model.selector.parameters())
    assert loss.item() == pytest.approx(sum(
        torch.nn.functional.binary_cross_entropy_with_logits(z, target).item()
        for z in _soft_logits(task, model, x, masks)), rel=1e-4)


def _soft_logits(task, model, x, masks):
    """The illness logits the rollout scored, recomputed step by step (the same Gumbel draws)."""
    from boed.amortised.gdfs import illness_logit
    from boed.amortised import masked_logits

    g = torch.Generator().manual_seed(0)
    m = torch.zeros_like(masks[0])
    out = []
    for mh in masks:
        logits = masked_logits(model.selector(torch.cat([x * m, m], 1)).float(), GEOM.fully_observed(m))
        soft, _ = concrete_sample(logits, 1.0, generator=g)
        ms = torch.maximum(m, (soft @ GEOM.patch_masks().flatten(1)).reshape(m.shape))
        out.append(illness_logit(model.predictor(torch.cat([x * ms, ms], 1)).float(), task.illness))
        m = mh
    return out


def test_training_with_fit_resumes_the_schedule_and_saves_a_policy(tmp_path):
    from ipa_core.trainer import TrainConfig, fit

    data, test = Images(12), Images(8, seed=1)
    tcfg = TrainConfig(steps=4, batch_size=4, lr=1e-3, warmup=0, ema_rate=None, grad_clip=10.0, skip_threshold=None,
                       log_every=2, sample_every=10**6, ckpt_every=2)
    model, cfg = _model()
    fit(GDFSTask(model, cfg, total_steps=6, progress=False), data, tcfg, tmp_path / "run")
    assert int(model.step) == 4
    tcfg6 = TrainConfig(**{**tcfg.to_dict(), "steps": 6})
    model2, _ = _model()
    fit(GDFSTask(model2, cfg, total_steps=6, progress=False), data, tcfg6, tmp_path / "run", test_set=test)
    assert int(model2.step) == 6  # the temperature schedule continued where the killed run stopped
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert rows[0]["temp"] == pytest.approx(temperature_at(1, 6, cfg)) and rows[-1]["temp"] < rows[0]["temp"]
    ev = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert {f"auroc_t{t}" for t in (1, 2, 3)} <= set(ev)
    cfg_saved = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert cfg_saved["method"] == "gdfs" and cfg_saved["tau"] == cfg.temp_end and cfg_saved["scans"] == 3
    policy = load_policy(tmp_path / "run", "Effusion", GEOM)
    assert policy.name == "gdfs" and policy.observes_everything is False
    state = ScanState.empty(5, 1, 32)
    x = Images(5, seed=2).images
    for t in range(4):  # hard argmax among not-yet-observed candidates, every step
        skip = GEOM.fully_observed(state.mask)
        locs = policy.next_locations(state)
        assert not skip[torch.arange(5), locs].any()
        state = state.scan(x, locs, GEOM)
    again = load_policy(tmp_path / "run" / "model", "effusion", GEOM)
    assert torch.equal(again.next_locations(state), policy.next_locations(state))


def test_train_policy_gdfs_cli(tmp_path, capsys, monkeypatch):
    import boed.commands.train_policy
    from boed.cli import main

    torch.manual_seed(0)
    AVPClassifier(AVPConfig(arch="tiny", image_size=64, width=4, pool=2)).save_pretrained(tmp_path / "avp")
    sets = {"train": Images(8, 64), "test": Images(6, 64, seed=1)}
    asked = []
    monkeypatch.setattr(boed.commands.train_policy, "dataset_from_args",  # the name the command binds
                        lambda args, split: asked.append(split) or sets[split])
    out = tmp_path / "gdfs"
    with pytest.raises(SystemExit) as e:
        main(["train-policy", "--method", "gdfs", "--avp", str(tmp_path / "avp"), "--out", str(out), "--scans", "2",
              "--steps", "2", "--batch-size", "4", "--device", "cpu", "--gdfs-predictor", "frozen", "--no-progress"])
    captured = capsys.readouterr()
    assert e.value.code == 0, captured.err
    assert "GDFS policy" in captured.out and asked == ["train", "test"]  # the test's images, not the default phantom
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "gdfs" and "auroc_t2" in report
    assert load_policy(out, "effusion", ScanGeometry(64)).name == "gdfs"
