import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from boed.classifier import AVPClassifier, AVPConfig
from boed.train_avp import (AVPTrainConfig, AVPTrainTask, format_auroc_table, positive_weights,
                            sample_training_masks)
from ipa_core.masks import IPA_TRAINING_MASKS
from tests.xray.conftest import make_nih
from xray.cli_base import make_main
from xray.errors import UserError
from xray.io import run_lock

S = 64


def _union_of_squares(m: torch.Tensor, P: int) -> torch.Tensor:
    """``(B,)``: whether each mask is a union of P x P squares, each possibly clipped at the border
    (every observed pixel lies in a fully observed P x P window, outside the image counting as observed)."""
    pad = F.pad(m, (P - 1,) * 4, value=1.0)
    fits = (F.avg_pool2d(pad, P, stride=1) > 1 - 1e-6).float()  # (B, 1, S + P - 1, S + P - 1) windows inside
    covered = F.max_pool2d(fits, P, stride=1)  # (B, 1, S, S)
    return (covered == m).flatten(1).all(1)


def test_default_masks_follow_appendix_I4():
    """Paper I.4: the completion networks' mixture (free-form share as IPA's) with 25 %-width patches, clipped
    at the border, and no fully observed share of its own. Checked on the masks alone over many seeded draws."""
    cfg = AVPTrainConfig()
    assert (cfg.p_full, cfg.patch_frac, cfg.max_patches) == (0.0, 0.25, 5)
    assert cfg.p_freeform == IPA_TRAINING_MASKS.p_freeform == 0.5
    n, P = 400, S // 4
    m = sample_training_masks(n, S, AVPTrainConfig(freeform_bank=0), torch.Generator().manual_seed(0))
    assert m.shape == (n, 1, S, S) and set(m.unique().tolist()) <= {0.0, 1.0}
    frac = m.flatten(1).mean(1)  # (n,)
    patchy = _union_of_squares(m, P) & (frac <= 5 * P * P / S**2 + 1e-6)  # at most 5 squares of side >= P
    assert abs(patchy.float().mean().item() - 0.5) < 0.075  # free-form never passes (checked: 0 of 300)
    wider = _union_of_squares(m, P + 1) & patchy & (frac > 0)  # squares of side >= P + 1 would pass this too
    assert wider.float().sum() < 0.15 * (patchy & (frac > 0)).float().sum()  # only corner-clipped ones do
    assert ((frac[patchy] * S * S) % (P * P) != 0).any()  # some patches clipped at the border
    assert ((frac[patchy] == 0).float().mean() - 1 / 6).abs() < 0.08  # 0..5 patches uniform
    assert (frac == 1).float().mean() < 0.05  # only free-form masks without holes (~2.7 %)
    assert (frac[~patchy] > 5 * P * P / S**2).float().mean() > 0.5  # free-form observed fractions reach 100 %
    again = sample_training_masks(40, S, AVPTrainConfig(freeform_bank=0), torch.Generator().manual_seed(0))
    torch.testing.assert_close(again, sample_training_masks(40, S, AVPTrainConfig(freeform_bank=0), torch.Generator().manual_seed(0)))


