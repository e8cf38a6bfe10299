"""boed/incremental/chain.py and graph.py: both engines give the full path's logits (known answers, wrong windows fail)."""

import logging

import pytest
import torch
from torch import nn

from boed.classifier import AVPClassifier, AVPConfig
from boed.geometry import ScanGeometry, observe
from boed.incremental import (MIN_SAVING, PatchIncrementalGraph, PatchIncrementalNet, from_module, graph_from_module,
                              incremental_for)
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


@pytest.mark.parametrize("kw", [{"mask_channel": False}, {"input_norm": "dataset", "norm_stats": ((0.4,), (0.2,))}])
def test_tiny_input_variants_stay_incremental(kw):
    """The classifier-table variants (mask hidden, dataset standardisation) keep patch-local scoring exact."""
    model = prepare_classifier(tiny(64, **kw), CPU)
    _check_logits(model, ScanGeometry(64), B=2, chunk=300)


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


def test_unsupported_models_are_refused(caplog):
    conv = lambda: nn.Conv2d(2, 2, 3, padding=1)  # noqa: E731
    head = [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 3)]
    assert isinstance(from_module(nn.Sequential(conv(), nn.ReLU(), *head)), PatchIncrementalNet)
    # a pooling layer inside the trunk: not a plain chain, but a graph
    assert isinstance(from_module(nn.Sequential(conv(), nn.MaxPool2d(2), conv(), *head)), PatchIncrementalGraph)
    caplog.set_level(logging.DEBUG, logger="boed.incremental")
    refused = {
        "dilation": nn.Sequential(conv(), nn.Conv2d(2, 2, 3, padding=2, dilation=2), *head),
        "reflect": nn.Sequential(conv(), nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), *head),
        "ceil": nn.Sequential(conv(), nn.MaxPool2d(2, ceil_mode=True), conv(), *head),
        "no conv": nn.Sequential(*head),
    }
    for why, model in refused.items():
        caplog.clear()
        assert from_module(model.eval()) is None, why
        assert any("full path" in r.getMessage() for r in caplog.records), why  # the reason is logged
    assert from_module(nn.Sequential(conv(), nn.BatchNorm2d(2), *head).train()) is None  # batch statistics
    assert from_module(AVPClassifier(AVPConfig(arch="resnet18", image_size=32)).train()) is None

    class Scaled(nn.Module):  # traceable forward around a trunk: windowed, the * 2 runs in the tail
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(conv(), *head)

        def forward(self, y):
            return self.net(y) * 2

    assert isinstance(from_module(Scaled()), PatchIncrementalGraph)

    class Checked(Scaled):  # untraceable forward (input check) that is not just .net: refused
        def forward(self, y):
            if y.shape[1] != 2:
                raise ValueError("two channels")
            return self.net(y) * 2

    caplog.clear()
    assert from_module(Checked()) is None
    assert any("traced .net" in r.getMessage() for r in caplog.records)


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


# ------------------------------------------------------------------ graphs (ResNet, DenseNet, ...)
def backbone(arch: str, S: int, seed: int = 0) -> AVPClassifier:
    """An AVP classifier with random weights, a live mask channel and non-trivial BN statistics."""
    torch.manual_seed(seed)
    clf = AVPClassifier(AVPConfig(arch=arch, image_size=S))
    with torch.no_grad():
        clf.first_conv.weight[:, -1].normal_(0, 0.3)
    return _randomise_bn(clf, seed).eval()


def _full_at(model: nn.Module, x: torch.Tensor, mask: torch.Tensor, geo: ScanGeometry, locs: torch.Tensor, chunk=64):
    """Reference logits ``(len(locs), N, K)`` of image 0 at the given locations, by full forwards."""
    _, N, C, S, _ = x.shape
    m = torch.maximum(mask[0], geo.patch_masks()[locs])[:, None]  # (l, 1, 1, S, S)
    y = observe((x[0].float() / 255).expand(len(locs), -1, -1, -1, -1), m).reshape(-1, C + 1, S, S)  # (l*N, C+1, S, S)
    with torch.no_grad():
        out = torch.cat([model(y[i:i + chunk].contiguous(memory_format=torch.channels_last)) for i in range(0, len(y), chunk)])
    return out.view(len(locs), N, -1)  # (l, N, K)


