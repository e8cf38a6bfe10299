"""Patch-local (incremental) classifier inference for greedy BOED scoring.

Scoring candidate ``l`` for sample ``n`` of image ``b`` classifies ``observe(x / 255, m ∪ patch_l)``,
which differs from the *base* input ``y0 = observe(x / 255, m)`` only inside the P x P patch box,
where it is ``cat(x / 255, 1)``. For a classifier whose forward is a plain chain of ``Conv2d`` and
pointwise layers followed by a tail (pool / flatten / linear), each conv output can change only on
the window of positions whose receptive field touches the changed region of its input. So
(like KRYPTON, Nakandala et al. 2019) we run the full trunk once per ``(b, n)`` on ``y0`` and keep
every conv input (the *base maps*), and per candidate recompute each conv only on a fixed-size
window: gather a crop of the zero-padded base map with the previous layer's recomputed window
pasted in (one ``index_select`` with precomputed per-location index tables; the first conv's crop
is built from the samples and the mask ∪ patch directly), run the conv with ``padding=0`` on the
crop, apply the pointwise layers. The last window is pasted into the base
final map and the tail runs on the full (small) map. Window sizes are the max over locations
(start clamped into the map), so all items have the same shapes and batch.

:func:`from_module` returns a :class:`PatchIncrementalNet` for a plain chain, a
:class:`PatchIncrementalGraph` for a network with branches (torchvision ResNet and DenseNet as
wrapped by :class:`boed.classifier.AVPClassifier`: residual adds, downsample branches, dense
concatenations, max/avg pooling, pointwise input normalisation; traced with ``torch.fx``, see the
"graphs" section below), or None (then use the full path; the reason is logged at debug level).
Both have the same :meth:`logits`. A chain module is accepted when it is an ``nn.Sequential`` or defines ``sequential_layers() -> list of
modules`` whose composition is its forward (see :class:`boed.classifier.TinyCNN`), and the layers
are ``[pointwise]* (Conv2d [pointwise]*)+ tail`` with no convolution in the tail. Convs need
dilation 1, zero padding given as numbers; any kernel, stride, groups. Pointwise: activations,
``Identity`` (a folded BN), ``Dropout`` and ``BatchNorm2d`` in eval mode.
"""

from __future__ import annotations

import copy
import logging
import math
import operator
import weakref
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from boed.geometry import ScanGeometry

log = logging.getLogger(__name__)

_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.ELU, nn.CELU, nn.SELU, nn.Sigmoid, nn.Tanh,
                nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Softplus, nn.PReLU, nn.Identity)


def is_pointwise(m: nn.Module) -> bool:
    """Whether ``m`` maps every spatial position independently and deterministically (in its current mode)."""
    t = type(m)
    if t in _ACTIVATIONS:
        return True
    if t in (nn.Dropout, nn.Dropout2d):
        return not m.training
    if t is nn.BatchNorm2d:  # eval mode with running statistics: a per-channel affine map
        return not m.training and m.track_running_stats and m.running_mean is not None
    return False


def is_supported_conv(m: nn.Module) -> bool:
    """A plain ``nn.Conv2d`` (not a subclass) with dilation 1 and numeric zero padding."""
    return (type(m) is nn.Conv2d and m.padding_mode == "zeros" and tuple(m.dilation) == (1, 1)
            and not isinstance(m.padding, str))


def _is_plain_sequential(m: nn.Module) -> bool:
    """An ``nn.Sequential`` (or subclass) that keeps ``Sequential.forward``."""
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


def _flatten(layers) -> list[nn.Module]:
    out: list[nn.Module] = []
    for m in layers:
        out.extend(_flatten(m) if _is_plain_sequential(m) else [m])
    return out


def sequential_layers(model: nn.Module) -> list[nn.Module] | None:
    """The modules whose composition is ``model.forward``, or None when that cannot be known."""
    fn = getattr(model, "sequential_layers", None)
    if callable(fn):
        layers = fn()
        return None if layers is None else _flatten(layers)
    if _is_plain_sequential(model):
        return _flatten(model)
    return None


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


