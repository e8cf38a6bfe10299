"""VD-VAE (Child 2020) style hierarchical VAE with the official module and parameter names.

Layout (state-dict names match the official release, so its checkpoints load with strict=True):

    encoder.in_conv, encoder.enc_blocks.{i}.{c1,c2,c3,c4}
    decoder.dec_blocks.{i}.{enc,prior,resnet}.{c1..c4}, decoder.dec_blocks.{i}.z_proj
    decoder.bias_xs.{k}, decoder.gain, decoder.bias, decoder.out_net.out_conv

The top-down pass is written once, in :meth:`Decoder.run`, with the choice of each latent left to
a callback: the posterior q(z|x) for the ELBO, the prior for unconditional samples, and (in
``ipa_core.ipa``) the partial encoder c(z|y) for conditional samples and the IPA objective.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from xray.errors import UserError

from .config import VAEConfig, get_config, parse_layer_string
from .dmol import DmolNet
from .lean import AvgPool, add_, lean_conv
from .persist import PretrainedMixin, load_state_dict_file, strict_load
from .seeding import draw


# ----------------------------------------------------------------------------------------------
# building blocks


def conv(in_ch: int, out_ch: int, k: int, zero_weights: bool = False) -> nn.Conv2d:
    c = nn.Conv2d(in_ch, out_ch, k, padding=k // 2)
    nn.init.zeros_(c.bias)
    if zero_weights:
        nn.init.zeros_(c.weight)
    return c


class Block(nn.Module):
    """Bottleneck residual block: GELU before each of c1 (1x1), c2, c3 (3x3, 1x1 at res <= 2), c4 (1x1)."""

    def __init__(self, in_w: int, mid_w: int, out_w: int, down_rate: int | None = None,
                 residual: bool = False, use_3x3: bool = True, zero_last: bool = False):
        super().__init__()
        k = 3 if use_3x3 else 1
        self.down_rate, self.residual = down_rate, residual
        self.c1 = conv(in_w, mid_w, 1)
        self.c2 = conv(mid_w, mid_w, k)
        self.c3 = conv(mid_w, mid_w, k)
        self.c4 = conv(mid_w, out_w, 1, zero_weights=zero_last)

    checkpointing = False  # recompute the block's activations in backward (VAE.set_checkpointing)

    def forward(self, x: Tensor) -> Tensor:
        if self.checkpointing and torch.is_grad_enabled():
            # keep only the block input; the 4 convs and GELUs run again in backward (deterministic)
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: Tensor, rows: slice | None = None, add: Tensor | None = None) -> Tensor:
        """The block; a block without residual and pooling may return ``add + out[:, rows]``."""
        if self.checkpointing:
            return self._lean_after_c1(x, lean_conv(self.c1, x), rows, add)
        h = self.c1(F.gelu(x))
        h = self.c2(F.gelu(h))
        h = self.c3(F.gelu(h))
        h = self.c4(F.gelu(h))
        h = h if rows is None else h[:, rows]
        out = x + h if self.residual else (h if add is None else add + h)
        if self.down_rate is not None:
            out = F.avg_pool2d(out, kernel_size=self.down_rate, stride=self.down_rate)
        return out

    def forward_from_c1(self, h: Tensor) -> Tensor:
        """A block without residual and pooling from c1's output ``h`` on."""
        assert not self.residual and self.down_rate is None
        h = self.c2(F.gelu(h))
        h = self.c3(F.gelu(h))
        return self.c4(F.gelu(h))

    def _lean_after_c1(self, x: Tensor | None, h: Tensor, rows: slice | None = None, add: Tensor | None = None) -> Tensor:
        """Checkpointing: the block from c1's output ``h`` on (``x``: its input, for the residual),
        the same numbers with less kept for backward: each conv keeps its input, not its GELU
        (:func:`ipa_core.lean.lean_conv`), the residual sum is made in place (c4 keeps its input,
        not its output) and the pooling keeps nothing. ``(B, W, r, r) -> (B, W, r / d, r / d)``."""
        h = lean_conv(self.c2, h)
        h = lean_conv(self.c3, h)
        h = lean_conv(self.c4, h, rows=rows, add=add)
        out = add_(h, x) if self.residual else h
        return out if self.down_rate is None else AvgPool.apply(out, self.down_rate)


