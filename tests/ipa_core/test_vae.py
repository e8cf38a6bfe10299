"""The VAE: loss decomposition, gradients, sampling and temperature, save/load, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ipa_core import VAE, VAEConfig, get_config
from xray.errors import UserError

torch.set_num_threads(1)


def small(**kw) -> VAE:
    torch.manual_seed(0)
    cfg = VAEConfig(image_size=16, image_channels=1, width=16, zdim=4, num_mixtures=3, custom_width_str="16:8",
                    enc_blocks="16x1,16d2,8x1,8d2,4x1,4d4,1x1", dec_blocks="1x1,4m1,4x1,8m4,8x1,16m8",
                    shift=-128.0, scale=1 / 64.0, **kw)
    return VAE(cfg)


def images(n=4, size=16, seed=0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_loss_is_distortion_plus_rate_and_every_parameter_learns():
    model = small()
    out = model.loss(images(), torch.Generator().manual_seed(0))
    assert set(out) == {"elbo", "distortion", "rate"}
    assert out["elbo"].item() == pytest.approx(out["distortion"].item() + out["rate"].item(), rel=1e-6)
    assert out["rate"].item() >= 0 and out["distortion"].item() > 0
    out["elbo"].backward()
    # every parameter receives a gradient (DDP without find_unused_parameters relies on it)
    assert all(p.grad is not None for p in model.parameters())
    assert sum(p.grad.abs().sum() for p in model.parameters()) > 0


def test_official_init_prior_last_conv_is_zero():
    # official init: the prior starts at N(0, 1)
    model = small()
    assert torch.count_nonzero(model.decoder.dec_blocks[0].prior.c4.weight) == 0


def test_loss_noise_comes_from_the_generator():
    model = small()
    x = images()
    a = model.loss(x, torch.Generator().manual_seed(1))["elbo"]
    b = model.loss(x, torch.Generator().manual_seed(1))["elbo"]
    c = model.loss(x, torch.Generator().manual_seed(2))["elbo"]
    assert a.item() == b.item() and a.item() != c.item()


def test_sampling_temperature_and_determinism():
    model = small()
    with torch.no_grad():  # give the prior some spread so the temperature matters
        for b in model.decoder.dec_blocks:
            b.prior.c4.weight.normal_(0, 0.3)
    s1 = model.sample(6, t=1.0, generator=torch.Generator().manual_seed(0))
    s1b = model.sample(6, t=1.0, generator=torch.Generator().manual_seed(0))
    s05 = model.sample(6, t=0.5, generator=torch.Generator().manual_seed(0))
    assert s1.dtype == torch.uint8 and s1.shape == (6, 1, 16, 16)
    assert torch.equal(s1, s1b) and not torch.equal(s1, s05)
    # t = 0: every latent at the prior mean, so the decoder state is the same for every image
    h = [model.decoder.run(2, model.prior_step(0.0, torch.Generator().manual_seed(s)))[0] for s in (0, 1)]
    assert torch.equal(h[0], h[1]) and torch.equal(h[0][0], h[0][1])
    # per-layer temperatures
    n = len(model.decoder.dec_blocks)
    assert model.sample(2, t=[1.0] * n, generator=torch.Generator().manual_seed(0)).shape == (2, 1, 16, 16)
    with pytest.raises(UserError, match="per-layer temperatures"):
        model.sample(2, t=[1.0] * (n + 1))


def test_reconstruct_and_round_trip(tmp_path):
    model = small()
    x = images()
    r = model.reconstruct(x, torch.Generator().manual_seed(0))
    assert r.shape == x.shape and r.dtype == torch.uint8
    model.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["model_type"] == "vae" and cfg["shift"] == -128.0
    loaded = VAE.from_pretrained(tmp_path / "m")
    a = model.loss(x, torch.Generator().manual_seed(3))["elbo"]
    b = loaded.loss(x, torch.Generator().manual_seed(3))["elbo"]
    assert a.item() == b.item()
    with pytest.raises(UserError, match="does not exist"):
        VAE.from_pretrained(tmp_path / "missing")


def test_bad_input_is_a_user_error():
    model = small()
    with pytest.raises(UserError, match=r"expects \(B, 1, 16, 16\)"):
        model.loss(images(size=8))
    unset = VAE(VAEConfig(**{**small().config.to_dict(), "shift": None, "scale": None}))
    with pytest.raises(UserError, match="shift, scale"):
        unset.loss(images())
    with pytest.raises(UserError, match="unknown config"):
        get_config("huge")
    with pytest.raises(UserError, match="image_channels"):
        VAEConfig(image_channels=2)


def test_tiny_config_builds_and_runs():
    cfg = get_config("tiny")
    cfg.shift, cfg.scale = -128.0, 1 / 64.0
    model = VAE(cfg)
    out = model.loss(images(2, size=cfg.image_size))
    assert torch.isfinite(out["elbo"])
    assert get_config("tiny").shift is None  # named configs are copied, never mutated


def _grads(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_checkpointing_gives_the_same_loss_and_gradients():
    model = small()
    x = images()
    loss0, g0 = _grads(model, lambda: model.loss(x, torch.Generator().manual_seed(3))["elbo"])
    assert not model.checkpointing
    calls = []
    hook = torch.utils.checkpoint.checkpoint  # every residual block goes through torch.utils.checkpoint
    import ipa_core.vae as vae_mod

    vae_mod.checkpoint = lambda *a, **kw: calls.append(kw) or hook(*a, **kw)
    try:
        model.set_checkpointing(True)
        loss1, g1 = _grads(model, lambda: model.loss(x, torch.Generator().manual_seed(3))["elbo"])
    finally:
        vae_mod.checkpoint = hook
    # the encoder per resolution (here 16, 8, 4, 1), and inside it each block, in forward and again
    # when the segment is recomputed; per decoder layer the prior head, the posterior head (with
    # its concatenation) and the state update (which recomputes the prior's state residual), and
    # inside the update its two nested units (the prior's residual, the resnet), in forward and again
    # when the update is recomputed
    assert len(calls) == 4 + 2 * len(model.encoder.enc_blocks) + 7 * len(model.decoder.dec_blocks)
    assert all(kw == {"use_reentrant": False} for kw in calls)
    assert model.checkpointing and torch.equal(loss0, loss1)
    assert g0.keys() == g1.keys() and len(g0) == len(list(model.parameters()))
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-7, msg=n)
    with torch.no_grad():  # inference: nothing is recomputed
        calls.clear()
        model.loss(x, torch.Generator().manual_seed(3))
    assert not calls


def test_checkpointing_is_not_saved(tmp_path):
    model = small().set_checkpointing(True)
    model.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert "checkpointing" not in cfg
    assert not VAE.from_pretrained(tmp_path / "m").checkpointing


# --- checkpointing keeps less (ipa_core.lean) -------------------------------------------------


class _Storages(TorchDispatchMode):
    """Records (shape, storage) of every tensor an op makes."""

    def __init__(self):
        super().__init__()
        self.made = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.made += [(tuple(t.shape), t.untyped_storage().data_ptr())
                      for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out

    def storages(self, shape) -> int:
        return len({ptr for s, ptr in self.made if s == shape})


def test_checkpointed_head_never_makes_the_concatenation_in_backward():
    from ipa_core.vae import cat_block

    model = small().set_checkpointing(True)
    block = model.decoder.dec_blocks[-1]  # the 16 px layer: state and activations 8 channels each
    g = torch.Generator().manual_seed(4)
    x, acts = (torch.randn(2, 8, 16, 16, generator=g).requires_grad_() for _ in range(2))
    out = cat_block(block.enc, x, acts, True)  # (2, 2 * zdim, 16, 16)
    rec = _Storages()
    with rec:
        out.sum().backward()
    # the recompute makes the concatenation once (its GELU in place) and no gradient of its size
    # (autograd: the concatenation, its GELU and the gradients of both)
    assert rec.storages((2, 16, 16, 16)) == 1
    assert x.grad.shape == acts.grad.shape == (2, 8, 16, 16)
    assert x.grad.untyped_storage().nbytes() == acts.grad.untyped_storage().nbytes() == x.numel() * 4  # own storage each


def test_checkpointed_blocks_keep_less_for_backward():
    """A checkpointed block keeps per conv its pre-activation, not its GELU too, and nothing for
    its pooling: fewer bytes than autograd saves for the plain block, the same numbers."""
    model = small()
    block = model.encoder.enc_blocks[1]  # 16d2: residual and downsampling
    x = torch.randn(2, 8, 16, 16, generator=torch.Generator().manual_seed(5)).requires_grad_()

    def run() -> tuple[int, torch.Tensor, torch.Tensor]:
        n = []
        x.grad = None
        with torch.autograd.graph.saved_tensors_hooks(lambda t: n.append(t.untyped_storage().nbytes()) or t, lambda t: t):
            out = block._forward(x)
        out.backward(torch.ones_like(out))
        return sum(n), out.detach(), x.grad.clone()

    plain, out0, g0 = run()
    block.checkpointing = True
    lean, out1, g1 = run()
    assert lean < 0.6 * plain
    assert torch.equal(out1, out0)
    torch.testing.assert_close(g1, g0, rtol=1e-6, atol=1e-7)


def test_checkpointed_vae_gives_the_same_loss_and_gradients_with_the_output_conv():
    a, b = small(), small().set_checkpointing(True)
    assert b.decoder.out_net.checkpointing and not a.decoder.out_net.checkpointing
    x = images()
    la = a.loss(x, torch.Generator().manual_seed(5))["elbo"]
    lb = b.loss(x, torch.Generator().manual_seed(5))["elbo"]
    la.backward()
    lb.backward()
    assert torch.equal(la, lb)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-5, atol=1e-7, msg=n)


def test_decoder_run_upto_stops_without_the_output_map():
    model = small()
    n = len(model.decoder.dec_blocks)
    step = model.prior_step(1.0, torch.Generator().manual_seed(0))
    with torch.no_grad():
        h, stats = model.decoder.run(2, step, upto=n)
        h_full, stats_full = model.decoder.run(2, model.prior_step(1.0, torch.Generator().manual_seed(0)))
        h_part, stats_part = model.decoder.run(2, model.prior_step(1.0, torch.Generator().manual_seed(0)), upto=2)
    assert h is None and h_part is None and h_full.shape == (2, 8, 16, 16)
    assert len(stats) == len(stats_full) == n and len(stats_part) == 2


def test_checkpointing_under_bf16_autocast_gives_the_same_loss():
    """The lean pieces keep autocast's dtypes (a bf16 map plus an fp32 one is summed in fp32)."""
    def run(ck: bool):
        model = small().set_checkpointing(ck)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model.loss(images(), torch.Generator().manual_seed(1))["elbo"]
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    (l0, g0), (l1, g1) = run(False), run(True)
    assert torch.equal(l0, l1)
    for n in g0:  # bf16 backward: rounding of its 8-bit mantissa
        torch.testing.assert_close(g1[n], g0[n], rtol=5e-2, atol=1e-3, msg=n)
