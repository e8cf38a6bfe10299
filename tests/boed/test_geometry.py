"""Scan geometry: grid, boxes, masks and which candidates a mask already covers."""

import pytest
import torch

from boed.geometry import ScanGeometry, observe
from xray.errors import UserError


def test_paper_and_demo_grids():
    g = ScanGeometry(256)
    assert (g.patch_size, g.stride, g.num_locations) == (64, 12, 289)
    assert g.box(0) == (0, 0, 64, 64) and g.box(288) == (192, 192, 256, 256)
    assert g.box(g.location_of(2, 5)) == (24, 60, 88, 124)
    assert ScanGeometry(64).stride == 3
    with pytest.raises(UserError, match="outside the grid"):
        g.box(289)
    with pytest.raises(UserError, match="does not divide"):
        ScanGeometry(64, grid=6)


def test_patch_masks_and_union_masks():
    g = ScanGeometry(32, grid=7)  # P = 8, stride 4
    pm = g.patch_masks()
    assert pm.shape == (49, 1, 32, 32) and (pm.sum((1, 2, 3)) == 64).all()
    m = g.mask([0, 48])
    assert m.sum() == 128 and m[0, 0, 0] == 1 and m[0, 31, 31] == 1
    assert torch.equal(g.masks([[0, 48], []])[0], m) and g.masks([[0, 48], []])[1].sum() == 0


@pytest.mark.parametrize("S,G", [(64, 17), (32, 7), (32, 25), (16, 1)])
def test_fully_observed_matches_counting_pixels(S, G):
    g = ScanGeometry(S, grid=G)
    gen = torch.Generator().manual_seed(S + G)
    pm = g.patch_masks()  # (L, 1, S, S)
    masks = [g.mask([]), g.mask([0]), g.mask([g.num_locations - 1, g.num_locations // 2])]
    masks.append((torch.rand(1, S, S, generator=gen) < 0.9).float())  # free-form: almost everything
    masks.append(torch.ones(1, S, S))
    m = torch.stack(masks)  # (B, 1, S, S)
    seen = torch.einsum("bchw,lchw->bl", m, pm)  # (B, L) observed pixels per patch
    expected = seen == g.patch_size ** 2
    got = g.fully_observed(m)
    assert got.shape == (len(masks), g.num_locations) and torch.equal(got, expected)
    assert not got[0].any() and got[1, 0] and got[-1].all()
    assert torch.equal(g.fully_observed(m[None]), expected[None])  # extra leading dims


def test_observe_concatenates_masked_image_and_mask():
    x = torch.rand(2, 3, 1, 8, 8)
    m = (torch.rand(2, 1, 1, 8, 8) > 0.5).float()
    y = observe(x, m)
    assert y.shape == (2, 3, 2, 8, 8)
    assert torch.equal(y[:, :, :1], x * m) and torch.equal(y[:, :, 1:], m.expand(2, 3, 1, 8, 8))
