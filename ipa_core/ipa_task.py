"""IPA as a :class:`ipa_core.trainer.TrainTask`: O_for (or O_rev) on random training masks,
completion grids of fixed test images, and the test O_for KL per observed-fraction bin.

>>> task = IPATask(IPA.from_vae(VAE.from_pretrained("runs/vae")), sample_images=test_x[:4])  # doctest: +SKIP
>>> fit(task, train_set, IPA_TRAIN_DEFAULTS["tiny"], "runs/ipa", test_set)                 # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from xray.dataset import dataset_images
from xray.errors import UserError

from .ipa import IPA
from .persist import state_digest
from .masks import IPA_TRAINING_MASKS, OBSERVED_BINS, MaskMixture, bin_name, freeform_masks, random_patch_masks
from .sampling import completion_figure, completion_titles, sample_completions, save_png
from .train_config import TrainConfig

# Named training defaults for the IPA stage, keyed like the VAE configs ("default" for the rest).
IPA_TRAIN_DEFAULTS: dict[str, TrainConfig] = {
    # CPU demo: O_for from a warm start converges fast; EMA short so the demo model is current.
    "tiny": TrainConfig(steps=1000, batch_size=16, lr=1e-3, warmup=50, ema_rate=0.99, grad_clip=200.0,
                        skip_threshold=1000.0, log_every=25, sample_every=250, ckpt_every=250),
    # The paper's x-ray IPA: batch 8, lr 1.5e-4, 180k iterations (appendix G.1).
    "xray256": TrainConfig(steps=180_000, batch_size=8, lr=1.5e-4, warmup=100, ema_rate=0.999, grad_clip=200.0,
                           skip_threshold=15000.0, log_every=100, sample_every=5000, ckpt_every=5000),
    "default": TrainConfig(steps=100_000, batch_size=8, lr=1.5e-4, warmup=100, ema_rate=0.999, grad_clip=200.0,
                           skip_threshold=400.0, log_every=100, sample_every=5000, ckpt_every=5000),
}


def _unwrap(model: nn.Module) -> IPA:
    return model.module if hasattr(model, "module") else model  # DDP wrapper -> IPA


def fixed_sample_masks(n: int, S: int) -> Tensor:
    """``(n, 1, S, S)`` deterministic masks for the sample grids: patches, then free-form bins, in turn."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        if i % 2 == 0:
            out.append(random_patch_masks(1, S, IPA_TRAINING_MASKS.patch_frac, 1 + i % 5, 1 + i % 5, g))
        else:
            out.append(freeform_masks(1, S, g, observed_range=OBSERVED_BINS[(i // 2) % len(OBSERVED_BINS)]))
    return torch.cat(out)  # (n, 1, S, S)


SAMPLE_N = 6  # completions per image in an IPA sample grid (`ipa_core train --sample-n`)


class IPATask:
    """Train the partial encoder of an :class:`IPA` (``model.config.objective``: forward = IPA, reverse = IPA-R).

    ``masks`` draws the training masks (the paper's mixture by default). ``sample_images`` uint8
    ``(B, C, S, S)`` are completed in every sample grid (none: prior-like completions of nothing).
    """

    def __init__(self, model: IPA, masks: MaskMixture = IPA_TRAINING_MASKS, sample_images: Tensor | None = None,
                 sample_n: int = SAMPLE_N, sample_t: float = 1.0, eval_max_images: int = 64, eval_batch_size: int = 16):
        if not isinstance(model, IPA):
            raise UserError(f"IPATask needs an IPA model, got {type(model).__name__}; build it with IPA.from_vae(vae)")
        self.model = model
        self.masks = dataclasses.replace(masks)
        self.sample_images = sample_images
        self.sample_n, self.sample_t = sample_n, sample_t
        self.eval_max_images, self.eval_batch_size = eval_max_images, eval_batch_size

    def prepare(self, dataset, generator: torch.Generator) -> None:
        """Before step 0 of a fresh run: without ``sample_images``, grid the first 4 training images."""
        if self.sample_images is None and len(dataset):
            self.sample_images = dataset_images(dataset, np.arange(min(4, len(dataset))))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return _unwrap(self.model).partial_parameters()

    def provenance(self) -> dict:
        """Stored in every checkpoint and compared on resume: the IPA config, its objective, the
        training masks and the digest of the frozen VAE weights it wraps (a VAE trained on since
        is another VAE: resuming on it is refused)."""
        ipa = _unwrap(self.model)
        sd = ipa.state_dict()
        frozen = [k for k in sd if not IPA.is_partial_name(k)]
        return {"task": "ipa", "model": ipa.config.to_dict(), "objective": ipa.config.objective,
                "masks": dataclasses.asdict(self.masks), "vae": state_digest(sd, frozen)}

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor], generator: torch.Generator) -> tuple[Tensor, dict]:
        x = batch[0]
        # masks are drawn on the CPU from a seed taken from the trainer's (checkpointed) generator
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
        m = self.masks.sample(x.shape[0], x.shape[-1], torch.Generator().manual_seed(seed)).to(x.device)
        out = model(x, m, generator)  # IPA.forward = the objective (goes through DDP when wrapped)
        return out["loss"], {k: v.detach() for k, v in out.items() if k != "loss"}

    @torch.no_grad()
    def on_sample(self, model: nn.Module, step: int, out_png: Path) -> None:
        """Rows: ground truth, masked input, completions, pixel mean and variance (same noise every time)."""
        if self.sample_n < 1:  # sample grids off
            return
        ipa = _unwrap(model)
        cfg = ipa.config
        device = ipa.decoder.gain.device
        x = self.sample_images
        if x is None:
            x = torch.zeros(1, cfg.image_channels, cfg.image_size, cfg.image_size, dtype=torch.uint8)
            m = torch.zeros(1, 1, cfg.image_size, cfg.image_size)
        else:
            m = fixed_sample_masks(x.shape[0], cfg.image_size)
        g = torch.Generator(device=device).manual_seed(0)
        samples = sample_completions(ipa, x.to(device), m.to(device), self.sample_n, t=self.sample_t, generator=g)
        save_png(completion_figure(x, m, samples), out_png, titles=completion_titles(samples.shape[1]), cell=samples.shape[-1])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, dataset) -> dict[str, float]:
        """Mean O_for KL (nats/dim) on test images per free-form observed-fraction bin and for 0-5 patches."""
        ipa = _unwrap(model)
        device = ipa.decoder.gain.device
        n = min(len(dataset), self.eval_max_images)
        S = ipa.config.image_size
        mask_g = torch.Generator().manual_seed(0)
        mask_sets = {f"kl_{bin_name(b)}": freeform_masks(n, S, mask_g, observed_range=b) for b in OBSERVED_BINS}
        mask_sets["kl_patches"] = random_patch_masks(n, S, self.masks.patch_frac, self.masks.max_patches, 0, mask_g)
        totals = dict.fromkeys(mask_sets, 0.0)
        g = torch.Generator(device=device).manual_seed(0)  # the same z ~ q(z | x) for every mask set
        for start in range(0, n, self.eval_batch_size):
            idx = np.arange(start, min(start + self.eval_batch_size, n))
            x = dataset_images(dataset, idx).to(device)
            layers = ipa.posterior_path(x, g)  # the frozen VAE's half: once per batch, not once per mask set
            for name, masks in mask_sets.items():
                totals[name] += float(ipa.forward_kl_given(layers, x, masks[idx].to(device)).sum())
            del layers
        res: dict[str, float] = {name: total / max(n, 1) for name, total in totals.items()}
        res["kl_mean_bins"] = float(np.mean([res[f"kl_{bin_name(b)}"] for b in OBSERVED_BINS]))
        res["n_images"] = n
        return res

    def save_pretrained(self, model: nn.Module, out_dir: Path) -> None:
        _unwrap(model).save_pretrained(out_dir)
