"""Masks: shapes, binary values, observed-fraction bins, patch geometry, mixtures, CLI specs."""

from __future__ import annotations

import pytest
import torch

from ipa_core.masks import (OBSERVED_BINS, MaskMixture, freeform_masks, observed_bin, observed_fraction,
                            parse_mask_spec, random_patch_masks)
from xray.errors import UserError


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def is_binary(m: torch.Tensor) -> bool:
    return bool(((m == 0) | (m == 1)).all())


@pytest.mark.parametrize("b", OBSERVED_BINS)
def test_freeform_masks_fall_in_their_bin(b):
    m = freeform_masks(6, 32, gen(), observed_range=b)
    assert m.shape == (6, 1, 32, 32) and m.dtype == torch.float32 and is_binary(m)
    f = observed_fraction(m)
    assert ((f >= b[0]) & (f <= b[1])).all(), f
    assert len({tuple(x.flatten().tolist()) for x in m}) == 6  # all different


def test_freeform_default_mixes_bins_and_is_reproducible():
    a, b = freeform_masks(40, 32, gen(3)), freeform_masks(40, 32, gen(3))
    assert torch.equal(a, b)
    assert not torch.equal(a, freeform_masks(40, 32, gen(4)))
    bins = {observed_bin(float(f)) for f in observed_fraction(a)}
    assert len(bins) >= 4  # the bin is drawn uniformly for each mask


def test_patch_masks_geometry():
    S, frac = 40, 0.25
    P = 10
    none = random_patch_masks(8, S, frac, max_patches=0, generator=gen())
    assert torch.equal(none, torch.zeros(8, 1, S, S))
    one = random_patch_masks(500, S, frac, max_patches=1, min_patches=1, generator=gen())
    assert is_binary(one)
    rows, cols = one.amax(dim=3)[:, 0], one.amax(dim=2)[:, 0]  # (B, S): which rows / cols are touched
    h, w = rows.sum(dim=1), cols.sum(dim=1)
    assert torch.equal(one.sum(dim=(1, 2, 3)), h * w)  # a single rectangle
    assert (h <= P).all() and (w <= P).all() and (h >= P // 2).all()
    inside = (h == P) & (w == P)
    assert 0.5 < inside.float().mean() < 0.95  # most are whole, some clipped at the border
    # clipped ones touch the border
    touch = (rows[:, 0] + rows[:, -1] + cols[:, 0] + cols[:, -1]) > 0
    assert touch[~inside].all()
    many = random_patch_masks(400, S, frac, max_patches=5, generator=gen(1))
    n_zero = int((many.sum(dim=(1, 2, 3)) == 0).sum())
    assert 40 < n_zero < 110  # P(0 patches) = 1/6
    assert float(observed_fraction(many).max()) <= 5 * P * P / S**2


def test_mixture_extremes():
    S = 32
    only_patches = MaskMixture(p_freeform=0.0, patch_frac=0.35).sample(16, S, gen(5))
    assert torch.equal(only_patches, random_patch_masks(16, S, 0.35, 5, 0, gen_after_rand(5, 16)))
    only_ff = MaskMixture(p_freeform=1.0).sample(8, S, gen(5))
    assert only_ff.shape == (8, 1, S, S) and is_binary(only_ff)
    mixed = MaskMixture().sample(64, S, gen(6))
    assert is_binary(mixed) and mixed.shape == (64, 1, S, S)


def gen_after_rand(seed: int, B: int) -> torch.Generator:
    g = gen(seed)
    torch.rand(B, generator=g)  # MaskMixture draws its coin flips first
    return g


def test_mask_specs():
    S = 16
    assert torch.equal(parse_mask_spec("none", S), torch.zeros(1, 1, S, S))
    assert torch.equal(parse_mask_spec("full", S), torch.ones(1, 1, S, S))
    box = parse_mask_spec("box:2,3,4,5", S)
    assert box.sum() == 20 and box[0, 0, 2, 3] == 1 and box[0, 0, 5, 7] == 1 and box[0, 0, 6, 7] == 0
    assert 0 < parse_mask_spec("patches:3", S, gen()).sum() <= 3 * 6 * 6
    assert parse_mask_spec("freeform", S, gen()).shape == (1, 1, S, S)
    for bad in ["patches:x", "patches:-1", "box:1,2,3", "box:20,0,2,2", "circle", "none:1", ""]:
        with pytest.raises(UserError, match="bad mask spec"):
            parse_mask_spec(bad, S)


def test_observed_bin_edges():
    assert observed_bin(0.0) == 0 and observed_bin(0.2) == 1 and observed_bin(0.999) == 4 and observed_bin(1.0) == 4
    with pytest.raises(UserError):
        random_patch_masks(2, 16, 0.0)
    with pytest.raises(UserError):
        freeform_masks(1, 16, gen(), observed_range=(0.5, 0.2))


def test_classifier_mixture_is_ipas_with_25pct_patches():
    from ipa_core.masks import CLASSIFIER_TRAINING_MASKS, IPA_TRAINING_MASKS

    assert CLASSIFIER_TRAINING_MASKS.patch_frac == 0.25 and IPA_TRAINING_MASKS.patch_frac == 0.35
    assert CLASSIFIER_TRAINING_MASKS.p_freeform == IPA_TRAINING_MASKS.p_freeform == 0.5
    assert CLASSIFIER_TRAINING_MASKS.max_patches == IPA_TRAINING_MASKS.max_patches == 5


def test_mask_bank():
    from ipa_core.masks import MaskBank

    S = 32
    no_ff = MaskMixture(p_freeform=0.0, patch_frac=0.25)
    bank = MaskBank(no_ff, S, size=4, seed=0)
    assert bank.freeform is None  # nothing drawn when the mixture has no free-form share
    torch.testing.assert_close(bank.sample(20, gen(2)), no_ff.sample(20, S, gen(2)))  # same draws, same order
    mix = MaskMixture(p_freeform=1.0)
    bank = MaskBank(mix, S, size=6, seed=3)
    assert torch.equal(bank.freeform, MaskBank(mix, S, size=6, seed=3).freeform)  # seeded
    m = bank.sample(200, gen(4))
    assert is_binary(m) and m.shape == (200, 1, S, S)
    variants = torch.cat([bank.freeform, bank.freeform.flip(2), bank.freeform.flip(3), bank.freeform.flip(2, 3)])  # (24, 1, S, S)
    hits = (m[:, None] == variants[None]).flatten(2).all(2)  # (200, 24)
    assert hits.any(1).all()  # every draw is a bank mask under some flip
    assert hits.any(0).sum() > 18  # and the flips are used
    assert torch.equal(m, bank.sample(200, gen(4)))
    with pytest.raises(UserError):
        MaskBank(mix, S, size=0)
