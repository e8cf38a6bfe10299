"""IPA: a partial encoder c(z | y; psi) trained inside a frozen, pretrained VD-VAE (theta, phi).

Layout (names parallel the official IPA state dict; the VAE keys are unchanged)::

    part_encoder.in_conv, part_encoder.enc_blocks.{i}    # Encoder with image_channels + 1 inputs
    decoder.dec_blocks.{i}.part_enc.{c1..c4}              # Block(2*width -> 2*zdim) per layer

The partial input is ``y = cat(x_std * m, m)`` (standardised image times mask, mask as an extra
channel, m = 1 where observed). Layer l of c reads ``part_enc(cat(state, partial activations))``,
with the same decoder state the posterior head ``enc`` sees.

Objectives (per image, nats per dimension, minimise):

- ``O_for`` (IPA): z ~ q(z | x) layer by layer, sum of the analytic KL(q(z_l|.) || c(z_l|.)).
  The frozen encoder/decoder run under ``no_grad``; only the partial encoder and the heads see
  gradients, and the output network never runs.
- ``O_rev`` (IPA-R, appendix E): z ~ c (reparameterised), KL(c || p) plus the DMoL NLL of the
  observed pixels only.

>>> ipa = IPA.from_vae(VAE.from_pretrained("runs/vae"))   # doctest: +SKIP
>>> ipa.objective(x_u8, m, generator=g)["loss"]             # O_for on a masked batch
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from xray.errors import UserError

from .config import VAEConfig, load_config_json
from .persist import resolve_model_dir
from .vae import VAE, Block, DecBlock, Encoder, LatentStep, cat_block, gaussian_kl, sample_gaussian, split_cat_block

OBJECTIVES = ("forward", "reverse")


@dataclass
class IPAConfig(VAEConfig):
    """The VAE's config plus the IPA settings; ``objective`` is "forward" (IPA) or "reverse" (IPA-R)."""

    objective: str = "forward"

    def __post_init__(self):
        super().__post_init__()
        if self.objective not in OBJECTIVES:
            raise UserError(f"unknown IPA objective {self.objective!r}; expected one of {', '.join(OBJECTIVES)}")

    @property
    def vae_config(self) -> VAEConfig:
        names = {f.name for f in dataclasses.fields(VAEConfig)}
        return VAEConfig(**{k: v for k, v in self.to_dict().items() if k in names})

    @classmethod
    def from_vae(cls, cfg: VAEConfig, **ipa_fields) -> "IPAConfig":
        return cls(**{**dataclasses.asdict(cfg), **ipa_fields})


