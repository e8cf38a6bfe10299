import torch
from torch import nn

from ipa_core.seeding import draw, seeded


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


def test_draw_uses_the_generators_device_and_stream():
    """``draw`` takes the numbers from the generator wherever it lives (a CPU generator driving a
    CUDA model gives the CPU's numbers) and returns them on the asked device and dtype."""
    a = draw(torch.randn, (2, 3), torch.Generator().manual_seed(5), "cpu", torch.float64)
    b = torch.randn((2, 3), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert a.dtype == torch.float64 and torch.equal(a, b)
    u = draw(torch.rand, (4,), torch.Generator().manual_seed(1), torch.device("cpu"))
    assert torch.equal(u, torch.rand(4, generator=torch.Generator().manual_seed(1)))
