import pytest
import torch

import boed.samplers
from boed.samplers import DatasetSampler, IPASampler, paste_observed
from xray.errors import UserError


class ImageSet:
    """Minimal dataset: items (uint8 (1, S, S), labels (15,)); image i is filled with value i."""

    def __init__(self, n=6, S=8):
        self.images = torch.arange(n, dtype=torch.uint8)[:, None, None, None].expand(n, 1, S, S).clone()
        self.labels = torch.zeros(n, 15)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


def _obs(B=3, S=8):
    return torch.zeros(B, 1, S, S, dtype=torch.uint8), torch.zeros(B, 1, S, S)


def test_dataset_sampler_shapes_without_replacement_and_reproducible():
    ds = ImageSet(6)
    s = DatasetSampler(ds)
    x, m = _obs()
    a = s.sample(x, m, 4, torch.Generator().manual_seed(0))
    b = s.sample(x, m, 4, torch.Generator().manual_seed(0))
    assert a.shape == (3, 4, 1, 8, 8) and a.dtype == torch.uint8
    assert torch.equal(a, b)
    ids = a[:, :, 0, 0, 0]  # (B, N) image id = value
    for row in ids:
        assert len(set(row.tolist())) == 4  # no repeats within an image's draws
    # more draws than images: with replacement, still valid ids
    big = s.sample(x, m, 10, torch.Generator().manual_seed(1))
    assert big.shape == (3, 10, 1, 8, 8) and int(big.max()) < 6
    shared = DatasetSampler(ds, shared=True).sample(x, m, 4, torch.Generator().manual_seed(2))
    assert torch.equal(shared[0], shared[1]) and torch.equal(shared[1], shared[2])


def test_dataset_sampler_rejects_size_mismatch_and_empty():
    with pytest.raises(UserError, match="scanned images"):
        DatasetSampler(ImageSet(3, S=8)).sample(*_obs(S=16), 2)
    with pytest.raises(UserError, match="empty"):
        DatasetSampler(ImageSet(0))


def test_paste_observed():
    samples = torch.full((1, 2, 1, 4, 4), 9, dtype=torch.uint8)
    x_obs = torch.full((1, 1, 4, 4), 3, dtype=torch.uint8)
    m = torch.zeros(1, 1, 4, 4)
    m[..., :2, :] = 1
    out = paste_observed(samples, x_obs, m)
    assert (out[..., :2, :] == 3).all() and (out[..., 2:, :] == 9).all()


def test_ipa_sampler_calls_sample_completions_in_bounded_batches(monkeypatch):
    """Stand-in sample_completions: checks the batching and arguments, not IPA itself."""
    calls = []

    def fake_sample_completions(model, x_obs, m, n, t=1.0, generator=None, paste=True, autocast=False):
        calls.append((x_obs.shape[0], n, t))
        out = torch.randint(0, 256, (x_obs.shape[0], n, *x_obs.shape[1:]), dtype=torch.uint8, generator=generator)
        return paste_observed(out, x_obs, m) if paste else out

    monkeypatch.setattr(boed.samplers, "sample_completions", fake_sample_completions)
    sampler = IPASampler(model=object(), temperature=0.5, paste=True, max_batch=8)
    x = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    m = torch.zeros(5, 1, 8, 8)
    m[:, :, :4] = 1
    x_obs = x * m.byte()
    out = sampler.sample(x_obs, m, 3, torch.Generator().manual_seed(0))
    assert out.shape == (5, 3, 1, 8, 8)
    assert [c[0] for c in calls] == [2, 2, 1] and all(c[1:] == (3, 0.5) for c in calls)
    assert torch.equal(out[:, :, :, :4], x_obs[:, None, :, :4].expand(5, 3, 1, 4, 8))
    with pytest.raises(UserError, match="temperature"):
        IPASampler(object(), temperature=0)


def test_ipa_sampler_with_a_real_tiny_ipa_keeps_observed_pixels():
    from ipa_core.config import VAEConfig
    from ipa_core.ipa import IPA

    cfg = VAEConfig(image_size=16, image_channels=1, width=16, zdim=4, custom_width_str="", num_mixtures=2,
                    enc_blocks="16x1,16d2,8x1,8d2,4x1,4d4,1x1", dec_blocks="1x1,4m1,4x1,8m4,8x1,16m8,16x1",
                    shift=-127.5, scale=1 / 64)
    torch.manual_seed(0)
    model = IPA(cfg).eval()
    x = torch.randint(0, 256, (2, 1, 16, 16), dtype=torch.uint8)
    m = torch.zeros(2, 1, 16, 16)
    m[:, :, 4:12, 4:12] = 1
    x_obs = x * m.byte()
    out = IPASampler(model, max_batch=3).sample(x_obs, m, 2, torch.Generator().manual_seed(0))
    assert out.shape == (2, 2, 1, 16, 16) and out.dtype == torch.uint8
    assert torch.equal(out[..., 4:12, 4:12], x_obs[:, None, :, 4:12, 4:12].expand(2, 2, 1, 8, 8))
    again = IPASampler(model, max_batch=3).sample(x_obs, m, 2, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_generator_for_keeps_same_device_generators():
    from boed.samplers import generator_for

    g = torch.Generator().manual_seed(3)
    assert generator_for(torch.device("cpu"), g) is g and generator_for(torch.device("cpu"), None) is None