def test_mask_bank_and_p_full():
    g = torch.Generator().manual_seed(1)
    cfg = AVPTrainConfig(p_full=0.2, freeform_bank=32)
    task = AVPTrainTask(AVPClassifier(AVPConfig(arch="tiny", image_size=S, width=4)), cfg)
    bank = task.mask_bank(S)
    assert bank.freeform.shape == (32, 1, S, S) and task.mask_bank(S) is bank
    m = sample_training_masks(600, S, cfg, g, bank)
    frac = m.flatten(1).mean(1)
    assert abs((frac == 1).float().mean().item() - 0.2) < 0.06
    partial = m[frac < 1]
    patchy = _union_of_squares(partial, S // 4) & (partial.flatten(1).mean(1) <= 5 / 16 + 1e-6)
    assert abs(patchy.float().mean().item() - 0.5) < 0.06
    ff = partial[~patchy]  # each is a bank mask, possibly flipped
    variants = torch.cat([bank.freeform, bank.freeform.flip(2), bank.freeform.flip(3), bank.freeform.flip(2, 3)])
    assert all((variants == f).flatten(1).all(1).any() for f in ff[:50])
    assert len({tuple(f.flatten().tolist()) for f in ff}) > 40  # flips multiply the bank


def _is_grid_union(m: torch.Tensor, pm: torch.Tensor) -> bool:
    """Whether mask ``m (1, S, S)`` is exactly the union of the scan-grid patches ``pm (L, 1, S, S)`` it covers."""
    covered = (m.flatten() @ pm.flatten(1).T) == pm.flatten(1).sum(1)  # (L,) patch fully observed
    union = (pm[covered].sum(0) > 0).float() if covered.any() else torch.zeros_like(m)
    return torch.equal(union, m)


def test_scan_layout_masks_are_unions_of_scan_grid_patches():
    """--patch-layout scan: the partial patch masks are unions of 0..5 distinct scan-grid patches (what
    a policy's t scans observe), the free-form share and p_full as before; the default layout is unchanged."""
    from boed.geometry import ScanGeometry
    from boed.train_avp import scan_patch_masks

    geom = ScanGeometry(S)
    pm = geom.patch_masks()  # (L, 1, S, S)
    m = scan_patch_masks(600, geom, 5, torch.Generator().manual_seed(0))  # (600, 1, S, S)
    assert all(_is_grid_union(x, pm) for x in m[:60])
    empty = (m.flatten(1).sum(1) == 0).float().mean()
    assert abs(empty.item() - 1 / 6) < 0.05  # 0..5 patches uniform
    assert m.flatten(1).mean(1).max() <= 5 / 16 + 1e-6
    cfg = AVPTrainConfig(patch_layout="scan", p_full=0.2, p_freeform=0.5, freeform_bank=16)
    task = AVPTrainTask(AVPClassifier(AVPConfig(arch="tiny", image_size=S, width=4)), cfg)
    mm = sample_training_masks(800, S, cfg, torch.Generator().manual_seed(1), task.mask_bank(S))
    frac = mm.flatten(1).mean(1)
    assert abs((frac == 1).float().mean().item() - 0.2) < 0.05
    grid_like = [_is_grid_union(x, pm) for x in mm[frac < 1][:200]]
    assert abs(np.mean(grid_like) - 0.5) < 0.1  # half scan-grid unions, half free-form
    assert "patch_layout" not in AVPTrainTask(AVPClassifier(AVPConfig(arch="tiny", image_size=S, width=4))).provenance()
    assert task.provenance()["patch_layout"] == "scan"
    with pytest.raises(UserError, match="patch-layout"):
        AVPTrainConfig(patch_layout="grid")


def test_positive_weights_known_answer():
    y = np.array([[1, 0, 0], [0, 0, 1], [0, 0, 1], [0, 0, 1]])
    np.testing.assert_allclose(positive_weights(y, max_weight=10).numpy(), [3.0, 4.0, 1.0])  # no positives: negatives / 1


def test_loss_of_uninformed_model_is_log2():
    model = AVPClassifier(AVPConfig(arch="tiny", image_size=S, width=4))
    torch.nn.init.zeros_(model.net.head.weight)
    torch.nn.init.zeros_(model.net.head.bias)
    task = AVPTrainTask(model, AVPTrainConfig(freeform_bank=4))
    x = torch.randint(0, 256, (4, 1, S, S), dtype=torch.uint8)
    y = (torch.rand(4, 15) > 0.5).float()
    loss, metrics = task.loss(model, (x, y), torch.Generator().manual_seed(0))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert 0 <= float(metrics["observed"]) <= 1
    loss.backward()
    assert model.net.head.weight.grad.abs().sum() > 0


def test_bad_config_is_user_error():
    for bad in ({"p_full": 1.5}, {"p_freeform": -0.1}, {"freeform_bank": -1}, {"patch_frac": 0}):
        with pytest.raises(UserError):
            AVPTrainConfig(**bad)
    with pytest.raises(UserError, match="needs the training labels"):
        AVPTrainTask(AVPClassifier(AVPConfig(arch="tiny", image_size=S)), AVPTrainConfig(pos_weight="auto"))


class _InMemorySet:
    """``images`` (n, 1, S, S) uint8 and ``labels`` (n, K) as the trainer reads a dataset."""

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], torch.as_tensor(self.labels[i])

    def get_batch(self, idx):
        return self.images[torch.as_tensor(idx)]


