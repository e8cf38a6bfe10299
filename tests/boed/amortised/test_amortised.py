"""Amortised scan policies: the policy network and its interface, teacher shards, the distillation
loss, `boed train-policy` and `boed run --policy` (tiny models, in-process)."""

import dataclasses
import json

import pytest
import torch

from boed.amortised import AmortisedPolicy, PolicyConfig, PolicyNet, load_policy
from boed.amortised.distill import auto_tau, choice_metrics, distill_loss
from boed.amortised.teacher import (TeacherConfig, TeacherStates, generate_teacher_data, load_shards, missing_shards,
                                    states_of)
from boed.commands import run as run_cmd
from boed.commands import train_policy as train_policy_cmd
from boed.geometry import ScanGeometry
from boed.policies import GreedyPolicy, ScanState
from xray.errors import UserError

S32 = ScanGeometry(32, 8, 5)  # L = 25: small enough to scan until everything is observed


class Images:
    """In-memory dataset with the XrayDataset surface the code uses."""

    def __init__(self, n=12, S=32, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randint(0, 256, (n, 1, S, S), dtype=torch.uint8, generator=g)
        self.labels = (torch.rand(n, 15, generator=g) < 0.4).float()
        self.image_size = S
        self.fingerprint = f"images-{n}-{S}-{seed}"

    def __len__(self):
        return len(self.images)

    def get_batch(self, idx):
        return self.images[torch.as_tensor(idx).long()]

    def get_labels(self, idx):
        return self.labels[torch.as_tensor(idx).long()]

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


def policy_config(**kw):
    base = dict(method="distill", illness="effusion", image_size=32, patch_size=8, grid=5, width=4, scans=3)
    return PolicyConfig(**{**base, **kw})


def random_state(geometry, B=6, max_scans=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (B, 1, geometry.image_size, geometry.image_size), dtype=torch.uint8, generator=g)
    locs = torch.randint(0, geometry.num_locations, (B, max_scans), generator=g)
    locs[:, :1] = -1  # some padding
    return x, states_of(x, locs, geometry)


# ---------------------------------------------------------------- distillation loss and metrics


def test_distill_loss_is_zero_at_the_target_and_ignores_observed_candidates():
    eig = torch.tensor([[0.0, 0.2, 0.1, 0.4], [0.3, 0.0, 0.3, 0.1]])
    skip = torch.tensor([[True, False, False, False], [False, True, False, False]])
    tau = 0.1
    logits = (eig / tau).clone().requires_grad_(True)
    loss = distill_loss(logits, eig, skip, tau)
    assert abs(float(loss.detach())) < 1e-6
    other = logits.detach().clone()
    other[skip] = 1e3  # whatever the network says on observed candidates changes nothing
    assert abs(float(distill_loss(other, eig, skip, tau))) < 1e-6
    worse = torch.zeros(2, 4, requires_grad=True)
    l2 = distill_loss(worse, eig, skip, tau)
    l2.backward()
    assert float(l2.detach()) > 0.1 and torch.isfinite(worse.grad).all() and (worse.grad[skip] == 0).all()


def test_choice_metrics_known_values():
    eig = torch.tensor([[0.1, 0.5, 0.2], [0.3, 0.2, 0.9]])
    skip = torch.tensor([[False, False, False], [False, False, True]])  # the 0.9 is already observed
    student = torch.tensor([[0.0, 1.0, 0.0], [0.0, 5.0, 9.0]])  # picks 1 (agrees), then 1 (masked 2; teacher 0)
    m = choice_metrics(student, eig, skip)
    assert m["top1_agreement"] == pytest.approx(0.5)
    assert m["eig_regret"] == pytest.approx(0.05)  # (0 + 0.1) / 2
    assert m["eig_regret_rel"] == pytest.approx(0.1 / 0.8)


def test_auto_tau_scales_with_the_eig_spread():
    eig = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
    skip = torch.zeros(3, 4, dtype=torch.bool)
    t1 = auto_tau(eig, skip, 0.25)
    assert t1 == pytest.approx(0.25 * 1.5)  # spreads (max - mean) 0.75, 1.5, 3.0: median 1.5
    assert auto_tau(10 * eig, skip, 0.25) == pytest.approx(10 * t1)


def test_student_trained_on_a_synthetic_eig_map_recovers_its_argmax():
    """Known peak per state: the candidate 7 cells after the first scanned one (mod L)."""
    torch.manual_seed(0)
    geom = S32
    L = geom.num_locations
    g = torch.Generator().manual_seed(1)
    n = 96
    first = torch.randint(0, L, (n,), generator=g)
    second = torch.randint(0, L, (n,), generator=g)
    x = torch.randint(0, 256, (n, 1, 32, 32), dtype=torch.uint8, generator=g)
    state = states_of(x, torch.stack([first, second], 1), geom)
    skip = geom.fully_observed(state.mask)
    peak = (first + 7) % L
    ok = ~skip[torch.arange(n), peak]
    d = torch.cdist(torch.stack([torch.arange(L) // 5, torch.arange(L) % 5], 1).float(),
                    torch.stack([torch.arange(L) // 5, torch.arange(L) % 5], 1).float())  # (L, L) grid distance
    eig = torch.exp(-d[peak] ** 2).masked_fill(skip, 0.0)  # (n, L) smooth bump on the peak
    net = PolicyNet(policy_config(width=8))
    y = torch.cat([state.x_obs.float() / 255, state.mask], 1)
    opt = torch.optim.Adam(net.parameters(), lr=5e-3)
    for _ in range(150):
        opt.zero_grad()
        loss = distill_loss(net(y), eig, skip, tau=0.1)
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        m = choice_metrics(net(y), eig, skip)
        choice = AmortisedPolicy(net).next_locations(state)
    assert m["top1_agreement"] > 0.9, m
    assert float((choice[ok] == peak[ok]).float().mean()) > 0.9


# ---------------------------------------------------------------- the policy interface


class AdversarialNet(PolicyNet):
    """Puts its largest logits on candidates already fully observed."""

    def forward(self, y):
        m = y[:, -1:]
        return self.config.geometry.fully_observed(m).float() * 100.0 + 0.01 * super().forward(y)


@pytest.mark.parametrize("method, first", [("distill", 12), ("gdfs", None)])
@pytest.mark.parametrize("net_cls", [PolicyNet, AdversarialNet])
def test_observed_candidates_are_never_chosen_at_any_t(method, first, net_cls):
    torch.manual_seed(0)
    geom = S32
    net = net_cls(policy_config(method=method, first_location=first))
    policy = AmortisedPolicy(net)
    assert policy.observes_everything is False and policy.name == {"distill": "distilled", "gdfs": "gdfs"}[method]
    x = torch.randint(0, 256, (4, 1, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    state = ScanState.empty(4, 1, 32)
    t = 0
    while not geom.fully_observed(state.mask).all():
        skip = geom.fully_observed(state.mask)  # (B, L)
        locs = policy.next_locations(state, torch.Generator().manual_seed(t))
        assert locs.dtype == torch.long and locs.shape == (4,)
        open_rows = ~skip.all(1)
        assert not skip[torch.arange(4), locs][open_rows].any(), f"an observed candidate was chosen at t={t + 1}"
        if t == 0 and first is not None:
            assert (locs == first).all()
        p = policy.probs(state)
        assert torch.allclose(p.sum(1)[open_rows], torch.ones(int(open_rows.sum()))) and (p[skip] == 0).all()
        state = state.scan(x, locs, geom)
        t += 1
    assert t <= geom.num_locations


def test_save_and_reload_give_identical_choices(tmp_path):
    torch.manual_seed(3)
    net = PolicyNet(policy_config(method="gdfs", tau=0.1, provenance={"avp": "abc"}))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        net.net.trunk[1].running_mean.uniform_(-0.1, 0.1)  # non-trivial BN statistics are saved too
    net.save_pretrained(tmp_path / "run" / "model")
    cfg = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    for key in ("method", "illness", "image_size", "grid", "patch_size", "label_names", "arch", "tau"):
        assert key in cfg
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    loaded = load_policy(tmp_path / "run", "Effusion", S32, "cpu")
    _, state = random_state(S32, B=8)
    assert torch.equal(AmortisedPolicy(net).next_locations(state), loaded.next_locations(state))
    assert torch.allclose(AmortisedPolicy(net).probs(state), loaded.probs(state))


@pytest.mark.parametrize("illness, geometry, message", [
    ("edema", S32, "trained for Effusion, not Edema"),
    ("effusion", ScanGeometry(64, 16, 17), "image size 32, the evaluation uses 64"),
    ("effusion", ScanGeometry(32, 8, 4), "grid 5, the evaluation uses 4"),
])
def test_load_policy_refuses_another_task(tmp_path, illness, geometry, message):
    PolicyNet(policy_config()).save_pretrained(tmp_path / "pol")
    with pytest.raises(UserError) as e:
        load_policy(tmp_path / "pol", illness, geometry)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_load_policy_missing_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no scan policy at"):
        load_policy(tmp_path / "nothing", "effusion", S32)


def test_policy_config_validates():
    with pytest.raises(UserError, match="unknown policy method"):
        policy_config(method="dime")
    with pytest.raises(UserError, match="unknown illness"):
        policy_config(illness="flu")
    with pytest.raises(UserError, match="first_location"):
        policy_config(first_location=25)


def test_resnet18_backbone_takes_the_mask_channel():
    net = PolicyNet(policy_config(arch="resnet18"))
    assert net(torch.zeros(2, 2, 32, 32)).shape == (2, 25)


# ---------------------------------------------------------------- teacher shards


class NoiseSampler:
    """Completions drawn from the generator (deterministic for a seeded generator)."""

    def sample(self, x_obs, m, n, generator=None):
        out = torch.randint(0, 256, (x_obs.shape[0], n, *x_obs.shape[1:]), dtype=torch.uint8, generator=generator)
        return torch.where(m[:, None] > 0.5, x_obs[:, None], out)


def tiny_teacher(geometry=S32):
    from boed.classifier import AVPClassifier, AVPConfig

    torch.manual_seed(0)
    avp = AVPClassifier(AVPConfig(arch="tiny", image_size=geometry.image_size, width=4, pool=2))
    return GreedyPolicy(avp, NoiseSampler(), "effusion", geometry, n_samples=3)


def _first():
    return 6


def test_teacher_shards_interrupted_and_resumed_equal_one_run(tmp_path):
    data = Images(10)
    cfg = TeacherConfig(scans=3, n_images=10, off_policy=2, n_samples=3, shard_size=3)
    teacher = tiny_teacher()
    assert generate_teacher_data(tmp_path / "a", teacher, data, cfg, {"avp": "x"}, _first, progress=False) == []
    # interrupted after one shard, a stray temp file from a kill mid-write, then resumed
    left = generate_teacher_data(tmp_path / "b", teacher, data, cfg, {"avp": "x"}, _first, max_shards=1, progress=False)
    assert left == [1, 2, 3] and missing_shards(tmp_path / "b", cfg) == [1, 2, 3]
    (tmp_path / "b" / ".shard-00001.pt.tmp").write_bytes(b"half")
    assert generate_teacher_data(tmp_path / "b", teacher, data, cfg, {"avp": "x"}, _first, progress=False) == []
    # two workers (--shard 0/2 and 1/2)
    for i in (0, 1):
        generate_teacher_data(tmp_path / "c", teacher, data, cfg, {"avp": "x"}, _first, shard=(i, 2), progress=False)
    a = load_shards(tmp_path / "a", list(range(4)))
    for other in ("b", "c"):
        b = load_shards(tmp_path / other, list(range(4)))
        for k in a:
            assert torch.equal(a[k], b[k]), (other, k)
    assert not list((tmp_path / "b").glob(".shard-*"))
    # contents: T - 1 greedy states + off_policy states per image, first scan = the t = 1 choice
    M = 10 * (cfg.scans - 1 + cfg.off_policy)
    assert a["eig"].shape == (M, 25) and a["locations"].shape == (M, 2)
    greedy = a["kind"] == 0
    assert (a["locations"][greedy, 0] == 6).all()
    steps = (a["locations"] >= 0).sum(1)
    assert steps.min() >= 1 and steps.max() <= cfg.scans - 1
    states = TeacherStates(tmp_path / "a", list(range(4)), data, S32)
    skip = S32.fully_observed(states.states(range(len(states))).mask)
    assert (a["eig"][skip] == 0).all() and (a["eig"][~skip] >= 0).all()
    y = states.get_batch([0, 1])
    assert y.dtype == torch.uint8 and y.shape == (2, 2, 32, 32) and set(y[:, 1].unique().tolist()) <= {0, 1}


def test_teacher_resume_with_other_settings_is_refused(tmp_path):
    data = Images(6)
    cfg = TeacherConfig(scans=2, n_images=3, off_policy=0, n_samples=2, shard_size=3)
    generate_teacher_data(tmp_path / "t", tiny_teacher(), data, cfg, {"avp": "x"}, _first, progress=False)
    with pytest.raises(UserError, match="n_samples"):
        generate_teacher_data(tmp_path / "t", tiny_teacher(), data, dataclasses.replace(cfg, n_samples=4), {"avp": "x"},
                              _first, progress=False)


# ---------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from boed.classifier import AVPClassifier, AVPConfig
    from ipa_core.config import get_config
    from ipa_core.ipa import IPA, IPAConfig

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    AVPClassifier(AVPConfig(arch="tiny", image_size=64, width=4, pool=2)).save_pretrained(root / "avp" / "model")
    IPA(IPAConfig.from_vae(dataclasses.replace(get_config("tiny"), shift=-127.5, scale=1 / 64))).save_pretrained(root / "ipa" / "model")
    return root


@pytest.fixture
def data64(monkeypatch):
    sets = {"train": Images(8, 64, 0), "test": Images(6, 64, 1)}
    for command in (run_cmd, train_policy_cmd):  # where the commands open the splits
        monkeypatch.setattr(command, "dataset_from_args", lambda args, split: sets[split])
    return sets


def cli(argv, capsys):
    from boed.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


@pytest.mark.slow
def test_train_policy_distill_end_to_end_then_run_policy(models, data64, tmp_path, capsys):
    out = tmp_path / "pol"
    argv = ["train-policy", "--method", "distill", "--ipa", str(models / "ipa"), "--avp", str(models / "avp"),
            "--out", str(out), "--scans", "2", "--teacher-images", "4", "--shard-size", "2", "--off-policy", "1",
            "--n-samples", "2", "--steps", "3", "--batch-size", "2", "--device", "cpu", "--no-progress"]
    for i in (0, 1):  # teacher data split over two workers; neither trains
        code, stdout, err = cli(argv + ["--shard", f"{i}/2"], capsys)
        assert code == 0 and "rerun without --shard" in stdout, err
        assert (out / "teacher" / f"shard-0000{i}.pt").is_file() and not (out / "model").exists()
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "teacher").glob("shard-*.pt")}
    code, stdout, err = cli(argv, capsys)
    assert code == 0, err
    assert "top-1 agreement" in stdout
    assert stamps == {p.name: p.stat().st_mtime_ns for p in (out / "teacher").glob("shard-*.pt")}  # reused, not redone
    assert sorted(p.name for p in (out / "teacher").glob("shard-*.pt")) == ["shard-00000.pt", "shard-00001.pt"]
    report = json.loads((out / "report.json").read_text())
    assert 0 <= report["top1_agreement"] <= 1 and report["eig_regret"] >= -1e-9 and report["tau"] > 0
    cfg = json.loads((out / "model" / "config.json").read_text())
    assert cfg["method"] == "distill" and cfg["illness"] == "Effusion" and cfg["image_size"] == 64 and cfg["grid"] == 17
    assert cfg["first_location"] == json.loads((out / "teacher" / "config.json").read_text())["first_location"]
    # boed run --policy: policy and EIG maps side by side
    scan = tmp_path / "scan"
    code, stdout, err = cli(["run", "--policy", str(out), "--ipa", str(models / "ipa"), "--avp", str(models / "avp"),
                             "--index", "1", "--scans", "2", "--n-samples", "2", "--out", str(scan)], capsys)
    assert code == 0, err
    rec = json.loads((scan / "scans.json").read_text())
    assert rec["method"] == "distilled" and len(rec["locations"]) == 2 and rec["locations"][0] == cfg["first_location"]
    assert all(s["eig"] is not None for s in rec["steps"])
    assert {"step_1.png", "step_2.png", "summary.png"} <= {p.name for p in scan.iterdir()}
    # a policy for another illness is refused before anything is written
    code, _, err = cli(["run", "--policy", str(out), "--illness", "edema", "--ipa", str(models / "ipa"), "--avp",
                        str(models / "avp"), "--index", "0", "--scans", "1", "--out", str(tmp_path / "no")], capsys)
    assert code == 2 and "trained for Effusion, not Edema" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize("extra, message", [
    (["--method", "dime"], "unknown --method 'dime'; choose one of distill, gdfs"),
    (["--method", "distill", "--ipa", "NOWHERE"], "the teacher needs an IPA model"),
    (["--method", "gdfs", "--avp", "NOWHERE"], "no AVP model at"),
    (["--method", "gdfs", "--arch", "vit"], "unknown --arch 'vit'"),
    (["--method", "distill", "--teacher-images", "99"], "exceeds the 8 training images"),
    (["--method", "distill", "--scans", "1"], "--scans must be >= 2"),
    (["--method", "gdfs", "--illness", "flu"], "unknown illness 'flu'"),
])
def test_train_policy_bad_input_is_one_line_and_writes_nothing(models, data64, tmp_path, capsys, extra, message):
    subst = {"NOWHERE": str(tmp_path / "nowhere")}
    args = {"--ipa": str(models / "ipa"), "--avp": str(models / "avp")}
    extra = [subst.get(a, a) for a in extra]
    for i in range(0, len(extra), 2):
        args[extra[i]] = extra[i + 1]
    out = tmp_path / "out"
    code, _, err = cli(["train-policy", *[a for kv in args.items() for a in kv], "--out", str(out), "--device", "cpu"], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


# ---------------------------------------------------------------- demo stage


def test_demo_policy_stages_parse_with_the_command_parser(tmp_path):
    import argparse

    from boed.amortised.demo import policy_stages, train_demo_policies
    from boed.commands import train_policy

    stages = policy_stages(tmp_path, ["effusion", "no finding"], "quick", scans=3, n_samples=4,
                           data_args=["--data", "phantom", "--image-size", 64])
    assert [s[0] for s in stages] == ["policy/effusion-distill", "policy/effusion-gdfs",
                                      "policy/no-finding-distill", "policy/no-finding-gdfs"]
    for name, cli_name, module, argv in stages:
        assert cli_name == "boed train-policy" and module == "boed.commands.train_policy"
        p = argparse.ArgumentParser()
        train_policy.configure(p)
        args = p.parse_args([str(a) for a in argv])
        assert args.method == name.rsplit("-", 1)[1] and args.scans == 3 and args.out.startswith(str(tmp_path / "policies"))
    with pytest.raises(UserError, match="no policy settings for demo profile"):
        policy_stages(tmp_path, ["effusion"], "huge", 3, 4, [])
    with pytest.raises(UserError, match="run `boed demo --out"):
        train_demo_policies(tmp_path / "nothing")


def test_run_policy_without_an_ipa_model_draws_policy_maps_only(models, data64, tmp_path, capsys):
    torch.manual_seed(0)
    pol = tmp_path / "gdfs"
    PolicyNet(PolicyConfig(method="gdfs", illness="edema", image_size=64, patch_size=16, grid=17, width=4)).save_pretrained(pol)
    scan = tmp_path / "scan"
    code, stdout, err = cli(["run", "--policy", str(pol), "--illness", "edema", "--ipa", str(tmp_path / "no-ipa"),
                             "--avp", str(models / "avp"), "--index", "2", "--scans", "3", "--out", str(scan)], capsys)
    assert code == 0, err
    rec = json.loads((scan / "scans.json").read_text())
    assert rec["method"] == "gdfs" and len(set(rec["locations"])) == 3
    assert all(s["eig"] is None and 0 < s["pi"] <= 1 for s in rec["steps"])
    assert {"step_1.png", "step_3.png", "summary.png"} <= {p.name for p in scan.iterdir()}
    code, _, err = cli(["run", "--policy", str(pol), "--illness", "edema", "--ipa", str(tmp_path / "no-ipa"),
                        "--avp", str(models / "avp"), "--index", "0", "--scans", "1", "--image-size", "32",
                        "--out", str(tmp_path / "no")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and not (tmp_path / "no").exists()


def test_teacher_config_refuses_a_split_that_validates_on_nothing():
    from boed.amortised.teacher import TeacherConfig, TeacherStates
    from xray.errors import UserError

    TeacherConfig(n_images=16, shard_size=8, val_shards=1).check_split()
    TeacherConfig(n_images=8, shard_size=8, val_shards=0).check_split()
    with pytest.raises(UserError, match="make 1 shard"):
        TeacherConfig(n_images=8, shard_size=8, val_shards=1).check_split()
    with pytest.raises(UserError, match="--val-shards must be >= 0"):
        TeacherConfig(val_shards=-1)
    assert TeacherStates.item_name == "states"