class IPA(VAE):
    """A VD-VAE with a partial encoder. theta and phi (everything the VAE had) are frozen.

    Use :meth:`from_vae` to start from a trained VAE, :meth:`from_pretrained` to load a trained IPA
    and :func:`ipa_core.sampling.sample_completions` to draw completions.
    """

    model_type = "ipa"
    config_class = IPAConfig

    def __init__(self, config: IPAConfig | VAEConfig):
        if not isinstance(config, IPAConfig):
            config = IPAConfig.from_vae(config)
        super().__init__(config)
        self.config: IPAConfig = config
        for p in self.parameters():  # theta, phi: frozen for good
            p.requires_grad_(False)
        self.part_encoder = Encoder(config, in_channels=config.image_channels + 1)
        for block in self.decoder.dec_blocks:
            width = block.widths[block.base]
            block.part_enc = Block(width * 2, int(width * config.bottleneck_multiple), config.zdim * 2,
                                   use_3x3=block.base > 2)

    # --- parameters ---------------------------------------------------------------------------
    @property
    def vae_config(self) -> VAEConfig:
        return self.config.vae_config

    @staticmethod
    def is_partial_name(name: str) -> bool:
        """True for psi (partial encoder and heads), False for theta/phi (the frozen VAE)."""
        return name.startswith("part_encoder.") or ".part_enc." in name

    def partial_parameters(self) -> list[nn.Parameter]:
        """psi: the only parameters IPA trains."""
        return [p for n, p in self.named_parameters() if self.is_partial_name(n)]

    def frozen_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not self.is_partial_name(n)]

    def train(self, mode: bool = True) -> "IPA":
        super().train(mode)
        for p in self.frozen_parameters():  # guard against a caller unfreezing everything
            p.requires_grad_(False)
        return self

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def from_vae(cls, vae: VAE, warm_start: bool = True, objective: str = "forward") -> "IPA":
        """An IPA around a copy of ``vae``'s weights.

        ``warm_start`` initialises psi from phi: the partial encoder copies the encoder (the weights
        of the new mask channel are zero) and each ``part_enc`` copies ``enc``, so with the whole
        image observed c equals q at the start.
        """
        if isinstance(vae, IPA):
            raise UserError("from_vae got an IPA model; pass the unconditional VAE it was built on")
        model = cls(IPAConfig.from_vae(vae.config, objective=objective))
        missing, unexpected = model.load_state_dict(vae.state_dict(), strict=False)
        assert not unexpected and all(cls.is_partial_name(k) for k in missing), (missing, unexpected)
        model.to(vae.decoder.gain.device)
        if warm_start:
            model.warm_start()
        return model

    @torch.no_grad()
    def warm_start(self) -> None:
        """psi <- phi (mask-channel weights of ``part_encoder.in_conv`` set to zero)."""
        C = self.config.image_channels
        src, dst = self.encoder.state_dict(), self.part_encoder.state_dict()
        for k, v in src.items():
            if k == "in_conv.weight":
                dst[k].zero_()
                dst[k][:, :C] = v  # (W, C+1, 3, 3): image channels copied, mask channel zero
            else:
                dst[k].copy_(v)
        for block in self.decoder.dec_blocks:
            block.part_enc.load_state_dict(block.enc.state_dict())


    # --- the partial encoder ------------------------------------------------------------------
    def check_mask(self, m: Tensor, x: Tensor) -> Tensor:
        """``m (B, 1, S, S)`` matching ``x (B, C, S, S)`` -> float32 on the model's device."""
        if m.dim() != 4 or m.shape[1] != 1 or m.shape[0] != x.shape[0] or m.shape[-2:] != x.shape[-2:]:
            raise UserError(f"mask of shape {tuple(m.shape)} given; expected (B, 1, S, S) = {(x.shape[0], 1, *x.shape[-2:])}")
        return m.to(self.decoder.gain.device, torch.float32)

    def partial_acts(self, inp: Tensor, m: Tensor,
                     memory_format: torch.memory_format = torch.contiguous_format) -> dict[int, Tensor]:
        """Partial-encoder activations ``{res: (B, W_res, res, res)}`` of ``y = cat(inp * m, m)``
        (``memory_format``: of ``y``; the convolutions keep it)."""
        return self.part_encoder(torch.cat([inp * m, m], dim=1).contiguous(memory_format=memory_format))  # input (B, C+1, S, S)

    @staticmethod
    def conditional(block: DecBlock, x: Tensor, pacts: dict[int, Tensor]) -> tuple[Tensor, Tensor]:
        """c(z_l | z<l, y): mean and log sigma from ``part_enc(cat(state, partial activations))``."""
        return cat_block(block.part_enc, x, pacts[block.base], block.checkpointing).chunk(2, dim=1)

    def partial_step(self, pacts: dict[int, Tensor], t: float | Sequence[float] | None = 1.0,
                     generator: torch.Generator | None = None, kl_to_prior: bool = False,
                     shares: Sequence[Tensor] | None = None) -> LatentStep:
        """z ~ c(z_l | z<l, y) at temperature t (multiplies sigma; t = 0 takes the mean).

        With ``kl_to_prior`` the step also returns ``stats['kl']`` = KL(c || p) ``(B, zdim, r, r)``.
        ``shares`` (sampling): instead of ``pacts``, per layer the share of the partial activations
        in its ``part_enc``'s c1 (:func:`ipa_core.vae.c1_share`, computed once per image by the
        caller; :func:`ipa_core.vae.split_cat_block`). On NHWC states the latent is then drawn on an
        NCHW copy of c's parameters (an elementwise op over a channel slice of NHWC maps runs several
        times slower) and returned NHWC.
        """

        def step(i, block, x, pm, pv):
            nhwc = False
            if shares is not None:
                out = split_cat_block(block.part_enc, x, shares[i])  # (n, 2 zdim, r, r)
                nhwc = not out.is_contiguous()
                cm, cv = out.contiguous().chunk(2, dim=1)  # (n, zdim, r, r) each
            else:
                cm, cv = self.conditional(block, x, pacts)
            stats = {"kl": gaussian_kl(cm.float(), pm.float(), cv.float(), pv.float())} if kl_to_prior else {}
            ti = t[i] if isinstance(t, (list, tuple)) else t
            if ti == 0:
                z = cm
            else:
                if ti is not None and ti != 1.0:
                    cv = cv + math.log(ti)
                z = sample_gaussian(cm, cv, generator)
            return (z.contiguous(memory_format=torch.channels_last) if nhwc else z), stats

        return step

    # --- objectives ---------------------------------------------------------------------------
    def forward_kl(self, x: Tensor, m: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """O_for per image: sum over layers of KL(q || c) / (C*H*W), shape ``(B,)``.

        Only psi receives gradients: the encoder and the decoder path (which depends on z ~ q
        alone) run under ``no_grad``, and the output network is skipped.
        """
        m = self.check_mask(m, x)
        return self.forward_kl_given(self.posterior_path(x, generator), x, m)

    @torch.no_grad()
    def posterior_path(self, x: Tensor, generator: torch.Generator | None = None) -> list[tuple[Tensor, Tensor, Tensor]]:
        """The frozen half of O_for: per decoder layer (state, q mean, q log sigma) along z ~ q(z | x).
        It does not depend on the mask: :meth:`forward_kl_given` scores any number of masks on it."""
        inp, _ = self.preprocess(x)
        acts = self.encoder(inp)
        layers: list[tuple[Tensor, Tensor, Tensor]] = []  # per layer (state, q mean, q log sigma)

        def step(i, block, h, pm, pv):
            qm, qv = block.posterior(h, acts[block.base])
            layers.append((h, qm, qv))
            return sample_gaussian(qm, qv, generator), {}

        self.decoder.run(x.shape[0], step, upto=len(self.decoder.dec_blocks))  # every layer, no output map (0.25 GB at 256 px)
        return layers

    def forward_kl_given(self, layers: list[tuple[Tensor, Tensor, Tensor]], x: Tensor, m: Tensor) -> Tensor:
        """O_for per image ``(B,)`` on the :meth:`posterior_path` ``layers`` of ``x`` and the mask ``m``."""
        m = self.check_mask(m, x)
        inp, _ = self.preprocess(x)
        pacts = self.partial_acts(inp, m)
        kl = x.new_zeros(x.shape[0], dtype=torch.float32, device=inp.device)
        for block, (h, qm, qv) in zip(self.decoder.dec_blocks, layers):
            cm, cv = self.conditional(block, h, pacts)
            # float32: under bf16 autocast the KL of nearby Gaussians would cancel catastrophically
            kl = kl + stable_gaussian_kl(qm.float(), cm.float(), qv.float(), cv.float()).sum(dim=(1, 2, 3))
        return kl / math.prod(x.shape[1:])

    def reverse_objective(self, x: Tensor, m: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """O_rev per image (IPA-R): ``rate`` = sum KL(c || p), ``distortion`` = NLL of observed pixels, both / (C*H*W)."""
        m = self.check_mask(m, x)
        inp, target = self.preprocess(x)
        pacts = self.partial_acts(inp, m)
        h, affine, stats = self.decoder.run_for_likelihood(x.shape[0], self.partial_step(pacts, 1.0, generator, kl_to_prior=True))
        ndims = math.prod(x.shape[1:])
        nll = self.decoder.out_net.nll_map(h, target, affine)  # (B, H, W)
        distortion = (nll * m[:, 0]).sum(dim=(1, 2)) / ndims
        rate = sum(s["kl"].sum(dim=(1, 2, 3)) for s in stats) / ndims
        return {"distortion": distortion, "rate": rate}

    def objective(self, x: Tensor, m: Tensor, generator: torch.Generator | None = None,
                  kind: str | None = None) -> dict[str, Tensor]:
        """The training loss of ``kind`` (default: ``config.objective``), batch means.

        Returns ``loss`` (minimise) and its parts: ``kl`` for O_for; ``rate``, ``distortion`` for O_rev.
        """
        kind = kind or self.config.objective
        if kind == "forward":
            kl = self.forward_kl(x, m, generator).mean()
            return {"loss": kl, "kl": kl}
        if kind == "reverse":
            parts = {k: v.mean() for k, v in self.reverse_objective(x, m, generator).items()}
            return {"loss": parts["rate"] + parts["distortion"], **parts}
        raise UserError(f"unknown IPA objective {kind!r}; expected one of {', '.join(OBJECTIVES)}")

    def forward(self, x: Tensor, m: Tensor, generator: torch.Generator | None = None, kind: str | None = None) -> dict[str, Tensor]:
        """The IPA training objective (so that a DDP wrapper syncs psi); the VAE ELBO stays :meth:`loss`."""
        return self.objective(x, m, generator, kind)

    # --- persistence --------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, map_location: str | torch.device = "cpu") -> "IPA":
        d = resolve_model_dir(path)
        kind = load_config_json(d / "config.json").get("model_type")
        if kind == "vae":
            raise UserError(f"{d} holds an unconditional VAE, not an IPA model; train IPA on it first (ipa_core train --stage ipa) and pass that run")
        return super().from_pretrained(d, map_location)


def stable_gaussian_kl(mu1: Tensor, mu2: Tensor, logsigma1: Tensor, logsigma2: Tensor) -> Tensor:
    """KL(N(mu1, s1^2) || N(mu2, s2^2)) elementwise, arranged so that equal arguments give exactly 0.

    Same value as :func:`ipa_core.vae.gaussian_kl`; the official ordering ``-0.5 + s2 - s1 + ...``
    rounds to about 1e-8 per element when q = c, which would hide the warm-start known answer.
    """
    return (logsigma2 - logsigma1) + 0.5 * (torch.exp(2 * (logsigma1 - logsigma2)) + ((mu1 - mu2) * torch.exp(-logsigma2)) ** 2) - 0.5
