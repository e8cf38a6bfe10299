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
