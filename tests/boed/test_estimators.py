import math

import torch

from boed.estimators import belief_shift, binary_entropy, eig, epe, information_gain


def H(p):
    return 0.0 if p in (0.0, 1.0) else -p * math.log(p) - (1 - p) * math.log(1 - p)


def test_binary_entropy_known_values_and_endpoints():
    p = torch.tensor([0.0, 0.5, 1.0, 0.25])
    h = binary_entropy(p)
    assert torch.allclose(h, torch.tensor([0.0, math.log(2), 0.0, H(0.25)]), atol=1e-7)
    assert torch.isfinite(binary_entropy(torch.tensor([1e-30, 1 - 1e-12]))).all()


def test_eig_hand_computed_table():
    # two candidates, two samples: one splits the samples, one does not
    p = torch.tensor([[0.0, 1.0], [0.3, 0.3]], dtype=torch.float64)
    assert torch.allclose(eig(p), torch.tensor([math.log(2), 0.0], dtype=torch.float64), atol=1e-12)
    p = torch.tensor([[0.1, 0.5, 0.9]], dtype=torch.float64)
    want = H(0.5) - (H(0.1) + H(0.5) + H(0.9)) / 3
    assert abs(eig(p).item() - want) < 1e-12
    assert abs(epe(p).item() - (H(0.1) + H(0.5) + H(0.9)) / 3) < 1e-12


def test_information_gain_known_value_and_mean_is_eig():
    p = torch.tensor([[0.2, 0.6]], dtype=torch.float64)
    pbar = 0.4
    kl = lambda a, b: a * math.log(a / b) + (1 - a) * math.log((1 - a) / (1 - b))
    ig = information_gain(p)
    assert torch.allclose(ig, torch.tensor([[kl(0.2, pbar), kl(0.6, pbar)]], dtype=torch.float64), atol=1e-12)
    g = torch.Generator().manual_seed(0)
    q = torch.rand(3, 7, 10, generator=g) ** 3  # (B, L, N), many values near 0
    q[0, 0] = torch.tensor([0.0, 1.0] * 5)  # endpoints
    assert torch.allclose(information_gain(q).mean(-1), eig(q), atol=1e-6)


def test_properties_nonnegative_identical_zero_shapes_dtypes():
    g = torch.Generator().manual_seed(1)
    q = torch.rand(2, 5, 289, 10, generator=g)
    e = eig(q)
    assert e.shape == (2, 5, 289) and e.dtype == torch.float32
    assert (e >= 0).all() and (information_gain(q) >= 0).all()
    same = torch.rand(4, 1, generator=g).expand(4, 10)
    assert torch.equal(eig(same), torch.zeros(4))
    assert torch.allclose(epe(q), binary_entropy(q).mean(-1), atol=1e-6)
    # probabilities that are exactly 0/1 in float32 give finite, correct answers
    sat = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    assert torch.allclose(eig(sat), torch.tensor([math.log(2)])) and torch.equal(epe(sat), torch.zeros(1))
    assert torch.isfinite(information_gain(sat)).all()


def test_belief_shift_known_values_and_relation_to_information_gain():
    p = torch.tensor([[0.9, 0.5, 0.2]])  # (B=1, L=3) after each candidate
    q = torch.tensor([0.5])  # (B,) current belief
    kl = belief_shift(p, q)
    assert kl.shape == (1, 3)
    assert math.isclose(float(kl[0, 0]), 0.9 * math.log(1.8) + 0.1 * math.log(0.2), rel_tol=1e-6)
    assert float(kl[0, 1]) == 0.0  # no change of belief, no shift
    assert float(kl[0, 2]) > 0
    # the per-sample information gain is the shift from the mean prediction
    samples = torch.tensor([[0.1, 0.7, 0.4]])  # (L=1, N=3)
    assert torch.allclose(information_gain(samples), belief_shift(samples, samples.mean(-1)))
