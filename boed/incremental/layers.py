"""Which layers the incremental engines can run: pointwise layers (the same function at every
position) and plain convolutions (windowed), and the layer list of a plain chain."""

from __future__ import annotations

from torch import nn

_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.ELU, nn.CELU, nn.SELU, nn.Sigmoid, nn.Tanh,
                nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Softplus, nn.PReLU, nn.Identity)


def is_pointwise(m: nn.Module) -> bool:
    """Whether ``m`` maps every spatial position independently and deterministically (in its current mode)."""
    t = type(m)
    if t in _ACTIVATIONS:
        return True
    if getattr(m, "pointwise_same_channels", False) is True:  # a module that declares it (boed.classifier.InputNorm)
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
