"""Layers that keep less for backward, for checkpointed (memory-bound) training.

A checkpointed unit is recomputed in backward with autograd saving what its ops need; at 256 px
(xray256, batch 1) a 512-channel map is 0.125 GB, and what autograd keeps beside the inputs the
unit keeps anyway (the GELU of an input, a pooling's input, a concatenation) sets the peak of a
training step. These functions give the plain layers' forward numbers (the same kernels on the
same values) and keep only what cannot be taken again cheaply:

- :class:`GeluConv` ``add + conv2d(gelu(cat(xs, 1)), w, b)[:, rows]``: keeps ``xs``, not their
  GELU or their concatenation; a 1x1 conv's input gradient is one ``bmm`` into its own tensor
  (the CPU conv backward needs twice that memory); output rows without a zero-padded gradient;
- :class:`AffineConv` ``conv1x1(x * g + b)`` (the decoder's output affine and the likelihood's
  conv): keeps ``x``, not ``x * g + b`` too;
- :class:`AvgPool`: keeps nothing (autograd's keeps the input);
- :func:`add_`: a sum in place where that changes no number.

Gradients equal autograd's up to float summation order (the same numbers where the same kernels
run: 3x3 convs, and 1x1 ones on one CPU thread). ``tests/ipa_core/test_lean.py`` checks them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def add_(a: Tensor, b: Tensor) -> Tensor:
    """``a + b``, written into ``a`` where that gives the same tensor (``a`` has the sum's dtype and
    shape: under autocast a bf16 ``a`` plus an fp32 ``b`` is fp32, made out of place); ``a`` must
    not be needed by autograd (an op's output that no backward keeps)."""
    if a.dtype == torch.result_type(a, b) and a.shape == torch.broadcast_shapes(a.shape, b.shape):
        return a.add_(b)
    return a + b


def lean_conv(c: nn.Conv2d, *xs: Tensor, gelu: bool = True, rows: slice | None = None, add: Tensor | None = None) -> Tensor:
    """``add + c(gelu(cat(xs, 1)))[:, rows]`` through :class:`GeluConv` (``gelu=False``: no GELU;
    no ``add``: the rows alone). ``xs[i]`` ``(B, C_i, r, r)`` -> ``(B, len(rows) or out, r, r)``."""
    return GeluConv.apply(c.weight, c.bias, c.padding, rows, gelu, add, *xs)


class GeluConv(torch.autograd.Function):
    """``add + conv2d(gelu(cat(xs, 1)), w, b, padding)[:, rows]`` that keeps for backward its
    inputs ``xs`` and ``w``; the backward takes their GELU again (each conv of a recomputed block
    keeps its pre-activation alone, half of what autograd keeps).

    - Two inputs (the heads over ``cat([state, activations])``, 1x1): the concatenation exists only
      in forward, its GELU taken in place (the same values as ``F.gelu``); the backward takes each
      half's gradients on its own, each into its own tensor (the gradient of the activations as a
      slice of the whole would keep the whole alive until the encoder's backward). At 256 px the
      concatenation, its GELU and their gradient are 0.25 GB each.
    - ``rows``: some output channels (the prior's mean and log sigma, or its state residual), in
      their own storage or summed onto ``add``; the other rows get zero gradients without a
      zero-padded gradient of the whole output (0.13 GB at 256 px).
    - 1x1: the input's gradient is ``w^T @ gy`` as one ``bmm``, written once (the CPU conv
      backward makes 0.25 GB for a 512-channel input at 256 px); the GELU's backward runs in place
      on it.
    Under autocast the conv runs in ``gy``'s dtype, and so does its backward, as autograd's would.
    """

    @staticmethod
    def forward(ctx, w: Tensor, b: Tensor, padding: tuple, rows: slice | None, gelu: bool, add: Tensor | None,
                *xs: Tensor) -> Tensor:
        ctx.save_for_backward(w, *xs)
        ctx.padding, ctx.rows, ctx.gelu, ctx.b_dtype = tuple(padding), rows, gelu, b.dtype
        u = xs[0] if len(xs) == 1 else torch.cat(xs, dim=1)  # (B, sum C_i, r, r)
        if gelu:
            u = F.gelu(u) if len(xs) == 1 else torch._C._nn.gelu_(u)  # in place on the concatenation only
        y = F.conv2d(u, w, b, 1, padding)  # (B, out, r, r)
        if rows is None:
            return y if add is None else add + y
        return y[:, rows].clone() if add is None else add + y[:, rows]  # (B, rows, r, r) in its own storage

    @staticmethod
    def backward(ctx, gy: Tensor):  # gy (B, rows or out, r, r)
        w_all, *xs = ctx.saved_tensors
        w = w_all if ctx.rows is None else w_all[ctx.rows]  # the rows gy covers
        need_w, need_b, _, _, _, need_add, *need_x = ctx.needs_input_grad
        dt = gy.dtype
        one_by_one = w.shape[-2:] == (1, 1) and ctx.padding == (0, 0)
        grads_x, grads_w, grad_b, start = [None] * len(xs), [], None, 0
        for i, x in enumerate(xs):
            wi = (w if len(xs) == 1 else w[:, start:start + x.shape[1]]).to(dt).contiguous()  # (out, C_i, k, k)
            start += x.shape[1]
            bias = need_b and i == 0
            via_conv = need_x[i] and not one_by_one
            if via_conv or need_w or bias:  # the weight's gradient first, while the GELU of x exists
                u = (F.gelu(x) if ctx.gelu else x).to(dt)
                gx, gw, gb = torch.ops.aten.convolution_backward(
                    gy, u, wi, [w.shape[0]] if bias else None, [1, 1], list(ctx.padding), [1, 1], False, [0, 0], 1,
                    [via_conv, need_w, bias])
                del u
                grads_w.append(gw)
                if bias:
                    grad_b = gb.to(ctx.b_dtype)
            if need_x[i]:
                if one_by_one:
                    wt = wi.flatten(1).t().expand(x.shape[0], -1, -1)  # (B, C_i, out)
                    gx = torch.bmm(wt, gy.flatten(2)).view(x.shape)  # (B, C_i, r, r)
                gx = gx.to(x.dtype)
                # the GELU's backward in place on the conv's input gradient: one tensor of x's size
                grads_x[i] = torch.ops.aten.gelu_backward.grad_input(gx, x, grad_input=gx) if ctx.gelu else gx
        gw = (grads_w[0] if len(xs) == 1 else torch.cat(grads_w, dim=1)).to(w.dtype) if need_w else None
        if ctx.rows is not None:  # the rows not covered: zero gradients
            gw = None if gw is None else _scatter_rows(gw, ctx.rows, w_all.shape[0])
            grad_b = None if grad_b is None else _scatter_rows(grad_b, ctx.rows, w_all.shape[0])
        return (gw, grad_b, None, None, None, gy if need_add else None, *grads_x)


def _scatter_rows(g: Tensor, rows: slice, n: int) -> Tensor:
    """``g`` (the gradient of ``rows`` of an ``n``-row tensor) in place in zeros ``(n, ...)``."""
    out = g.new_zeros(n, *g.shape[1:])
    out[rows] = g
    return out


class AffineConv(torch.autograd.Function):
    """``conv2d(x * g + b, w, bias)`` (1x1; ``g``, ``b`` per channel ``(1, C, 1, 1)``) that keeps
    ``x`` alone: autograd keeps ``x`` for the gradient of ``g`` and ``x * g + b`` for the conv's
    weight gradient (0.125 GB each at 256 px, from the end of the forward to the likelihood's
    backward). The backward takes ``x * g + b`` again for the weight gradient, then ``w^T @ gy``
    as one ``bmm`` (see :class:`GeluConv`), and ``g``'s and ``b``'s gradients are the sums
    autograd takes; ``x``'s gradient is made in place on that of ``x * g + b``."""

    @staticmethod
    def forward(ctx, x: Tensor, g: Tensor, b: Tensor, w: Tensor, bias: Tensor) -> Tensor:  # x (B, C, r, r)
        ctx.save_for_backward(x, g, b, w)
        ctx.bias_dtype = bias.dtype
        return F.conv2d(x * g + b, w, bias)  # (B, out, r, r)

    @staticmethod
    def backward(ctx, gy: Tensor):  # gy (B, out, r, r)
        x, g, b, w = ctx.saved_tensors
        need_x, need_g, need_b, need_w, need_bias = ctx.needs_input_grad
        dt = gy.dtype
        wt = w.to(dt).contiguous()
        gw = gbias = gx = gg = gb = None
        if need_w or need_bias:
            _, gw, gbias = torch.ops.aten.convolution_backward(
                gy, (x * g + b).to(dt), wt, [w.shape[0]], [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [False, need_w, need_bias])
            gw = gw.to(w.dtype) if need_w else None
            gbias = gbias.to(ctx.bias_dtype) if need_bias else None
        if need_x or need_g or need_b:
            gh = torch.bmm(wt.flatten(1).t().expand(x.shape[0], -1, -1), gy.flatten(2)).view(x.shape)  # (B, C, r, r)
            gh = gh.to(torch.result_type(x, g))
            dims = [0, 2, 3]
            gg = (gh * x).sum(dims, keepdim=True).to(g.dtype) if need_g else None
            gb = gh.sum(dims, keepdim=True).to(b.dtype) if need_b else None
            if need_x:
                gx = (gh.mul_(g) if gh.dtype == x.dtype else gh * g).to(x.dtype)
        return gx, gg, gb, gw, gbias


class AvgPool(torch.autograd.Function):
    """``F.avg_pool2d(x, d, d)`` that keeps nothing for backward (autograd's keeps the input, 0.125
    GB for a 256 px block); its backward spreads each gradient, divided by ``d * d`` (exact: a power
    of two for the downsampling rates here), over its window, as ``avg_pool2d_backward`` does."""

    @staticmethod
    def forward(ctx, x: Tensor, d: int) -> Tensor:  # (B, C, r, r) -> (B, C, r / d, r / d)
        ctx.d = d
        return F.avg_pool2d(x, kernel_size=d, stride=d)

    @staticmethod
    def backward(ctx, g: Tensor):
        d = ctx.d
        return F.interpolate(g / (d * d), scale_factor=d, mode="nearest"), None
