"""The chain engine: patch-local inference for a ``[pointwise]* (Conv2d [pointwise]*)+ tail`` classifier.

The full trunk runs once per ``(b, n)`` on the base input ``observe(x / 255, m)`` and keeps every
conv input (the *base maps*); per candidate each conv is recomputed only on a fixed-size window
(:mod:`.receptive`): a crop of the zero-padded base map with the previous layer's recomputed window
pasted in (one ``index_select`` with precomputed per-location index tables; the first conv's crop
is built from the samples and the mask ∪ patch directly), the conv with ``padding=0`` on the
crop, then the pointwise layers. The last window is pasted into the base final map and the tail
runs on the full (small) map. A chain module is an ``nn.Sequential`` or defines
``sequential_layers()`` (see :class:`boed.classifier.TinyCNN`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from boed.geometry import ScanGeometry

from .driver import IncrementalEngine
from .layers import is_pointwise, is_supported_conv, sequential_layers
from .receptive import patch_axis


@dataclass(frozen=True)
class _Stage:
    conv: nn.Conv2d
    post: tuple[nn.Module, ...]  # pointwise layers after the conv

    def __call__(self, h: Tensor, padding) -> Tensor:
        c = self.conv
        h = F.conv2d(h, c.weight, c.bias, c.stride, padding, 1, c.groups)
        for m in self.post:
            h = m(h)
        return h


@dataclass
class _Step:
    """Gather tables of one crop (a conv input window, or the full final map) for every location.

    ``base (L, h, w)``: position of each crop pixel in the padded base map; ``use_win (L, h, w)``:
    take it from the previous conv's output window instead, at position ``win (L, h, w)`` (layer 0:
    the pixel is inside the patch, so observed).
    """

    base: Tensor
    win: Tensor
    use_win: Tensor
    inside: Tensor  # (L, h, w) bool: the position is inside the map (not padding)
    map_hw: tuple[int, int]  # padded base map (rows, cols)
    win_hw: tuple[int, int]  # window source (rows, cols)
    pad: tuple[int, int]


@dataclass
class _Plan:
    steps: list[_Step]  # one per conv, then the final-map paste
    window_elems: list[int]  # window positions per item-sample feeding each step (0 for layer 0)
    rows: list = field(default_factory=list)  # per step >= 1 (PatchIncrementalNet._row_tables), filled on first use


def _axis(size: int, starts: list[int], P: int, convs: list[tuple[int, int, int]]):
    """1-D window analysis along one axis. ``convs`` = [(kernel, stride, pad)].

    Returns per conv ``(n_in, n_out, W, ws, in_lo, in_hi)``: output window size and starts per grid
    position, and the changed input interval ``[in_lo, in_hi)`` per grid position.
    """
    a, out = patch_axis(size, starts, P), []
    for K, st, pd in convs:
        b = a.through(K, st, pd)
        out.append((a.n, b.n, b.W, b.ws, a.lo, a.hi))
        a = b
    return out, a.n


def _is_identity_pool(m: nn.Module, hw: tuple[int, int]) -> bool:
    """An adaptive pool whose output size is the input size ``hw`` (it returns its input)."""
    if type(m) not in (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d):
        return False
    size = m.output_size if isinstance(m.output_size, tuple) else (m.output_size, m.output_size)
    return tuple(hw[d] if size[d] is None else size[d] for d in (0, 1)) == hw


class PatchIncrementalNet(IncrementalEngine):
    """Incremental inference for a ``[pointwise]* (Conv2d [pointwise]*)+ tail`` chain (see module doc).

    Holds references to the model's own layers (weights are read at call time). Build it with
    :func:`chain_from_module`; :meth:`logits` (:class:`.driver.IncrementalEngine`) does the work.
    """

    def worthwhile(self, geometry: ScanGeometry) -> bool:
        """Plain conv chains always gain (2.6-3.7x for the tiny AVP-CNN at 64 px)."""
        return True

    def __init__(self, pre: list[nn.Module], stages: list[_Stage], tail: list[nn.Module]):
        self.pre, self.stages, self.tail = list(pre), list(stages), list(tail)
        self._plans: dict[tuple, _Plan] = {}

    @property
    def in_channels(self) -> int:
        return self.stages[0].conv.in_channels

    @property
    def device(self) -> torch.device:
        return self.stages[0].conv.weight.device

    # ------------------------------------------------------------------ plan
    def plan(self, geometry: ScanGeometry, device: torch.device) -> _Plan:
        """Window sizes and gather tables for ``geometry`` (cached per geometry and device)."""
        key = (geometry.image_size, geometry.patch_size, geometry.grid, str(device))
        if key not in self._plans:
            self._plans[key] = self._make_plan(geometry, torch.device(device))
        return self._plans[key]

    def _make_plan(self, geo: ScanGeometry, device: torch.device) -> _Plan:
        S, P, G = geo.image_size, geo.patch_size, geo.grid
        starts = [g * geo.stride for g in range(G)]
        convs = [s.conv for s in self.stages]
        ax = [_axis(S, starts, P, [(c.kernel_size[d], c.stride[d], c.padding[d]) for c in convs]) for d in (0, 1)]
        steps, window_elems = [], []
        for k in range(len(convs) + 1):
            per_axis = []  # per axis: base index, window index, use_win, inside, each (G, h), and sizes
            for d in (0, 1):
                layers, n_final = ax[d]
                if k < len(convs):
                    n_in, _, W, ws, lo, hi = layers[k]
                    K, st, pd = convs[k].kernel_size[d], convs[k].stride[d], convs[k].padding[d]
                    crop = (W - 1) * st + K
                    p = torch.tensor(ws)[:, None] * st + torch.arange(crop)[None]  # (G, h) padded coords
                    n_map = n_in + 2 * pd
                else:  # final map: the whole map, no padding
                    p, pd, n_map = torch.arange(n_final)[None].expand(G, -1), 0, n_final
                u = p - pd  # (G, h) map coords
                if k == 0:  # the patch box: observed pixels
                    lo_t, hi_t = torch.tensor(layers[0][4])[:, None], torch.tensor(layers[0][5])[:, None]
                    use, widx, n_win = (u >= lo_t) & (u < hi_t), p, n_map
                else:  # window source: the previous conv's output window
                    _, _, Wp, wsp, _, _ = layers[k - 1]
                    w0 = torch.tensor(wsp)[:, None]  # (G, 1)
                    use, widx, n_win = (u >= w0) & (u < w0 + Wp), (u - w0).clamp(0, Wp - 1), Wp
                per_axis.append((p, widx, use, n_map, n_win, pd, (u >= 0) & (u < n_map - 2 * pd)))
            (pr, wr, ur, hr, hw_r, pdr, ir), (pc, wc, uc, hc, hw_c, pdc, ic) = per_axis
            base = (pr[:, None, :, None] * hc + pc[None, :, None, :]).reshape(G * G, pr.shape[1], pc.shape[1])  # (L, h, w)
            win = (wr[:, None, :, None] * hw_c + wc[None, :, None, :]).reshape(G * G, pr.shape[1], pc.shape[1])  # (L, h, w)
            use = (ur[:, None, :, None] & uc[None, :, None, :]).reshape(G * G, pr.shape[1], pc.shape[1])  # (L, h, w)
            inside = (ir[:, None, :, None] & ic[None, :, None, :]).reshape(G * G, pr.shape[1], pc.shape[1])  # (L, h, w)
            steps.append(_Step(base.to(device), win.to(device), use.to(device), inside.to(device), (hr, hc), (hw_r, hw_c),
                               (pdr, pdc)))
            window_elems.append(0 if k == 0 else hw_r * hw_c)
        return _Plan(steps, window_elems)

    # ------------------------------------------------------------------ inference
    def _run(self, modules, h: Tensor) -> Tensor:
        for m in modules:
            h = m(h)
        return h

    def run_stage(self, k: int, h: Tensor, padding=0) -> Tensor:
        """Conv ``k`` and its pointwise layers on ``h (M, C, H, W)``: crops (padding 0) or full maps."""
        return self.stages[k](h, padding)

    def run_tail(self, h: Tensor) -> Tensor:
        """The tail (pool, flatten, head) on full final maps ``(M, C, H, W)`` -> logits ``(M, K)``.

        Fast path for NHWC maps and a tail starting ``[identity pool] Flatten Linear``: the head's
        weight columns are permuted to NHWC order so the map is never copied to NCHW.
        """
        n = self._nhwc_head(h)
        if n:
            lin = self.tail[n - 1]
            M, C, H, W = h.shape
            w = lin.weight.view(-1, C, H, W).permute(0, 2, 3, 1).reshape(-1, H * W * C)  # (K, H*W*C) NHWC order
            flat = h.permute(0, 2, 3, 1).reshape(M, H * W * C)  # (M, H*W*C); the reshape is a view
            # logits^T = w @ flat^T: with few outputs K this GEMM shape runs ~2x faster on CPUs than flat @ w^T
            out = torch.mm(w, flat.t()) if lin.bias is None else torch.addmm(lin.bias[:, None], w, flat.t())  # (K, M)
            return self._run(self.tail[n:], out.t().contiguous())  # (M, K)
        return self._run(self.tail, h)

    def _nhwc_head(self, h: Tensor) -> int:
        """Length of the tail prefix ``[identity layers] Flatten(1, -1) Linear`` the fast path replaces (0: none)."""
        if h.dim() != 4 or not h.permute(0, 2, 3, 1).is_contiguous():
            return 0
        for i, m in enumerate(self.tail):
            if type(m) is nn.Flatten:
                break
            if not (type(m) is nn.Identity or (type(m) in (nn.Dropout, nn.Dropout2d) and not m.training)
                    or _is_identity_pool(m, tuple(h.shape[2:]))):
                return 0
        else:
            return 0
        flat, lin = self.tail[i], self.tail[i + 1] if i + 1 < len(self.tail) else None
        ok = (flat.start_dim, flat.end_dim) == (1, -1) and type(lin) is nn.Linear and lin.in_features == h[0].numel()
        return i + 2 if ok else 0

    @staticmethod
    def _padded_nhwc(h: Tensor, pad: tuple[int, int], extra_rows: int = 0, group: int = 1) -> Tensor:
        """A fresh buffer ``(M * Hp * Wp / group + extra_rows, group * C)``: maps ``h (M, C, H, W)``
        zero-padded to ``(Hp, Wp)`` in NHWC order, or with ``group = N`` one row per (image,
        position) holding the C channels of all N samples (``(M / N, Hp, Wp, N, C)``)."""
        M, C, H, W = h.shape
        pr, pc = pad
        Hp, Wp, Mg = H + 2 * pr, W + 2 * pc, M // group
        buf = h.new_empty(Mg * Hp * Wp + extra_rows, group * C)
        maps = buf[:Mg * Hp * Wp].view(Mg, Hp, Wp, group, C)  # (M / group, Hp, Wp, group, C)
        if pr or pc:
            maps.zero_()
        maps[:, pr:pr + H, pc:pc + W].copy_(h.view(Mg, group, C, H, W).permute(0, 3, 4, 1, 2))  # (M / group, H, W, group, C)
        return buf

    def image_bytes(self, plan: _Plan, N: int) -> int:
        """Padded samples and mask, padded conv inputs and the final map of one image."""
        C = self.in_channels - 1
        return 4 * (math.prod(plan.steps[0].map_hw) * (N * C + 1)
                    + N * sum(math.prod(s.map_hw) * st.conv.in_channels for s, st in zip(plan.steps[1:], self.stages[1:]))
                    + N * math.prod(plan.steps[-1].map_hw) * self.stages[-1].conv.out_channels)

    def base(self, plan: _Plan, x_u8: Tensor, m: Tensor, max_inputs: int, state, fmt) -> tuple[list, Tensor]:
        pools, h = self._base(x_u8, m, plan, max_inputs, fmt)
        return pools, self.run_tail(h)

    def candidates(self, plan: _Plan, pools: list, b: Tensor, l: Tensor, N: int, Bb: int, state, fmt) -> Tensor:
        return self._candidates(pools, plan, b, l, N, Bb, fmt)

    def _base(self, x_u8: Tensor, m: Tensor, plan: _Plan, max_inputs: int, fmt):
        """Full trunk on the base inputs of a block of images; returns the gather pools and the final maps.

        Pool 0 is ``(padded images (Bb * Hp * Wp, N * C), padded masks (Bb * Hp * Wp,))``; pool
        ``k >= 1`` holds the padded base input of conv ``k`` (the final map for the last), one row
        per (image, sample, position), then room for ``max_inputs`` windows.
        """
        Bb, N, C, S, _ = x_u8.shape
        device = self.stages[0].conv.weight.device
        pad0 = plan.steps[0].pad
        x = x_u8.to(device).float().div_(255).reshape(Bb * N, C, S, S)  # (Bb*N, C, S, S)
        mf = m.to(device=device, dtype=torch.float32)  # (Bb, 1, S, S)
        pools: list = [(self._padded_nhwc(x, pad0, group=N), self._padded_nhwc(mf, pad0).view(-1))]
        mm = mf.repeat_interleave(N, 0)  # (Bb*N, 1, S, S)
        h = self._run(self.pre, torch.cat([x * mm, mm], 1).contiguous(memory_format=fmt))  # (Bb*N, C+1, S, S)
        for k, stage in enumerate(self.stages):
            h = self.run_stage(k, h, stage.conv.padding)  # (Bb*N, C_k, H_k, W_k)
            pools.append(self._padded_nhwc(h, plan.steps[k + 1].pad, max_inputs * plan.window_elems[k + 1]))
        return pools, h

    def _first_crops(self, pools, step: _Step, b: Tensor, l: Tensor, N: int) -> Tensor:
        """Conv-0 input crops ``(k * N, C + 1, h, w)`` (NHWC strides): ``observe`` of the samples'
        crops with the mask crop ∪ the patch, built from per-item mask crops shared by the N samples."""
        xp, mp = pools
        k, (h, w) = b.shape[0], step.base.shape[1:]
        pos = step.base[l] + (b * math.prod(step.map_hw))[:, None, None]  # (k, h, w) rows of the padded maps
        mc = torch.where(step.use_win[l], 1.0, mp.take(pos))  # (k, h, w) mask ∪ patch
        C = xp.shape[1] // N
        xc = xp.index_select(0, pos.view(-1)).view(k, h, w, N, C).permute(0, 3, 1, 2, 4)  # (k, N, h, w, C)
        y = xp.new_empty(k, N, h, w, C + 1)  # (k, N, h, w, C + 1)
        mcb = mc[:, None, :, :, None]  # (k, 1, h, w, 1)
        torch.mul(xc, mcb, out=y[..., :C])
        y[..., C:] = mcb
        crop = y.view(k * N, h, w, C + 1).permute(0, 3, 1, 2)  # (k*N, C+1, h, w)
        if self.pre:  # the conv pads its input after the leading pointwise layers
            crop = self._run(self.pre, crop) * step.inside[l].repeat_interleave(N, 0)[:, None].to(crop.dtype)  # (k*N, 1, h, w) mask
        return crop

    @staticmethod
    def _row_tables(plan: _Plan) -> list[tuple[Tensor, Tensor] | None]:
        """Per step ``s >= 1``: ``(rel, per_sample)``, each ``(L, h, w)``: the pool row of each crop
        pixel relative to the first row of its item's source, and the rows between two samples
        there: ``(win, window_elems[s])`` where the pixel comes from the recomputed windows,
        ``(base, map rows)`` where from the base maps. A chunk's gather index is then
        ``first + rel + n * per_sample`` (one pass over its ``(k, N, h, w)`` entries)."""
        if not plan.rows:
            plan.rows = [None] + [(torch.where(st.use_win, st.win, st.base),
                                   torch.where(st.use_win, plan.window_elems[s], math.prod(st.map_hw)))
                                  for s, st in enumerate(plan.steps[1:], 1)]
        return plan.rows

    def _candidates(self, pools: list, plan: _Plan, b: Tensor, l: Tensor, N: int, Bb: int, fmt) -> Tensor:
        """Logits ``(k * N, K)`` of items ``(b (k,) image in block, l (k,) location)``."""
        k = b.shape[0]
        tables = self._row_tables(plan)
        item = torch.arange(k, device=b.device)[:, None, None]  # (k, 1, 1)
        n = torch.arange(N, device=b.device)[None, :, None, None]  # (1, N, 1, 1)
        win = None
        for s, step in enumerate(plan.steps):
            if s == 0:
                crop = self._first_crops(pools[0], step, b, l, N)
            else:
                pool, we = pools[s], plan.window_elems[s]
                nb = Bb * N * math.prod(step.map_hw)  # rows of base maps in the pool
                pool[nb:nb + k * N * we].view(k * N, *step.win_hw, -1).copy_(win.permute(0, 2, 3, 1))  # (k*N, Wr, Wc, C)
                # first row of each item's source: its N windows (after the base maps), or its image's N base maps
                first = torch.where(step.use_win[l], nb + item * (N * we), (b * (N * math.prod(step.map_hw)))[:, None, None])  # (k, h, w)
                rel, per_sample = tables[s]
                idx = torch.addcmul((first + rel[l])[:, None], n, per_sample[l][:, None])  # (k, N, h, w) rows of the pool
                h, w = idx.shape[-2:]
                crop = pool.index_select(0, idx.view(-1)).view(k * N, h, w, -1).permute(0, 3, 1, 2)  # (k*N, C, h, w) NHWC strides
            crop = crop.contiguous(memory_format=fmt)  # no copy when channels_last
            if s < len(self.stages):
                win = self.run_stage(s, crop)  # (k*N, C', Wr, Wc)
            else:
                return self.run_tail(crop)  # (k*N, K)
        raise AssertionError("unreachable")


def chain_from_module(model: nn.Module) -> PatchIncrementalNet | None:
    """A :class:`PatchIncrementalNet` for ``model``, or None when it is not a supported conv chain."""
    layers = sequential_layers(model)
    if not layers:
        return None
    if any(m.training and isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd))
           for m in model.modules()):
        return None  # train-mode batch statistics / random masks are not per-position functions
    i, pre = 0, []
    while i < len(layers) and is_pointwise(layers[i]):
        pre.append(layers[i])
        i += 1
    stages = []
    while i < len(layers) and is_supported_conv(layers[i]):
        conv, i, post = layers[i], i + 1, []
        while i < len(layers) and is_pointwise(layers[i]):
            post.append(layers[i])
            i += 1
        stages.append(_Stage(conv, tuple(post)))
    tail = layers[i:]
    if not stages or any(isinstance(m, nn.modules.conv._ConvNd) for t in tail for m in t.modules()):
        return None  # no trunk, or the trunk is cut by a layer this module cannot window
    return PatchIncrementalNet(pre, stages, tail)
