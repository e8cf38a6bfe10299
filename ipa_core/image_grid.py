"""One PNG grid of uint8 images (the trainer's sample grids)."""

from __future__ import annotations

import math
import os

import torch
from PIL import Image
from torch import Tensor

from xray.io import atomic_path


def save_image_grid(images: Tensor, path: str | os.PathLike, nrow: int | None = None, pad: int = 2) -> None:
    """Write uint8 ``(N, C, H, W)`` images (C = 1 or 3) as one PNG grid, atomically."""
    x = images.detach().to("cpu", torch.uint8)
    n, c, h, w = x.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = torch.full((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), 255, dtype=torch.uint8)
    for i in range(n):
        r, k = divmod(i, nrow)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = x[i]
    arr = grid[0].numpy() if c == 1 else grid.permute(1, 2, 0).numpy()  # (H, W) or (H, W, 3)
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")
