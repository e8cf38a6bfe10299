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

class _PhantomSet(_InMemorySet):
    """An in-memory phantom set of the given difficulty: Effusion on every other film, nothing else."""

    def __init__(self, n: int, offset: int, difficulty: str, size: int = S, seed: int = 7):
        from xray.labels import LABELS
        from xray.phantom import render_meta
        from xray.phantom.metadata import ImageMeta

        k = LABELS.index("Effusion")
        ims, y = [], np.zeros((n, len(LABELS)), np.float32)
        for i in range(n):
            pos = i % 2 == 1
            meta = ImageMeta(f"{offset + i:08d}_000.png", ("Effusion",) if pos else (), 0, offset + i, 50,
                             "F" if i % 3 == 0 else "M", "AP" if i % 4 < 2 else "PA", ("2500", "2048", "0.168", "0.168"))
            ims.append(render_meta(meta, seed, offset + i, size, difficulty=difficulty).image)
            y[i, k] = y[i, LABELS.index("Any Finding")] = float(pos)
        self.images = torch.as_tensor(np.stack(ims))[:, None]  # (n, 1, S, S) uint8
        self.labels, self.image_size, self.effusion = y, size, k


def brief_cpu_recipe_auroc(tmp_path, steps: int, n_train: int, n_test: int, difficulty: str, seed: int = 0,
                           **mask_overrides) -> float:
    """Full-image Effusion AUROC of the cpu demo profile's AVP recipe (masks, lr, batch) after ``steps``."""
    import dataclasses

    from sklearn.metrics import roc_auc_score

    from boed.commands.train_avp import _defaults
    from boed.demo import PROFILES
    from ipa_core.trainer import fit

    p = PROFILES["cpu"]
    masks = {k: v for k, v in (("p_full", p.avp_p_full), ("p_freeform", p.avp_p_freeform),
                               ("patch_layout", p.avp_patch_layout)) if v is not None}
    masks.update(mask_overrides)
    train, test = _PhantomSet(n_train, 0, difficulty), _PhantomSet(n_test, 10**6, difficulty)
    torch.manual_seed(seed)
    model = AVPClassifier(AVPConfig(arch=p.avp_arch, image_size=S))
    task = AVPTrainTask(model, AVPTrainConfig(seed=seed, freeform_bank=64, **masks), progress=False)
    cfg = dataclasses.replace(_defaults(), steps=steps, batch_size=p.avp_batch, lr=p.avp_lr, seed=seed, device="cpu",
                              sample_every=10**9, ckpt_every=steps, log_every=steps)
    out = fit(task, train, cfg, tmp_path / f"run-{seed}").eval()
    prob = out.predict_proba(test.images, torch.ones(len(test), 1, S, S))[:, test.effusion]
    return float(roc_auc_score(test.labels[:, test.effusion], prob.numpy()))


# Measured with this test's own setting (600 steps, 1 024 training and 512 test films of the
# realistic preset, Effusion on every other film), full-image Effusion AUROC:
#   cpu masks (--p-full 0.2 --p-freeform 0 --patch-layout scan), seeds 0/1/2: 0.648 0.553 0.580
#   appendix-I.4 masks (the issue-24 regression), seeds 0/1:                 0.604 0.573
#   --p-full 0.2 --p-freeform 0.25 --patch-layout scan, seeds 0/1:           0.682 0.635
# and at 2 000 steps, cpu masks 0.905 0.911 vs I.4 masks 0.881 0.915. So a brief run on a tiny set
# does NOT separate the regression from the fix (the table does, on 612 test films of the full
# demo mixture: realistic preset, Effusion full image 0.756 vs 0.905); the floor below only
# catches a recipe that stops learning from full images (a collapse to chance), with margin for
# seed noise. The hard preset is not used: at this budget every recipe is at chance on it.
BRIEF_STEPS, BRIEF_TRAIN, BRIEF_TEST = 600, 1024, 512
FULL_IMAGE_FLOOR = 0.53


def test_cpu_recipe_learns_full_images_of_harder_films(tmp_path):
    """Issue 24 (item 5, partly): the cpu recipe trained briefly on harder-than-default films is
    above chance on the full image (see the measurements above for what this cannot show)."""
    auroc = brief_cpu_recipe_auroc(tmp_path, BRIEF_STEPS, BRIEF_TRAIN, BRIEF_TEST, "realistic")
    assert auroc >= FULL_IMAGE_FLOOR, auroc


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
