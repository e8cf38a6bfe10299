"""Classifier probabilities for every (candidate scan, sampled completion) pair, in bounded chunks.

:func:`candidate_probs` is the cost centre of greedy BOED: for B test images, L candidate
locations and N completions it classifies ``B * L * N`` observations
``f_{prev, l}(x(n)) = observe(x(n) / 255, mask ∪ patch_l)``. Inputs are built per chunk of whole
candidates, each mask broadcast over its N samples and written straight into the classifier's
memory format (no Python loop over L * N, no ``(B, L, ...)`` tensor in memory), and run under
``torch.inference_mode()`` on an inference copy of the classifier (BN folded into the convs,
channels_last). Candidates already fully observed are not classified.

Precision: scoring runs in float32 by default (:data:`DEFAULT_AMP`); ``amp=True`` asks for bf16
autocast on CUDA. ``benchmarks/bench_precision.py`` measured how often the greedy EIG argmax under
bf16 autocast differs from float32 (tiny AVP-CNN, S = 64, N = 10, t = 1..5, CPU bf16 autocast):
218 of 220 decisions agreed (99.1 %, 95 % interval 96.7-99.8 %; both disagreements near-ties,
largest EIG lost 0.5 %). Agreement >= 99 % is not established, so bf16 is opt-in.

When the classifier is a conv chain or a traceable ResNet/DenseNet-style graph
(:func:`boed.incremental.from_module` accepts it) and its windows save enough compute (always for
chains such as the ``tiny`` AVP-CNN; for graphs from about 128 px up) and the classifier is on the CPU, candidates are scored incrementally by default: the trunk runs once per
``(b, n)`` on the current observation and each candidate only recomputes the windows its patch
can change (``incremental=False`` forces the full path; the outputs agree to float tolerance).
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from tqdm.auto import tqdm

from boed.geometry import ScanGeometry
from boed.incremental import incremental_for
from xray.labels import Illness


DEFAULT_AMP = False  # float32 scoring; see the module docstring and benchmarks/results/precision.json


@dataclass
class ScoringConfig:
    chunk_size: int | None = None  # classifier inputs per forward pass; None: default_chunk_size(device)
    channels_last: bool = True
    amp: bool = DEFAULT_AMP  # True: bf16 autocast, CUDA only
    progress: bool = False  # tqdm over chunks
    incremental: bool | str = True  # patch-local inference (boed.incremental) when supported and it saves compute; "always": whenever supported


def model_device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """Fold every ``Conv2d -> BatchNorm2d`` pair inside ``nn.Sequential`` containers into the conv.

    Inference only (uses the BN running statistics); works in place on ``module`` and returns it.
    The folded BN becomes ``nn.Identity``. Other layouts (e.g. BN before conv) are left as they are.
    """
    for seq in [m for m in module.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = seq._modules[a], seq._modules[b]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
                seq._modules[a] = fuse_conv_bn_eval(conv, bn)
                seq._modules[b] = nn.Identity()
    return module


def default_chunk_size(device: torch.device) -> int:
    """Inputs per forward: large on GPUs; on CPUs a few hundred keep activations in cache."""
    return 2048 if device.type == "cuda" else 256


def prepare_classifier(classifier: nn.Module, device: torch.device, channels_last: bool = True,
                       fold_bn: bool = True) -> nn.Module:
    """An inference copy of ``classifier`` for scoring: on ``device``, eval mode, BN folded into
    convs (``fold_bn``), weights channels_last (``set_channels_last`` when the model has it).
    The caller's module is not modified."""
    classifier = copy.deepcopy(classifier).to(device).eval()
    for p in classifier.parameters():
        p.requires_grad_(False)
    if fold_bn:
        classifier = fold_batchnorm(classifier)
    if channels_last:
        if hasattr(classifier, "set_channels_last"):
            classifier = classifier.set_channels_last(True)
        else:
            classifier = classifier.to(memory_format=torch.channels_last)
    return classifier