def width_settings(width: int, custom: str) -> defaultdict[int, int]:
    """Per-resolution widths: ``width`` everywhere unless ``custom`` ('64:32,32:48') says otherwise."""
    widths: defaultdict[int, int] = defaultdict(lambda: width)
    for part in filter(None, custom.split(",")):
        res, w = part.split(":")
        widths[int(res)] = int(w)
    return widths


def pad_channels(x: Tensor, width: int) -> Tensor:
    return F.pad(x, (0, 0, 0, 0, 0, width - x.shape[1]))  # (B, width, H, W)


def gaussian_kl(mu1: Tensor, mu2: Tensor, logsigma1: Tensor, logsigma2: Tensor) -> Tensor:
    """KL(N(mu1, s1^2) || N(mu2, s2^2)) elementwise, parameterised by log sigmas (official form)."""
    return -0.5 + logsigma2 - logsigma1 + 0.5 * (logsigma1.exp() ** 2 + (mu1 - mu2) ** 2) / logsigma2.exp() ** 2


def sample_gaussian(mu: Tensor, logsigma: Tensor, generator: torch.Generator | None = None) -> Tensor:
    eps = draw(torch.randn, mu.shape, generator, mu.device, mu.dtype)
    return mu + logsigma.exp() * eps


# ----------------------------------------------------------------------------------------------
# encoder and decoder


