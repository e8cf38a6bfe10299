import json
import socket
import sys
import types
import urllib.error

import numpy as np
import pytest
import torch
import torchvision

from boed.classifier import (IMAGENET_MEAN, IMAGENET_STD, AVPClassifier, AVPConfig, InitSpec, init_config, init_state,
                             load_init, parse_init)
from boed.amortised.network import PolicyConfig, PolicyNet
from boed.geometry import observe
from ipa_core.persist import CONFIG_NAME, PretrainedMixin
from xray.errors import UserError
from xray.labels import LABELS


def _inputs(B=3, S=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (B, 1, S, S), generator=g, dtype=torch.uint8)
    m = (torch.rand(B, 1, S, S, generator=g) > 0.5).float()
    return x, m


def test_tiny_forward_and_predict_proba_shapes():
    model = AVPClassifier(AVPConfig(arch="tiny", image_size=32))
    x, m = _inputs()
    logits = model(observe(x.float() / 255, m))
    assert logits.shape == (3, 15)
    p = model.predict_proba(x, m)
    assert p.shape == (3, 15) and p.dtype == torch.float32
    assert ((p > 0) & (p < 1)).all()
    assert model.label_names == tuple(LABELS)
    assert model.training  # predict_proba restores the mode
    # chunked inference equals one pass
    torch.testing.assert_close(model.predict_proba(x, m, chunk_size=2), p)


def test_predict_proba_uses_only_observed_pixels():
    model = AVPClassifier(AVPConfig(arch="tiny", image_size=32)).eval()
    x, m = _inputs()
    x2 = torch.where(m.bool(), x, 255 - x)  # differs only where unobserved
    torch.testing.assert_close(model.predict_proba(x, m), model.predict_proba(x2, m))


def test_channels_last_matches():
    torch.manual_seed(0)
    model = AVPClassifier(AVPConfig(arch="tiny", image_size=32)).eval()
    x, m = _inputs()
    p = model.predict_proba(x, m)
    model.set_channels_last(True)
    torch.testing.assert_close(model.predict_proba(x, m), p, atol=1e-5, rtol=1e-4)


def test_bad_input_shape_is_user_error():
    model = AVPClassifier(AVPConfig(arch="tiny", image_size=32))
    with pytest.raises(UserError, match=r"\(B, 2, S, S\)"):
        model(torch.zeros(2, 1, 32, 32))
    with pytest.raises(UserError):
        AVPConfig(arch="vgg")


@pytest.mark.parametrize("layout", ["model", "run"])
def test_save_load_round_trip(tmp_path, layout):
    torch.manual_seed(0)
    model = AVPClassifier(AVPConfig(arch="tiny", image_size=32, label_names=("a", "b")))
    with torch.no_grad():
        for b in model.modules():
            if isinstance(b, torch.nn.BatchNorm2d):
                b.running_mean.uniform_(-1, 1)  # buffers must round-trip too
    out = tmp_path / "run" / "model" if layout == "run" else tmp_path / "m"
    model.save_pretrained(out)
    assert json.loads((out / "config.json").read_text())["label_names"] == ["a", "b"]
    loaded = AVPClassifier.from_pretrained(tmp_path / "run" if layout == "run" else out)
    assert loaded.config == model.config and loaded.label_names == ("a", "b")
    x, m = _inputs()
    torch.testing.assert_close(loaded.predict_proba(x, m), model.eval().predict_proba(x, m))


def test_from_pretrained_missing_is_user_error(tmp_path):
    with pytest.raises(UserError, match="boed train-avp"):
        AVPClassifier.from_pretrained(tmp_path / "nope")


