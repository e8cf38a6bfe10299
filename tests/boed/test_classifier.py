import json

import pytest
import torch
import torchvision

from boed.classifier import AVPClassifier, AVPConfig, load_init
from boed.geometry import observe
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
    with pytest.raises(UserError, match=r"key 'net\.stem\.0\.weight' has shape"):
        AVPClassifier.from_pretrained(tmp_path / "a")


@pytest.mark.parametrize("arch,rgb", [("resnet18", False), ("resnet18", True), ("densenet121", True)])
def test_init_from_image_only_backbone_keeps_outputs(tmp_path, arch, rgb):
    """A widened image-only network gives the same logits whatever the mask channel holds."""
    torch.manual_seed(0)
    C_src = 3 if rgb else 1
    tv = getattr(torchvision.models, arch)(weights=None, num_classes=15)
    if not rgb:
        tv.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    torch.save(tv.state_dict(), tmp_path / "backbone.pt")
    avp = load_init(AVPClassifier(AVPConfig(arch=arch, image_size=32)), tmp_path / "backbone.pt")
    tv.eval(), avp.eval()
    x = torch.rand(2, 1, 32, 32)
    m = (torch.rand(2, 1, 32, 32) > 0.5).float()
    with torch.no_grad():
        ref = tv(x.expand(-1, C_src, -1, -1))
        torch.testing.assert_close(avp(torch.cat([x, m], 1)), ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(avp(torch.cat([x, torch.zeros_like(m)], 1)), ref, atol=1e-4, rtol=1e-4)


def test_init_skips_imagenet_head_and_rejects_wrong_backbone(tmp_path):
    tv = torchvision.models.resnet18(weights=None)  # 1000-way ImageNet head
    torch.save(tv.state_dict(), tmp_path / "r18.pt")
    avp = load_init(AVPClassifier(AVPConfig(arch="resnet18", image_size=32)), tmp_path / "r18.pt")
    torch.testing.assert_close(avp.net.layer1[0].conv1.weight, tv.layer1[0].conv1.weight)
    assert avp.net.fc.weight.shape == (15, 512)
    with pytest.raises(UserError, match="missing"):
        load_init(AVPClassifier(AVPConfig(arch="tiny", image_size=32)), tmp_path / "r18.pt")
    with pytest.raises(UserError, match=r"key 'layer4"):  # a truncated state dict
        sd = {k: v for k, v in tv.state_dict().items() if not k.startswith("layer4")}
        torch.save(sd, tmp_path / "partial.pt")
        load_init(AVPClassifier(AVPConfig(arch="resnet18", image_size=32)), tmp_path / "partial.pt")


def test_init_from_full_avp_checkpoint(tmp_path):
    src = AVPClassifier(AVPConfig(arch="tiny", image_size=32))
    src.save_pretrained(tmp_path / "run" / "model")
    dst = load_init(AVPClassifier(AVPConfig(arch="tiny", image_size=32)), tmp_path / "run")
    for a, b in zip(src.state_dict().values(), dst.state_dict().values()):
        torch.testing.assert_close(a, b)
    dst2 = load_init(AVPClassifier(AVPConfig(arch="tiny", image_size=32)), tmp_path / "run" / "model" / "model.safetensors")
    torch.testing.assert_close(dst2.net.head.weight, src.net.head.weight)
