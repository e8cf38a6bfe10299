"""The AVP-CNN g(v | y): a classifier of partially observed images (paper I.4, Harvey et al. 2019).

The input is the observation ``y = cat(x * m, m)`` (``C + 1`` channels, pixel values in [0, 1],
mask 1 = observed); the output is ``K = 15`` logits, one per label of :data:`xray.labels.LABELS`
(14 pathologies + "Any Finding"), each an independent Bernoulli (sigmoid).

Backbones: ``tiny`` (a small fast CNN for CPU work at S = 64, about 4.4 MFLOPs per input) and
torchvision ``resnet18``, ``resnet50``, ``densenet121`` (built with ``weights=None``: nothing is
ever downloaded) whose first convolution is widened by one input channel for the mask. The new
channel's weights start at zero, so a pretrained image-only network gives the same outputs with the
mask appended. :func:`load_init` loads local weights: an image-only torchvision state dict
(widened on load; RGB first convolutions are summed over colour for grayscale input) or a full AVP
checkpoint.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from xray.errors import UserError
from xray.io import ensure_writable_dir
from xray.labels import LABELS

from .geometry import observe

log = logging.getLogger(__name__)

ARCHS = ("tiny", "resnet18", "resnet50", "densenet121")
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

# The first convolution and the classification head of each torchvision backbone (state-dict keys).
_FIRST_CONV = {"resnet18": "conv1", "resnet50": "conv1", "densenet121": "features.conv0", "tiny": "stem.0"}
_HEAD = {"resnet18": "fc", "resnet50": "fc", "densenet121": "classifier", "tiny": "head"}


@dataclass
class AVPConfig:
    arch: str = "tiny"
    image_size: int = 64  # S
    in_channels: int = 1  # C (image channels; the model takes C + 1 with the mask)
    label_names: tuple[str, ...] = field(default_factory=lambda: tuple(LABELS))
    width: int = 12  # tiny only: channels of the stem (doubled at each of the 3 later blocks)
    pool: int = 4  # tiny only: features pooled to pool x pool before the linear head (1 = global average)

    def __post_init__(self):
        self.label_names = tuple(self.label_names)
        if self.arch not in ARCHS:
            raise UserError(f"unknown classifier arch {self.arch!r}; choose one of {', '.join(ARCHS)}")
        if self.image_size < 16:
            raise UserError(f"classifier image size must be >= 16, got {self.image_size}")
        if self.in_channels < 1 or self.width < 1 or self.pool < 1:
            raise UserError(f"in_channels, width and pool must be >= 1, got {self.in_channels}, {self.width}, {self.pool}")
        if not self.label_names:
            raise UserError("label_names is empty; give at least one label")

    @property
    def num_labels(self) -> int:  # K
        return len(self.label_names)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["label_names"] = list(self.label_names)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "AVPConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"unknown AVP config keys {unknown}; expected a subset of {sorted(known)}")
        return cls(**dict(d))


def _conv_bn(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class TinyCNN(nn.Module):
    """Stride-2 stem, 3 stride-2 3x3 conv blocks doubling the width, pool to ``pool x pool``, linear.

    At S = 64, width 12: feature maps 32x32 -> 4x4, about 4.4 MFLOPs per input. The head sees a
    coarse 4 x 4 map rather than a global average: where a finding lies matters in a chest x-ray
    (on the phantom set this lifts full-image AUROC from ~0.70-0.87 to ~0.82-0.96 at equal steps).
    """

    def __init__(self, in_channels: int, num_outputs: int, width: int = 12, pool: int = 4):
        super().__init__()
        w = width
        self.stem = nn.Sequential(*_conv_bn(in_channels, w, 2))  # (B, w, S/2, S/2)
        self.blocks = nn.Sequential(
            *_conv_bn(w, 2 * w, 2),  # (B, 2w, S/4, S/4)
            *_conv_bn(2 * w, 4 * w, 2),  # (B, 4w, S/8, S/8)
            *_conv_bn(4 * w, 8 * w, 2),  # (B, 8w, S/16, S/16)
        )
        self.pool = nn.AdaptiveAvgPool2d(pool)  # (B, 8w, pool, pool)
        self.head = nn.Linear(8 * w * pool * pool, num_outputs)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        h = self.pool(self.blocks(self.stem(y)))  # (B, 8w, pool, pool)
        return self.head(h.flatten(1))  # (B, K)

    def sequential_layers(self) -> list[nn.Module]:
        """The layers whose composition is :meth:`forward` (for :mod:`boed.incremental`)."""
        return [*self.stem, *self.blocks, self.pool, nn.Flatten(1), self.head]


def _torchvision_backbone(arch: str, in_channels: int, num_outputs: int) -> nn.Module:
    """A torchvision backbone (weights=None) taking ``in_channels`` and giving ``num_outputs`` logits."""
    import torchvision

    net = getattr(torchvision.models, arch)(weights=None, num_classes=num_outputs)
    name = _FIRST_CONV[arch]
    parent = net.features if arch == "densenet121" else net
    attr = name.split(".")[-1]
    old: nn.Conv2d = getattr(parent, attr)
    new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=old.bias is not None)
    setattr(parent, attr, new)
    return net


class AVPClassifier(nn.Module):
    """g(v | y): ``forward(y (B, C+1, S, S) float) -> logits (B, K)``."""

    model_type = "avp-cnn"  # recorded in config.json

    def __init__(self, config: AVPConfig | None = None):
        super().__init__()
        self.config = config or AVPConfig()
        c = self.config
        if c.arch == "tiny":
            self.net = TinyCNN(c.in_channels + 1, c.num_labels, c.width, c.pool)
        else:
            self.net = _torchvision_backbone(c.arch, c.in_channels + 1, c.num_labels)
        with torch.no_grad():  # the mask channel starts at zero weight (see module docstring)
            self.first_conv.weight[:, c.in_channels:].zero_()
        self.channels_last = False  # inputs of predict_proba follow the weights' memory format

    def set_channels_last(self, enabled: bool = True) -> "AVPClassifier":
        """Store weights (and format inputs of :meth:`predict_proba`) channels_last; often faster on CPU."""
        self.channels_last = bool(enabled)
        return self.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)

    @property
    def label_names(self) -> tuple[str, ...]:
        return self.config.label_names

    @property
    def first_conv(self) -> nn.Conv2d:
        return self.net.get_submodule(_FIRST_CONV[self.config.arch])

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def sequential_layers(self) -> list[nn.Module] | None:
        """The layers whose composition is :meth:`forward` on valid input, or None (torchvision backbones)."""
        fn = getattr(self.net, "sequential_layers", None)
        return fn() if callable(fn) else None

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        c = self.config
        if y.dim() != 4 or y.shape[1] != c.in_channels + 1:
            raise UserError(f"AVP input must be (B, {c.in_channels + 1}, S, S) = cat(x * m, m), got {tuple(y.shape)}")
        return self.net(y)

    @torch.inference_mode()
    def predict_proba(self, x_u8: torch.Tensor, m: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
        """Label probabilities of observed images: uint8 ``x (B, C, S, S)``, mask ``m (B, 1, S, S)`` -> ``(B, K)``.

        Runs in eval mode on the model's device (inputs are moved there), ``chunk_size`` inputs per
        forward pass (all at once when None). The output is float32 on the model's device.
        """
        c = self.config
        if x_u8.dim() != 4 or x_u8.shape[1] != c.in_channels or m.shape != (x_u8.shape[0], 1, *x_u8.shape[2:]):
            raise UserError(f"predict_proba wants x (B, {c.in_channels}, S, S) and m (B, 1, S, S), got {tuple(x_u8.shape)} and {tuple(m.shape)}")
        was_training = self.training
        self.eval()
        dev = self.device
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        step = chunk_size or max(1, x_u8.shape[0])
        out = []
        try:
            for i in range(0, x_u8.shape[0], step):
                x = x_u8[i:i + step].to(dev, non_blocking=True).float().div_(255)
                mm = m[i:i + step].to(dev, dtype=torch.float32, non_blocking=True)
                y = observe(x, mm).contiguous(memory_format=fmt)  # (b, C + 1, S, S)
                out.append(torch.sigmoid(self.forward(y).float()))
        finally:
            self.train(was_training)
        return torch.cat(out) if out else torch.zeros(0, c.num_labels, device=dev)

    # ---------------------------------------------------------------- persistence
    def save_pretrained(self, out_dir: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``out_dir`` (the folder is replaced atomically)."""
        from ipa_core.persist import save_pretrained

        ensure_writable_dir(Path(out_dir).parent)
        return save_pretrained(self, out_dir)

    @classmethod
    def config_from_dir(cls, path: str | Path) -> AVPConfig:
        raw = json.loads((Path(path) / CONFIG_NAME).read_text())
        raw.pop("model_type", None)
        return AVPConfig.from_dict(raw)

    @classmethod
    def from_pretrained(cls, path: str | Path, map_location: str | torch.device = "cpu") -> "AVPClassifier":
        """Load from a model dir (``config.json`` + ``model.safetensors``) or a run dir holding ``model/``."""
        from ipa_core.persist import load_pretrained

        hint = f"train one with `boed train-avp --out {path}`"
        return load_pretrained(cls, path, map_location, what="AVP model", hint=hint).to(map_location).eval()


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"weights file {path} not found; check the path")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or foreign files
        raise UserError(f"cannot read weights {path}: {type(e).__name__}: {e}; give a .safetensors or torch state-dict file") from None
    if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{path} does not hold a state dict of tensors; give a torchvision-style state dict or an AVP model dir")
    return dict(sd)