class Encoder(nn.Module):
    """Bottom-up ResNet; returns the activations kept per resolution ``{res: (B, W_res, res, res)}``."""

    def __init__(self, cfg: VAEConfig, in_channels: int | None = None):
        super().__init__()
        self.widths = width_settings(cfg.width, cfg.custom_width_str)
        self.in_conv = conv(in_channels or cfg.image_channels, self.widths[cfg.image_size], 3)
        blocks = parse_layer_string(cfg.enc_blocks)
        self.enc_blocks = nn.ModuleList(
            Block(self.widths[res], int(self.widths[res] * cfg.bottleneck_multiple), self.widths[res],
                  down_rate=down, residual=True, use_3x3=res > 2)
            for res, down in blocks
        )
        for b in self.enc_blocks:
            b.c4.weight.data *= math.sqrt(1 / len(blocks))

    checkpointing = False  # see VAE.set_checkpointing

    def forward(self, x: Tensor) -> dict[int, Tensor]:
        if self.checkpointing and torch.is_grad_enabled():
            return self._forward_segments(x)
        x = self.in_conv(x)
        acts = {x.shape[2]: x}
        for block in self.enc_blocks:
            x = self._block(block, x)
            acts[x.shape[2]] = x
        return acts

    def _block(self, block: Block, x: Tensor) -> Tensor:
        x = block(x)
        res = x.shape[2]
        return pad_channels(x, self.widths[res]) if x.shape[1] != self.widths[res] else x

    def _forward_segments(self, x: Tensor) -> dict[int, Tensor]:
        """The same activations, checkpointed per resolution: a segment runs the blocks whose output
        has one resolution (the first one starts with ``in_conv``), and only its input and its last
        output (the kept activation ``acts[res]``) stay in memory. In backward a segment is run
        again with its blocks checkpointed one by one (nested), so at most one segment's block
        inputs exist at a time."""
        S = x.shape[2]
        res_of = [S // math.prod(b.down_rate or 1 for b in self.enc_blocks[: i + 1]) for i in range(len(self.enc_blocks))]
        segments: list[list[Block]] = []
        for i, block in enumerate(self.enc_blocks):
            if i and res_of[i] == res_of[i - 1]:
                segments[-1].append(block)
            else:
                segments.append([block])

        def run(blocks: list[Block], first: bool, h: Tensor) -> Tensor:
            if first:
                h = self.in_conv(h)
            for block in blocks:
                h = self._block(block, h)
            return h

        acts: dict[int, Tensor] = {}
        if not segments or res_of[0] != S:  # no block keeps the resolution of in_conv: its output is acts[S]
            x = self.in_conv(x)
            acts[S] = x
        for k, blocks in enumerate(segments):
            first = k == 0 and S not in acts
            x = checkpoint(run, blocks, first, x, use_reentrant=False)
            acts[x.shape[2]] = x
        return acts


class DecBlock(nn.Module):
    """One top-down layer: posterior head ``enc``, ``prior`` (mean, log sigma, state residual), ``z_proj``, ``resnet``."""

    def __init__(self, cfg: VAEConfig, res: int, mixin: int | None, n_blocks: int):
        super().__init__()
        self.base, self.mixin, self.zdim = res, mixin, cfg.zdim
        self.widths = width_settings(cfg.width, cfg.custom_width_str)
        width = self.widths[res]
        cond_w = int(width * cfg.bottleneck_multiple)
        use_3x3 = res > 2
        self.enc = Block(width * 2, cond_w, cfg.zdim * 2, use_3x3=use_3x3)
        self.prior = Block(width, cond_w, cfg.zdim * 2 + width, use_3x3=use_3x3, zero_last=True)
        self.z_proj = conv(cfg.zdim, width, 1)
        self.z_proj.weight.data *= math.sqrt(1 / n_blocks)
        self.resnet = Block(width, cond_w, width, residual=True, use_3x3=use_3x3)
        self.resnet.c4.weight.data *= math.sqrt(1 / n_blocks)

    def input_state(self, xs: dict[int, Tensor], n: int, ref: Tensor,
                    memory_format: torch.memory_format = torch.contiguous_format) -> Tensor:
        """The state entering this layer: the running state at ``base`` (zeros if none) plus the mixin."""
        x = xs.get(self.base)
        if x is None:
            x = ref.new_zeros(n, self.widths[self.base], self.base, self.base).contiguous(memory_format=memory_format)  # (B, W, r, r)
        if self.mixin is not None:
            up = F.interpolate(xs[self.mixin][:, : x.shape[1]], scale_factor=self.base // self.mixin)  # nearest
            x = x + up
        return x

    checkpointing = False  # see VAE.set_checkpointing

    def posterior(self, x: Tensor, acts: Tensor) -> tuple[Tensor, Tensor]:
        """q(z | z<l, x): mean and log sigma from cat(state, encoder activations)."""
        return cat_block(self.enc, x, acts, self.checkpointing).chunk(2, dim=1)

    def prior_head(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """p(z | z<l): mean and log sigma alone, checkpointed; the rest of the prior's output (the
        state residual, ``(B, W, r, r)``) is not kept, and gets no (zero) gradient from here:
        :meth:`update_from_state` computes it again."""
        return checkpoint(self.prior._forward, x, slice(0, 2 * self.zdim), use_reentrant=False).chunk(2, dim=1)  # (B, zdim, r, r) each

    def update_from_state(self, x: Tensor, z: Tensor) -> Tensor:
        """:meth:`update` with the prior's state residual computed from ``x`` again (checkpointed:
        only ``x`` and ``z`` are kept)."""
        def fn(x: Tensor, z: Tensor) -> Tensor:
            # nested units: when this one is recomputed in backward it keeps only x, z and the
            # resnet's input h (B, W, r, r); the prior's and the resnet's internals are recomputed
            # one unit at a time in their own backward, never both at once (at 256 px each holds
            # about 0.45 GB); the same operations on the same values: the numbers do not change
            h = add_(checkpoint(self._plus_state_residual, x, use_reentrant=False), self.z_proj(z))  # (B, W, r, r)
            return checkpoint(self.resnet._forward, h, use_reentrant=False)

        return checkpoint(fn, x, z, use_reentrant=False)

    def _plus_state_residual(self, x: Tensor) -> Tensor:
        """``x`` plus the prior's state residual ``(B, W, r, r)`` (its output's last W channels: their
        gradient is taken without the rest's zeros)."""
        return self.prior._forward(x, slice(2 * self.zdim, None), x)

    def update(self, x: Tensor, xpp: Tensor, z: Tensor) -> Tensor:
        """The next state: ``resnet(x + xpp + z_proj(z))`` (one recomputed unit when checkpointing)."""
        if self.checkpointing and torch.is_grad_enabled():
            return checkpoint(self._update, x, xpp, z, True, use_reentrant=False)
        return self._update(x, xpp, z)

    def _update(self, x: Tensor, xpp: Tensor, z: Tensor, inner: bool = False) -> Tensor:
        # (x + xpp) first, as the official code; checkpointing, the second sum in place (the same
        # numbers, one map less: the frozen half of IPA's objective runs here without a graph)
        h = add_(x + xpp, self.z_proj(z)) if self.checkpointing else x + xpp + self.z_proj(z)  # (B, W, r, r)
        return self.resnet._forward(h) if inner else self.resnet(h)


def cat_block(block: Block, x: Tensor, acts: Tensor, checkpointing: bool) -> Tensor:
    """``block(cat([x, acts], 1))``; checkpointed, the concatenation is never kept (see :class:`ipa_core.lean.GeluConv`)."""
    if checkpointing:
        def fn(a: Tensor, b: Tensor) -> Tensor:
            return block._lean_after_c1(None, lean_conv(block.c1, a, b))

        # without a graph (the frozen half of IPA's objective, sampling) the same lean forward
        return checkpoint(fn, x, acts, use_reentrant=False) if torch.is_grad_enabled() else fn(x, acts)
    return block(torch.cat([x, acts], dim=1))


def c1_share(block: Block, acts: Tensor) -> Tensor:
    """The share of ``acts`` (the last channels of the block's input) in its c1, plus c1's bias:
    ``conv1x1(gelu(acts), c1.weight[:, -W':]) + bias`` ``(n, mid, r, r)``; see :func:`split_cat_block`."""
    c = block.c1
    return F.conv2d(F.gelu(acts), c.weight[:, c.in_channels - acts.shape[1]:], c.bias)


def split_cat_block(block: Block, x: Tensor, share: Tensor) -> Tensor:
    """``block(cat([x, acts], 1))`` (no residual, no pooling, 1x1 c1) from ``share = c1_share(block, acts)``:
    c1 is linear in its input channels, so the concatenation is never built and the ``acts`` half
    (the same for all N samples of an image) is convolved once per image. The same maths; the c1
    sum is split in two (float rounding). ``x (n, W, r, r)``, ``share (n, mid, r, r)``."""
    c = block.c1
    h = F.conv2d(F.gelu(x), c.weight[:, :x.shape[1]]) + share  # (n, mid, r, r)
    return block.forward_from_c1(h)


# A latent step decides z for one layer: (layer index, block, state x, prior mean, prior log sigma)
# -> (z, stats). x is the state *before* the prior's residual is added (what enc/part_enc see).
LatentStep = Callable[[int, DecBlock, Tensor, Tensor, Tensor], tuple[Tensor, dict]]


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.widths = width_settings(cfg.width, cfg.custom_width_str)
        blocks = parse_layer_string(cfg.dec_blocks)
        self.dec_blocks = nn.ModuleList(DecBlock(cfg, res, mixin, len(blocks)) for res, mixin in blocks)
        self.resolutions = sorted({res for res, _ in blocks})
        self.bias_xs = nn.ParameterList(
            nn.Parameter(torch.zeros(1, self.widths[res], res, res)) for res in self.resolutions if res <= cfg.no_bias_above
        )
        top = self.widths[cfg.image_size]
        self.out_net = DmolNet(top, cfg.num_mixtures, cfg.image_channels, cfg.low_bit)
        self.gain = nn.Parameter(torch.ones(1, top, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, top, 1, 1))

    def run(self, n: int, step: LatentStep, upto: int | None = None, raw: bool = False,
            memory_format: torch.memory_format = torch.contiguous_format) -> tuple[Tensor | None, list[dict]]:
        """The top-down pass for ``n`` images; ``step`` picks each latent.

        Returns the final feature map ``(n, W, S, S)`` fed to the output network (``None`` when
        ``upto`` is given: the run stops after ``upto`` layers; ``raw``: the last state, before
        the output affine ``gain``, ``bias``) and the list of per-layer stats. ``memory_format``:
        of the states (``torch.channels_last``: NHWC, which the convolutions keep; faster on CPUs).
        """
        ref = self.bias_xs[0] if len(self.bias_xs) else self.gain
        # {res: (n, W, r, r)}: views of the (1, W, r, r) biases laid out in memory_format, which the sums with them keep
        xs = {b.shape[2]: b.contiguous(memory_format=memory_format).expand(n, -1, -1, -1) for b in self.bias_xs}
        stats = []
        for i, block in enumerate(self.dec_blocks):
            if upto is not None and i >= upto:
                return None, stats
            x = block.input_state(xs, n, ref, memory_format)
            if block.checkpointing and torch.is_grad_enabled():
                # keep x and z only: the prior runs again for the state update (forward and backward)
                pm, pv = block.prior_head(x)
                z, s = step(i, block, x, pm, pv)
                x = block.update_from_state(x, z)
            else:
                pm, pv, xpp = torch.split(block.prior(x), [block.zdim, block.zdim, x.shape[1]], dim=1)
                z, s = step(i, block, x, pm, pv)
                x = block.update(x, xpp, z)
            xs[block.base] = x
            stats.append(s)
        if upto is not None:
            return None, stats
        h = xs[self.cfg.image_size]
        return (h if raw else h * self.gain + self.bias), stats

    def run_for_likelihood(self, n: int, step: LatentStep) -> tuple[Tensor, tuple[Tensor, Tensor] | None, list[dict]]:
        """:meth:`run` for the output network's likelihood: ``(h, affine, stats)`` for
        ``out_net.nll(h, target, affine)``. Checkpointing with gradients, ``h`` is the last state and
        ``affine`` ``(gain, bias)``, applied inside the output conv (:class:`ipa_core.lean.AffineConv`
        keeps 0.125 GB less at 256 px); otherwise ``h`` is :meth:`run`'s map and ``affine`` None."""
        fused = self.out_net.checkpointing and torch.is_grad_enabled()
        h, stats = self.run(n, step, raw=fused)
        return h, ((self.gain, self.bias) if fused else None), stats


# ----------------------------------------------------------------------------------------------
# the model


class VAE(PretrainedMixin, nn.Module):
    """Hierarchical VAE over uint8 images ``(B, C, S, S)``.

    >>> model = VAE(get_config("tiny"))            # doctest: +SKIP
    >>> model.loss(x_u8)["elbo"]                   # nats per dimension
    >>> model.sample(8, t=0.9, generator=g)        # uint8 (8, C, S, S)
    """

    model_type = "vae"
    config_class = VAEConfig

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    # --- memory -----------------------------------------------------------------------------
    @property
    def checkpointing(self) -> bool:
        """Activation checkpointing of every residual block (encoders, decoder, partial encoder).

        A run-time switch, not part of the architecture (not in the config, not saved). Training
        keeps, of the encoder, only its activations per resolution (each resolution's blocks are
        one recomputed segment, with its blocks checkpointed inside it), and of each decoder layer
        its input state and latent: the prior's mean and log sigma are its only output kept, and
        the state update runs the prior again for its state residual, as a nested unit beside the
        resnet (their internals are never recomputed at once). Inside recomputed units the layers
        of :mod:`ipa_core.lean` keep less than autograd (a conv keeps its pre-activation, not its
        GELU; no concatenation, pooling input or zero-padded gradient is kept). Everything else is
        recomputed in backward. Only deterministic parts are recomputed (never a sampling step):
        the loss is the same and the gradients equal up to float summation order.
        At 256 px (xray256, batch 1) a training step with AdamW and EMA peaks at 3.97 GB resident
        (VAE; IPA 3.50 GB), 1.7 GB of it weights, EMA and AdamW state and 0.6 GB the torch import
        (``benchmarks/bench_vae.py --memory``).
        """
        return any(b.checkpointing for b in self.modules() if isinstance(b, (Block, DecBlock)))

    @checkpointing.setter
    def checkpointing(self, enabled: bool) -> None:
        for b in self.modules():
            if isinstance(b, (Block, DecBlock, Encoder, DmolNet)):
                b.checkpointing = bool(enabled)

    def set_checkpointing(self, enabled: bool = True) -> "VAE":
        """Turn activation checkpointing on or off (see :attr:`checkpointing`); returns ``self``."""
        self.checkpointing = enabled
        return self

    # --- data <-> network -------------------------------------------------------------------
    def preprocess(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """uint8 ``(B, C, S, S)`` -> (standardised network input, DMoL target in [-1, 1])."""
        cfg = self.config
        self._check_images(x)
        if cfg.shift is None or cfg.scale is None:
            raise UserError("the VAE's input standardisation (shift, scale) is not set; train it or set them in the config")
        x = x.to(self.decoder.gain.device, torch.float32)
        inp = (x + cfg.shift) * cfg.scale
        target = torch.floor(x / 8) * 8 if cfg.low_bit else x
        return inp, target / 127.5 - 1

    def _check_images(self, x: Tensor) -> None:
        cfg = self.config
        want = (cfg.image_channels, cfg.image_size, cfg.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != want:
            raise UserError(f"images of shape {tuple(x.shape)} given; this model expects (B, {want[0]}, {want[1]}, {want[2]})")

    # --- inference ----------------------------------------------------------------------------
    def posterior_step(self, acts: dict[int, Tensor], generator: torch.Generator | None = None) -> LatentStep:
        """z ~ q(z | z<l, x) with the analytic KL(q || p) per layer in ``stats['kl']`` (B, zdim, r, r)."""

        def step(i, block, x, pm, pv):
            qm, qv = block.posterior(x, acts[block.base])
            z = sample_gaussian(qm, qv, generator)
            return z, {"kl": gaussian_kl(qm.float(), pm.float(), qv.float(), pv.float())}  # fp32 under autocast

        return step

    @staticmethod
    def prior_step(t: float | Sequence[float] | None = 1.0, generator: torch.Generator | None = None) -> LatentStep:
        """z ~ p(z | z<l) with temperature t (a float, or one per layer) multiplying the prior sigma."""

        def step(i, block, x, pm, pv):
            ti = t[i] if isinstance(t, (list, tuple)) else t
            if ti is not None and ti != 1.0:
                pv = pv + math.log(ti) if ti > 0 else torch.full_like(pv, -math.inf)
            z = pm if ti == 0 else sample_gaussian(pm, pv, generator)
            return z, {}

        return step

    def loss(self, x: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Negative ELBO of a uint8 batch in nats per dimension, as the official code defines it.

        ``distortion`` = DMoL NLL / (C*H*W), ``rate`` = sum of layer KLs / (C*H*W),
        ``elbo`` = distortion + rate (batch means; minimise ``elbo``).
        """
        inp, target = self.preprocess(x)
        acts = self.encoder(inp)
        h, affine, stats = self.decoder.run_for_likelihood(x.shape[0], self.posterior_step(acts, generator))
        ndims = math.prod(x.shape[1:])
        distortion = self.decoder.out_net.nll(h, target, affine)  # (B,) per dimension
        rate = sum(s["kl"].sum(dim=(1, 2, 3)) for s in stats) / ndims  # (B,)
        return {"elbo": (distortion + rate).mean(), "distortion": distortion.mean(), "rate": rate.mean()}

    forward = loss

    @torch.no_grad()
    def reconstruct(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """z ~ q(z | x), then x ~ p(x | z): uint8 ``(B, C, S, S)``."""
        inp, _ = self.preprocess(x)
        h, _ = self.decoder.run(x.shape[0], self.posterior_step(self.encoder(inp), generator))
        return self.decoder.out_net.sample(h, generator)

    @torch.no_grad()
    def sample(self, n: int, t: float | Sequence[float] = 1.0, generator: torch.Generator | None = None) -> Tensor:
        """Unconditional samples: uint8 ``(n, C, S, S)``. ``t`` scales the prior sigma (per layer if a list)."""
        if isinstance(t, (list, tuple)) and len(t) != len(self.decoder.dec_blocks):
            raise UserError(f"{len(t)} per-layer temperatures given; the decoder has {len(self.decoder.dec_blocks)} layers")
        h, _ = self.decoder.run(n, self.prior_step(t, generator))
        return self.decoder.out_net.sample(h, generator)

    # --- persistence (save_pretrained / from_pretrained: PretrainedMixin) ----------------------
    @classmethod
    def from_official(cls, path: str | Path, config: VAEConfig | str) -> "VAE":
        """Load an official VD-VAE ``*-model-ema.th`` / ``*-model.th`` state dict (to CPU, strict)."""
        cfg = get_config(config) if isinstance(config, str) else config
        model = cls(cfg)
        sd = load_state_dict_file(path)
        sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
        strict_load(model, sd, source=str(path))
        return model

