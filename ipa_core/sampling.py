"""Fast batched IPA completions and the completion figure.

:func:`sample_completions` encodes each partial image once, expands the partial-encoder
activations to ``B * N`` and runs one top-down pass for all images and samples together. On CPUs
(float32) the maps are NHWC (channels_last: the small-channel convolutions at full resolution skip
their layout reorders) and the partial activations' share in every ``part_enc``'s first (1x1, linear)
conv is computed once per image, not once per sample (:func:`ipa_core.vae.split_cat_block`); the
numbers are those of the plain pass up to float rounding
(``tests/ipa_core/test_sampling.py::test_fast_path_is_the_plain_top_down_pass``).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from xray.errors import UserError
from xray.io import atomic_path

from .ipa import IPA
from .vae import c1_share


def check_partial_batch(model: IPA, x_obs: Tensor, m: Tensor) -> None:
    """One-line :class:`UserError` unless ``x_obs (B, C, S, S)`` and ``m (B, 1, S, S)`` fit ``model``."""
    cfg = model.config
    want = (cfg.image_channels, cfg.image_size, cfg.image_size)
    if x_obs.dim() != 4 or tuple(x_obs.shape[1:]) != want:
        raise UserError(f"observed images of shape {tuple(x_obs.shape)} given; this model expects (B, {want[0]}, {want[1]}, {want[2]}): resize the images to {cfg.image_size} px")
    if m.dim() != 4 or tuple(m.shape) != (x_obs.shape[0], 1, cfg.image_size, cfg.image_size):
        raise UserError(f"mask of shape {tuple(m.shape)} given; expected {(x_obs.shape[0], 1, cfg.image_size, cfg.image_size)}")


def _check_temperature(model: IPA, t: float | Sequence[float]) -> None:
    n_layers = len(model.decoder.dec_blocks)
    ts = list(t) if isinstance(t, (list, tuple)) else [t]
    if isinstance(t, (list, tuple)) and len(ts) != n_layers:
        raise UserError(f"{len(ts)} per-layer temperatures given; the decoder has {n_layers} layers")
    if any(v < 0 for v in ts):
        raise UserError(f"temperatures must be >= 0, got {t}")


@torch.inference_mode()
def sample_completions(model: IPA, x_obs: Tensor, m: Tensor, n: int, t: float | Sequence[float] = 1.0,
                       generator: torch.Generator | None = None, paste: bool = True,
                       autocast: bool = False, max_batch: int | None = None) -> Tensor:
    """``n`` completions of each partially observed image: uint8 ``(B, N, C, S, S)``.

    ``x_obs`` uint8 ``(B, C, S, S)`` (unobserved pixels are ignored), ``m`` ``(B, 1, S, S)`` with
    1 = observed. ``t`` multiplies the sigma of c at every layer (a float, or one per layer; 0 =
    means). ``paste`` puts the observed pixels back. An all-zero mask gives prior-like samples, an
    all-ones mask reconstruction-like ones. ``autocast`` runs the networks in bfloat16 (GPU speed).
    ``max_batch`` bounds the rows of one decoder pass (memory; on CPUs 16-32 rows stay in cache);
    the partial encoder still runs once per image.
    """
    if not isinstance(model, IPA):
        raise UserError(f"sample_completions needs an IPA model, got {type(model).__name__}; load it with IPA.from_pretrained")
    check_partial_batch(model, x_obs, m)
    _check_temperature(model, t)
    if n < 1:
        raise UserError(f"number of samples must be >= 1, got {n}")
    if max_batch is not None and max_batch < 1:
        raise UserError(f"max_batch must be >= 1, got {max_batch}")
    B, C, S, _ = x_obs.shape
    device = model.decoder.gain.device
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with ctx:
        inp, _ = model.preprocess(x_obs)
        mf = m.to(device, torch.float32)
        # float32 on CPUs: NHWC maps (the small-channel convs at full resolution skip their layout
        # reorders) and the partial activations' share in every part_enc's first conv once per image
        fast = device.type == "cpu" and not autocast
        fmt = torch.channels_last if fast else torch.contiguous_format
        pacts = model.partial_acts(inp, mf, fmt)  # once per image: {res: (B, W, r, r)}
        shares = [c1_share(block.part_enc, pacts[block.base]) for block in model.decoder.dec_blocks] if fast else None  # [(B, mid, r, r)]
        image_of_row = torch.arange(B * n, device=device) // n  # (B*N,) rows ordered image-major
        chunk = B * n if max_batch is None else max_batch
        outs = []
        for start in range(0, B * n, chunk):
            rows = image_of_row[start:start + chunk]
            if shares is None:
                step = model.partial_step({r: a[rows] for r, a in pacts.items()}, t, generator)  # {res: (rows, W, r, r)}
            else:
                step = model.partial_step({}, t, generator, shares=[a[rows] for a in shares])  # [(rows, mid, r, r)]
            h, _ = model.decoder.run(len(rows), step, memory_format=fmt)
            outs.append(model.decoder.out_net.sample(h.float(), generator))  # (rows, C, S, S)
        out = torch.cat(outs).reshape(B, n, C, S, S)  # (B, N, C, S, S)
    if paste:
        keep = (mf > 0.5)[:, None]  # (B, 1, 1, S, S)
        out = torch.where(keep, x_obs.to(device)[:, None], out)  # (B, N, C, S, S)
    return out


# ----------------------------------------------------------------------------------------------
# figures


def _masked_view(x: Tensor, m: Tensor) -> np.ndarray:
    """Observed pixels in grey, unobserved pixels tinted blue: uint8 (H, W, 3)."""
    g = x.float().mean(dim=0).numpy()  # (H, W)
    mm = m[0].numpy() > 0.5
    rgb = np.stack([g, g, g], axis=-1)
    rgb[~mm] = (30.0, 40.0, 90.0)
    return rgb.astype(np.uint8)


def _gray(a: np.ndarray) -> np.ndarray:
    return np.repeat(np.clip(a, 0, 255).astype(np.uint8)[..., None], 3, axis=-1)  # (H, W, 3)


def completion_figure(x: Tensor, m: Tensor, samples: Tensor, pad: int = 2) -> np.ndarray:
    """One row per image: ground truth, masked input, N completions, pixel mean, pixel variance.

    ``x (B, C, S, S)`` uint8, ``m (B, 1, S, S)``, ``samples (B, N, C, S, S)`` uint8 -> RGB uint8
    ``(rows, cols, 3)``. The variance panel is scaled so its maximum over the figure is white.
    """
    x, m, samples = x.cpu(), m.cpu().float(), samples.cpu()
    B, N, C, S, _ = samples.shape
    s = samples.float().mean(dim=2)  # (B, N, S, S) grey
    mean = s.mean(dim=1)  # (B, S, S)
    var = s.var(dim=1, unbiased=False)  # (B, S, S), zero when N = 1
    vmax = max(float(var.max()), 1e-6)
    cols = 4 + N
    fig = np.full((B * (S + pad) + pad, cols * (S + pad) + pad, 3), 255, dtype=np.uint8)
    for b in range(B):
        panels = [_gray(x[b].float().mean(dim=0).numpy()), _masked_view(x[b], m[b])]
        panels += [_gray(s[b, k].numpy()) for k in range(N)]
        panels += [_gray(mean[b].numpy()), _gray(var[b].numpy() / vmax * 255)]
        for c, p in enumerate(panels):
            top, left = pad + b * (S + pad), pad + c * (S + pad)
            fig[top:top + S, left:left + S] = p
    return fig


def completion_titles(n: int) -> list[str]:
    """Column titles of :func:`completion_figure`: truth, observed, completion 1..N, mean, variance."""
    return ["truth", "observed", *(f"completion {k}" if n <= 8 else str(k) for k in range(1, n + 1)), "mean", "variance"]


TITLE_BAND = 18  # px of white above the upscaled figure for the column titles


def save_png(img: np.ndarray, path: str | Path, min_size: int = 256, titles: list[str] | None = None,
             cell: int | None = None, pad: int = 2) -> Path:
    """Write an RGB uint8 array as PNG atomically, upscaled (nearest) so the short side is >= ``min_size``.

    ``titles``: one per column of ``cell`` px panels separated by ``pad`` px (the layout of
    :func:`completion_figure`), written centred above the columns after the upscale, so they stay sharp.
    """
    im = Image.fromarray(img)
    k = max(1, -(-min_size // min(img.shape[:2])))
    if k > 1:
        im = im.resize((im.width * k, im.height * k), Image.NEAREST)
    if titles:
        if cell is None:
            raise ValueError("save_png: titles need the panel size `cell`")
        canvas = Image.new("RGB", (im.width, im.height + TITLE_BAND), (255, 255, 255))
        canvas.paste(im, (0, TITLE_BAND))
        draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
        for c, text in enumerate(titles):
            centre = k * (pad + c * (cell + pad) + cell / 2)
            draw.text((centre - draw.textlength(text, font=font) / 2, 3), text, fill=(0, 0, 0), font=font)
        im = canvas
    path = Path(path)
    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG")
    return path