def test_mismatched_checkpoint_names_key(tmp_path):
    AVPClassifier(AVPConfig(arch="tiny", image_size=32, width=8)).save_pretrained(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    cfg["width"] = 4
    (tmp_path / "a" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "a" / "digest.json").unlink()  # unchecked, as a folder saved before digests (else: "damaged")
    with pytest.raises(UserError, match=r"key 'net\.stem\.0\.weight' has shape"):
        AVPClassifier.from_pretrained(tmp_path / "a")




# ---------------------------------------------------------------- pretrained initialisation (never downloads)


def _old_densenet_keys(sd):
    """torchvision's published DenseNet files use "norm.1"-style keys; write the test file that way."""
    import re

    return {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v for k, v in sd.items()}


def _randomise_bn(net):
    with torch.no_grad():
        for b in net.modules():
            if isinstance(b, torch.nn.BatchNorm2d):
                b.running_mean.uniform_(-0.5, 0.5)
                b.running_var.uniform_(0.5, 2.0)


def _with_head_of(ref, avp, head):
    """``ref`` with ``avp``'s freshly initialised 15-way head (the pretrained head is skipped on load)."""
    src = getattr(avp.net, head)
    setattr(ref, head, torch.nn.Linear(src.in_features, src.out_features))
    getattr(ref, head).load_state_dict(src.state_dict())
    return ref.eval()


@pytest.mark.parametrize("arch", ["resnet18", "densenet121"])
def test_imagenet_init_keeps_image_only_outputs(tmp_path, arch):
    """ImageNet weights + zero mask channel: the AVP-CNN computes the ImageNet network on the grey
    image replicated to RGB and ImageNet-normalised, whatever the mask channel holds."""
    torch.manual_seed(0)
    tv = getattr(torchvision.models, arch)(weights=None)  # 1000-way head, 3 input channels
    _randomise_bn(tv)
    sd = tv.state_dict()
    torch.save(_old_densenet_keys(sd) if arch == "densenet121" else sd, tmp_path / "imagenet.pth")
    init = parse_init("imagenet", arch, tmp_path / "imagenet.pth")
    avp = init_state(AVPClassifier(init_config(AVPConfig(arch=arch, image_size=32), init)), init).eval()
    assert avp.config.input_norm == "imagenet" and avp.first_conv.in_channels == 4
    head = "fc" if arch == "resnet18" else "classifier"
    ref = _with_head_of(tv, avp, head)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = torch.rand(2, 1, 32, 32)
    m = (torch.rand(2, 1, 32, 32) > 0.4).float()
    with torch.no_grad():
        full = ref((x.expand(-1, 3, -1, -1) - mean) / std)
        torch.testing.assert_close(avp(observe(x, torch.ones_like(m))), full, atol=1e-4, rtol=1e-4)
        part = ref((x.expand(-1, 3, -1, -1) - mean) / std * m)  # unobserved pixels = the ImageNet mean
        torch.testing.assert_close(avp(observe(x, m)), part, atol=1e-4, rtol=1e-4)
    for k, v in sd.items():  # every backbone weight but the head and the widened first conv came through
        if not k.startswith(head) and not k.endswith("num_batches_tracked") and k != f"{avp_first(arch)}.weight":
            torch.testing.assert_close(avp.net.state_dict()[k], v)


def avp_first(arch):
    return {"resnet18": "conv1", "densenet121": "features.conv0"}[arch]


def test_xrv_init_uses_xrv_scaling(tmp_path):
    """A torchxrayvision DenseNet-121 state dict (1 channel, 18 outputs, op_threshs buffer)."""
    torch.manual_seed(1)
    xrv_like = torchvision.models.densenet121(weights=None, num_classes=18)
    xrv_like.features.conv0 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    _randomise_bn(xrv_like)
    torch.save({**xrv_like.state_dict(), "op_threshs": torch.rand(18)}, tmp_path / "nih.pt")
    init = parse_init("xrv:densenet121-res224-nih", "densenet121", tmp_path / "nih.pt")
    avp = init_state(AVPClassifier(init_config(AVPConfig(arch="densenet121", image_size=32), init)), init).eval()
    assert avp.config.input_norm == "xrv" and avp.first_conv.in_channels == 2
    ref = _with_head_of(xrv_like, avp, "classifier")
    x = torch.rand(2, 1, 32, 32)
    m = (torch.rand(2, 1, 32, 32) > 0.4).float()
    with torch.no_grad():
        torch.testing.assert_close(avp(observe(x, m)), ref((2 * x - 1) * 1024 * m), atol=2e-3, rtol=1e-4)


def test_normalisation_is_saved_and_reproduced(tmp_path):
    torch.manual_seed(0)
    model = AVPClassifier(AVPConfig(arch="resnet18", image_size=32, input_norm="imagenet")).eval()
    plain = AVPClassifier(AVPConfig(arch="resnet18", image_size=32))
    assert set(model.state_dict()) == {k for k in plain.state_dict()}  # the norm adds no weights
    model.train_config = {"masks": {"patch_frac": 0.25}, "init": "imagenet"}
    model.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["input_norm"] == "imagenet" and cfg["train_config"]["init"] == "imagenet" and cfg["label_names"] == list(LABELS)
    loaded = AVPClassifier.from_pretrained(tmp_path / "m")
    assert loaded.config == model.config and loaded.train_config == model.train_config
    x, m = _inputs(S=32)
    torch.testing.assert_close(loaded.predict_proba(x, m), model.predict_proba(x, m))
    from boed.scoring import prepare_classifier  # BN folding and channels_last keep the normalisation

    fast = prepare_classifier(model, torch.device("cpu"))
    torch.testing.assert_close(fast.predict_proba(x, m), model.predict_proba(x, m), atol=1e-4, rtol=1e-3)


def test_input_norm_is_pointwise_and_tiny_stays_incremental():
    from boed.classifier import InputNorm
    from boed.incremental import from_module
    from boed.scoring import prepare_classifier

    norm = InputNorm(1, IMAGENET_MEAN, IMAGENET_STD)
    y = observe(torch.rand(1, 1, 8, 8), (torch.rand(1, 1, 8, 8) > 0.5).float())
    y2 = y.clone()
    y2[..., 3, 5] = torch.tensor([0.7, 1.0])
    diff = (norm(y2) - norm(y)).abs().sum(1)[0]  # (8, 8)
    assert diff[3, 5] > 0 and diff.sum() == diff[3, 5]  # only that pixel changes
    assert (norm(torch.zeros(1, 2, 4, 4)) == 0).all()  # no constant term: zero padding stays zero
    tiny = AVPClassifier(AVPConfig(arch="tiny", image_size=32))
    assert tiny.norm is None and from_module(prepare_classifier(tiny, torch.device("cpu"))) is not None
    with pytest.raises(UserError, match="not arch 'tiny'"):
        AVPConfig(arch="tiny", input_norm="imagenet")


def test_mask_channel_off_hides_the_mask_and_dataset_norm_standardises(tmp_path):
    """mask_channel=False: the output does not depend on the mask channel; input_norm "dataset":
    the training images' own mean and std (known answer), saved with the model."""
    from boed.classifier import dataset_norm_stats

    torch.manual_seed(0)
    hidden = AVPClassifier(AVPConfig(arch="tiny", image_size=32, mask_channel=False)).eval()
    with torch.no_grad():
        hidden.first_conv.weight.normal_()  # a live mask-channel weight: still hidden
    y = observe(torch.rand(2, 1, 32, 32), torch.ones(2, 1, 32, 32))
    y2 = y.clone()
    y2[:, 1] = torch.rand(2, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(hidden(y2), hidden(y))
        live = AVPClassifier(AVPConfig(arch="tiny", image_size=32))
        live.first_conv.weight.normal_()
        assert not torch.allclose(live.eval()(y2), live(y))
    imgs = torch.tensor([0, 255], dtype=torch.uint8).repeat(4).view(2, 1, 2, 2)  # half 0, half 1
    (mean,), (std,) = dataset_norm_stats(imgs)
    assert mean == pytest.approx(0.5) and std == pytest.approx(np.sqrt(8 / 7) / 2)
    model = AVPClassifier(AVPConfig(arch="tiny", image_size=32, input_norm="dataset", norm_stats=((0.25,), (0.5,))))
    out = model.norm(observe(torch.full((1, 1, 32, 32), 0.75), torch.ones(1, 1, 32, 32)))
    assert torch.allclose(out[:, 0], torch.ones(1, 32, 32))  # (0.75 - 0.25) / 0.5
    model.save_pretrained(tmp_path / "m")
    assert AVPClassifier.from_pretrained(tmp_path / "m").config.norm_stats == ((0.25,), (0.5,))
    with pytest.raises(UserError, match="goes with norm_stats"):
        AVPConfig(arch="tiny", input_norm="dataset")


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """Every download fails as it would offline (and nothing is read from a real cache)."""
    def refuse(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(socket.socket, "connect", lambda *a, **k: refuse())


def test_offline_downloads_fail_with_one_line_hint(no_network, monkeypatch):
    init = parse_init("imagenet", "resnet18")
    model = AVPClassifier(init_config(AVPConfig(arch="resnet18", image_size=32), init))
    with pytest.raises(UserError, match=r"cannot download the ImageNet weights of resnet18 .*--init imagenet --init-weights FILE") as e:
        init_state(model, init)
    assert "\n" not in str(e.value)
    xinit = parse_init("xrv:densenet121-res224-nih", "densenet121")
    dn = AVPClassifier(init_config(AVPConfig(arch="densenet121", image_size=32), xinit))
    monkeypatch.setitem(sys.modules, "torchxrayvision", None)  # not installed
    with pytest.raises(UserError, match=r"pip install torchxrayvision.*--init-weights FILE"):
        init_state(dn, xinit)

    def offline_get_model(name):
        raise ConnectionError(f"HTTPSConnectionPool(host='github.com'): Max retries exceeded ({name})")

    fake = types.SimpleNamespace(models=types.SimpleNamespace(get_model=offline_get_model))
    monkeypatch.setitem(sys.modules, "torchxrayvision", fake)
    with pytest.raises(UserError, match=r"cannot get the torchxrayvision weights densenet121-res224-nih .*--init-weights FILE"):
        init_state(dn, xinit)


def test_bad_init_is_user_error(tmp_path):
    cases = [
        (("xrv:densenet999", "densenet121", None), "unknown torchxrayvision weights"),
        (("xrv:densenet121-res224-nih", "resnet18", None), "pass --arch densenet121"),
        (("imagenet", "tiny", None), "no ImageNet weights for --arch tiny"),
        (("imagenet", "resnet18", tmp_path / "nope.pth"), "no such file"),
        (("scratch", "resnet18", tmp_path / "nope.pth"), "--init-weights"),
        (("imagnet", "resnet18", None), "is not one of scratch, imagenet"),
        (("scratch", "vgg16", None), "unknown --arch"),
    ]
    for (spec, arch, wf), msg in cases:
        with pytest.raises(UserError, match=msg):
            parse_init(spec, arch, wf)
    # a weights file of another architecture, a truncated one, a pickled whole model
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    init = parse_init("imagenet", "resnet50", tmp_path / "r18.pth")
    with pytest.raises(UserError, match=r"key 'layer1\.0\.conv1\.weight' has shape .*pass the --arch these weights were made for"):
        init_state(AVPClassifier(init_config(AVPConfig(arch="resnet50", image_size=32), init)), init)
    init = parse_init("imagenet", "densenet121", tmp_path / "r18.pth")
    with pytest.raises(UserError, match=r"does not match a densenet121 backbone: key 'features\.conv0\.weight' is missing"):
        init_state(AVPClassifier(init_config(AVPConfig(arch="densenet121", image_size=32), init)), init)
    sd = {k: v for k, v in torchvision.models.resnet18(weights=None).state_dict().items() if not k.startswith("layer4")}
    torch.save(sd, tmp_path / "partial.pth")
    init = parse_init("imagenet", "resnet18", tmp_path / "partial.pth")
    with pytest.raises(UserError, match=r"key 'layer4"):
        init_state(AVPClassifier(init_config(AVPConfig(arch="resnet18", image_size=32), init)), init)
    torch.save(torch.nn.Linear(2, 2), tmp_path / "pickled.pt")  # xrv's DenseNet release files are pickled modules
    init = parse_init("xrv:densenet121-res224-nih", "densenet121", tmp_path / "pickled.pt")
    with pytest.raises(UserError, match=r"cannot read weights .*state_dict\(\)"):
        init_state(AVPClassifier(init_config(AVPConfig(arch="densenet121", image_size=32), init)), init)
    with pytest.raises(UserError, match="without config.json"):
        parse_init(str(tmp_path / "r18.pth"), "resnet18")  # an image-only file is not an AVP model


def test_init_from_avp_run_keeps_its_normalisation(tmp_path):
    src = AVPClassifier(AVPConfig(arch="resnet18", image_size=32, input_norm="xrv"))
    src.save_pretrained(tmp_path / "run" / "model")
    init = parse_init(str(tmp_path / "run"), "resnet18")
    cfg = init_config(AVPConfig(arch="resnet18", image_size=32), init)
    assert cfg.input_norm == "xrv"
    dst = init_state(AVPClassifier(cfg), init)
    for a, b in zip(src.state_dict().values(), dst.state_dict().values()):
        torch.testing.assert_close(a, b)
    with pytest.raises(UserError, match="pass --arch resnet18"):
        init_config(AVPConfig(arch="densenet121", image_size=32), init)
    assert init.describe()["init_digest"]  # the source weights are named by digest in the provenance


def test_init_from_full_avp_checkpoint(tmp_path):
    src = AVPClassifier(AVPConfig(arch="tiny", image_size=32))
    src.save_pretrained(tmp_path / "run" / "model")
    dst = load_init(AVPClassifier(AVPConfig(arch="tiny", image_size=32)), tmp_path / "run")
    for a, b in zip(src.state_dict().values(), dst.state_dict().values()):
        torch.testing.assert_close(a, b)
    dst2 = load_init(AVPClassifier(AVPConfig(arch="tiny", image_size=32)), tmp_path / "run" / "model" / "model.safetensors")
    torch.testing.assert_close(dst2.net.head.weight, src.net.head.weight)


def test_save_load_through_the_mixin_keeps_train_config_and_refuses_other_kinds(tmp_path):
    for cls in (AVPClassifier, PolicyNet):
        assert issubclass(cls, PretrainedMixin) and "config_from_dir" not in vars(cls)
    torch.manual_seed(0)
    avp = AVPClassifier(AVPConfig(width=4))
    avp.train_config = {"masks": "random"}
    avp.save_pretrained(tmp_path / "avp")
    assert json.loads((tmp_path / "avp" / CONFIG_NAME).read_text())["train_config"] == {"masks": "random"}
    back = AVPClassifier.from_pretrained(tmp_path / "avp")
    assert back.train_config == {"masks": "random"} and not back.training
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in avp.state_dict().items())
    PolicyNet(PolicyConfig(width=4)).save_pretrained(tmp_path / "policy")
    assert not PolicyNet.from_pretrained(tmp_path / "policy").training
    with pytest.raises(UserError, match="expected 'avp-cnn'"):
        AVPClassifier.from_pretrained(tmp_path / "policy")


# ---------------------------------------------------------------- --arch encoder --init ipa:RUN | vae:RUN


@pytest.fixture(scope="module")
def vae_ipa(tmp_path_factory):
    """A tiny 64 px VAE and the IPA built on it (psi <- phi, then psi perturbed: it differs from phi)."""
    import dataclasses

    from ipa_core.config import get_config
    from ipa_core.ipa import IPA, IPAConfig
    from ipa_core.vae import VAE

    root = tmp_path_factory.mktemp("encoders")
    torch.manual_seed(0)
    cfg = dataclasses.replace(get_config("tiny"), shift=-100.0, scale=1 / 50)
    vae = VAE(cfg)
    vae.save_pretrained(root / "vae" / "model")
    ipa = IPA(IPAConfig.from_vae(cfg))
    with torch.no_grad():
        for p in ipa.part_encoder.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ipa.save_pretrained(root / "ipa" / "model")
    return root, vae, ipa


def _encoder_avp(spec):
    init = parse_init(spec, "encoder")
    return init_state(AVPClassifier(init_config(AVPConfig(arch="encoder", image_size=64), init)), init), init


def test_ipa_init_reads_cat_x_m_as_ipas_partial_encoder_does(vae_ipa):
    root, _, ipa = vae_ipa
    model, init = _encoder_avp(f"ipa:{root / 'ipa'}")
    assert model.config.input_norm == "vae" and model.net.res == 4 and init.describe()["init_digest"]
    x, m = _inputs(B=2, S=64)
    inp = (x.float() + ipa.config.shift) * ipa.config.scale  # the VAE's standardisation
    want = ipa.partial_acts(inp, m)[4]  # (B, W, 4, 4)
    got = model.net.encoder(model.norm(observe(x.float() / 255, m)))[4]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert model.predict_proba(x, m).shape == (2, len(LABELS))


def test_vae_init_is_phi_with_a_zero_mask_channel(vae_ipa):
    root, vae, _ = vae_ipa
    model, _ = _encoder_avp(f"vae:{root / 'vae'}")
    w = model.net.encoder.in_conv.weight  # (O, C + 1, 3, 3)
    torch.testing.assert_close(w[:, :1], vae.encoder.in_conv.weight)
    assert (w[:, 1:] == 0).all()
    x, m = _inputs(B=2, S=64)
    full = torch.ones_like(m)  # fully observed: the AVP's features are phi's
    want = vae.encoder((x.float() + vae.config.shift) * vae.config.scale)[4]
    torch.testing.assert_close(model.net.encoder(model.norm(observe(x.float() / 255, full)))[4], want, rtol=1e-5, atol=1e-5)


def test_encoder_avp_round_trips_without_its_source(vae_ipa, tmp_path):
    root, _, _ = vae_ipa
    model, _ = _encoder_avp(f"ipa:{root / 'ipa'}")
    model.save_pretrained(tmp_path / "avp")
    back = AVPClassifier.from_pretrained(tmp_path / "avp")  # config.json holds the encoder's fields
    x, m = _inputs(B=2, S=64)
    torch.testing.assert_close(back.predict_proba(x, m), model.predict_proba(x, m))


def test_encoder_init_refusals_are_one_line(vae_ipa, tmp_path):
    root, _, _ = vae_ipa
    for spec, arch, match in ((f"ipa:{root / 'ipa'}", "tiny", "--arch encoder"), ("scratch", "encoder", "--arch encoder"),
                              (f"ipa:{root / 'vae'}", "encoder", "holds a 'vae' model, expected 'ipa'"),
                              (f"vae:{tmp_path / 'none'}", "encoder", "does not exist")):
        with pytest.raises(UserError, match=match):
            parse_init(spec, arch)
    init = parse_init(f"ipa:{root / 'ipa'}", "encoder")
    with pytest.raises(UserError, match="pass --image-size 64"):
        init_config(AVPConfig(arch="encoder", image_size=32), init)
    with pytest.raises(UserError, match="--init ipa:RUN or vae:RUN"):
        AVPClassifier(AVPConfig(arch="encoder", image_size=64))
