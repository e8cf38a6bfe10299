"""What both incremental engines share: the abstract engine and its ``logits`` driver.

An engine scores, for every item q (candidate ``item_l[q]`` of image ``item_b[q]``) and sample
n, the classifier's logits of ``observe(x_n / 255, m ∪ patch_l)``: a base pass per block of
images (the full forward on ``observe(x_n / 255, m)``, keeping what the candidates gather from),
then the candidates in chunks (windows recomputed, gathered from the base maps). The driver
below blocks the images (about ``block_bytes`` of base maps) and chunks the items (about
``chunk_size`` inputs, and ``window_bytes`` of recomputed windows when the engine says what a
window costs); an engine writes :meth:`plan`, :meth:`base` and :meth:`candidates`.
"""

from __future__ import annotations

import abc
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from boed.geometry import ScanGeometry


class IncrementalEngine(abc.ABC):
    """Patch-local inference for one classifier (weights read at call time)."""

    default_block_bytes: int = 64 << 20  # base maps per block of images

    @property
    @abc.abstractmethod
    def in_channels(self) -> int:
        """Channels of the classifier input ``cat(x, m)``: C + 1."""

    @property
    @abc.abstractmethod
    def device(self) -> torch.device:
        ...

    @abc.abstractmethod
    def worthwhile(self, geometry: ScanGeometry) -> bool:
        """Whether the windows save enough to beat the full path."""

    @abc.abstractmethod
    def plan(self, geometry: ScanGeometry, device) -> Any:
        """Window sizes and gather tables for ``geometry`` (cached)."""

    @abc.abstractmethod
    def image_bytes(self, plan, N: int) -> int:
        """Bytes of the base maps of one image (its N samples)."""

    def window_bytes(self, plan) -> int:
        """Bytes of the recomputed windows (and their crops) of one item-sample; 0: not bounded."""
        return 0

    def prepare(self) -> Any:
        """What every block reads (e.g. folded conv weights), computed once per call under inference mode."""
        return None

    @abc.abstractmethod
    def base(self, plan, x_u8: Tensor, m: Tensor, max_inputs: int, state, fmt) -> tuple[Any, Tensor]:
        """``(gather pools, base logits (Bb * N, K))`` of a block: ``x_u8 (Bb, N, C, S, S)``, ``m (Bb, 1, S, S)``;
        the pools have room for ``max_inputs`` item-samples' windows."""

    @abc.abstractmethod
    def candidates(self, plan, pools, b: Tensor, l: Tensor, N: int, Bb: int, state, fmt) -> Tensor:
        """Logits ``(k * N, K)`` of items ``(b (k,) image in block, l (k,) location)``."""

    def logits(self, samples: Tensor, mask: Tensor, geometry: ScanGeometry, item_b: Tensor, item_l: Tensor, *,
               chunk_size: int = 256, channels_last: bool = True, amp: bool = True, progress: bool = False,
               block_bytes: int | None = None, window_bytes: int = 256 << 20) -> tuple[Tensor, Tensor]:
        """Logits of the base inputs and of the candidate items, float32 ``((B, N, K), (Q, N, K))``.

        ``samples`` uint8 ``(B, N, C, S, S)``, ``mask (B, 1, S, S)``; item ``q`` is candidate
        ``item_l[q]`` of image ``item_b[q]`` (sorted by image). Images are processed in blocks whose
        base maps take about ``block_bytes`` (default :attr:`default_block_bytes`); items in chunks
        of about ``chunk_size`` inputs whose recomputed windows take about ``window_bytes``.
        """
        B, N, C, S, _ = samples.shape
        if self.in_channels != C + 1 or mask.shape != (B, 1, S, S) or geometry.image_size != S:
            raise ValueError(f"samples {tuple(samples.shape)}, mask {tuple(mask.shape)}, geometry S={geometry.image_size} "
                             f"and a classifier taking {self.in_channels} channels disagree")
        device = self.device
        plan = self.plan(geometry, device)
        item_b, item_l = item_b.to(device), item_l.to(device)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        per_win = self.window_bytes(plan)
        chunk = max(1, int(chunk_size) // N if not per_win else min(int(chunk_size) // N, window_bytes // max(1, per_win * N)))
        block = max(1, (block_bytes or self.default_block_bytes) // self.image_bytes(plan, N))  # images per block
        amp_ctx = torch.autocast("cuda", dtype=torch.bfloat16) if (amp and device.type == "cuda") else nullcontext()
        base_logits: list[Tensor] = []
        cand_logits: list[Tensor] = []
        bounds = torch.searchsorted(item_b, torch.arange(0, B + block, block, device=device).clamp(max=B)).tolist()
        n_chunks = sum(-(-(q1 - q0) // chunk) for q0, q1 in zip(bounds, bounds[1:]))
        bar = tqdm(total=n_chunks, desc="classify (incremental)", disable=not progress or None, leave=False)
        with torch.inference_mode(), amp_ctx:
            state = self.prepare()
            for blk, b0 in enumerate(range(0, B, block)):
                b1 = min(B, b0 + block)
                pools, logits0 = self.base(plan, samples[b0:b1], mask[b0:b1], chunk * N, state, fmt)
                base_logits.append(logits0.float().view(b1 - b0, N, -1))  # (Bb, N, K)
                q0, q1 = bounds[blk], bounds[blk + 1]
                for i0 in range(q0, q1, chunk):
                    i1 = min(q1, i0 + chunk)
                    out = self.candidates(plan, pools, item_b[i0:i1] - b0, item_l[i0:i1], N, b1 - b0, state, fmt)
                    cand_logits.append(out.float().view(i1 - i0, N, -1))  # (k, N, K)
                    bar.update(1)
        bar.close()
        K = base_logits[0].shape[-1]
        return torch.cat(base_logits), torch.cat(cand_logits) if cand_logits else torch.zeros(0, N, K, device=device)
