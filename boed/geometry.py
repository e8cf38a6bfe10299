"""Scan geometry: an S x S image, square patches of side P = S/4, a G x G grid of top-left corners.

Locations are integer indices ``l = row * G + col`` over the grid (L = G * G = 289 for G = 17).
The corner of grid cell (row, col) is ``(row * stride, col * stride)`` with
``stride = (S - P) / (G - 1)`` (12 px at S = 256, 3 px at S = 64). Masks use one convention
everywhere: 1 = observed, 0 = unobserved, and an observation is ``y = cat(x * m, m)``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from xray.errors import UserError


@dataclass(frozen=True)
class ScanGeometry:
    image_size: int = 256  # S
    patch_size: int | None = None  # P; default S // 4
    grid: int = 17  # G

    def __post_init__(self):
        S, G = self.image_size, self.grid
        if self.patch_size is None:
            if S % 4:
                raise UserError(f"image size must be a multiple of 4 (patch = S/4), got {S}")
            object.__setattr__(self, "patch_size", S // 4)
        P = self.patch_size
        if not 0 < P <= S:
            raise UserError(f"patch size must be in 1..{S}, got {P}")
        if G < 1 or (G > 1 and (S - P) % (G - 1)):
            raise UserError(f"grid {G} does not divide the valid range 0..{S - P} evenly; choose G with (S-P) % (G-1) == 0")

    @property
    def stride(self) -> int:
        return 0 if self.grid == 1 else (self.image_size - self.patch_size) // (self.grid - 1)

    @property
    def num_locations(self) -> int:  # L
        return self.grid * self.grid

    def to_dict(self) -> dict:
        return asdict(self)

    def check_location(self, loc: int) -> int:
        if not 0 <= int(loc) < self.num_locations:
            raise UserError(f"scan location {loc} is outside the grid 0..{self.num_locations - 1}")
        return int(loc)

    def box(self, loc: int) -> tuple[int, int, int, int]:
        """Pixel box ``(top, left, bottom, right)`` (exclusive ends) of location ``loc``."""
        r, c = divmod(self.check_location(loc), self.grid)
        top, left = r * self.stride, c * self.stride
        return top, left, top + self.patch_size, left + self.patch_size

    def location_of(self, row: int, col: int) -> int:
        """Location index of grid cell (row, col)."""
        if not (0 <= row < self.grid and 0 <= col < self.grid):
            raise UserError(f"grid cell ({row}, {col}) is outside 0..{self.grid - 1}")
        return row * self.grid + col

    def patch_masks(self, device: torch.device | str | None = None, dtype=torch.float32) -> torch.Tensor:
        """The mask of every single location: ``(L, 1, S, S)``, 1 inside the patch."""
        S, P, s, G = self.image_size, self.patch_size, self.stride, self.grid
        ar = torch.arange(S, device=device)
        starts = torch.arange(G, device=device) * s  # (G,)
        inside = (ar[None, :] >= starts[:, None]) & (ar[None, :] < starts[:, None] + P)  # (G, S)
        m = inside[:, None, :, None] & inside[None, :, None, :]  # (G, G, S, S) rows x cols
        return m.reshape(G * G, 1, S, S).to(dtype)  # (L, 1, S, S)

    def mask(self, locations: Sequence[int], device: torch.device | str | None = None, dtype=torch.float32) -> torch.Tensor:
        """Observation mask of the union of scanned patches: ``(1, S, S)``."""
        S = self.image_size
        m = torch.zeros(1, S, S, device=device, dtype=dtype)
        for loc in locations:
            t, l, b, r = self.box(loc)
            m[:, t:b, l:r] = 1
        return m

    def masks(self, locations: Sequence[Sequence[int]], device=None, dtype=torch.float32) -> torch.Tensor:
        """One mask per image from a list of location lists: ``(B, 1, S, S)``."""
        return torch.stack([self.mask(locs, device, dtype) for locs in locations])

    def fully_observed(self, mask: torch.Tensor) -> torch.Tensor:
        """Which candidates add nothing: ``mask (..., 1, S, S)`` -> ``(..., L)`` bool."""
        S, P, G = self.image_size, self.patch_size, self.grid
        m = mask.reshape(-1, 1, S, S).float()  # (M, 1, S, S)
        frac = F.avg_pool2d(m, P, stride=max(self.stride, 1))[..., :G, :G]  # (M, 1, G, G) observed share of each patch
        return (frac * (P * P) >= P * P - 0.5).reshape(*mask.shape[:-3], G * G)  # (..., L)

    def grid_map(self, values: torch.Tensor) -> torch.Tensor:
        """Reshape per-location values ``(..., L)`` to the grid ``(..., G, G)``."""
        return values.reshape(*values.shape[:-1], self.grid, self.grid)  # (..., G, G)


def observe(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The observation ``y = cat(x * m, m)`` for images ``x (..., C, H, W)`` and masks ``m (..., 1, H, W)``."""
    return torch.cat([x * m, m.expand(*x.shape[:-3], 1, *x.shape[-2:])], dim=-3)  # (..., C + 1, H, W)
