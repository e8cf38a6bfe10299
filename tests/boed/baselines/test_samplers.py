import pytest
import torch

from boed.baselines.samplers import RetrievalSampler
from tests.boed.test_samplers import ImageSet
from xray.errors import UserError


def bank():
    ds = ImageSet(20, S=8)
    g = torch.Generator().manual_seed(0)
    ds.images = torch.randint(0, 256, (20, 1, 8, 8), dtype=torch.uint8, generator=g)
    return ds


def test_retrieval_finds_the_matching_image_and_pastes_observations():
    ds = bank()
    s = RetrievalSampler(ds, top_k=5)
    m = torch.zeros(2, 1, 8, 8)
    m[:, :, :4] = 1  # top half observed
    x = ds.images[[7, 13]].clone()
    x_obs = x * m.byte()
    d = s.distances(x_obs, m)
    assert d.shape == (2, 20) and d[0, 7] < 1e-6 and d[1, 13] < 1e-6
    # brute-force masked mean squared distance
    want = ((x_obs[0].float() / 255 - ds.images.float() / 255) ** 2 * m[0]).sum((1, 2, 3)) / m[0].sum()
    assert torch.allclose(d[0], want, atol=1e-5)
    out = s.sample(x_obs, m, 3, torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 1, 8, 8)
    assert torch.equal(out[0, 0], x[0]) and torch.equal(out[1, 0], x[1])  # nearest first: the image itself
    assert torch.equal(out[:, :, :, :4], x_obs[:, None, :, :4].expand(2, 3, 1, 4, 8))


def test_retrieval_with_nothing_observed_draws_varied_images_reproducibly():
    s = RetrievalSampler(bank(), top_k=20, temperature=0.1)
    x, m = torch.zeros(1, 1, 8, 8, dtype=torch.uint8), torch.zeros(1, 1, 8, 8)
    a = s.sample(x, m, 6, torch.Generator().manual_seed(1))
    b = s.sample(x, m, 6, torch.Generator().manual_seed(1))
    c = s.sample(x, m, 6, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len({bytes(im.flatten().tolist()) for im in a[0]}) == 6  # without replacement


def test_retrieval_bad_input():
    with pytest.raises(UserError, match="empty"):
        RetrievalSampler(ImageSet(0, S=8))
    s = RetrievalSampler(bank())
    with pytest.raises(UserError, match="scanned images"):
        s.sample(torch.zeros(1, 1, 16, 16, dtype=torch.uint8), torch.zeros(1, 1, 16, 16), 2)