def load_state_checked(module: nn.Module, state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """``load_state_dict`` that raises a one-line UserError naming the first missing/extra/mis-shaped key."""
    from ipa_core.persist import strict_load

    strict_load(module, state, source, hint="check --arch/--image-size against the checkpoint")


def load_init(model: AVPClassifier, path: str | Path) -> AVPClassifier:
    """Initialise ``model`` from local weights (``--init``); never downloads.

    ``path`` is an AVP model/run dir or file with the full AVP state (loaded as is), or an image-only
    torchvision-style state dict of the same backbone (keys without the ``net.`` prefix): its first
    convolution is widened with a zero mask channel (RGB weights are summed for grayscale input) and
    a head with a different number of outputs is skipped (left freshly initialised).
    """
    p = Path(path)
    if p.is_dir():
        src = AVPClassifier.from_pretrained(p)
        if src.config.arch != model.config.arch:
            raise UserError(f"--init {p} is a {src.config.arch} AVP model, this model is {model.config.arch}; pass a matching --arch")
        load_state_checked(model, src.state_dict(), source=str(p))
        return model
    sd = _read_weights(p)
    if any(k.startswith("net.") for k in sd):  # a full AVP checkpoint file
        load_state_checked(model, sd, source=str(p))
        return model
    arch, C = model.config.arch, model.config.in_channels
    conv_key, head = f"{_FIRST_CONV[arch]}.weight", _HEAD[arch]
    if conv_key not in sd:
        raise UserError(f"{p} does not match a {arch} backbone: key {conv_key!r} is missing; pass the matching --arch")
    sd = dict(sd)
    w = sd[conv_key]  # (O, C_src, k, k)
    if w.shape[1] == 3 and C == 1:
        w = w.sum(dim=1, keepdim=True)  # grayscale x replicated to RGB gives the same response
    if w.shape[1] == C:
        w = torch.cat([w, w.new_zeros(w.shape[0], 1, *w.shape[2:])], dim=1)  # (O, C + 1, k, k): zero mask channel
    sd[conv_key] = w
    own = model.net.state_dict()
    for k in (f"{head}.weight", f"{head}.bias"):
        if k in sd and k in own and sd[k].shape != own[k].shape:
            log.info("--init: skipping head %s (%s outputs, model has %s)", k, tuple(sd[k].shape), tuple(own[k].shape))
            sd[k] = own[k]
    load_state_checked(model.net, sd, source=str(p))
    return model
