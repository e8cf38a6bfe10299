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
concatenations, max/avg pooling, pointwise input normalisation; traced with ``torch.fx``, see
:mod:`.graph`), or None (then use the full path; the reason is logged at debug level).
Both have the same :meth:`logits`. A chain module is accepted when it is an ``nn.Sequential`` or defines ``sequential_layers() -> list of
modules`` whose composition is its forward (see :class:`boed.classifier.TinyCNN`), and the layers
are ``[pointwise]* (Conv2d [pointwise]*)+ tail`` with no convolution in the tail. Convs need
dilation 1, zero padding given as numbers; any kernel, stride, groups. Pointwise: activations,
``Identity`` (a folded BN), ``Dropout`` and ``BatchNorm2d`` in eval mode, and modules that set
``pointwise_same_channels = True`` (:class:`boed.classifier.InputNorm` of a tiny AVP-CNN with
``input_norm "dataset"`` or a hidden mask channel).

Modules, each read top to bottom: :mod:`.layers` (which layers can be windowed), :mod:`.receptive`
(the receptive-field arithmetic of both engines), :mod:`.driver` (the engine base class and the
shared ``logits`` driver), :mod:`.chain` and :mod:`.graph` (the two engines); here the choice
between them, cached per model.
"""

from __future__ import annotations

import logging
import weakref

from torch import nn

from .chain import PatchIncrementalNet, chain_from_module
from .driver import IncrementalEngine
from .graph import MIN_SAVING, PatchIncrementalGraph, Unsupported, graph_from_module

log = logging.getLogger(__name__)

__all__ = ["MIN_SAVING", "IncrementalEngine", "PatchIncrementalGraph", "PatchIncrementalNet", "Unsupported",
           "chain_from_module", "from_module", "graph_from_module", "incremental_for"]


def from_module(model: nn.Module) -> IncrementalEngine | None:
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


_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, IncrementalEngine | None]]" = weakref.WeakKeyDictionary()


def _signature(model: nn.Module) -> tuple:
    return tuple((id(m), m.training) for m in model.modules())


def incremental_for(model: nn.Module) -> IncrementalEngine | None:
    """:func:`from_module` cached per model object (re-analysed when its modules or modes change)."""
    sig = _signature(model)
    hit = _CACHE.get(model)
    if hit is None or hit[0] != sig:
        hit = (sig, from_module(model))
        _CACHE[model] = hit
    return hit[1]
