"""Initial weights that depend on the seed alone.

``nn.Module`` initialisers draw from torch's global generator, and recent PyTorch (2.14 here) seeds
that generator differently in every process (``torch.initial_seed()`` changes from run to run).
A model built outside :func:`seeded` therefore starts from other weights in every run, and so
does all that is trained from it.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Inside the block torch's global CPU generator is seeded with ``seed``; after it, its old
    state is back (code after the block draws what it would have drawn without it)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def draw(fn, shape, generator: torch.Generator | None, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``fn(shape)`` (``torch.rand`` or ``torch.randn``) from ``generator``, returned on ``device``.

    A generator draws on its own device: a CPU generator driving a CUDA model draws on the CPU and the
    draws are moved (the same numbers on every device), a CUDA generator draws on the GPU. Without a
    generator the draw is made on ``device`` from torch's default generator there."""
    where = generator.device if generator is not None else torch.device(device)
    return fn(shape, generator=generator, device=where, dtype=dtype).to(device, non_blocking=True)