def _check_graph(model, geo, locs, N=1, channels_last=True, chunk=64, seed=0, inc=None, atol=1e-5):
    inc = inc or from_module(model)
    assert isinstance(inc, PatchIncrementalGraph)
    S = geo.image_size
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (1, N, 1, S, S), dtype=torch.uint8, generator=g)
    mask = _masks(geo, g)[1:2]  # three scanned patches
    base, cand = inc.logits(x, mask, geo, torch.zeros(len(locs), dtype=torch.long), locs, chunk_size=chunk,
                            channels_last=channels_last)
    ref = _full_at(model, x, mask, geo, locs)
    torch.testing.assert_close(cand, ref, atol=atol, rtol=1e-5)
    with torch.no_grad():
        ref0 = model(observe(x[0].float() / 255, mask[0].expand(N, -1, -1, -1)))  # (N, K)
    torch.testing.assert_close(base[0], ref0, atol=atol, rtol=1e-5)
    assert (ref - ref0).abs().max() > 1e-4  # candidates really differ from the current observation
    return inc


@pytest.mark.parametrize("arch, channels_last", [("resnet18", True), ("densenet121", False)])
def test_s64_every_location_matches_full_forward(arch, channels_last):
    geo = ScanGeometry(64)
    model = prepare_classifier(backbone(arch, 64), CPU, channels_last=channels_last)  # BN folded where it follows a conv
    inc = _check_graph(model, geo, torch.arange(geo.num_locations), channels_last=channels_last, chunk=100)
    sizes = dict((name, win) for name, win, _ in inc.window_sizes(geo))
    stem = "conv1" if arch == "resnet18" else "features_conv0"
    assert sizes[stem] == (11, 11)  # 16-px patch through a 7x7 stride-2 conv: (16 + 6) / 2 rounded up, of 32


@pytest.mark.parametrize("arch, channels_last, locs", [
    ("resnet18", False, [0, 150]),
    ("densenet121", True, [288]),
    pytest.param("resnet18", True, [16, 144, 272], marks=pytest.mark.slow),
    pytest.param("densenet121", False, [0, 144, 200], marks=pytest.mark.slow),
])
def test_s256_locations_match_full_forward(arch, channels_last, locs):
    geo = ScanGeometry(256)
    model = prepare_classifier(backbone(arch, 256, seed=1), CPU, channels_last=channels_last)
    inc = _check_graph(model, geo, torch.tensor(locs + [72]), channels_last=channels_last, chunk=40, atol=2e-5)
    assert inc.flops(geo)["ratio"] > 1.5  # the windows are a real saving at 256 px


@pytest.mark.parametrize("arch", ["resnet18", pytest.param("densenet121", marks=pytest.mark.slow)])
def test_wrong_window_sizes_fail(arch):
    geo = ScanGeometry(64)
    model = prepare_classifier(backbone(arch, 64), CPU)
    inc = from_module(model)
    locs = torch.tensor([0, 144, 288])
    _check_graph(model, geo, locs, inc=inc)
    name, win, hw = next(s for s in inc.window_sizes(geo)[2:] if s[1][0] < s[2][0] - 1)  # a conv in the first block
    node = next(i for i, v in enumerate(inc.nodes) if v.name == name)
    _check_graph(model, geo, locs, inc=graph_from_module(model, window_override={node: win[0] + 1}))  # larger: still exact
    with pytest.raises(AssertionError):
        _check_graph(model, geo, locs, inc=graph_from_module(model, window_override={node: win[0] - 1}))