def _axis(size: int, starts: list[int], P: int, convs: list[tuple[int, int, int]]):
    """1-D window analysis along one axis. ``convs`` = [(kernel, stride, pad)].

    Returns per conv ``(n_in, n_out, W, ws, in_lo, in_hi)``: output window size and starts per grid
    position, and the changed input interval ``[in_lo, in_hi)`` per grid position.
    """
    lo = [max(0, s) for s in starts]
    hi = [min(size, s + P) for s in starts]
    n, out = size, []
    for K, st, pd in convs:
        n_out = (n + 2 * pd - K) // st + 1
        if n_out < 1:
            raise ValueError(f"a conv (kernel {K}, stride {st}, padding {pd}) gets {n} positions: input too small")
        oa = [max(0, -(-(a + pd - K + 1) // st)) for a in lo]  # first output whose field reaches a
        ob = [min(n_out - 1, (b - 1 + pd) // st) if b > a else -1 for a, b in zip(lo, hi)]  # last reaching b - 1
        empty = [b < a for a, b in zip(oa, ob)]
        W = max([1] + [b - a + 1 for a, b, e in zip(oa, ob, empty) if not e])
        ws = [min(0 if e else a, n_out - W) for a, e in zip(oa, empty)]
        out.append((n, n_out, W, ws, lo, hi))
        lo = [0 if e else a for a, e in zip(oa, empty)]
        hi = [0 if e else b + 1 for b, e in zip(ob, empty)]
        n = n_out
    return out, n


def _is_identity_pool(m: nn.Module, hw: tuple[int, int]) -> bool:
    """An adaptive pool whose output size is the input size ``hw`` (it returns its input)."""
    if type(m) not in (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d):
        return False
    size = m.output_size if isinstance(m.output_size, tuple) else (m.output_size, m.output_size)
    return tuple(hw[d] if size[d] is None else size[d] for d in (0, 1)) == hw


class PatchIncrementalNet:
    """Incremental inference for a ``[pointwise]* (Conv2d [pointwise]*)+ tail`` chain (see module doc).

    Holds references to the model's own layers (weights are read at call time). Build it with
    :func:`from_module`; :meth:`logits` does the work.
    """

    def worthwhile(self, geometry: ScanGeometry) -> bool:
        """Plain conv chains always gain (2.6-3.7x for the tiny AVP-CNN at 64 px)."""
        return True

    def __init__(self, pre: list[nn.Module], stages: list[_Stage], tail: list[nn.Module]):
        self.pre, self.stages, self.tail = list(pre), list(stages), list(tail)
        self._plans: dict[tuple, _Plan] = {}

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
            h = F.linear(h.permute(0, 2, 3, 1).reshape(M, H * W * C), w, lin.bias)  # (M, K); the reshape is a view
            return self._run(self.tail[n:], h)
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

    def logits(
        self,
        samples: Tensor,
        mask: Tensor,
        geometry: ScanGeometry,
        item_b: Tensor,
        item_l: Tensor,
        *,
        chunk_size: int = 256,
        channels_last: bool = True,
        amp: bool = True,
        progress: bool = False,
        block_bytes: int = 64 << 20,
    ) -> tuple[Tensor, Tensor]:
        """Logits of the base inputs and of the candidate items, float32 ``((B, N, K), (Q, N, K))``.

        ``samples`` uint8 ``(B, N, C, S, S)``, ``mask (B, 1, S, S)``; item ``q`` is candidate
        ``item_l[q]`` of image ``item_b[q]`` (sorted by image). Images are processed in blocks whose
        base maps take about ``block_bytes``; items in chunks of about ``chunk_size`` inputs.
        """
        B, N, C, S, _ = samples.shape
        conv0 = self.stages[0].conv
        if conv0.in_channels != C + 1 or mask.shape != (B, 1, S, S) or geometry.image_size != S:
            raise ValueError(f"samples {tuple(samples.shape)}, mask {tuple(mask.shape)}, geometry S={geometry.image_size} "
                             f"and a classifier taking {conv0.in_channels} channels disagree")
        device = conv0.weight.device
        plan = self.plan(geometry, device)
        item_b, item_l = item_b.to(device), item_l.to(device)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        chunk = max(1, int(chunk_size) // N)  # items per chunk
        # bytes of base maps per image: padded samples and mask, padded conv inputs, the final map
        per_img = 4 * (math.prod(plan.steps[0].map_hw) * (N * C + 1)
                       + N * sum(math.prod(s.map_hw) * st.conv.in_channels for s, st in zip(plan.steps[1:], self.stages[1:]))
                       + N * math.prod(plan.steps[-1].map_hw) * self.stages[-1].conv.out_channels)
        block = max(1, block_bytes // per_img)  # images per block
        amp_ctx = torch.autocast("cuda", dtype=torch.bfloat16) if (amp and device.type == "cuda") else nullcontext()
        base_logits: list[Tensor] = []
        cand_logits: list[Tensor] = []
        bounds = torch.searchsorted(item_b, torch.arange(0, B + block, block, device=device).clamp(max=B)).tolist()
        n_chunks = sum(-(-(q1 - q0) // chunk) for q0, q1 in zip(bounds, bounds[1:]))
        bar = tqdm(total=n_chunks, desc="classify (incremental)", disable=not progress or None, leave=False)
        with torch.inference_mode(), amp_ctx:
            for blk, b0 in enumerate(range(0, B, block)):
                b1 = min(B, b0 + block)
                pools, h0 = self._base(samples[b0:b1], mask[b0:b1], plan, chunk * N, fmt)
                base_logits.append(self.run_tail(h0).float().view(b1 - b0, N, -1))  # (Bb, N, K)
                q0, q1 = bounds[blk], bounds[blk + 1]
                for i0 in range(q0, q1, chunk):
                    i1 = min(q1, i0 + chunk)
                    out = self._candidates(pools, plan, item_b[i0:i1] - b0, item_l[i0:i1], N, b1 - b0, fmt)
                    cand_logits.append(out.float().view(i1 - i0, N, -1))  # (k, N, K)
                    bar.update(1)
        bar.close()
        K = base_logits[0].shape[-1]
        return torch.cat(base_logits), torch.cat(cand_logits) if cand_logits else torch.zeros(0, N, K, device=device)

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

    def _candidates(self, pools: list, plan: _Plan, b: Tensor, l: Tensor, N: int, Bb: int, fmt) -> Tensor:
        """Logits ``(k * N, K)`` of items ``(b (k,) image in block, l (k,) location)``."""
        k = b.shape[0]
        n = torch.arange(N, device=b.device)
        row = b[:, None] * N + n[None]  # (k, N) base row of each item-sample
        item_row = torch.arange(k * N, device=b.device).view(k, N)  # (k, N) window row of each item-sample
        win = None
        for s, step in enumerate(plan.steps):
            if s == 0:
                crop = self._first_crops(pools[0], step, b, l, N)
            else:
                pool, we = pools[s], plan.window_elems[s]
                nb = Bb * N * math.prod(step.map_hw)  # rows of base maps in the pool
                pool[nb:nb + k * N * we].view(k * N, *step.win_hw, -1).copy_(win.permute(0, 2, 3, 1))  # (k*N, Wr, Wc, C)
                use = step.use_win[l][:, None]  # (k, 1, h, w)
                idx = torch.where(use, (nb + item_row * we)[:, :, None, None] + step.win[l][:, None],
                                  (row * math.prod(step.map_hw))[:, :, None, None] + step.base[l][:, None])  # (k, N, h, w)
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


def from_module(model: nn.Module):
    """Incremental inference for ``model``: a :class:`PatchIncrementalNet` for a plain conv chain,
    else a :class:`PatchIncrementalGraph` for a traceable network (ResNet, DenseNet, ...), else None
    (use the full path; the reason is logged at debug level)."""
    inc = chain_from_module(model)
    if inc is not None:
        return inc
    if any(m.training and isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd))
           for m in model.modules()):
        log.debug("boed.incremental: %s has train-mode BatchNorm/Dropout; using the full path", type(model).__name__)
        return None
    try:
        return graph_from_module(model)
    except Unsupported as e:
        log.debug("boed.incremental: %s is scored on the full path: %s", type(model).__name__, e)
        return None


def _fetch_attr(gm: nn.Module, target: str):
    obj = gm
    for a in target.split("."):
        obj = getattr(obj, a)
    return obj


def _trace(model: nn.Module):
    """``(graph module, whether it must be checked against model)``: the model, or its ``.net``
    backbone when the model's forward only validates its input (e.g. :class:`AVPClassifier`)."""
    import torch.fx as fx

    if not any(type(m) is nn.Conv2d for m in model.modules()):
        raise Unsupported("it has no nn.Conv2d")
    # trace shallow copies: a forward that sets attributes (counters) must not leave proxies behind
    try:
        return fx.symbolic_trace(copy.copy(model)), False
    except Exception as e:  # data-dependent control flow (input checks)
        net = getattr(model, "net", None)
        if not isinstance(net, nn.Module):
            raise Unsupported(f"torch.fx cannot trace it ({type(e).__name__}: {e})") from None
        try:
            return fx.symbolic_trace(copy.copy(net)), True
        except Exception as e2:
            raise Unsupported(f"torch.fx cannot trace its .net ({type(e2).__name__}: {e2})") from None


def graph_from_module(model: nn.Module, window_override: dict | None = None) -> PatchIncrementalGraph:
    """Trace ``model`` and classify its nodes (see the section comment); raises :class:`Unsupported`."""
    gm, check = _trace(model)
    modules = dict(gm.named_modules())
    nodes: list[_GNode] = []
    idx: dict[str, int] = {}  # fx node name -> local node
    tail: list = []

    def add(n, node: _GNode):
        idx[n.name] = len(nodes)
        nodes.append(node)

    def const(a):
        if isinstance(a, (int, float)):
            return a
        if isinstance(a, torch.fx.Node) and a.op == "get_attr":
            return _fetch_attr(gm, a.target)
        return None

    for n in gm.graph.nodes:
        if n.op == "placeholder":
            if nodes:
                raise Unsupported("more than one input")
            add(n, _GNode(n.name, "input", []))
            continue
        local = [a for a in n.all_input_nodes if a.name in idx]
        if n.op in ("get_attr", "output") or not local:
            tail.append(n)
            continue
        args, kwargs = n.args, dict(n.kwargs)
        if n.op == "call_module":
            m = modules[n.target]
            w = _windowed(m)
            if w is not None and len(args) == 1 and not kwargs:
                kind, fill = w
                if kind == "conv":
                    k, st, pd = tuple(m.kernel_size), tuple(m.stride), tuple(m.padding)
                else:
                    k = _pair(m.kernel_size)
                    st, pd = _pair(m.stride if m.stride is not None else m.kernel_size), _pair(m.padding)
                add(n, _GNode(n.name, kind, [idx[args[0].name]], module=m, kernel=k, stride=st, padding=pd, fill=fill))
                continue
            if is_pointwise(m) and len(args) == 1 and not kwargs:
                src = nodes[idx[args[0].name]]
                if (type(m) is nn.BatchNorm2d and src.kind == "conv" and src.bn is None and len(args[0].users) == 1
                        and nodes[-1] is src):
                    src.bn = m  # folded into the conv (eval statistics)
                    idx[n.name] = idx[args[0].name]
                    continue
                add(n, _GNode(n.name, "point", [idx[args[0].name]], fn=_out_of_place_module(m)))
                continue
        elif n.op in ("call_function", "call_method"):
            t = n.target
            if (t in _POINTWISE_FUNCS if n.op == "call_function" else t in _POINTWISE_METHODS) and len(local) == 1 \
                    and args[0] is local[0] and not any(isinstance(a, torch.fx.Node) for a in args[1:]):
                kwargs.pop("inplace", None)
                if n.op == "call_function":
                    f, rest = _POINTWISE_FUNCS[t], args[1:]
                    fn = (lambda f, rest, kw: lambda x: f(x, *rest, **kw))(f, rest, kwargs)
                else:
                    name, rest = _POINTWISE_METHODS[t], args[1:]
                    fn = (lambda name, rest, kw: lambda x: getattr(x, name)(*rest, **kw))(name, rest, kwargs)
                add(n, _GNode(n.name, "point", [idx[args[0].name]], fn=fn))
                continue
            if t in _ARITH and len(args) == 2 and not kwargs:
                op = _ARITH[t]
                a, b = args
                la, lb = isinstance(a, torch.fx.Node) and a.name in idx, isinstance(b, torch.fx.Node) and b.name in idx
                if la and lb and op in _MERGE_OK:
                    add(n, _GNode(n.name, "merge", [idx[a.name], idx[b.name]], fn=op))
                    continue
                c = const(b if la else a)
                if (la != lb) and c is not None and _is_channel_const(c):
                    fn = (lambda op, c: lambda x: op(x, c))(op, c) if la else (lambda op, c: lambda x: op(c, x))(op, c)
                    add(n, _GNode(n.name, "point", [idx[(a if la else b).name]], fn=fn))
                    continue
            if n.op == "call_function" and t is torch.cat:
                seq = args[0]
                dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
                if isinstance(seq, (list, tuple)) and dim == 1 and all(isinstance(a, torch.fx.Node) and a.name in idx for a in seq):
                    add(n, _GNode(n.name, "cat", [idx[a.name] for a in seq]))
                    continue
        tail.append(n)  # reads local maps: its inputs are frontier nodes
    fx_index = {}
    for n in tail:
        if n.op == "call_module" and isinstance(modules[n.target], _SPATIAL):
            raise Unsupported(f"{n.target} ({type(modules[n.target]).__name__}) cannot be windowed and is not at the end")
        if n.op == "call_function" and n.target in (F.conv2d, F.max_pool2d, F.avg_pool2d, F.interpolate):
            raise Unsupported(f"{n.name} ({n.target.__name__}) cannot be windowed")
        for a in n.all_input_nodes:
            if a.name in idx:
                fx_index[a.name] = idx[a.name]
                nodes[idx[a.name]].frontier = True
    if not any(v.kind == "conv" for v in nodes):
        raise Unsupported("no convolution before the global tail")
    if any(v.kind == "input" for v in nodes[1:]) or not nodes:
        raise Unsupported("no input")
    for v in nodes:
        for j in v.inputs:
            nodes[j].users += 1
    first = next(v for v in nodes if v.kind == "conv")
    for v in nodes:
        v.materialised = v.kind in ("input", "conv", "pool") or v.users > 1 or v.frontier
        if v.kind == "input":
            v.channels = first.module.in_channels
        elif v.kind == "conv":
            v.channels = v.module.out_channels
        elif v.kind == "cat":
            v.channels = sum(nodes[j].channels for j in v.inputs)
        else:
            v.channels = nodes[v.inputs[0]].channels
    inc = PatchIncrementalGraph(gm, nodes, fx_index, tail, window_override)
    if check:
        _check_same(model, inc)
    return inc


def _check_same(model: nn.Module, inc: PatchIncrementalGraph) -> None:
    """The traced backbone must compute ``model``'s forward (a wrapper may add steps around it)."""
    p = next(iter(model.parameters()))
    S = int(getattr(getattr(model, "config", None), "image_size", 64))
    S = min(S, 64)
    g = torch.Generator().manual_seed(0)
    y = torch.rand(2, inc.nodes[0].channels, S, S, generator=g).to(p.device)
    with torch.inference_mode():
        a, b = model(y), inc.gm(y)
    if a.shape != b.shape or not torch.allclose(a.float(), b.float(), atol=1e-4, rtol=1e-3):
        raise Unsupported(f"its forward is not the forward of its traced .net (wrapper adds steps)")


_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, PatchIncrementalNet | None]]" = weakref.WeakKeyDictionary()


def _signature(model: nn.Module) -> tuple:
    return tuple((id(m), m.training) for m in model.modules())


def incremental_for(model: nn.Module) -> PatchIncrementalNet | PatchIncrementalGraph | None:
    """:func:`from_module` cached per model object (re-analysed when its modules or modes change)."""
    sig = _signature(model)
    hit = _CACHE.get(model)
    if hit is None or hit[0] != sig:
        hit = (sig, from_module(model))
        _CACHE[model] = hit
    return hit[1]


# ====================================================================================== graphs
# Block-aware incremental inference for networks with branches (torchvision ResNet and DenseNet,
# and anything else built from the same pieces), traced with torch.fx.
#
# Every node of the traced graph before the global pooling is *local*: a conv or a pooling layer
# (windowed), a pointwise op (activation, eval BatchNorm, arithmetic with a per-channel constant),
# an elementwise merge of two maps (residual add) or a channel concatenation (dense blocks). For
# a candidate patch, each local node's map changes only on an interval per axis: the patch box
# for the input; for a windowed op the outputs whose receptive field reaches the changed input;
# for merges and concatenations the union over their inputs. Convs, pools and nodes used more than
# once are *materialised*: per item-sample we compute their values on a fixed-size window (the max
# over locations of the changed interval, start clamped into the map) from crops gathered out of
# the base maps with the recomputed windows of their inputs pasted in (one ``index_select`` over
# ``[base rows; window rows; fill rows]``). Other nodes are *virtual*: a crop of them is computed
# from crops of their inputs. The nodes the global tail reads (the *frontier*) get their full map
# (base with the window pasted in) and the tail (pool, flatten, head) runs on it as traced.
# Convs followed by their only user, an eval BatchNorm, use the folded weights (read per call).

_POINTWISE_FUNCS = {F.relu: F.relu, torch.relu: F.relu, torch.relu_: F.relu, F.relu6: F.relu6, torch.sigmoid: torch.sigmoid,
                    torch.tanh: torch.tanh, F.silu: F.silu, F.gelu: F.gelu, F.hardswish: F.hardswish, F.elu: F.elu,
                    F.leaky_relu: F.leaky_relu, F.hardtanh: F.hardtanh}
_POINTWISE_METHODS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "sigmoid_": "sigmoid", "tanh": "tanh",
                      "tanh_": "tanh", "contiguous": "contiguous", "float": "float", "clone": "clone"}
_ARITH = {operator.add: torch.add, operator.sub: torch.sub, operator.mul: torch.mul, operator.truediv: torch.div,
          torch.add: torch.add, torch.sub: torch.sub, torch.mul: torch.mul, torch.div: torch.div,
          "add": torch.add, "add_": torch.add, "sub": torch.sub, "sub_": torch.sub, "mul": torch.mul, "mul_": torch.mul,
          "div": torch.div, "div_": torch.div}
_MERGE_OK = (torch.add, torch.sub, torch.mul)  # elementwise of two maps


class Unsupported(Exception):
    """Raised (and logged at debug level) when a network cannot be windowed; the full path is used."""


@dataclass
class _GNode:
    name: str
    kind: str  # input | conv | pool | point | merge | cat
    inputs: list[int]  # local input nodes
    module: nn.Module | None = None  # conv or pool
    bn: nn.BatchNorm2d | None = None  # folded into the conv
    fn: object = None  # point: x -> y; merge: (a, b) -> y
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    fill: float = 0.0  # value of the padding a windowed op sees
    channels: int = 0
    materialised: bool = False
    users: int = 0
    frontier: bool = False


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _out_of_place_module(m: nn.Module):
    if type(m) is nn.ReLU:
        return F.relu
    if getattr(m, "inplace", False):
        m = copy.copy(m)  # shares the parameters
        m.inplace = False
    return m


def _is_channel_const(v) -> bool:
    """A Python number or a tensor that broadcasts per channel only (same at every position)."""
    if isinstance(v, (int, float)):
        return True
    return isinstance(v, Tensor) and (v.numel() == 1 or (v.dim() >= 3 and tuple(v.shape[-2:]) == (1, 1)))


def _windowed(m: nn.Module) -> tuple[str, float] | None:
    """``(kind, fill)`` when ``m`` is a conv or pooling layer we can window."""
    if is_supported_conv(m):
        return "conv", 0.0
    if type(m) is nn.MaxPool2d and _pair(m.dilation) == (1, 1) and not m.ceil_mode and not m.return_indices:
        return "pool", float("-inf")
    if type(m) is nn.AvgPool2d and not m.ceil_mode and (m.count_include_pad or _pair(m.padding) == (0, 0)):
        return "pool", 0.0
    return None


_SPATIAL = (nn.modules.conv._ConvNd, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd, nn.Upsample)


class _Axis:
    """Per-axis plan of one node: map size ``n``, changed interval ``[lo, hi)`` per grid position
    (``lo == hi``: unchanged), window size ``W`` and window starts ``ws``."""

    def __init__(self, n: int, lo: list[int], hi: list[int], window: int | None = None):
        self.n, self.lo, self.hi = n, lo, hi
        W = window if window is not None else max([1] + [b - a for a, b in zip(lo, hi)])
        self.W = min(n, W)
        self.ws = [min(a if b > a else 0, n - self.W) for a, b in zip(lo, hi)]


MIN_SAVING = 1.3  # a traced graph is scored incrementally only when its windows save this factor of MACs


class PatchIncrementalGraph:
    """Incremental inference for a traced network with branches (see the section comment above).

    Same call as :class:`PatchIncrementalNet`: :meth:`logits`. Weights are read at call time.
    """

    def __init__(self, gm, nodes: list[_GNode], fx_index: dict, tail: list, window_override: dict | None = None):
        self.gm, self.nodes, self.fx_index, self.tail = gm, nodes, fx_index, tail
        self.window_override = dict(window_override or {})  # {node index: window size} (tests: wrong sizes must fail)
        self._plans: dict[tuple, dict] = {}

    # ------------------------------------------------------------------ plan
    def plan(self, geometry: ScanGeometry, device) -> dict:
        key = (geometry.image_size, geometry.patch_size, geometry.grid, str(device), tuple(sorted(self.window_override.items())))
        if key not in self._plans:
            self._plans[key] = self._make_plan(geometry)
        return self._plans[key]

    def _make_plan(self, geo: ScanGeometry) -> dict:
        S, P, G = geo.image_size, geo.patch_size, geo.grid
        starts = [g * geo.stride for g in range(G)]
        axes: list[tuple[_Axis, _Axis]] = []
        for i, v in enumerate(self.nodes):
            per = []
            for d in (0, 1):
                if v.kind == "input":
                    per.append(_Axis(S, starts, [s + P for s in starts]))
                    continue
                src = [axes[j][d] for j in v.inputs]
                if v.kind in ("conv", "pool"):
                    a = src[0]
                    K, st, pd = v.kernel[d], v.stride[d], v.padding[d]
                    n = (a.n + 2 * pd - K) // st + 1
                    if n < 1:
                        raise ValueError(f"{v.name} (kernel {K}, stride {st}, padding {pd}) gets {a.n} positions: input too small")
                    lo, hi = [], []
                    for x0, x1 in zip(a.lo, a.hi):
                        o0 = max(0, -(-(x0 + pd - K + 1) // st))
                        o1 = min(n - 1, (x1 - 1 + pd) // st) + 1
                        lo.append(o0 if (x1 > x0 and o1 > o0) else 0)
                        hi.append(o1 if (x1 > x0 and o1 > o0) else 0)
                else:
                    n = src[0].n
                    if any(s.n != n for s in src):
                        raise ValueError(f"{v.name} merges maps of sizes {[s.n for s in src]}")
                    lo = [min([s.lo[g] for s in src if s.hi[g] > s.lo[g]], default=0) for g in range(G)]
                    hi = [max([s.hi[g] for s in src if s.hi[g] > s.lo[g]], default=0) for g in range(G)]
                per.append(_Axis(n, lo, hi, self.window_override.get(i)))
            axes.append(tuple(per))
        return {"axes": axes, "tables": {}, "G": G, "starts": starts, "P": P}

    def window_sizes(self, geometry: ScanGeometry) -> list[tuple[str, tuple[int, int], tuple[int, int]]]:
        """``(node, window (rows, cols), map (rows, cols))`` of every materialised node."""
        ax = self.plan(geometry, "cpu")["axes"]
        return [(v.name, (ax[i][0].W, ax[i][1].W), (ax[i][0].n, ax[i][1].n))
                for i, v in enumerate(self.nodes) if v.materialised and v.kind != "input"]

    def worthwhile(self, geometry: ScanGeometry) -> bool:
        """Whether the windows save enough to beat the full path: at least :data:`MIN_SAVING` times
        fewer conv multiply-adds (measured on the CPU: ResNet-18/DenseNet-121 at 64 px save 1.15-1.17x
        and run at 0.76-0.93x of the full path; at 256 px they save 1.73-1.85x and run 1.76-1.98x faster)."""
        return self.flops(geometry)["ratio"] >= MIN_SAVING

    def flops(self, geometry: ScanGeometry) -> dict:
        """Multiply-adds of the convs per input: the full map, and the windows one candidate recomputes."""
        ax = self.plan(geometry, "cpu")["axes"]
        full = win = 0
        for i, v in enumerate(self.nodes):
            if v.kind == "conv":
                c = v.module
                per_pos = c.out_channels * (c.in_channels // c.groups) * c.kernel_size[0] * c.kernel_size[1]
                full += per_pos * ax[i][0].n * ax[i][1].n
                win += per_pos * ax[i][0].W * ax[i][1].W
        return {"full_macs": full, "window_macs": win, "ratio": full / max(1, win)}

    def _table(self, plan: dict, i: int, r0: list[int], c0: list[int], h: int, w: int, device):
        """Per location ``(L, h, w)``: kind (0 base, 1 window, 2 fill), base offset, window offset,
        inside-map and (input only) inside-patch masks of a crop of node ``i`` starting at
        ``(r0[g], c0[g])`` in map coordinates."""
        key = (i, tuple(r0), tuple(c0), h, w, str(device))
        tab = plan["tables"].get(key)
        if tab is None:
            per = []
            for d, st0, size in ((0, r0, h), (1, c0, w)):
                a = plan["axes"][i][d]
                u = torch.tensor(st0)[:, None] + torch.arange(size)[None]  # (G, size) map coords
                inside = (u >= 0) & (u < a.n)
                ws = torch.tensor(a.ws)[:, None]
                inwin = (u >= ws) & (u < ws + a.W)
                if self.nodes[i].kind == "input":
                    s = torch.tensor(plan["starts"])[:, None]
                    patch, inwin = (u >= s) & (u < s + plan["P"]), torch.zeros_like(inside)
                else:
                    patch = torch.zeros_like(inside)
                per.append((u.clamp(0, a.n - 1), (u - ws).clamp(0, a.W - 1), inside, inwin, patch, a))
            (ur, wr, ir, qr, pr, ar), (uc, wc, ic, qc, pc, ac) = per
            G = ur.shape[0]

            def outer(x, y, op):
                return op(x[:, None, :, None], y[None, :, None, :]).reshape(G * G, h, w)  # (L, h, w)

            inside = outer(ir, ic, torch.logical_and)
            inwin = outer(qr, qc, torch.logical_and)
            kind = torch.where(inside, torch.where(inwin, 1, 0), 2)
            base = outer(ur * ac.n, uc, torch.add)
            win = outer(wr * ac.W, wc, torch.add)
            patch = outer(pr, pc, torch.logical_and)
            tab = tuple(t.to(device) for t in (kind, base, win, inside, patch))
            plan["tables"][key] = tab
        return tab

    # ------------------------------------------------------------------ compute
    def _conv_params(self) -> dict:
        """Effective (weight, bias) of every conv, BatchNorm folded (eval statistics), read now."""
        out = {}
        for i, v in enumerate(self.nodes):
            if v.kind != "conv":
                continue
            c, bn = v.module, v.bn
            w, b = c.weight, c.bias
            if bn is not None:
                scale = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else torch.rsqrt(bn.running_var + bn.eps)
                shift = (bn.bias if bn.affine else 0) - bn.running_mean * scale
                w = w * scale.view(-1, 1, 1, 1)
                b = shift if b is None else b * scale + shift
                w = w.contiguous(memory_format=torch.channels_last) if c.weight.is_contiguous(memory_format=torch.channels_last) and not c.weight.is_contiguous() else w
            out[i] = (w, b)
        return out

    def run_stage(self, i: int, h: Tensor, params: dict, padding=None) -> Tensor:
        """Windowed node ``i`` (conv or pool) on ``h``: crops (padding 0) or full maps (its own padding)."""
        v = self.nodes[i]
        pad = v.padding if padding is None else padding
        if v.kind == "conv":
            w, b = params[i]
            return F.conv2d(h, w, b, v.stride, pad, 1, v.module.groups)
        m = v.module
        if type(m) is nn.MaxPool2d:
            return F.max_pool2d(h, v.kernel, v.stride, pad)
        return F.avg_pool2d(h, v.kernel, v.stride, pad, False, m.count_include_pad, m.divisor_override)

    def run_tail(self, env: dict) -> Tensor:
        """The traced tail (global pool, flatten, head) given the frontier maps in ``env``."""
        for node in self.tail:
            args = torch.fx.node.map_arg(node.args, lambda a: env[a.name])
            kwargs = torch.fx.node.map_arg(node.kwargs, lambda a: env[a.name])
            if node.op == "output":
                return args[0]
            if node.op == "call_module":
                env[node.name] = self.gm.get_submodule(node.target)(*args, **kwargs)
            elif node.op == "call_function":
                env[node.name] = node.target(*args, **kwargs)
            elif node.op == "call_method":
                env[node.name] = getattr(args[0], node.target)(*args[1:], **kwargs)
            elif node.op == "get_attr":
                env[node.name] = _fetch_attr(self.gm, node.target)
        raise AssertionError("traced graph without output")

    def _consts(self) -> dict:
        return {n.name: _fetch_attr(self.gm, n.target) for n in self.gm.graph.nodes if n.op == "get_attr"}

    def _full(self, i: int, vals: dict, params: dict) -> Tensor:
        """Full map of local node ``i`` from full maps of its inputs (the base pass)."""
        v = self.nodes[i]
        xs = [vals[j] for j in v.inputs]
        if v.kind in ("conv", "pool"):
            return self.run_stage(i, xs[0], params)
        if v.kind == "point":
            return v.fn(xs[0])
        if v.kind == "merge":
            return v.fn(xs[0], xs[1])
        return torch.cat(xs, 1)

    def logits(self, samples: Tensor, mask: Tensor, geometry: ScanGeometry, item_b: Tensor, item_l: Tensor, *,
               chunk_size: int = 256, channels_last: bool = True, amp: bool = True, progress: bool = False,
               block_bytes: int = 256 << 20, window_bytes: int = 256 << 20) -> tuple[Tensor, Tensor]:
        """Logits of the base inputs and of the candidate items, float32 ``((B, N, K), (Q, N, K))``.

        As :meth:`PatchIncrementalNet.logits`; chunks are also bounded so that the recomputed
        windows of one chunk take about ``window_bytes``.
        """
        B, N, C, S, _ = samples.shape
        c0 = self.nodes[0].channels
        if c0 != C + 1 or mask.shape != (B, 1, S, S) or geometry.image_size != S:
            raise ValueError(f"samples {tuple(samples.shape)}, mask {tuple(mask.shape)}, geometry S={geometry.image_size} "
                             f"and a classifier taking {c0} channels disagree")
        device = next(iter(self.gm.parameters())).device
        plan = self.plan(geometry, device)
        ax = plan["axes"]
        item_b, item_l = item_b.to(device), item_l.to(device)
        mats = [i for i, v in enumerate(self.nodes) if v.materialised]
        per_img = 4 * N * sum(ax[i][0].n * ax[i][1].n * self.nodes[i].channels for i in mats)
        per_win = 4 * 3 * sum(ax[i][0].W * ax[i][1].W * self.nodes[i].channels for i in mats if i)  # windows + crops
        block = max(1, block_bytes // per_img)  # images per block
        chunk = max(1, min(int(chunk_size) // N, window_bytes // max(1, per_win * N)))  # items per chunk
        amp_ctx = torch.autocast("cuda", dtype=torch.bfloat16) if (amp and device.type == "cuda") else nullcontext()
        base_logits, cand_logits = [], []
        bounds = torch.searchsorted(item_b, torch.arange(0, B + block, block, device=device).clamp(max=B)).tolist()
        n_chunks = sum(-(-(q1 - q0) // chunk) for q0, q1 in zip(bounds, bounds[1:]))
        bar = tqdm(total=n_chunks, desc="classify (incremental)", disable=not progress or None, leave=False)
        with torch.inference_mode(), amp_ctx:
            params, consts = self._conv_params(), self._consts()
            for blk, b0 in enumerate(range(0, B, block)):
                b1 = min(B, b0 + block)
                pools, logits0 = self._base(plan, samples[b0:b1], mask[b0:b1], chunk * N, params, consts, channels_last)
                base_logits.append(logits0.float().view(b1 - b0, N, -1))  # (Bb, N, K)
                q0, q1 = bounds[blk], bounds[blk + 1]
                for i0 in range(q0, q1, chunk):
                    i1 = min(q1, i0 + chunk)
                    out = self._candidates(plan, pools, item_b[i0:i1] - b0, item_l[i0:i1], N, b1 - b0, params, consts,
                                           channels_last)
                    cand_logits.append(out.float().view(i1 - i0, N, -1))  # (k, N, K)
                    bar.update(1)
        bar.close()
        K = base_logits[0].shape[-1]
        return torch.cat(base_logits), torch.cat(cand_logits) if cand_logits else torch.zeros(0, N, K, device=device)

    def _base(self, plan: dict, x_u8: Tensor, m: Tensor, max_inputs: int, params: dict, consts: dict, channels_last: bool):
        """Full forward of the base inputs of a block of images: the gather pools and the logits.

        Pool of materialised node ``i``: ``(Bb * N * H * W + max_inputs * Wr * Wc + 2, C)`` rows,
        the base maps in NHWC order, room for one chunk's windows, then a zero and a -inf row.
        """
        Bb, N, C, S, _ = x_u8.shape
        device = next(iter(self.gm.parameters())).device
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        x = x_u8.to(device).float().div_(255).reshape(Bb * N, C, S, S)  # (Bb*N, C, S, S)
        mm = m.to(device=device, dtype=torch.float32).repeat_interleave(N, 0)  # (Bb*N, 1, S, S)
        vals: dict[int, Tensor] = {}
        pools: dict[int, Tensor] = {}
        last_use = {i: (len(self.nodes) if v.frontier else i) for i, v in enumerate(self.nodes)}
        for i, v in enumerate(self.nodes):
            for j in v.inputs:
                last_use[j] = max(last_use[j], i)
        for i, v in enumerate(self.nodes):
            if i == 0:
                h = torch.cat([x * mm, mm], 1).contiguous(memory_format=fmt)  # (Bb*N, C+1, S, S)
                src = torch.cat([x, mm], 1)  # the pool keeps x and the mask: candidates observe more of x
            else:
                h = self._full(i, vals, params)
                src = h
            vals[i] = h
            for j in v.inputs:  # free maps no later node reads
                if last_use[j] == i:
                    del vals[j]
            if v.materialised:
                M, Ck, H, W = src.shape
                win = 0 if i == 0 else plan["axes"][i][0].W * plan["axes"][i][1].W
                pool = src.new_empty(M * H * W + max_inputs * win + 2, Ck)
                pool[:M * H * W].view(M, H, W, Ck).copy_(src.permute(0, 2, 3, 1))
                pool[-2].zero_()
                pool[-1].fill_(float("-inf"))
                pools[i] = pool
        env = dict(consts)
        for node_name, i in self.fx_index.items():
            env[node_name] = vals[i]
        return pools, self.run_tail(env)

    def _gather(self, plan, pools, wins, ctx, i: int, r0, c0, h: int, w: int, fill) -> Tensor:
        """Crop ``(k*N, C, h, w)`` (NHWC strides) of node ``i``'s new map at ``(r0[g], c0[g])`` for the
        chunk's items; positions outside the map hold ``fill`` (None: unspecified)."""
        v = self.nodes[i]
        b, l, N, Bb, k = ctx
        if v.materialised and i and wins.get(i) is not None:
            ar, ac = plan["axes"][i]
            if ar.W == ar.n and ac.W == ac.n and len(set(r0)) == 1 and len(set(c0)) == 1:
                # the window is the whole map (deep layers): pad and slice it, no gather
                t, lft = r0[0], c0[0]
                win_map = wins[i]
                pads = (max(0, -lft), max(0, lft + w - ac.n), max(0, -t), max(0, t + h - ar.n))
                if any(pads):
                    win_map = F.pad(win_map, pads, value=0.0 if fill is None else fill)
                return win_map[:, :, t + pads[2]:t + pads[2] + h, lft + pads[0]:lft + pads[0] + w]
        if v.materialised:
            kind, base, win, inside, patch = self._table(plan, i, r0, c0, h, w, b.device)
            pool = pools[i]
            ax = plan["axes"][i]
            nA, WA = ax[0].n * ax[1].n, ax[0].W * ax[1].W
            nb = Bb * N * nA
            n = torch.arange(N, device=b.device)
            if i and wins.get(i) is not None:
                pool[nb:nb + k * N * WA].view(k * N, ax[0].W, ax[1].W, -1).copy_(wins[i].permute(0, 2, 3, 1))
            kl = kind[l][:, None]  # (k, 1, h, w)
            row_b = ((b[:, None] * N + n[None]) * nA)[:, :, None, None] + base[l][:, None]  # (k, N, h, w)
            row_w = nb + ((torch.arange(k, device=b.device)[:, None] * N + n[None]) * WA)[:, :, None, None] + win[l][:, None]
            fill_row = pool.shape[0] - (1 if fill == float("-inf") else 2)
            idx = torch.where(kl == 1, row_w, torch.where(kl == 0, row_b, fill_row))  # (k, N, h, w)
            crop = pool.index_select(0, idx.view(-1)).view(k * N, h, w, -1).permute(0, 3, 1, 2)  # (k*N, C, h, w)
            if i == 0:  # pool rows hold (x, m): observe with the mask ∪ the candidate's patch
                Cx = crop.shape[1] - 1
                mc = torch.maximum(crop[:, Cx:], patch[l].repeat_interleave(N, 0)[:, None].to(crop.dtype))  # (k*N, 1, h, w)
                crop = torch.cat([crop[:, :Cx] * mc, mc], 1)
                if fill is not None and fill != 0.0:  # fill rows give 0 after observe
                    crop = torch.where(inside[l].repeat_interleave(N, 0)[:, None], crop, fill)
            return crop
        return self._compose(plan, pools, wins, ctx, i, r0, c0, h, w, fill)

    def _compose(self, plan, pools, wins, ctx, i: int, r0, c0, h: int, w: int, fill) -> Tensor:
        """A crop of non-windowed node ``i`` computed from crops of its inputs."""
        v = self.nodes[i]
        b, l, N = ctx[0], ctx[1], ctx[2]
        kids = [self._gather(plan, pools, wins, ctx, j, r0, c0, h, w, None) for j in v.inputs]
        if v.kind == "cat":
            return torch.cat(kids, 1)
        out = v.fn(kids[0]) if v.kind == "point" else v.fn(kids[0], kids[1])
        if fill is not None:
            inside = self._table(plan, i, r0, c0, h, w, b.device)[3]
            if not bool(inside.all()):
                out = torch.where(inside[l].repeat_interleave(N, 0)[:, None], out, torch.tensor(fill, dtype=out.dtype, device=out.device))
        return out

    def _candidates(self, plan, pools, b: Tensor, l: Tensor, N: int, Bb: int, params: dict, consts: dict,
                    channels_last: bool) -> Tensor:
        """Logits ``(k * N, K)`` of items ``(b (k,) image in block, l (k,) location)``."""
        G = plan["G"]
        ax = plan["axes"]
        ctx = (b, l, N, Bb, b.shape[0])
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        wins: dict[int, Tensor] = {}
        for i, v in enumerate(self.nodes):
            if not v.materialised or i == 0:
                continue
            (ar, ac) = ax[i]
            if v.kind in ("conv", "pool"):
                j = v.inputs[0]
                (st_r, st_c), (pd_r, pd_c), (K_r, K_c) = v.stride, v.padding, v.kernel
                r0 = [ar.ws[g] * st_r - pd_r for g in range(G)]
                c0 = [ac.ws[g] * st_c - pd_c for g in range(G)]
                crop = self._gather(plan, pools, wins, ctx, j, r0, c0, (ar.W - 1) * st_r + K_r, (ac.W - 1) * st_c + K_c, v.fill)
                wins[i] = self.run_stage(i, crop.contiguous(memory_format=fmt), params, padding=0)
            else:  # a branch point or frontier node: its own window from its inputs
                wins[i] = self._compose(plan, pools, wins, ctx, i, ar.ws, ac.ws, ar.W, ac.W, None)
        env = dict(consts)
        for node_name, i in self.fx_index.items():
            (ar, ac) = ax[i]
            env[node_name] = self._gather(plan, pools, wins, ctx, i, [0] * G, [0] * G, ar.n, ac.n, None).contiguous(memory_format=fmt)
        return self.run_tail(env)
