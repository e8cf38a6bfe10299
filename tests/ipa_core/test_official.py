"""Parity with the official VD-VAE (Child 2020): names, shapes, forward math, loss, loading.

The reference below is an independent, functional transcription of the official code's forward
pass: NHWC images in, the official preprocessing, the decoder driven by a flat dict of tensors
with the official key names, the official discretized mixture of logistics loss (NHWC, params
unpacked by reshape as the official code does) and the official KL. Random weights (all of them
non-zero, unlike the model's init) are written as a ``module.``-prefixed ``-model.th`` state dict
and loaded with ``VAE.from_official``.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ipa_core import VAE, VAEConfig, get_config
from ipa_core.config import parse_layer_string
from ipa_core.vae import gaussian_kl
from xray.errors import UserError

torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------
# the reference: official structure (names, shapes) and forward math


def ref_parse(s: str) -> list[tuple[int, int | None]]:
    out = []
    for ss in s.split(","):
        if "x" in ss:
            res, num = ss.split("x")
            out += [(int(res), None)] * int(num)
        elif "m" in ss:
            a, b = ss.split("m")
            out.append((int(a), int(b)))
        elif "d" in ss:
            a, b = ss.split("d")
            out.append((int(a), int(b)))
        else:
            out.append((int(ss), None))
    return out


def ref_widths(cfg: VAEConfig) -> defaultdict:
    w = defaultdict(lambda: cfg.width)
    for part in filter(None, cfg.custom_width_str.split(",")):
        r, v = part.split(":")
        w[int(r)] = int(v)
    return w


def ref_shapes(cfg: VAEConfig) -> dict[str, tuple[int, ...]]:
    """Official state-dict keys and shapes (encoder, then decoder in registration order)."""
    widths, z = ref_widths(cfg), cfg.zdim
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name, cin, cout, k):
        shapes[f"{name}.weight"] = (cout, cin, k, k)
        shapes[f"{name}.bias"] = (cout,)

    def block(name, cin, mid, cout, use_3x3):
        k = 3 if use_3x3 else 1
        conv(f"{name}.c1", cin, mid, 1)
        conv(f"{name}.c2", mid, mid, k)
        conv(f"{name}.c3", mid, mid, k)
        conv(f"{name}.c4", mid, cout, 1)

    conv("encoder.in_conv", cfg.image_channels, widths[cfg.image_size], 3)
    for i, (res, _) in enumerate(ref_parse(cfg.enc_blocks)):
        w = widths[res]
        block(f"encoder.enc_blocks.{i}", w, int(w * cfg.bottleneck_multiple), w, res > 2)
    dec = ref_parse(cfg.dec_blocks)
    for i, (res, _) in enumerate(dec):
        w, cw = widths[res], int(widths[res] * cfg.bottleneck_multiple)
        p = f"decoder.dec_blocks.{i}"
        block(f"{p}.enc", 2 * w, cw, 2 * z, res > 2)
        block(f"{p}.prior", w, cw, 2 * z + w, res > 2)
        conv(f"{p}.z_proj", z, w, 1)
        block(f"{p}.resnet", w, cw, w, res > 2)
    for k, res in enumerate(r for r in sorted({r for r, _ in dec}) if r <= cfg.no_bias_above):
        shapes[f"decoder.bias_xs.{k}"] = (1, widths[res], res, res)
    per_mix = 10 if cfg.image_channels == 3 else 3
    # official: H.width; its forward only runs when widths[image_size] == width, so the model's
    # generalisation to a custom top width (tiny) uses widths[image_size]
    top = widths[cfg.image_size]
    conv("decoder.out_net.out_conv", top, cfg.num_mixtures * per_mix, 1)
    shapes["decoder.gain"] = (1, top, 1, 1)
    shapes["decoder.bias"] = (1, top, 1, 1)
    return shapes


def random_official_state(cfg: VAEConfig, seed: int = 0, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in ref_shapes(cfg).items():
        if k.endswith(".weight"):
            fan_in = math.prod(shape[1:])
            sd[k] = scale * torch.randn(shape, generator=g) / math.sqrt(fan_in)
        elif k == "decoder.gain":
            sd[k] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            sd[k] = 0.1 * torch.randn(shape, generator=g)
    return sd


def r_conv(P, name, x):
    w = P[f"{name}.weight"]
    return F.conv2d(x, w, P[f"{name}.bias"], stride=1, padding=1 if w.shape[-1] == 3 else 0)


def r_block(P, name, x, residual=False, down_rate=None):
    xhat = r_conv(P, f"{name}.c1", F.gelu(x))
    xhat = r_conv(P, f"{name}.c2", F.gelu(xhat))
    xhat = r_conv(P, f"{name}.c3", F.gelu(xhat))
    xhat = r_conv(P, f"{name}.c4", F.gelu(xhat))
    out = x + xhat if residual else xhat
    if down_rate is not None:
        out = F.avg_pool2d(out, kernel_size=down_rate, stride=down_rate)
    return out


def r_kl(mu1, mu2, logsigma1, logsigma2):
    return -0.5 + logsigma2 - logsigma1 + 0.5 * (logsigma1.exp() ** 2 + (mu1 - mu2) ** 2) / (logsigma2.exp() ** 2)


def r_dmol_loss(x, l, low_bit):
    """Official discretized_mix_logistic_loss: x (B,H,W,C) in [-1,1], l (B,H,W,P) -> (B,)."""
    xs, C = list(x.shape), x.shape[-1]
    nr_mix = l.shape[-1] // (10 if C == 3 else 3)
    logit_probs = l[..., :nr_mix]
    l = torch.reshape(l[..., nr_mix:], xs + [nr_mix * (3 if C == 3 else 2)])
    means = l[..., :nr_mix]
    log_scales = torch.clamp(l[..., nr_mix:2 * nr_mix], min=-7.0)
    x = torch.reshape(x, xs + [1]) + torch.zeros(xs + [nr_mix])
    if C == 3:
        coeffs = torch.tanh(l[..., 2 * nr_mix:3 * nr_mix])
        m2 = torch.reshape(means[:, :, :, 1, :] + coeffs[:, :, :, 0, :] * x[:, :, :, 0, :], xs[:3] + [1, nr_mix])
        m3 = torch.reshape(means[:, :, :, 2, :] + coeffs[:, :, :, 1, :] * x[:, :, :, 0, :] + coeffs[:, :, :, 2, :] * x[:, :, :, 1, :], xs[:3] + [1, nr_mix])
        means = torch.cat([torch.reshape(means[:, :, :, 0, :], xs[:3] + [1, nr_mix]), m2, m3], dim=3)
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    half = 1.0 / 31.0 if low_bit else 1.0 / 255.0
    plus_in = inv_stdv * (centered_x + half)
    min_in = inv_stdv * (centered_x - half)
    cdf_delta = torch.sigmoid(plus_in) - torch.sigmoid(min_in)
    log_cdf_plus = plus_in - F.softplus(plus_in)
    log_one_minus_cdf_min = -F.softplus(min_in)
    mid_in = inv_stdv * centered_x
    log_pdf_mid = mid_in - log_scales - 2.0 * F.softplus(mid_in)
    log_probs = torch.where(x < -0.999, log_cdf_plus, torch.where(
        x > 0.999, log_one_minus_cdf_min,
        torch.where(cdf_delta > 1e-5, torch.log(torch.clamp(cdf_delta, min=1e-12)),
                    log_pdf_mid - np.log(15.5 if low_bit else 127.5))))
    log_probs = log_probs.sum(dim=3) + torch.log_softmax(logit_probs, dim=-1)
    return -torch.logsumexp(log_probs, -1).sum(dim=[1, 2]) / np.prod(xs[1:])


def official_loss(P, cfg: VAEConfig, x_nhwc_u8: torch.Tensor, generator: torch.Generator) -> dict:
    """The official VAE.forward on the official preprocessing of uint8 NHWC images."""
    inp = x_nhwc_u8.float()
    out = inp.clone()
    inp = (inp + cfg.shift) * cfg.scale
    if cfg.low_bit:
        out = torch.floor(out * (1.0 / 8.0)) * 8.0
    out = (out + -127.5) * (1.0 / 127.5)
    widths = ref_widths(cfg)
    # encoder
    x = r_conv(P, "encoder.in_conv", inp.permute(0, 3, 1, 2).contiguous())
    acts = {x.shape[2]: x}
    for i, (res, down) in enumerate(ref_parse(cfg.enc_blocks)):
        x = r_block(P, f"encoder.enc_blocks.{i}", x, residual=True, down_rate=down)
        r = x.shape[2]
        if x.shape[1] != widths[r]:
            x = F.pad(x, (0, 0, 0, 0, 0, widths[r] - x.shape[1]))
        acts[r] = x
    # decoder
    n_bias = sum(1 for k in P if k.startswith("decoder.bias_xs."))
    xs = {P[f"decoder.bias_xs.{k}"].shape[2]: P[f"decoder.bias_xs.{k}"] for k in range(n_bias)}
    kls = []
    for i, (res, mixin) in enumerate(ref_parse(cfg.dec_blocks)):
        p = f"decoder.dec_blocks.{i}"
        a = acts[res]
        x = xs[res] if res in xs else torch.zeros_like(a)
        if a.shape[0] != x.shape[0]:
            x = x.repeat(a.shape[0], 1, 1, 1)
        if mixin is not None:
            x = x + F.interpolate(xs[mixin][:, :x.shape[1], ...], scale_factor=res // mixin)
        qm, qv = r_block(P, f"{p}.enc", torch.cat([x, a], dim=1)).chunk(2, dim=1)
        feats = r_block(P, f"{p}.prior", x)
        pm, pv, xpp = feats[:, :cfg.zdim], feats[:, cfg.zdim:2 * cfg.zdim], feats[:, 2 * cfg.zdim:]
        x = x + xpp
        eps = torch.randn(qm.shape, generator=generator)
        z = torch.exp(qv) * eps + qm
        kls.append(r_kl(qm, pm, qv, pv))
        x = x + r_conv(P, f"{p}.z_proj", z)
        xs[res] = r_block(P, f"{p}.resnet", x, residual=True)
    px_z = xs[cfg.image_size] * P["decoder.gain"] + P["decoder.bias"]
    l = r_conv(P, "decoder.out_net.out_conv", px_z).permute(0, 2, 3, 1)
    distortion = r_dmol_loss(out, l, cfg.low_bit)
    ndims = np.prod(inp.shape[1:])
    rate = torch.zeros_like(distortion)
    for kl in kls:
        rate += kl.sum(dim=(1, 2, 3))
    rate /= ndims
    return {"elbo": (distortion + rate).mean(), "distortion": distortion.mean(), "rate": rate.mean()}


# ----------------------------------------------------------------------------------------------


def small_cfg(channels: int, low_bit: bool = False) -> VAEConfig:
    return VAEConfig(image_size=16, image_channels=channels, width=16, zdim=4, num_mixtures=3, no_bias_above=8,
                     enc_blocks="16x1,16d2,8x1,8d2,4x2,4d4,1x1", dec_blocks="1x1,4m1,4x1,8m4,8x1,16m8,16x1",
                     shift=-110.0, scale=1 / 60.0, low_bit=low_bit)


def write_official(tmp_path, sd, name="vae-model.th"):
    path = tmp_path / name
    torch.save({f"module.{k}": v for k, v in sd.items()}, path)
    return path


@pytest.mark.parametrize("channels,low_bit", [(1, False), (3, False), (3, True)])
def test_loss_matches_official_forward(tmp_path, channels, low_bit):
    cfg = small_cfg(channels, low_bit)
    sd = random_official_state(cfg)
    model = VAE.from_official(write_official(tmp_path, sd), cfg)
    x = torch.randint(0, 256, (3, 16, 16, channels), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    x[0, :2, :2] = 0  # both edge bins present
    x[1, :2, :2] = 255
    with torch.no_grad():
        ours = model.loss(x.permute(0, 3, 1, 2).contiguous(), torch.Generator().manual_seed(7))
        ref = official_loss(sd, cfg, x, torch.Generator().manual_seed(7))
    for k in ("elbo", "distortion", "rate"):
        assert ref[k].item() > 0
        torch.testing.assert_close(ours[k], ref[k], rtol=1e-5, atol=1e-6)


def test_loss_matches_official_within_monte_carlo_error(tmp_path):
    cfg = small_cfg(1)
    sd = random_official_state(cfg, seed=3, scale=0.3)
    model = VAE.from_official(write_official(tmp_path, sd), cfg)
    x = torch.randint(0, 256, (2, 16, 16, 1), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    with torch.no_grad():
        ours = torch.stack([model.loss(x.permute(0, 3, 1, 2), torch.Generator().manual_seed(s))["elbo"] for s in range(20)])
        ref = torch.stack([official_loss(sd, cfg, x, torch.Generator().manual_seed(100 + s))["elbo"] for s in range(20)])
    assert ours.std() > 0  # the noise matters, so this is a real Monte-Carlo comparison
    se = math.sqrt((ours.var() + ref.var()).item() / 20)
    assert abs(ours.mean() - ref.mean()).item() < 4 * se + 1e-6


def test_official_checkpoint_names_and_shapes(tmp_path):
    for channels in (1, 3):
        cfg = small_cfg(channels)
        own = {k: tuple(v.shape) for k, v in VAE(cfg).state_dict().items()}
        assert own == ref_shapes(cfg)


def test_ema_file_without_prefix_loads(tmp_path):
    cfg = small_cfg(3)
    sd = random_official_state(cfg)
    path = tmp_path / "vae-model-ema.th"
    torch.save(sd, path)
    model = VAE.from_official(path, cfg)
    torch.testing.assert_close(model.state_dict()["decoder.gain"], sd["decoder.gain"])


def test_mismatched_shape_names_first_key(tmp_path):
    cfg = small_cfg(1)
    sd = random_official_state(cfg)
    sd["decoder.dec_blocks.2.z_proj.weight"] = torch.zeros(5, 4, 1, 1)
    with pytest.raises(UserError, match=r"decoder\.dec_blocks\.2\.z_proj\.weight.*shape"):
        VAE.from_official(write_official(tmp_path, sd), cfg)
    sd = random_official_state(small_cfg(3))  # an RGB checkpoint into a 1-channel model
    with pytest.raises(UserError, match=r"encoder\.in_conv\.weight"):
        VAE.from_official(write_official(tmp_path, sd, "rgb.th"), cfg)


def test_missing_and_truncated_checkpoint(tmp_path):
    cfg = small_cfg(1)
    sd = random_official_state(cfg)
    del sd["decoder.bias_xs.1"]
    with pytest.raises(UserError, match=r"decoder\.bias_xs\.1.*missing"):
        VAE.from_official(write_official(tmp_path, sd), cfg)
    path = write_official(tmp_path, random_official_state(cfg), "full.th")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated"):
        VAE.from_official(path, cfg)
    with pytest.raises(UserError, match="does not exist"):
        VAE.from_official(tmp_path / "nope.th", cfg)


def test_layer_string_parsing():
    assert parse_layer_string("32x2,32d2,4m1,1") == [(32, None), (32, None), (32, 2), (4, 1), (1, None)]
    for s in (get_config("ffhq256").enc_blocks, get_config("ffhq256").dec_blocks, get_config("cifar10").dec_blocks):
        assert parse_layer_string(s) == ref_parse(s)
    assert len(parse_layer_string(get_config("ffhq256").dec_blocks)) == 66
    with pytest.raises(UserError, match="bad layer string"):
        parse_layer_string("32x,16d2")
    with pytest.raises(UserError, match="enc_blocks start at resolution 16"):
        VAEConfig(image_size=32, enc_blocks="16x1,16d2,8x1")


@pytest.mark.parametrize("name,millions", [("cifar10", 39.2), ("imagenet64", 125.0), ("ffhq256", 114.9)])
def test_official_param_counts(name, millions):
    cfg = get_config(name)
    with torch.device("meta"):
        model = VAE(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert n == sum(math.prod(s) for s in ref_shapes(cfg).values())
    # published sizes, rounded to 0.1 M (cifar10 counts 39.15 M; the VD-VAE paper says "39M")
    assert abs(n / 1e6 - millions) < 0.06


def test_kl_known_answers():
    z = torch.zeros(())
    assert gaussian_kl(z, z, z, z).item() == 0.0
    assert gaussian_kl(torch.tensor(1.0), z, z, z).item() == pytest.approx(0.5)
    # sigma1 = e, sigma2 = 1: log(1/e) + e^2/2 - 1/2
    assert gaussian_kl(z, z, torch.tensor(1.0), z).item() == pytest.approx(-1 + math.e ** 2 / 2 - 0.5)
    g = torch.Generator().manual_seed(0)
    m1, m2, s1, s2 = (torch.randn(100, generator=g) for _ in range(4))
    want = torch.distributions.kl_divergence(torch.distributions.Normal(m1, s1.exp()), torch.distributions.Normal(m2, s2.exp()))
    torch.testing.assert_close(gaussian_kl(m1, m2, s1, s2), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gaussian_kl(m1, m2, s1, s2), r_kl(m1, m2, s1, s2))