class BrightCornerSet(_InMemorySet):
    """Label k = 1 when a bright square sits in a known place: learnable from masked views."""

    def __init__(self, n=256, seed=0):
        g = torch.Generator().manual_seed(seed)
        x = torch.randint(0, 80, (n, 1, S, S), generator=g, dtype=torch.uint8)
        y = (torch.rand(n, 15, generator=g) > 0.5).float()
        y[:, 4] = torch.arange(n) % 2  # Effusion balanced
        x[y[:, 4] == 1, :, 8:40, 8:40] = 230
        self.images, self.labels, self.image_size = x, y.numpy(), S


def test_fit_learns_and_reports(tmp_path):
    from ipa_core.trainer import TrainConfig, fit

    torch.manual_seed(0)
    data = BrightCornerSet()
    model = AVPClassifier(AVPConfig(arch="tiny", image_size=S, width=4))
    task = AVPTrainTask(model, AVPTrainConfig(p_full=0.3, eval_images=128, freeform_bank=16), progress=False, preview=data)
    cfg = TrainConfig(steps=80, batch_size=32, lr=3e-3, warmup=10, ema_rate=None, log_every=20, sample_every=80, ckpt_every=80, device="cpu")
    fit(task, data, cfg, tmp_path / "run", test_set=data)
    res = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert res["full/Effusion"] > 0.95  # the bright square is seen on the full image
    assert 0.5 < res["patch1/Effusion"] <= res["full/Effusion"] + 1e-9  # one patch sees it only sometimes
    assert "full/mean" in res and res["n_images"] == 128
    assert list((tmp_path / "run" / "samples").glob("*.png"))
    loaded = AVPClassifier.from_pretrained(tmp_path / "run")
    assert "Effusion" in format_auroc_table(res)
    x = data.get_batch(list(range(8)))
    p = loaded.predict_proba(x, torch.ones(8, 1, S, S))[:, 4]
    assert (p[1::2].min() > p[0::2].max())  # positives above negatives


