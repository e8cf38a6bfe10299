"""IPA model: names, warm start (known answer KL = 0), frozen theta/phi, O_for / O_rev, save/load."""

from __future__ import annotations

import pytest
import torch

from ipa_core.config import VAEConfig
from ipa_core.ipa import IPA, IPAConfig, stable_gaussian_kl
from ipa_core.vae import VAE, gaussian_kl
from xray.errors import UserError

torch.set_num_threads(1)


def micro_config(**kw) -> VAEConfig:
    """A 16 px model with every kind of layer (mixins, downsampling, res 1) that runs in milliseconds."""
    return VAEConfig(image_size=16, image_channels=1, width=16, zdim=4, num_mixtures=3, custom_width_str="16:8",
                     enc_blocks="16x1,16d2,8x1,8d2,4x1,4d4,1x1", dec_blocks="1x1,4m1,4x1,8m4,8x1,16m8,16x1",
                     shift=-110.0, scale=1 / 60.0, **kw)


def micro_vae(seed: int = 0) -> VAE:
    """A VAE with random (non-degenerate) weights: zero-initialised convs get noise too."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():  # module init draws from the global RNG
        torch.manual_seed(seed)
        vae = VAE(micro_config())
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return vae.eval()


def images(B: int, seed: int = 1, S: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (B, 1, S, S), generator=g).to(torch.uint8)


def half_mask(B: int, S: int = 16) -> torch.Tensor:
    m = torch.zeros(B, 1, S, S)
    m[..., : S // 2, :] = 1
    return m


def test_names_shapes_and_frozen_parts():
    vae = micro_vae()
    ipa = IPA.from_vae(vae)
    sd = ipa.state_dict()
    assert set(vae.state_dict()) < set(sd)
    assert sd["part_encoder.in_conv.weight"].shape == (8, 2, 3, 3)  # image channel + mask channel
    assert sd["decoder.dec_blocks.0.part_enc.c1.weight"].shape[1] == 2 * 16  # cat(state, partial acts)
    assert sd["decoder.dec_blocks.6.part_enc.c4.weight"].shape[0] == 2 * 4  # mean and log sigma
    assert all(IPA.is_partial_name(k) for k in set(sd) - set(vae.state_dict()))
    assert all(not p.requires_grad for p in ipa.frozen_parameters())
    assert all(p.requires_grad for p in ipa.partial_parameters())
    ipa.requires_grad_(True).train()  # train() re-freezes theta/phi
    assert all(not p.requires_grad for p in ipa.frozen_parameters())
    assert ipa.vae_config == vae.config and type(ipa.vae_config) is VAEConfig
    for k, v in vae.state_dict().items():
        assert torch.equal(sd[k], v), k


def test_warm_start_full_observation_gives_exactly_zero_kl():
    ipa = IPA.from_vae(micro_vae())
    x = images(3)
    g = torch.Generator().manual_seed(0)
    kl_full = ipa.forward_kl(x, torch.ones(3, 1, 16, 16), g)
    assert torch.equal(kl_full, torch.zeros(3))
    kl_half = ipa.forward_kl(x, half_mask(3), g)
    assert (kl_half > 0).all()
    cold = IPA.from_vae(micro_vae(), warm_start=False)
    assert (cold.forward_kl(x, torch.ones(3, 1, 16, 16), g) > 0).all()


def test_stable_kl_matches_official_form():
    g = torch.Generator().manual_seed(0)
    a, b, c, d = (torch.randn(1000, generator=g) for _ in range(4))
    torch.testing.assert_close(stable_gaussian_kl(a, b, c, d), gaussian_kl(a, b, c, d), atol=1e-5, rtol=1e-5)
    assert torch.equal(stable_gaussian_kl(a, a, c, c), torch.zeros(1000))


def test_dmol_nll_map_sums_to_dmol_nll():
    vae = micro_vae()
    x = images(2)
    inp, target = vae.preprocess(x)
    h, _ = vae.decoder.run(2, vae.posterior_step(vae.encoder(inp), torch.Generator().manual_seed(0)))
    per_pixel = vae.decoder.out_net.nll_map(h, target)
    assert per_pixel.shape == (2, 16, 16)
    torch.testing.assert_close(per_pixel.sum(dim=(1, 2)) / 256, vae.decoder.out_net.nll(h, target))


@pytest.mark.parametrize("kind", ["forward", "reverse"])
def test_training_moves_only_psi_and_lowers_the_objective(kind):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        ipa = IPA.from_vae(micro_vae(), warm_start=False, objective=kind).train()
    frozen = {n: p.detach().clone() for n, p in ipa.named_parameters() if not IPA.is_partial_name(n)}
    psi0 = {n: p.detach().clone() for n, p in ipa.named_parameters() if IPA.is_partial_name(n)}
    opt = torch.optim.AdamW(ipa.partial_parameters(), lr=3e-3, weight_decay=0.01)
    x, m = images(4), half_mask(4)
    losses = []
    for step in range(25):
        g = torch.Generator().manual_seed(123)  # same noise every step: a deterministic objective
        out = ipa(x, m, g)
        opt.zero_grad()
        out["loss"].backward()
        if step == 0:
            assert all(p.grad is None for p in ipa.frozen_parameters())
            assert all(p.grad is not None for p in ipa.partial_parameters())
        opt.step()
        losses.append(float(out["loss"].detach()))
    for n, p in ipa.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"frozen parameter {n} changed"
    assert any(not torch.equal(p, psi0[n]) for n, p in ipa.named_parameters() if n in psi0)
    # O_rev is dominated by the NLL of random pixels, which psi cannot lower much
    assert losses[-1] < (0.2 if kind == "forward" else 0.99) * losses[0], losses


def test_reverse_objective_ignores_unobserved_pixels():
    ipa = IPA.from_vae(micro_vae(), objective="reverse")
    x, m = images(2), half_mask(2)
    x2 = x.clone()
    x2[..., 8:, :] = 255 - x2[..., 8:, :]  # change only unobserved pixels
    a = ipa.reverse_objective(x, m, torch.Generator().manual_seed(0))
    b = ipa.reverse_objective(x2, m, torch.Generator().manual_seed(0))
    torch.testing.assert_close(a["distortion"], b["distortion"])
    torch.testing.assert_close(a["rate"], b["rate"])
    c = ipa.reverse_objective(x, torch.ones_like(m), torch.Generator().manual_seed(0))
    assert (c["distortion"] > a["distortion"]).all()  # more observed pixels, more NLL terms


def test_save_load_round_trip_and_wrong_folders(tmp_path):
    vae = micro_vae()
    ipa = IPA.from_vae(vae, objective="reverse")
    ipa.save_pretrained(tmp_path / "ipa")
    back = IPA.from_pretrained(tmp_path / "ipa")
    assert isinstance(back.config, IPAConfig) and back.config == ipa.config and back.config.objective == "reverse"
    back_sd = back.state_dict()
    for k, v in ipa.state_dict().items():
        assert torch.equal(back_sd[k], v)
    assert all(not p.requires_grad for p in back.frozen_parameters())
    vae.save_pretrained(tmp_path / "vae")
    with pytest.raises(UserError, match="unconditional VAE"):
        IPA.from_pretrained(tmp_path / "vae")
    with pytest.raises(UserError, match="does not exist"):
        IPA.from_pretrained(tmp_path / "missing")
    other = IPA.from_vae(VAE(VAEConfig(**{**micro_config().to_dict(), "zdim": 5})))
    other.save_pretrained(tmp_path / "other")
    (tmp_path / "other" / "config.json").write_text((tmp_path / "ipa" / "config.json").read_text())
    (tmp_path / "other" / "digest.json").unlink()  # unchecked, as a folder saved before digests (else: "damaged")
    with pytest.raises(UserError, match="does not match"):
        IPA.from_pretrained(tmp_path / "other")
    with pytest.raises(UserError, match="IPA model"):
        IPA.from_vae(ipa)
    with pytest.raises(UserError, match="objective"):
        IPAConfig.from_vae(micro_config(), objective="sideways")


@pytest.mark.parametrize("kind", ["forward", "reverse"])
def test_checkpointing_gives_the_same_objective_and_gradients(kind):
    model = IPA.from_vae(micro_vae(), objective=kind).train()
    x, m = images(3), half_mask(3)

    def grads():
        model.zero_grad(set_to_none=True)
        loss = model.objective(x, m, torch.Generator().manual_seed(4))["loss"]
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss0, g0 = grads()
    model.set_checkpointing(True)
    assert model.checkpointing and all(b.checkpointing for b in model.part_encoder.enc_blocks)
    loss1, g1 = grads()
    assert torch.equal(loss0, loss1)
    assert g0.keys() == g1.keys() and all(IPA.is_partial_name(n) for n in g0) and len(g0) > 0
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-7, msg=n)