def classify_in_chunks(
    classifier: nn.Module,
    n_items: int,
    build: Callable[[int, int], Tensor],
    illness: Illness,
    cfg: ScoringConfig = ScoringConfig(),
    per_item: int = 1,
) -> Tensor:
    """``illness.prob(sigmoid(classifier(build(i0, i1))))`` over items ``0..n_items`` -> float32 ``(n_items * per_item,)``.

    ``build(i0, i1)`` returns the observations of items ``i0..i1``, ``((i1 - i0) * per_item, C + 1,
    S, S)``, on the classifier's device. Chunks hold whole items, about ``cfg.chunk_size`` inputs.
    """
    device = model_device(classifier)
    out = torch.empty(n_items * per_item, dtype=torch.float32, device=device)
    chunk = max(1, int(cfg.chunk_size or default_chunk_size(device)) // per_item)  # items per forward
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if (cfg.amp and device.type == "cuda") else nullcontext()
    with torch.inference_mode(), amp:
        for i0 in tqdm(range(0, n_items, chunk), desc="classify", disable=not cfg.progress or None, leave=False):
            i1 = min(i0 + chunk, n_items)
            y = build(i0, i1)
            if cfg.channels_last:
                y = y.contiguous(memory_format=torch.channels_last)  # no copy when built that way
            logits = classifier(y)  # (chunk, K)
            out[i0 * per_item:i1 * per_item] = illness.prob(torch.sigmoid(logits.float()))
    return out


class _Observations:
    """Builds ``observe(x[b, n] / 255, mask_k)`` for work items ``(b, mask_k)`` and all n at once.

    The images are converted to float once; each item's mask is broadcast over its N samples and
    the result is written straight into the classifier's memory format (channels_last: NHWC), so
    a chunk costs one write of its inputs and no Python loop over samples or locations.
    """

    def __init__(self, samples: Tensor, device: torch.device, channels_last: bool):
        self.channels_last = channels_last
        x = samples.to(device)  # (B, N, C, S, S) uint8
        if channels_last:
            x = x.permute(0, 1, 3, 4, 2)  # (B, N, S, S, C)
        self.x = x.float().div_(255).contiguous()
        self.B, self.N, self.C, self.S = samples.shape[0], samples.shape[1], samples.shape[2], samples.shape[-1]

    def __call__(self, b: Tensor, masks: Tensor) -> Tensor:
        """``b (k,)`` image of each item (sorted runs), ``masks (k, 1, S, S)`` -> ``(k * N, C + 1, S, S)``."""
        k, N, C, S = b.shape[0], self.N, self.C, self.S
        if self.channels_last:
            mm = masks.permute(0, 2, 3, 1)[:, None]  # (k, 1, S, S, 1)
            y = torch.empty(k, N, S, S, C + 1, device=masks.device)  # (k, N, S, S, C + 1)
            xs, ys, ym = self.x, y[..., :C], y[..., C:]
        else:
            mm = masks[:, None]  # (k, 1, 1, S, S)
            y = torch.empty(k, N, C + 1, S, S, device=masks.device)  # (k, N, C + 1, S, S)
            xs, ys, ym = self.x, y[:, :, :C], y[:, :, C:]
        runs, counts = torch.unique_consecutive(b, return_counts=True)
        i = 0
        for img, cnt in zip(runs.tolist(), counts.tolist()):  # runs of items on the same image
            torch.mul(xs[img][None], mm[i:i + cnt], out=ys[i:i + cnt])  # (cnt, N, ..., C) broadcast over items
            i += cnt
        ym.copy_(mm.expand_as(ym))
        if self.channels_last:
            return y.view(k * N, S, S, C + 1).permute(0, 3, 1, 2)  # (k*N, C+1, S, S), channels_last strides
        return y.view(k * N, C + 1, S, S)  # (k*N, C+1, S, S)


def use_incremental(inc, geometry: ScanGeometry, device: torch.device, mode: bool | str = True) -> bool:
    """Whether :func:`candidate_probs` scores through the patch-local engine ``inc``.

    ``mode="always"``: yes; ``False``: no; ``True`` (default): on the CPU when the windows save
    enough compute (:meth:`worthwhile`), never on other devices. On an H200 the window gathers made
    one DenseNet-121 decision at 256 px (N = 10, L = 289) 50x *slower* than the full path (25.1 s
    vs 0.5 s, ``benchmarks/results/device_check_cuda.md``): the GPU is bound by launches and
    gathers, not by the multiply-adds the windows save."""
    if mode == "always":
        return True
    if not mode or torch.device(device).type != "cpu":
        return False
    return inc.worthwhile(geometry)


def candidate_probs(
    classifier: nn.Module,
    samples: Tensor,
    mask: Tensor,
    geometry: ScanGeometry,
    illness: Illness,
    chunk_size: int | None = None,
    skip: Tensor | None = None,
    *,
    channels_last: bool = True,
    amp: bool = DEFAULT_AMP,
    progress: bool = False,
    incremental: bool | str = True,
) -> Tensor:
    """``p (B, L, N)``: g(v=1 | observe(samples[b, n] / 255, mask[b] ∪ patch_l)).

    ``samples`` uint8 ``(B, N, C, S, S)``; ``mask`` ``(B, 1, S, S)``. ``skip (B, L)`` bool marks
    candidates not to classify; default: patches already fully observed. A skipped candidate
    adds nothing, so its row is ``g(observe(samples[b, n] / 255, mask[b]))`` (the current
    posterior per sample), computed once per image instead of once per skipped location.
    ``incremental``: use patch-local inference when the classifier supports it and it saves compute
    (:func:`use_incremental`: on the CPU only; ``"always"``: whenever supported, ``False``: never).
    """
    B, N, C, S, _ = samples.shape
    L = geometry.num_locations
    if mask.shape != (B, 1, S, S) or geometry.image_size != S:
        raise ValueError(f"samples {tuple(samples.shape)}, mask {tuple(mask.shape)} and geometry S={geometry.image_size} disagree")
    device = model_device(classifier)
    cfg = ScoringConfig(chunk_size, channels_last, amp, progress, incremental)
    m = mask.to(device=device, dtype=torch.float32)  # (B, 1, S, S)
    if skip is None:
        skip = geometry.fully_observed(m)  # (B, L)
    skip = skip.to(device)
    inc = incremental_for(classifier) if (cfg.incremental and B) else None
    if inc is not None and use_incremental(inc, geometry, device, cfg.incremental):
        return _candidate_probs_incremental(inc, samples, m, geometry, illness, skip, cfg)

    obs = _Observations(samples, device, channels_last)
    pm = torch.cat([geometry.patch_masks(device), torch.zeros(1, 1, S, S, device=device)])  # (L + 1, 1, S, S); L = no patch

    # Work items: (b, l) candidates to classify, each with all N samples, sorted by b; then one
    # "current observation" item (l = L: no patch) per image that has skipped candidates.
    bl = (~skip).nonzero()  # (Q, 2)
    cur = skip.any(1).nonzero().reshape(-1)  # (Bc,)
    item_b = torch.cat([bl[:, 0], cur])  # (Q + Bc,)
    item_l = torch.cat([bl[:, 1], torch.full_like(cur, L)])  # (Q + Bc,)
    n_items = item_b.numel()

    def build(i0: int, i1: int) -> Tensor:
        b, l = item_b[i0:i1], item_l[i0:i1]
        return obs(b, torch.maximum(m[b], pm[l]))  # masks (k, 1, S, S)

    per_item = classify_in_chunks(classifier, n_items, build, illness, cfg, per_item=N).reshape(n_items, N)  # (items, N)
    p = torch.empty(B, L, N, dtype=torch.float32, device=device)
    q = bl.shape[0]
    p[bl[:, 0], bl[:, 1]] = per_item[:q]
    if cur.numel():
        current = torch.empty(B, N, dtype=torch.float32, device=device)
        current[cur] = per_item[q:]
        sb, sl = skip.nonzero().unbind(1)
        p[sb, sl] = current[sb]
    return p


def _candidate_probs_incremental(inc, samples: Tensor, m: Tensor, geometry: ScanGeometry, illness: Illness,
                                 skip: Tensor, cfg: ScoringConfig) -> Tensor:
    """:func:`candidate_probs` through :class:`boed.incremental.PatchIncrementalNet`: the base row
    of every image is computed anyway, so skipped candidates cost nothing."""
    B, N = samples.shape[:2]
    device = m.device
    bl = (~skip).nonzero()  # (Q, 2), sorted by image
    base, cand = inc.logits(samples, m, geometry, bl[:, 0], bl[:, 1],
                            chunk_size=cfg.chunk_size or default_chunk_size(device),
                            channels_last=cfg.channels_last, amp=cfg.amp, progress=cfg.progress)  # (B, N, K), (Q, N, K)
    p = torch.empty(B, geometry.num_locations, N, dtype=torch.float32, device=device)
    p[bl[:, 0], bl[:, 1]] = illness.prob(torch.sigmoid(cand))  # (Q, N)
    sb, sl = skip.nonzero().unbind(1)
    p[sb, sl] = illness.prob(torch.sigmoid(base))[sb]  # (S_k, N)
    return p


def sequence_probs(
    classifier: nn.Module,
    images: Tensor,
    masks: Tensor,
    illness: Illness,
    chunk_size: int | None = None,
    *,
    channels_last: bool = True,
    amp: bool = DEFAULT_AMP,
    progress: bool = False,
) -> Tensor:
    """``p (M, N)``: g(v=1 | observe(images[n] / 255, masks[j])) for every mask j and image n.

    ``images`` uint8 ``(N, C, S, S)``; ``masks`` ``(M, 1, S, S)`` (e.g. whole scan sequences).
    """
    N, C, S, _ = images.shape
    M = masks.shape[0]
    device = model_device(classifier)
    obs = _Observations(images[None], device, channels_last)
    mk = masks.to(device=device, dtype=torch.float32)  # (M, 1, S, S)
    zeros = torch.zeros(M, dtype=torch.long, device=device)  # every item uses image set 0

    def build(j0: int, j1: int) -> Tensor:
        return obs(zeros[j0:j1], mk[j0:j1])  # (k * N, C + 1, S, S)

    cfg = ScoringConfig(chunk_size, channels_last, amp, progress)
    return classify_in_chunks(classifier, M, build, illness, cfg, per_item=N).reshape(M, N)  # (M, N)
