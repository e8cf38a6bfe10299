"""Exponential moving average of the trainable weights."""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    """``ema <- rate * ema + (1 - rate) * model`` over the trainable parameters (one fused
    ``_foreach_lerp_``; the pairs are gathered once), buffers copied."""

    def __init__(self, ema: nn.Module, model: nn.Module, rate: float):
        pairs = [(e, m) for e, m in zip(ema.parameters(), model.parameters()) if m.requires_grad]
        self.ema_params, self.model_params = [e for e, _ in pairs], [m for _, m in pairs]
        self.buffers = list(zip(ema.buffers(), model.buffers()))
        self.rate = rate

    @torch.no_grad()
    def update(self) -> None:
        if self.ema_params:
            torch._foreach_lerp_(self.ema_params, self.model_params, 1.0 - self.rate)
        for eb, mb in self.buffers:
            eb.copy_(mb)
