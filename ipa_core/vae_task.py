"""The unconditional VAE as a :class:`ipa_core.trainer.TrainTask`: negative ELBO in nats per
dimension, input statistics measured before step 0, sample grids, test bits/dim."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from xray.errors import UserError

from .batch_order import fetch_batch
from .image_grid import save_image_grid
from .train_config import TrainConfig
from .vae import VAE

# Named training defaults per config: official hparams for the released models (SPEC section 7),
# the paper's for x-rays, and fast ones for the CPU demo.
TRAIN_DEFAULTS: dict[str, TrainConfig] = {
    "tiny": TrainConfig(steps=800, batch_size=8, lr=2e-3, warmup=50, ema_rate=0.99, grad_clip=200.0,
                        skip_threshold=1000.0, log_every=25, sample_every=200, ckpt_every=200),
    "xray256": TrainConfig(steps=1_000_000, batch_size=8, lr=1.5e-4, warmup=100, ema_rate=0.999, grad_clip=200.0,
                           skip_threshold=15000.0, log_every=100, sample_every=5000, ckpt_every=5000),
    "cifar10": TrainConfig(steps=1_100_000, batch_size=16, lr=2e-4, warmup=100, ema_rate=0.9999, grad_clip=200.0,
                           skip_threshold=400.0, log_every=100, sample_every=5000, ckpt_every=5000),
    "imagenet64": TrainConfig(steps=1_600_000, batch_size=4, lr=1.5e-4, warmup=100, ema_rate=0.999, grad_clip=220.0,
                              skip_threshold=380.0, log_every=100, sample_every=5000, ckpt_every=5000),
    "ffhq256": TrainConfig(steps=1_700_000, batch_size=1, lr=1.5e-4, warmup=100, ema_rate=0.999, grad_clip=130.0,
                           skip_threshold=180.0, log_every=100, sample_every=5000, ckpt_every=5000),
}


def measure_standardisation(dataset, generator: torch.Generator, max_images: int = 1000) -> tuple[float, float]:
    """(shift, scale) = (-mean, 1/std) of the pixel values of up to ``max_images`` random images."""
    n = len(dataset)
    idx = torch.randperm(n, generator=generator)[:max_images].numpy() if n > max_images else np.arange(n)
    total, total_sq, count = 0.0, 0.0, 0
    for start in range(0, len(idx), 256):
        x, _ = fetch_batch(dataset, np.sort(idx[start:start + 256]))
        x = x.to(torch.float64)
        total, total_sq, count = total + x.sum().item(), total_sq + (x * x).sum().item(), count + x.numel()
    mean = total / count
    std = math.sqrt(max(total_sq / count - mean * mean, 0.0))
    if not std > 0:
        raise UserError(f"the training images are constant (every pixel {mean:.1f}); the VAE cannot be trained on them")
    return -mean, 1.0 / std


def match_channels(x: Tensor, channels: int) -> Tensor:
    """Grayscale ``(B, 1, S, S)`` -> ``(B, 3, S, S)`` for an RGB model (e.g. official weights), else unchanged."""
    if x.shape[1] == 1 and channels == 3:
        return x.expand(-1, 3, -1, -1)  # (B, 3, S, S) identical channels, as the official IPA fed x-rays
    return x


SAMPLE_N = 8  # samples per temperature row of a VAE sample grid (`ipa_core train --sample-n`)


class VAETask:
    """Train a :class:`VAE` by its negative ELBO. ``on_sample`` draws the same noise every time
    (rows at temperatures ``sample_temps``) so that grids from different steps compare."""

    def __init__(self, model: VAE, sample_n: int = SAMPLE_N, sample_temps: tuple[float, ...] = (1.0, 0.85),
                 eval_batch_size: int = 32, eval_max_images: int | None = None, init_digest: str | None = None):
        self.model = model
        self.init_digest = init_digest  # file digest of the weights training started from (--import-official)
        self.sample_n, self.sample_temps = sample_n, sample_temps
        self.eval_batch_size, self.eval_max_images = eval_batch_size, eval_max_images

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def provenance(self) -> dict:
        """Stored in every checkpoint and compared on resume: the model config (measured
        standardisation included) and the weights training started from, if imported."""
        return {"task": "vae", "model": self.model.config.to_dict(), "init": self.init_digest}

    def prepare(self, dataset, generator: torch.Generator) -> None:
        cfg = self.model.config
        if cfg.shift is None or cfg.scale is None:
            cfg.shift, cfg.scale = measure_standardisation(dataset, generator)

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor], generator: torch.Generator) -> tuple[Tensor, dict]:
        x = match_channels(batch[0], self.model.config.image_channels)
        out = model(x, generator)  # VAE.forward = VAE.loss (goes through DDP when wrapped)
        return out["elbo"], {"distortion": out["distortion"].detach(), "rate": out["rate"].detach()}

    @torch.no_grad()
    def on_sample(self, model: VAE, step: int, out_png: Path) -> None:
        if self.sample_n < 1:  # sample grids off
            return
        device = next(model.parameters()).device
        rows = []
        for t in self.sample_temps:
            g = torch.Generator(device=device).manual_seed(0)
            rows.append(model.sample(self.sample_n, t=t, generator=g))
        save_image_grid(torch.cat(rows), out_png, nrow=self.sample_n)

    @torch.no_grad()
    def evaluate(self, model: VAE, dataset) -> dict[str, float]:
        """Test-set negative ELBO (nats/dim and bits/dim), distortion and rate; one fixed noise draw."""
        device = next(model.parameters()).device
        g = torch.Generator(device=device).manual_seed(0)
        n = len(dataset) if self.eval_max_images is None else min(len(dataset), self.eval_max_images)
        sums = {"elbo": 0.0, "distortion": 0.0, "rate": 0.0}
        for start in range(0, n, self.eval_batch_size):
            x, _ = fetch_batch(dataset, np.arange(start, min(start + self.eval_batch_size, n)))
            out = model.loss(match_channels(x.to(device), model.config.image_channels), g)
            for k in sums:
                sums[k] += float(out[k]) * len(x)
        res = {k: v / n for k, v in sums.items()}
        res["bits_per_dim"] = res["elbo"] / math.log(2)
        res["n_images"] = n
        return res

    def save_pretrained(self, model: VAE, out_dir: Path) -> None:
        model.save_pretrained(out_dir)
