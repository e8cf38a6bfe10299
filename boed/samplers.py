"""Completion samplers: N plausible full images given what has been scanned.

Protocol (every sampler, including those in :mod:`boed.baselines.samplers`)::

    sample(x_obs uint8 (B, C, S, S), m float (B, 1, S, S), n: int, generator) -> uint8 (B, N, C, S, S)

- :class:`IPASampler`: completions from an IPA model conditioned on ``y = cat(x_obs, m)``.
- :class:`DatasetSampler`: N images drawn from a dataset, ignoring the observations: the t = 1
  draws of the paper and the samples of the Uncond baselines.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from ipa_core.sampling import sample_completions
from xray.dataset import dataset_images
from xray.errors import UserError


@runtime_checkable
class Sampler(Protocol):
    def sample(self, x_obs: Tensor, m: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``x_obs (B, C, S, S) uint8, m (B, 1, S, S)`` -> completions ``(B, N, C, S, S) uint8``."""
        ...


def paste_observed(samples: Tensor, x_obs: Tensor, m: Tensor) -> Tensor:
    """Put the observed pixels back: ``samples (B, N, C, S, S)`` with ``x_obs``/``m`` where m = 1."""
    keep = (m > 0.5)[:, None]  # (B, 1, 1, S, S)
    return torch.where(keep, x_obs[:, None].to(samples.device), samples)  # (B, N, C, S, S)


def generator_for(device: torch.device, generator: torch.Generator | None) -> torch.Generator | None:
    """A generator usable on ``device``: ``generator`` itself, or one seeded from it (deterministically)
    when it lives on another device (e.g. a CPU generator driving sampling on CUDA)."""
    if generator is None or generator.device.type == torch.device(device).type:
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.Generator(device=device).manual_seed(seed)


def check_sampler_inputs(x_obs: Tensor, m: Tensor, n: int) -> None:
    if x_obs.dim() != 4 or m.dim() != 4 or m.shape[1] != 1 or x_obs.shape[0] != m.shape[0] or x_obs.shape[-2:] != m.shape[-2:]:
        raise ValueError(f"expected x_obs (B, C, S, S) and m (B, 1, S, S), got {tuple(x_obs.shape)} and {tuple(m.shape)}")
    if n < 1:
        raise UserError(f"number of samples must be >= 1, got {n}")


class IPASampler:
    """Completions from an IPA model (``ipa_core.sampling.sample_completions``).

    ``temperature`` scales the prior sigma (1.0 = the paper's setting; lower cuts posterior
    coverage). ``paste`` puts the observed pixels back into every sample. ``max_batch`` bounds the
    number of images (B * N) generated per call of the model (default 512 on CUDA; 32 on CPU,
    where larger batches fall out of cache and run slower per image). ``amp``: bf16
    autocast when the inputs are on CUDA.
    """

    def __init__(self, model: torch.nn.Module, temperature: float = 1.0, paste: bool = True,
                 max_batch: int | None = None, amp: bool = True):
        if temperature <= 0:
            raise UserError(f"sampling temperature must be > 0, got {temperature}")
        self.model = model
        self.temperature = float(temperature)
        self.paste = paste
        self.max_batch = None if max_batch is None else max(1, int(max_batch))
        self.amp = amp  # bf16 autocast of the networks, CUDA only

    @torch.inference_mode()
    def sample(self, x_obs: Tensor, m: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
        check_sampler_inputs(x_obs, m, n)
        max_batch = self.max_batch or (512 if x_obs.device.type == "cuda" else 32)
        per_call = max(1, max_batch // n)  # images of the batch per model call
        autocast = self.amp and x_obs.device.type == "cuda"
        generator = generator_for(x_obs.device, generator)
        outs = []
        for start in range(0, x_obs.shape[0], per_call):
            xo, mo = x_obs[start:start + per_call], m[start:start + per_call]
            out = sample_completions(self.model, xo, mo, n, t=self.temperature, generator=generator,
                                     paste=self.paste, autocast=autocast)  # (b, N, C, S, S)
            outs.append(out)
        return torch.cat(outs)


class DatasetSampler:
    """N images from a dataset, ignoring the observations (uniform, without replacement per image).

    ``shared=True`` gives every image of a batch the same N draws (one index draw per call).
    ``key`` identifies the draws: two samplers over the same data (equal ``dataset.fingerprint``,
    or the same dataset object) with the same ``shared`` draw the same images from the same
    generator state (used by :class:`boed.policies.FirstChoiceCache`).
    """

    def __init__(self, dataset: Any, shared: bool = False):
        if len(dataset) < 1:
            raise UserError("the dataset to draw samples from is empty; point --data/--cache-dir at a prepared split")
        self.dataset = dataset
        self.shared = shared
        fp = getattr(dataset, "fingerprint", None)
        self.key = ("dataset", fp if isinstance(fp, str) else f"object-{id(dataset)}", len(dataset), bool(shared))

    def indices(self, B: int, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Dataset indices ``(B, N)``; sampled without replacement per row when N <= len(dataset)."""
        size = len(self.dataset)
        rows = 1 if self.shared else B
        if n <= size:
            idx = torch.rand(rows, size, generator=generator).argsort(dim=1)[:, :n]  # (rows, N)
        else:
            idx = torch.randint(size, (rows, n), generator=generator)  # (rows, N)
        return idx.expand(B, n) if self.shared else idx

    def sample(self, x_obs: Tensor, m: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
        check_sampler_inputs(x_obs, m, n)
        B, C, S, _ = x_obs.shape
        idx = self.indices(B, n, generator)  # (B, N)
        x = dataset_images(self.dataset, idx.reshape(-1))  # (B * N, C', S', S')
        if x.shape[1:] != (C, S, S):
            raise UserError(f"dataset images are {tuple(x.shape[1:])} but the scanned images are {(C, S, S)}; "
                            "use data prepared at the models' image size")
        return x.reshape(B, n, C, S, S).to(x_obs.device)  # (B, N, C, S, S)
