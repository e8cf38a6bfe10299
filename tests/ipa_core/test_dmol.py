"""Discretized mixture of logistics: a normalised distribution over pixel values, sampling that
follows it, determinism for a generator."""

from __future__ import annotations

import math

import pytest
import torch

from ipa_core.dmol import DmolNet, to_uint8

torch.set_num_threads(1)


def head(channels=1, low_bit=False, mixtures=4, width=6, seed=0) -> tuple[DmolNet, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    net = DmolNet(width, mixtures, channels, low_bit)
    with torch.no_grad():
        net.out_conv.weight.copy_(torch.randn(net.out_conv.weight.shape, generator=g))
        net.out_conv.bias.copy_(torch.randn(net.out_conv.bias.shape, generator=g) * 0.5)
    h = torch.randn(1, width, 1, 1, generator=g)
    return net, h


def value_probs(net: DmolNet, h: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """p(value) for one 1x1 grayscale pixel, for each of ``values`` (uint8)."""
    x = (values.float() / 127.5 - 1).view(-1, 1, 1, 1)  # (V, 1, 1, 1)
    return torch.exp(-net.nll(h.expand(len(values), -1, -1, -1), x))  # 1 dim: nll = -log p


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_probabilities_sum_to_one_over_256_values(seed):
    net, h = head(seed=seed)
    with torch.no_grad():
        p = value_probs(net, h, torch.arange(256))
    assert p.min() >= 0
    assert p.sum().item() == pytest.approx(1.0, abs=2e-3)


def test_low_bit_probabilities_over_32_values():
    # official 5-bit form: targets floor(x/8)*8 (0..248), bins of half-width 1/31 around them.
    # The bins overlap by ~3 % and the top one ends at 248 (no edge bin up to 255), so with the
    # mass away from the top the total is 1 + ~3 %, as in the official code
    M = 4
    net = DmolNet(6, M, 1, low_bit=True)
    with torch.no_grad():
        net.out_conv.weight.zero_()
        net.out_conv.bias.copy_(torch.cat([torch.randn(M), torch.linspace(-0.6, 0.5, M), torch.full((M,), -2.5)]))
    h = torch.zeros(1, 6, 1, 1)
    with torch.no_grad():
        p = value_probs(net, h, torch.arange(0, 256, 8))
    assert 1.0 <= p.sum().item() < 1.04
    assert p.sum().item() == pytest.approx(2 / 31 / (8 / 127.5), abs=2e-3)


@pytest.mark.slow  # 16.7 M colours: ~1-2 min on 2 cores
def test_rgb_probabilities_sum_to_one_over_all_colours():
    # p(r, g, b) = sum_m pi_m p_m(r) p_m(g | r) p_m(b | r, g): summed over all 256^3 colours -> 1
    net, h = head(channels=3, mixtures=2, seed=4)
    v = torch.arange(256).float() / 127.5 - 1
    gb = torch.stack(torch.meshgrid(v, v, indexing="ij"), 0).flatten(1)  # (2, 65536) all (g, b)
    total = 0.0
    with torch.no_grad():
        for r in range(0, 256, 16):  # 16 red values per chunk
            rr = v[r:r + 16].repeat_interleave(gb.shape[1])  # (16 * 65536,)
            x = torch.stack([rr, gb[0].repeat(16), gb[1].repeat(16)], 1).view(-1, 3, 1, 1)
            total += torch.exp(-3 * net.nll(h.expand(len(x), -1, -1, -1), x).double()).sum().item()
    assert total == pytest.approx(1.0, abs=5e-3)


def test_samples_follow_the_probabilities():
    net, h = head(seed=3)
    with torch.no_grad():
        p = value_probs(net, h, torch.arange(256))
        s = net.sample(h.expand(20000, -1, -1, -1), torch.Generator().manual_seed(0)).flatten()
    freq = torch.bincount(s.long(), minlength=256).float() / len(s)
    tv = 0.5 * (freq - p / p.sum()).abs().sum().item()
    assert tv < 0.04


def test_samples_deterministic_for_a_generator():
    net, h = head(channels=3)
    hh = h.expand(64, -1, 4, 4).contiguous()
    a = net.sample(hh, torch.Generator().manual_seed(5))
    b = net.sample(hh, torch.Generator().manual_seed(5))
    c = net.sample(hh, torch.Generator().manual_seed(6))
    assert a.dtype == torch.uint8 and a.shape == (64, 3, 4, 4)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("channels", [1, 3])
def test_sample_picks_the_gumbel_max_component_of_every_channel(channels):
    """The gather-based component choice equals the textbook one-hot mixture selection bit for bit."""
    net, h = head(channels=channels, mixtures=5, seed=4)
    hh = h.expand(8, -1, 6, 6).contiguous() + torch.randn(8, h.shape[1], 6, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = net.sample(hh, torch.Generator().manual_seed(9))
        logits, means, log_scales, coeffs = net.params(hh)
        g = torch.Generator().manual_seed(9)  # the same draws, in the same order
        uni = lambda shape: torch.rand(shape, generator=g) * (1 - 2e-5) + 1e-5  # noqa: E731
        k = (logits - torch.log(-torch.log(uni(logits.shape)))).argmax(dim=1)  # (B, H, W)
        sel = torch.nn.functional.one_hot(k, 5).permute(0, 3, 1, 2).unsqueeze(1).float()  # (B, 1, M, H, W)
        mu, ls = (means * sel).sum(2), (log_scales * sel).sum(2)  # (B, C, H, W)
        u = uni(mu.shape)
        x = mu + ls.exp() * (torch.log(u) - torch.log1p(-u))
        if coeffs is not None:
            c = (coeffs * sel).sum(2)
            x0 = x[:, 0].clamp(-1, 1)
            x1 = (x[:, 1] + c[:, 0] * x0).clamp(-1, 1)
            x = torch.stack([x0, x1, (x[:, 2] + c[:, 1] * x0 + c[:, 2] * x1).clamp(-1, 1)], dim=1)
    assert torch.equal(got, to_uint8(x))


def test_edges_and_uint8_conversion():
    assert to_uint8(torch.tensor([-1.5, -1.0, 0.0, 1.0, 2.0])).tolist() == [0, 0, 128, 255, 255]
    net, h = head()
    with torch.no_grad():
        p = value_probs(net, h, torch.tensor([0, 255]))
    assert (p > 0).all() and (p < 1).all()
    # the mean image lies in [-1, 1]
    assert net.mean(h).abs().max() <= 1
    assert math.isfinite(net.nll(h, torch.zeros(1, 1, 1, 1)).item())
