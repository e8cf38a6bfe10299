import torch
from torch import nn

from ipa_core.seeding import seeded


def test_seeded_fixes_initial_weights_and_restores_the_global_generator():
    torch.manual_seed(5)
    expected_next = torch.rand(3)
    torch.manual_seed(5)
    with seeded(0):
        a = nn.Conv2d(2, 4, 3).weight.detach().clone()
    assert torch.equal(torch.rand(3), expected_next)  # the global stream goes on as if untouched
    torch.manual_seed(99)
    with seeded(0):
        b = nn.Conv2d(2, 4, 3).weight.detach().clone()
    with seeded(1):
        c = nn.Conv2d(2, 4, 3).weight.detach().clone()
    assert torch.equal(a, b) and not torch.equal(a, c)