class _Norm(nn.Module):
    """Pointwise input normalisation with buffers, as a wrapper may put in front of a backbone."""

    def __init__(self, c: int):
        super().__init__()
        self.register_buffer("mean", torch.linspace(0.2, 0.6, c).view(1, c, 1, 1))
        self.register_buffer("std", torch.linspace(0.5, 1.5, c).view(1, c, 1, 1))

    def forward(self, y):
        return (y - self.mean) / self.std + 0.1


class _Branchy(nn.Module):
    """Every supported piece: normalisation, max pool with padding, residual add with a strided
    1x1 downsample, a concatenation, avg pool with zero padding counted, in-place ReLUs."""

    def __init__(self):
        super().__init__()
        self.norm = _Norm(2)
        self.stem = nn.Sequential(nn.Conv2d(2, 6, 5, 2, 2), nn.BatchNorm2d(6), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        self.a = nn.Sequential(nn.Conv2d(6, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.Conv2d(8, 8, 3, 1, 1))
        self.down = nn.Conv2d(6, 8, 1, 2)
        self.b = nn.Sequential(nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3, 1, 1))
        self.pool = nn.AvgPool2d(3, 1, 1)
        self.head = nn.Linear(12, NUM_LABELS)

    def forward(self, y):
        h = self.stem(self.norm(y))
        h = torch.relu(self.a(h) + self.down(h))
        h = self.pool(torch.cat([h, self.b(h)], 1))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))


@pytest.mark.parametrize("channels_last", [True, False])
def test_branchy_graph_matches_every_location(channels_last):
    torch.manual_seed(3)
    model = _randomise_bn(_Branchy(), 3).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    geo = ScanGeometry(48, grid=13)
    inc = _check_graph(model, geo, torch.arange(geo.num_locations), N=3, channels_last=channels_last, chunk=50)
    kinds = [v.kind for v in inc.nodes]
    assert {"point", "merge", "cat", "pool"} <= set(kinds) and kinds.count("conv") == 5


def test_candidate_probs_takes_the_graph_path_for_resnet():
    geo = ScanGeometry(64)
    model = prepare_classifier(backbone("resnet18", 64, seed=4), CPU)
    g = torch.Generator().manual_seed(5)
    x = torch.randint(0, 256, (2, 1, 1, 64, 64), dtype=torch.uint8, generator=g)
    mask = _masks(geo, g)[:2]
    skip = torch.rand(2, geo.num_locations, generator=g) < 0.95  # few candidates: keep it fast
    ill = resolve_illness("no finding")
    fast = candidate_probs(model, x, mask, geo, ill, chunk_size=64, skip=skip, incremental="always")
    full = candidate_probs(model, x, mask, geo, ill, chunk_size=64, skip=skip, incremental=False)
    torch.testing.assert_close(fast, full, atol=1e-6, rtol=0)


def test_graph_windows_are_used_only_where_they_save_compute():
    """At 64 px ResNet-18's windows cover almost the whole map (the full path is faster); at 256 px
    they save about 1.85x: only there does the default choose them."""
    inc = from_module(prepare_classifier(backbone("resnet18", 64, seed=4), CPU))
    assert inc.flops(ScanGeometry(64))["ratio"] < MIN_SAVING and not inc.worthwhile(ScanGeometry(64))
    assert inc.flops(ScanGeometry(256))["ratio"] >= MIN_SAVING and inc.worthwhile(ScanGeometry(256))


def test_tracing_leaves_the_model_untouched():
    class Counting(nn.Module):  # a forward with a side effect: tracing must not store proxies in it
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                     nn.Linear(3, 2))
            self.inputs = 0

        def forward(self, y):
            self.inputs += y.shape[0]
            return self.net(y)

    model = Counting().eval()
    assert isinstance(from_module(model), PatchIncrementalGraph)
    assert model.inputs == 0 and type(model.inputs) is int
