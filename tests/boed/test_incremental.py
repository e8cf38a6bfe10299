import pytest
import torch
from torch import nn

from boed.classifier import AVPClassifier, AVPConfig
from boed.geometry import ScanGeometry, observe
from boed.incremental import from_module, incremental_for
from boed.scoring import candidate_probs, fold_batchnorm, prepare_classifier
from xray.labels import NUM_LABELS, resolve_illness

CPU = torch.device("cpu")


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, so folding matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model


def tiny(S: int, seed: int = 0, **kw) -> AVPClassifier:
    torch.manual_seed(seed)
    clf = AVPClassifier(AVPConfig(arch="tiny", image_size=S, **kw))
    with torch.no_grad():  # a live mask channel (it starts at zero)
        clf.first_conv.weight[:, -1].normal_(0, 0.3)
    return _randomise_bn(clf, seed).eval()


def _masks(geo: ScanGeometry, g: torch.Generator) -> torch.Tensor:
    """Empty, a few scanned patches, and a free-form mask: ``(3, 1, S, S)``."""
    S = geo.image_size
    free = (torch.rand(1, 1, S // 4, S // 4, generator=g) < 0.3).float()
    free = nn.functional.interpolate(free, size=(S, S), mode="nearest")[0]  # (1, S, S) blocky blobs
    free[:, 3:7, 5:S - 2] = 1
    return torch.stack([geo.mask([]), geo.mask([0, geo.num_locations // 2 + 1, geo.num_locations - 1]), free])


def _full_logits(model: nn.Module, x: torch.Tensor, mask: torch.Tensor, geo: ScanGeometry) -> torch.Tensor:
    """Reference ``(B, L, N, K)``: the model on every candidate observation."""
    B, N, C, S, _ = x.shape
    pm = geo.patch_masks()  # (L, 1, S, S)
    out = []
    with torch.no_grad():
        for b in range(B):
            m = torch.maximum(mask[b], pm)[:, None]  # (L, 1, 1, S, S)
            xs = (x[b].float() / 255).expand(geo.num_locations, -1, -1, -1, -1)  # (L, N, C, S, S)
            y = observe(xs, m)  # (L, N, C + 1, S, S)
            out.append(model(y.reshape(-1, C + 1, S, S)).reshape(geo.num_locations, N, -1))  # (L, N, K)
    return torch.stack(out)


def _check_logits(model, geo, B=3, N=2, chunk=64, channels_last=True, seed=0, atol=1e-5):
    inc = from_module(model)
    assert inc is not None
    S = geo.image_size
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (B, N, model_in(model) - 1, S, S), dtype=torch.uint8, generator=g)
    mask = _masks(geo, g)[:B]
    L = geo.num_locations
    item_b, item_l = torch.arange(B).repeat_interleave(L), torch.arange(L).repeat(B)  # every candidate
    base, cand = inc.logits(x, mask, geo, item_b, item_l, chunk_size=chunk, channels_last=channels_last)
    ref = _full_logits(model, x, mask, geo)  # (B, L, N, K)
    assert cand.shape == (B * L, N, ref.shape[-1]) and base.shape == (B, N, ref.shape[-1])
    torch.testing.assert_close(cand.view(B, L, N, -1), ref, atol=atol, rtol=1e-5)
    with torch.no_grad():
        ref0 = model(observe(x.float() / 255, mask[:, None].expand(-1, N, -1, -1, -1)).flatten(0, 1)).view(B, N, -1)
    torch.testing.assert_close(base, ref0, atol=atol, rtol=1e-5)
    if B > 1:  # one image per block: same answer
        base1, cand1 = inc.logits(x, mask, geo, item_b, item_l, chunk_size=chunk, channels_last=channels_last, block_bytes=1)
        assert torch.allclose(base1, base, atol=1e-6) and torch.allclose(cand1, cand, atol=1e-6)
    assert (ref[:, 0] - ref[:, L // 2]).abs().max() > 1e-4  # candidates really differ
    return inc


@pytest.mark.parametrize("fold, channels_last, chunk", [(True, True, 1), (True, False, 50), (False, True, 4096)])
def test_tiny_s64_every_location_matches_full_forward(fold, channels_last, chunk):
    geo = ScanGeometry(64)
    model = prepare_classifier(tiny(64), CPU, channels_last=channels_last, fold_bn=fold)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules()) != fold
    inc = _check_logits(model, geo, chunk=chunk, channels_last=channels_last)
    # windows recomputed per layer: 9x9 of 32x32, 6x6 of 16, 4x4 of 8, 3x3 of 4 (8 %, 14 %, 25 %, 56 %)
    assert [st.win_hw for st in inc.plan(geo, CPU).steps[1:]] == [(9, 9), (6, 6), (4, 4), (3, 3)]


@pytest.mark.parametrize("S, grid, kw", [(32, 25, {}), (128, 17, {"width": 4})])
def test_tiny_other_sizes_match(S, grid, kw):
    geo = ScanGeometry(S, grid=grid)  # S = 32: stride 1 px, every alignment; S = 128: 8x8 map pooled to 4x4
    _check_logits(tiny(S, **kw), geo, B=2 if S == 32 else 1, N=2, chunk=300)


class _Chain(nn.Sequential):
    """A conv chain with odd kernels, strides, groups, asymmetric padding and several activations."""

    def __init__(self, c_in: int = 2):
        super().__init__(
            nn.Identity(),
            nn.Conv2d(c_in, 6, 5, 1, 2), nn.BatchNorm2d(6), nn.LeakyReLU(0.1),
            nn.Conv2d(6, 8, 3, 2, 1, groups=2), nn.SiLU(),
            nn.Conv2d(8, 8, 1), nn.GELU(),
            nn.Conv2d(8, 10, (3, 5), 2, (0, 2)), nn.Tanh(),
            nn.Conv2d(10, 12, 2, 2, 0, bias=False), nn.Hardswish(),
            nn.Conv2d(12, 12, 1, 2, 0), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(48, NUM_LABELS),
        )


def model_in(model: nn.Module) -> int:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels


@pytest.mark.parametrize("channels_last", [True, False])
def test_generic_sequential_chain_matches(channels_last):
    torch.manual_seed(1)
    model = _randomise_bn(_Chain(), 1).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    _check_logits(model, ScanGeometry(48, grid=13), B=3, N=2, chunk=33, channels_last=channels_last)


def test_leading_pointwise_layer_is_padded_after_it():
    torch.manual_seed(2)  # sigmoid(0) = 0.5: the first conv must still see zero padding
    model = nn.Sequential(nn.Sigmoid(), nn.Conv2d(2, 4, 3, 2, 1), nn.ReLU(), nn.Conv2d(4, 6, 3, 2, 1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)).eval()
    _check_logits(model, ScanGeometry(32, grid=5), B=2, N=3, chunk=20)


def test_unsupported_models_are_refused():
    assert from_module(prepare_classifier(AVPClassifier(AVPConfig(arch="resnet18", image_size=64)), CPU)) is None
    import torchvision

    assert from_module(torchvision.models.resnet18(weights=None)) is None
    conv = lambda: nn.Conv2d(2, 2, 3, padding=1)  # noqa: E731
    head = [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 3)]
    assert from_module(nn.Sequential(conv(), nn.ReLU(), *head)) is not None
    assert from_module(nn.Sequential(conv(), nn.MaxPool2d(2), conv(), *head)) is None  # non-pointwise middle layer
    assert from_module(nn.Sequential(conv(), nn.Conv2d(2, 2, 3, padding=2, dilation=2), *head)) is None
    assert from_module(nn.Sequential(conv(), nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), *head)) is None
    assert from_module(nn.Sequential(conv(), nn.BatchNorm2d(2), *head).train()) is None  # batch statistics
    assert from_module(nn.Sequential(*head)) is None  # no conv trunk

    class Custom(nn.Module):  # forward unknown: no sequential_layers()
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(conv(), *head)

        def forward(self, y):
            return self.net(y) * 2

    assert from_module(Custom()) is None


def test_candidate_probs_incremental_equals_full_path_with_skips():
    geo = ScanGeometry(64)
    model = prepare_classifier(tiny(64, seed=3), CPU)
    g = torch.Generator().manual_seed(5)
    B, N = 3, 3
    x = torch.randint(0, 256, (B, N, 1, 64, 64), dtype=torch.uint8, generator=g)
    mask = _masks(geo, g)
    ill = resolve_illness("no finding")
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))  # the full path calls forward
    for skip in (None, torch.rand(B, geo.num_locations, generator=g) < 0.3,
                 torch.ones(B, geo.num_locations, dtype=torch.bool)):
        calls.clear()
        fast = candidate_probs(model, x, mask, geo, ill, chunk_size=100, skip=skip)
        assert not calls  # the incremental path was taken
        full = candidate_probs(model, x, mask, geo, ill, chunk_size=100, skip=skip, incremental=False)
        assert calls
        torch.testing.assert_close(fast, full, atol=1e-6, rtol=0)
        sk = geo.fully_observed(mask) if skip is None else skip
        b, l = sk.nonzero()[0].tolist()
        with torch.no_grad():  # a skipped candidate gets the current observation's row
            cur = ill.prob(torch.sigmoid(model(observe(x[b].float() / 255, mask[b].expand(N, 1, -1, -1)))))
        torch.testing.assert_close(fast[b, l], cur, atol=1e-6, rtol=0)


def test_analysis_is_cached_per_model_and_refreshed_on_change():
    model = tiny(32)
    inc = incremental_for(model)
    assert inc is not None and incremental_for(model) is inc
    model.train()  # unfolded BN in train mode: refused
    assert incremental_for(model) is None
    fold_batchnorm(model.eval())  # modules replaced in place: analysed again, now without BN
    inc2 = incremental_for(model)
    assert inc2 is not None and inc2 is not inc
    assert not any(isinstance(m, nn.BatchNorm2d) for st in inc2.stages for m in st.post)
