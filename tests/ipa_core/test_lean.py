"""ipa_core.lean: the plain layers' numbers with less kept for backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ipa_core.lean import AvgPool, GeluConv, lean_conv

torch.set_num_threads(1)


def _grads(fn, *leaves):
    out = fn(*leaves)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=out.dtype))
    return out.detach(), [t.grad.clone() for t in leaves]


def _leaves(*shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=g) * 2).requires_grad_() for s in shapes]


@pytest.mark.parametrize("k,pad", [(1, 0), (3, 1)])
def test_gelu_conv_gives_autograds_numbers(k, pad):
    x, w, b = _leaves((2, 6, 9, 9), (5, 6, k, k), (5,))
    ref, g_ref = _grads(lambda x, w, b: F.conv2d(F.gelu(x), w, b, 1, pad), x, w, b)
    x2, w2, b2 = (t.detach().clone().requires_grad_() for t in (x, w, b))
    out, g = _grads(lambda x, w, b: GeluConv.apply(w, b, (pad, pad), None, True, None, x), x2, w2, b2)
    assert torch.equal(out, ref)
    for a, r in zip(g, g_ref):  # 3x3: the calls autograd makes, the same numbers; 1x1: a matmul, float rounding
        if k == 3:
            assert torch.equal(a, r)
        torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-6)


def test_gelu_conv_of_two_inputs_is_the_conv_of_their_concatenation():
    x, a, w, b = _leaves((2, 4, 7, 7), (2, 3, 7, 7), (5, 7, 1, 1), (5,), seed=1)
    ref, g_ref = _grads(lambda x, a, w, b: F.conv2d(F.gelu(torch.cat([x, a], 1)), w, b), x, a, w, b)
    x2, a2, w2, b2 = (t.detach().clone().requires_grad_() for t in (x, a, w, b))
    out, g = _grads(lambda x, a, w, b: GeluConv.apply(w, b, (0, 0), None, True, None, x, a), x2, a2, w2, b2)
    assert torch.equal(out, ref)  # the forward is the plain one
    for got, want in zip(g, g_ref):  # the backward one half at a time: float summation order only
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # only the inputs that need a gradient get one
    x3, a3, w3, b3 = x.detach(), a.detach().clone().requires_grad_(), w.detach().clone().requires_grad_(), b.detach()
    GeluConv.apply(w3, b3, (0, 0), None, True, None, x3, a3).sum().backward()
    assert a3.grad is not None and w3.grad is not None


def test_gelu_conv_under_bf16_autocast_matches_autograd():
    x, a, w, b = _leaves((1, 4, 6, 6), (1, 4, 6, 6), (3, 8, 1, 1), (3,), seed=2)

    def plain(x, a, w, b):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return F.conv2d(F.gelu(torch.cat([x, a], 1)), w, b)

    def lean(x, a, w, b):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return GeluConv.apply(w, b, (0, 0), None, True, None, x, a)

    ref, g_ref = _grads(plain, x, a, w, b)
    x2, a2, w2, b2 = (t.detach().clone().requires_grad_() for t in (x, a, w, b))
    out, g = _grads(lean, x2, a2, w2, b2)
    assert out.dtype == ref.dtype == torch.bfloat16 and torch.equal(out, ref)
    for got, want in zip(g, g_ref):
        assert got.dtype == want.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("d", [2, 4])
def test_avg_pool_keeps_nothing_and_gives_the_same_numbers(d):
    (x,) = _leaves((2, 3, 8, 8), seed=3)
    ref, (g_ref,) = _grads(lambda x: F.avg_pool2d(x, d, d), x)
    x2 = x.detach().clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out, (g,) = _grads(lambda x: AvgPool.apply(x, d), x2)
    assert not saved
    assert torch.equal(out, ref) and torch.equal(g, g_ref)


def test_gelu_conv_rows_is_the_slice_of_the_whole_output():
    x, w, b = _leaves((2, 6, 5, 5), (7, 6, 1, 1), (7,), seed=6)
    ref, g_ref = _grads(lambda x, w, b: F.conv2d(F.gelu(x), w, b)[:, :3], x, w, b)
    x2, w2, b2 = (t.detach().clone().requires_grad_() for t in (x, w, b))
    out, g = _grads(lambda x, w, b: GeluConv.apply(w, b, (0, 0), slice(0, 3), True, None, x), x2, w2, b2)
    assert out.shape == (2, 3, 5, 5) and torch.equal(out, ref)
    assert out.untyped_storage().nbytes() == out.numel() * 4  # its own storage, not a view of the whole
    for got, want in zip(g, g_ref):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert not g[1][3:].any() and not g[2][3:].any()  # rows not returned: zero gradients


def test_lean_conv_without_gelu_is_the_plain_conv():
    conv = torch.nn.Conv2d(6, 4, 1)
    (x,) = _leaves((2, 6, 5, 5), seed=7)
    ref, g_ref = _grads(lambda x: conv(x), x)
    conv.zero_grad()
    x2 = x.detach().clone().requires_grad_()
    out, g = _grads(lambda x: lean_conv(conv, x, gelu=False), x2)
    assert torch.equal(out, ref)
    torch.testing.assert_close(g[0], g_ref[0], rtol=1e-6, atol=1e-6)


def test_gelu_conv_last_rows_summed_onto_add():
    x, w, b, a = _leaves((2, 6, 5, 5), (7, 6, 1, 1), (7,), (2, 4, 5, 5), seed=8)
    ref, g_ref = _grads(lambda x, w, b, a: a + F.conv2d(F.gelu(x), w, b)[:, 3:], x, w, b, a)
    x2, w2, b2, a2 = (t.detach().clone().requires_grad_() for t in (x, w, b, a))
    out, g = _grads(lambda x, w, b, a: GeluConv.apply(w, b, (0, 0), slice(3, None), True, a, x), x2, w2, b2, a2)
    assert torch.equal(out, ref)
    for got, want in zip(g, g_ref):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert not g[1][:3].any() and not g[2][:3].any()  # rows not covered: zero gradients


def test_affine_conv_is_the_conv_of_the_affine_map():
    from ipa_core.lean import AffineConv

    x, g, b, w, bias = _leaves((2, 6, 5, 5), (1, 6, 1, 1), (1, 6, 1, 1), (4, 6, 1, 1), (4,), seed=9)
    ref, g_ref = _grads(lambda x, g, b, w, bias: F.conv2d(x * g + b, w, bias), x, g, b, w, bias)
    leaves = [t.detach().clone().requires_grad_() for t in (x, g, b, w, bias)]
    out, got = _grads(AffineConv.apply, *leaves)
    assert torch.equal(out, ref)
    for a, r in zip(got, g_ref):
        torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-6)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        AffineConv.apply(*leaves)
    assert saved.count((2, 6, 5, 5)) == 1  # x alone, not x * g + b too