def test_cli_trains_resumes_and_writes_report(tmp_path, capsys):
    main = make_main("boed", "test", {"train-avp": "boed.commands.train_avp"})
    root = make_nih(tmp_path / "nih", n=40, px=48)
    argv = ["train-avp", "--data", "chestxray", "--data-root", str(root), "--cache-dir", str(tmp_path / "cache"),
            "--image-size", str(S), "--width", "4", "--steps", "6", "--batch-size", "4", "--log-every", "3",
            "--ckpt-every", "3", "--sample-every", "100", "--freeform-bank", "8", "--out", str(tmp_path / "avp"), "--eval-images", "50"]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "1 patch" in out and (tmp_path / "avp" / "auroc_table.txt").is_file()
    m1 = AVPClassifier.from_pretrained(tmp_path / "avp")
    assert m1.config.image_size == S and m1.config.width == 4
    saved = json.loads((tmp_path / "avp" / "model" / "config.json").read_text())
    assert saved["label_names"] == list(m1.label_names) and len(saved["label_names"]) == 15
    tc = saved["train_config"]  # how it was trained, with the model
    assert (tc["init"], tc["p_full"], tc["p_freeform"], tc["patch_frac"], tc["freeform_bank"], tc["arch"]) == ("scratch", 0.0, 0.5, 0.25, 8, "tiny")
    assert m1.train_config == tc
    with pytest.raises(SystemExit) as e:  # same command again: resumes at step 6, nothing to do, same model
        main(argv)
    assert e.value.code == 0
    m2 = AVPClassifier.from_pretrained(tmp_path / "avp")
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values()):
        torch.testing.assert_close(a, b)
    with pytest.raises(SystemExit) as e:  # a different architecture in the same run folder
        other = [a for i, a in enumerate(argv[:-4]) if "--width" not in argv[i - 1:i + 1]]  # --width: the tiny net's only
        main(other + ["--arch", "resnet18", "--out", str(tmp_path / "avp"), "--eval-images", "50"])
    assert e.value.code == 2 and "different model config" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # another seed, and a new cache folder: refused before the data is prepared
        main(argv[:-4] + ["--seed", "3", "--cache-dir", str(tmp_path / "cache2"), "--out", str(tmp_path / "avp")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"error: --seed changed: the run in {tmp_path / 'avp'} was made with 0, this run has 3; ")
    assert not (tmp_path / "cache2").exists()
    before = {p: p.read_bytes() for p in (tmp_path / "avp").rglob("*") if p.is_file()}
    with run_lock(tmp_path / "avp"), pytest.raises(SystemExit) as e:  # another training holds the folder
        main(argv[:-4] + ["--steps", "9", "--out", str(tmp_path / "avp"), "--eval-images", "50"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == f"error: another training is writing {tmp_path / 'avp'} (pid {os.getpid()}); wait for it or use another --out\n"
    before[tmp_path / "avp" / ".lock"] = f"{os.getpid()}\n".encode()  # only the holder wrote its pid
    assert {p: p.read_bytes() for p in (tmp_path / "avp").rglob("*") if p.is_file()} == before


def test_cli_eval_images_0_trains_without_a_report(tmp_path, capsys):
    main = make_main("boed", "test", {"train-avp": "boed.commands.train_avp"})
    root = make_nih(tmp_path / "nih", n=40, px=48)
    with pytest.raises(SystemExit) as e:
        main(["train-avp", "--data", "chestxray", "--data-root", str(root), "--cache-dir", str(tmp_path / "cache"),
              "--image-size", str(S), "--width", "4", "--steps", "1", "--batch-size", "4", "--sample-every", "100",
              "--freeform-bank", "4", "--eval-images", "0", "--out", str(tmp_path / "avp")])
    assert e.value.code == 0, capsys.readouterr().err
    assert (tmp_path / "avp" / "model" / "model.safetensors").is_file() and not (tmp_path / "avp" / "eval.json").exists()


def test_cli_input_norm_dataset_standardises_by_the_training_pixels(tmp_path, capsys):
    """--input-norm dataset (the cpu profile's recipe): config.json holds the mean and std of the
    training images the run's seed draws (every image of a small set), from the same initial weights
    as a run without it; a resume keeps them; the refusal for a pretrained backbone is one line."""
    from boed.train_avp import training_norm_stats
    from xray.dataset import dataset_images, open_dataset

    root = make_nih(tmp_path / "nih", n=40, px=48)
    base = ["train-avp", "--data", "chestxray", "--data-root", str(root), "--cache-dir", str(tmp_path / "cache"),
            "--image-size", str(S), "--width", "4", "--batch-size", "4", "--sample-every", "100",
            "--freeform-bank", "4", "--eval-images", "0", "--lr", "1e-12"]
    for run, extra in (("std", ["--input-norm", "dataset"]), ("plain", [])):
        with pytest.raises(SystemExit) as e:
            _cli()([*base, "--steps", "1", "--out", str(tmp_path / run), *extra])
        assert e.value.code == 0, capsys.readouterr().err
    std, plain = (AVPClassifier.from_pretrained(tmp_path / r) for r in ("std", "plain"))
    train = open_dataset("chestxray", root, split="train", size=S, cache_dir=tmp_path / "cache", progress=False, workers=1)
    x = dataset_images(train, list(range(len(train)))).double() / 255  # (n, 1, S, S): a small set, all of it
    (mean,), (sd,) = std.config.norm_stats
    assert (std.config.input_norm, plain.config.input_norm) == ("dataset", "none")
    assert mean == pytest.approx(x.mean().item()) and sd == pytest.approx(x.std().item())
    assert std.config.norm_stats == training_norm_stats(train, seed=0)
    weights = dict(std.named_parameters())
    for k, v in plain.named_parameters():  # lr ~ 0: both still at the seed's initial weights (BN statistics differ)
        torch.testing.assert_close(weights[k], v, msg=k)
    with pytest.raises(SystemExit) as e:  # resume to 2 steps: the same statistics
        _cli()([*base, "--steps", "2", "--out", str(tmp_path / "std"), "--input-norm", "dataset"])
    assert e.value.code == 0, capsys.readouterr().err
    assert AVPClassifier.from_pretrained(tmp_path / "std").config.norm_stats == std.config.norm_stats


def test_task_provenance_records_the_training_config():
    model = AVPClassifier(AVPConfig(arch="resnet18", image_size=S, input_norm="imagenet"))
    cfg = AVPTrainConfig(p_full=0.1, freeform_bank=4, pos_weight="none", init="imagenet", init_weights="/w/densenet.pth",
                         init_digest="abc123", eval_images=7)
    prov = AVPTrainTask(model, cfg).provenance()
    assert json.loads(json.dumps(prov)) == prov  # JSON-able
    assert prov["arch"] == "resnet18" and prov["input_norm"] == "imagenet" and prov["init"] == "imagenet"
    assert (prov["patch_frac"], prov["p_freeform"], prov["p_full"], prov["freeform_bank"]) == (0.25, 0.5, 0.1, 4)
    assert prov["init_digest"] == "abc123" and "eval_images" not in prov  # the report size does not change the model
    assert model.train_config == prov
    assert AVPTrainTask(model, AVPTrainConfig(p_full=0.2, freeform_bank=4)).provenance() != prov


def _cli():
    return make_main("boed", "test", {"train-avp": "boed.commands.train_avp"})


def test_cli_bad_input_is_one_line_and_creates_nothing(tmp_path, capsys, monkeypatch):
    import socket
    import urllib.error

    def offline(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setattr(socket.socket, "connect", lambda *a, **k: offline())
    import torchvision

    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    cases = [
        (["--init", "imagnet"], "is not one of scratch, imagenet"),
        (["--init", "xrv:densenet121-res224-foo", "--arch", "densenet121"], "unknown torchxrayvision weights"),
        (["--init", "xrv:densenet121-res224-nih"], "is a densenet121, but --arch is tiny"),
        (["--init", "imagenet"], "no ImageNet weights for --arch tiny"),
        (["--arch", "resnet18", "--init", "imagenet", "--init-weights", str(tmp_path / "none.pth")], "no such file"),
        (["--arch", "densenet121", "--init", "imagenet", "--init-weights", str(tmp_path / "r18.pth")], "does not match a densenet121"),
        (["--arch", "resnet18", "--init", "imagenet"], "offline, copy that file here and pass --init imagenet --init-weights FILE"),
        (["--init-weights", str(tmp_path / "r18.pth")], "pass --init imagenet or --init xrv:NAME with it"),
        (["--p-full", "1.5"], "argument --p-full: 1.5 is out of range"),
        (["--freeform-bank", "-2"], "--freeform-bank must be >= 0"),
        (["--arch", "resnet18", "--input-norm", "dataset"], "--input-norm dataset is for --arch tiny --init scratch"),
    ]
    base = ["train-avp", "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"), "--steps", "1"]
    for extra, msg in cases:
        with pytest.raises(SystemExit) as e:
            _cli()(base + extra)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, (extra, err)
        assert msg in err, (extra, err)
        assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists(), extra
    with pytest.raises(SystemExit) as e:  # argparse's own refusal of an unknown --arch
        _cli()(base + ["--arch", "vgg16"])
    assert e.value.code == 2 and "invalid choice: 'vgg16'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_cli_help_states_the_code_defaults(capsys):
    with pytest.raises(SystemExit):
        _cli()(["train-avp", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    cfg = AVPTrainConfig()
    for flag, value in [("--p-full", cfg.p_full), ("--p-freeform", cfg.p_freeform), ("--freeform-bank", cfg.freeform_bank),
                        ("--init", "scratch"), ("--arch", "tiny"), ("--eval-images", cfg.eval_images)]:
        assert f"(default: {value})" in out, flag
    assert "25% width" in out


def test_cli_initial_weights_depend_on_the_seed_alone(tmp_path, capsys):
    """Two runs of the same command start from the same weights, whatever the global generator
    did before (recent PyTorch seeds it differently in every process)."""
    main = _cli()
    root = make_nih(tmp_path / "nih", n=24, px=48)
    models = []
    for run, global_seed in (("a", 1), ("b", 2), ("c", 1)):
        torch.manual_seed(global_seed)  # another process, another global generator state
        argv = ["train-avp", "--data", "chestxray", "--data-root", str(root), "--cache-dir", str(tmp_path / "cache"),
                "--image-size", str(S), "--width", "4", "--steps", "2", "--batch-size", "4", "--sample-every", "100",
                "--freeform-bank", "4", "--eval-images", "4", "--out", str(tmp_path / run)]
        argv += ["--seed", "3"] if run == "c" else []
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0, capsys.readouterr().err
        models.append(AVPClassifier.from_pretrained(tmp_path / run).state_dict())
    a, b, c = models
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())  # another --seed, other weights


# ---------------------------------------------------------------- the cpu recipe on harder data (issue 24)

# Phantom sets with the demo's mixture of findings, as `boed demo --data-root` reads one (1 847 training
# and 446 test films each).
FLOOR_SET = dict(n=2400, size=S, seed=11)


def phantom_set(root, n: int, size: int, seed: int, difficulty: str):
    """``root`` holding a fresh NIH-format phantom set (``nih/``) with the demo prevalences (``xray phantom``)."""
    from xray import phantom

    phantom.generate(root / "nih", n=n, size=size, seed=seed, workers=1, prevalence=phantom.DEMO_PREVALENCE,
                     progress=False, difficulty=difficulty)
    return root


def demo_avp_aurocs(profile, root, out, fraction: float, seed: int = 0) -> dict[str, float]:
    """Full-image AUROC per demo illness of the AVP-CNN that `boed demo`'s own AVP stage trains for
    ``profile`` (its command and flags: masks, normalisation, arch, lr, batch) on the phantom set under
    ``root`` (:func:`phantom_splits`), at ``fraction`` of the profile's steps, scored on every test image."""
    import dataclasses

    from sklearn.metrics import roc_auc_score

    from boed.demo import DemoOptions, avp_stage
    from xray.cli_base import run_command
    from xray.dataset import dataset_images, open_dataset
    from xray.labels import resolve_illness

    brief = dataclasses.replace(profile, avp_steps=round(profile.avp_steps * fraction))
    stage = avp_stage(DemoOptions(out=out, profile=brief, illnesses=("Effusion",), data_root=root / "nih",
                                  cache_dir=root / "cache", seed=seed, eval_images=0))
    run_command(stage.target, [str(a) for a in stage.argv])
    model = AVPClassifier.from_pretrained(out / "avp")
    test = open_dataset("chestxray", root / "nih", split="test", size=profile.image_size, cache_dir=root / "cache",
                        progress=False, workers=1)
    x = dataset_images(test, list(range(len(test))))  # (n, 1, S, S) uint8
    p = model.predict_proba(x, torch.ones(len(test), 1, *x.shape[-2:]), chunk_size=256)  # (n, K)
    y = np.asarray(test.labels)  # (n, K)
    illnesses = [resolve_illness(name) for name in ("Effusion", "Edema")]
    return {ill.name: float(roc_auc_score(np.asarray(ill.target(y)), np.asarray(ill.prob(p)))) for ill in illnesses}


# Item 5 of issue 24, measured with this very setting (FLOOR_SET of each preset; the demo's AVP stage
# at half the profile's steps; full-image Effusion AUROC over training seeds):
#                                                                  realistic (seeds 0-5 / 0-2)    hard (0-5 / 0-3)
#   cpu profile now (full + scan-grid masks, input standardised)   .955 .952 .963 .944 .955 .951  .690 .703 .716 .682 .719 .725
#   the same without the standardisation (the recipe before it)    .868 .878 .876 .911 .925 .890
#   appendix-I.4 masks at the same steps (a masks-only revert)     .850 .858 .857
#   the old cpu profile (appendix-I.4 masks, 2 000 steps: 1 000)   .724 .718 .695                 .581 .556 .585 .561
# Each floor sits halfway between the old profile's mean and the cpu profile's (realistic .713 / .953,
# hard .571 / .706): on realistic 0.11 of margin each side; on hard 0.04 below the cpu profile's lowest
# seed (4 sds of its spread below its mean) and 0.05 above the old profile's highest. A masks-only revert
# at the same steps is NOT caught (on these phantoms the masks matter far less than the steps and the
# standardisation; see the README's classifier section).
BRIEF_FRACTION = 0.5
EFFUSION_FLOOR = {"realistic": 0.83, "hard": 0.64}


@pytest.fixture(scope="module", params=sorted(EFFUSION_FLOOR))
def harder_films(request, tmp_path_factory):
    """(preset, root of a fresh FLOOR_SET phantom set of that preset)."""
    return request.param, phantom_set(tmp_path_factory.mktemp(request.param), difficulty=request.param, **FLOOR_SET)


def old_cpu_profile(profile):
    """The cpu profile before issue 24: `boed train-avp`'s own masks and normalisation (appendix I.4), 2 000 steps."""
    import dataclasses

    return dataclasses.replace(profile, avp_steps=2000, avp_p_full=None, avp_p_freeform=None, avp_patch_layout=None,
                               avp_input_norm=None)


def test_cpu_recipe_keeps_full_image_auroc_on_harder_films(harder_films, tmp_path):
    """Issue 24, item 5: the demo's own AVP stage (cpu profile), trained briefly on harder-than-default
    films, stays above a full-image floor that the old cpu recipe fails (measured above; the slow test
    below runs that recipe and checks it does)."""
    from boed.demo import PROFILES

    preset, root = harder_films
    auroc = demo_avp_aurocs(PROFILES["cpu"], root, tmp_path, BRIEF_FRACTION)
    assert auroc["Effusion"] >= EFFUSION_FLOOR[preset], (preset, auroc)


@pytest.mark.slow
def test_the_old_cpu_recipe_fails_the_floor(harder_films, tmp_path):
    """The floors are not vacuous: the cpu profile of before issue 24 falls below them in the same setting."""
    from boed.demo import PROFILES

    preset, root = harder_films
    auroc = demo_avp_aurocs(old_cpu_profile(PROFILES["cpu"]), root, tmp_path, BRIEF_FRACTION)
    assert auroc["Effusion"] < EFFUSION_FLOOR[preset], (preset, auroc)


def test_cli_encoder_arch_starts_from_the_ipa_run_and_records_it(tmp_path, capsys):
    """`boed train-avp --arch encoder --init ipa:RUN`: the first step starts from IPA's partial
    encoder (its blocks are the AVP's before training), the run records the init and its digest."""
    import dataclasses

    from ipa_core.config import get_config
    from ipa_core.ipa import IPA, IPAConfig
    from ipa_core.persist import model_digest

    torch.manual_seed(0)
    ipa = IPA(IPAConfig.from_vae(dataclasses.replace(get_config("tiny"), shift=-100.0, scale=1 / 50)))
    ipa.save_pretrained(tmp_path / "ipa" / "model")
    root = make_nih(tmp_path / "nih", n=40, px=64)
    argv = ["train-avp", "--data", "chestxray", "--data-root", str(root), "--cache-dir", str(tmp_path / "cache"),
            "--image-size", "64", "--arch", "encoder", "--init", f"ipa:{tmp_path / 'ipa'}", "--pool", "2", "--lr", "1e-12",
            "--steps", "2", "--batch-size", "4", "--sample-every", "100", "--eval-images", "0", "--out", str(tmp_path / "avp")]
    with pytest.raises(SystemExit) as e:
        _cli()(argv)
    assert e.value.code == 0, capsys.readouterr().err
    avp = AVPClassifier.from_pretrained(tmp_path / "avp")
    assert (avp.config.arch, avp.config.input_norm, avp.config.pool, avp.net.res) == ("encoder", "vae", 2, 4)
    own = avp.net.encoder.state_dict()
    for k, v in ipa.part_encoder.state_dict().items():  # lr 1e-12: the weights are still psi's
        if k in own and not k.endswith(("running_mean", "running_var", "num_batches_tracked")):
            torch.testing.assert_close(own[k], v, msg=k)
    tc = avp.train_config
    assert tc["init"] == "ipa" and tc["init_digest"] == model_digest(tmp_path / "ipa")
    with pytest.raises(SystemExit) as e:  # the tiny net's --width does not shape the encoder
        _cli()([*argv[:-2], "--width", "8", "--out", str(tmp_path / "avp2")])
    assert e.value.code == 2 and "--width 8" in capsys.readouterr().err and not (tmp_path / "avp2").exists()
