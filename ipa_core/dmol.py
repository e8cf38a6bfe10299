"""Discretized mixture of logistics (PixelCNN++ / VD-VAE) over images in [-1, 1], in NCHW.

One channel natively (per mixture: logit, mean, log scale), or the official RGB form (per mixture:
logit, then per colour mean, log scale and a tanh coefficient that couples colours c to c' < c).
The RGB parameter layout equals the official one, so ``out_conv`` weights load unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .lean import AffineConv, lean_conv
from .seeding import draw


class DmolNet(nn.Module):
    def __init__(self, width: int, num_mixtures: int, channels: int = 1, low_bit: bool = False):
        super().__init__()
        self.num_mixtures, self.channels, self.low_bit = num_mixtures, channels, low_bit
        per_mix = 10 if channels == 3 else 3
        self.out_conv = nn.Conv2d(width, num_mixtures * per_mix, 1)
        nn.init.zeros_(self.out_conv.bias)

    checkpointing = False  # memory-bound training (VAE.set_checkpointing): out_conv through ipa_core.lean

    def params(self, h: Tensor, affine: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Mixture logits (B, M, H, W); means, log scales (B, C, M, H, W); colour coeffs (B, 3, M, H, W) or None.

        ``affine`` ``(gain, bias)``: ``h`` is the decoder's last state, its output map is
        ``h * gain + bias`` (checkpointing: :meth:`ipa_core.vae.Decoder.run_for_likelihood`)."""
        M, C = self.num_mixtures, self.channels
        # the likelihood in fp32 even under autocast; checkpointing, the conv's backward keeps and
        # makes less (ipa_core.lean: 0.125 GB each at 256 px)
        if affine is not None:
            l = AffineConv.apply(h, *affine, self.out_conv.weight, self.out_conv.bias)
        elif self.checkpointing:
            l = lean_conv(self.out_conv, h, gelu=False)
        else:
            l = self.out_conv(h)
        l = l.float()
        B, _, H, W = l.shape
        logits = l[:, :M]
        if C == 1:
            means, log_scales = l[:, M:2 * M].unsqueeze(1), l[:, 2 * M:3 * M].unsqueeze(1)  # (B, 1, M, H, W)
            coeffs = None
        else:
            p = l[:, M:].reshape(B, 3, 3, M, H, W)  # (B, colour, {mean, log scale, coeff}, M, H, W)
            means, log_scales, coeffs = p[:, :, 0], p[:, :, 1], torch.tanh(p[:, :, 2])
        return logits, means, log_scales.clamp(min=-7.0), coeffs

    @staticmethod
    def _coupled_means(means: Tensor, coeffs: Tensor | None, x: Tensor) -> Tensor:
        """RGB: mean of G depends on R, of B on R and G (official autoregressive colour coupling)."""
        if coeffs is None:
            return means
        x = x.unsqueeze(2)  # (B, 3, 1, H, W)
        m1 = means[:, 1] + coeffs[:, 0] * x[:, 0]
        m2 = means[:, 2] + coeffs[:, 1] * x[:, 0] + coeffs[:, 2] * x[:, 1]
        return torch.stack([means[:, 0], m1, m2], dim=1)  # (B, 3, M, H, W)

    def nll(self, h: Tensor, x: Tensor, affine: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Negative log-likelihood per dimension of targets ``x (B, C, H, W)`` in [-1, 1] -> ``(B,)``."""
        return self.nll_map(h, x, affine).sum(dim=(1, 2)) / math.prod(x.shape[1:])  # (B,)

    def nll_map(self, h: Tensor, x: Tensor, affine: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Per-pixel negative log-likelihood ``(B, H, W)``, summed over channels (O_rev needs the
        likelihood of the observed pixels alone)."""
        logits, means, log_scales, coeffs = self.params(h, affine)
        means = self._coupled_means(means, coeffs, x)
        half_bin, log_bins = (1.0 / 31.0, math.log(15.5)) if self.low_bit else (1.0 / 255.0, math.log(127.5))
        xc = x.unsqueeze(2) - means  # (B, C, M, H, W)
        inv_s = torch.exp(-log_scales)
        plus_in, min_in, mid_in = inv_s * (xc + half_bin), inv_s * (xc - half_bin), inv_s * xc
        log_cdf_plus = plus_in - F.softplus(plus_in)  # log sigmoid(plus_in): the x = -1 edge bin
        log_one_minus_cdf_min = -F.softplus(min_in)  # the x = +1 edge bin
        cdf_delta = torch.sigmoid(plus_in) - torch.sigmoid(min_in)
        log_pdf_mid = mid_in - log_scales - 2.0 * F.softplus(mid_in)  # fallback for tiny bins
        xb = x.unsqueeze(2).expand_as(xc)
        log_probs = torch.where(
            xb < -0.999, log_cdf_plus,
            torch.where(xb > 0.999, log_one_minus_cdf_min,
                        torch.where(cdf_delta > 1e-5, torch.log(cdf_delta.clamp(min=1e-12)), log_pdf_mid - log_bins)))
        log_probs = log_probs.sum(dim=1) + F.log_softmax(logits, dim=1)  # (B, M, H, W)
        return -torch.logsumexp(log_probs, dim=1)  # (B, H, W)

    def mean(self, h: Tensor) -> Tensor:
        """Mixture mean image in [-1, 1] (no colour coupling beyond the means): ``(B, C, H, W)``."""
        logits, means, _, _ = self.params(h)
        w = torch.softmax(logits, dim=1).unsqueeze(1)  # (B, 1, M, H, W)
        return (w * means).sum(dim=2).clamp(-1, 1)

    def sample(self, h: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Draw images: uint8 ``(B, C, H, W)``."""
        logits, means, log_scales, coeffs = self.params(h)

        def uniform(shape):
            return draw(torch.rand, shape, generator, h.device, h.dtype) * (1 - 2e-5) + 1e-5

        gumbel = -torch.log(-torch.log(uniform(logits.shape)))
        # Gumbel-max component choice; max(dim).indices is several times faster than argmax over a
        # non-innermost dim on CPUs, same result (first maximum)
        k = (logits + gumbel).max(dim=1).indices  # (B, H, W)
        B, _, H, W = logits.shape

        def pick(p: Tensor) -> Tensor:  # (B, C', M, H, W) -> (B, C', H, W) at component k
            return p.gather(2, k[:, None, None].expand(B, p.shape[1], 1, H, W)).squeeze(2)

        mu, ls = pick(means), pick(log_scales)  # (B, C, H, W)
        u = uniform(mu.shape)
        x = mu + ls.exp() * (torch.log(u) - torch.log1p(-u))
        if coeffs is not None:
            c = pick(coeffs)  # (B, 3, H, W)
            x0 = x[:, 0].clamp(-1, 1)
            x1 = (x[:, 1] + c[:, 0] * x0).clamp(-1, 1)
            x2 = (x[:, 2] + c[:, 1] * x0 + c[:, 2] * x1).clamp(-1, 1)
            x = torch.stack([x0, x1, x2], dim=1)
        return to_uint8(x)


def to_uint8(x: Tensor) -> Tensor:
    """[-1, 1] -> uint8 [0, 255] (rounded)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
