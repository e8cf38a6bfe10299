"""The AVP-CNN g(v | y): a classifier of partially observed images (paper I.4, Harvey et al. 2019).

The input is the observation ``y = cat(x * m, m)`` (``C + 1`` channels, pixel values in [0, 1],
mask 1 = observed); the output is ``K = 15`` logits, one per label of :data:`xray.labels.LABELS`
(14 pathologies + "Any Finding"), each an independent Bernoulli (sigmoid).

Backbones: ``tiny`` (a small fast CNN for CPU work at S = 64, about 4.4 MFLOPs per input) and
torchvision ``resnet18``, ``resnet50``, ``densenet121`` whose first convolution is widened by one
input channel for the mask. The new channel's weights start at zero, so a pretrained image-only
network gives the same outputs with the mask appended.

Initialisation (:func:`init_state`, the ``--init`` flag of ``boed train-avp``):

- ``scratch``: random weights, no input normalisation.
- ``imagenet``: torchvision's ImageNet weights through its weights API (``IMAGENET1K_V1``).
  Input normalisation ``imagenet``: the grey channel is replicated to RGB and each copy normalised
  with the ImageNet mean/std, so the first convolution keeps its 3 RGB input channels (plus the
  mask) and a fully observed image gives exactly what the ImageNet network computes on that grey
  photo.
- ``xrv:NAME``: a torchxrayvision chest x-ray model (e.g. ``xrv:densenet121-res224-nih``),
  single-channel, with torchxrayvision's own scaling of [0, 1] to [-1024, 1024] (``xrv``).
- a path: an AVP model or run folder (or its weights file) to fine-tune; its normalisation is kept.

``--init-weights FILE`` gives ``imagenet`` / ``xrv:NAME`` a local copy of those weights (a plain
state dict, ``.pth``/``.pt``/``.safetensors``); nothing is then downloaded. Offline downloads fail
with a one-line :class:`UserError` that says so.

The normalisation is part of the model: ``AVPConfig.input_norm`` is saved in ``config.json`` and
:class:`InputNorm` (module ``AVPClassifier.norm``, before ``AVPClassifier.net``) applies it in
``forward``. It is pointwise: each output pixel depends on the same pixel of ``y`` only, as
``(x - mean) / std * m`` per image channel (unobserved pixels read as 0, the normalised mean) with
the mask passed through. ``input_norm "dataset"`` standardises with the training images' own pixel
mean and std (``AVPConfig.norm_stats``, from :func:`dataset_norm_stats`), the one option besides
``none`` for ``tiny``; ``mask_channel=False`` multiplies the mask channel by 0 (the network then
sees ``x * m`` only). Both are variants measured in ``benchmarks/bench_classifier.py``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file
from torch import nn

from ipa_core.config import VAEConfig, parse_layer_string
from ipa_core.ipa import IPA
from ipa_core.persist import DictConfig, PretrainedMixin, load_config_json, model_digest, resolve_model_dir, strict_load
from ipa_core.vae import VAE, Encoder
from xray.errors import UserError
from xray.io import ensure_writable_dir
from xray.labels import LABELS
from xray.provenance import file_digest

from .geometry import observe

log = logging.getLogger(__name__)

ARCHS = ("tiny", "resnet18", "resnet50", "densenet121", "encoder")
INPUT_NORMS = ("none", "imagenet", "xrv", "vae", "dataset")
# The VD-VAE encoder fields an "encoder" AVP keeps from the VAE/IPA it was initialised from (--init ipa:RUN | vae:RUN).
ENCODER_FIELDS = ("image_size", "image_channels", "width", "custom_width_str", "enc_blocks", "bottleneck_multiple",
                  "shift", "scale")
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

# The first convolution and the classification head of each torchvision backbone (state-dict keys).
_FIRST_CONV = {"resnet18": "conv1", "resnet50": "conv1", "densenet121": "features.conv0", "tiny": "stem.0",
               "encoder": "encoder.in_conv"}
_HEAD = {"resnet18": "fc", "resnet50": "fc", "densenet121": "classifier", "tiny": "head", "encoder": "head"}

# Per-channel (mean, std) of each input normalisation, on pixel values in [0, 1].
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
XRV_MEAN, XRV_STD = (0.5,), (1 / 2048,)  # torchxrayvision: (2 x - 1) * 1024 in [-1024, 1024]
_NORM_STATS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "xrv": (XRV_MEAN, XRV_STD)}

# torchxrayvision weight names (``xrv:NAME``) and the torchvision backbone each one is.
XRV_MODELS = {**{f"densenet121-res224-{d}": "densenet121" for d in ("all", "nih", "pc", "chex", "rsna", "mimic_nb", "mimic_ch")},
              "resnet50-res512-all": "resnet50"}


@dataclass
class AVPConfig(DictConfig):
    _config_name = "AVP config"  # in error messages
    arch: str = "tiny"
    image_size: int = 64  # S
    in_channels: int = 1  # C (image channels; the model takes C + 1 with the mask)
    label_names: tuple[str, ...] = field(default_factory=lambda: tuple(LABELS))
    width: int = 12  # tiny only: channels of the stem (doubled at each of the 3 later blocks)
    pool: int = 4  # tiny only: features pooled to pool x pool before the linear head (1 = global average)
    input_norm: str = "none"  # "none" | "imagenet" | "xrv" | "vae" | "dataset": see the module docstring
    encoder: dict | None = None  # arch "encoder": the VD-VAE encoder's fields (ENCODER_FIELDS) of the init's VAE/IPA
    # input_norm "dataset": the training images' per-channel pixel (mean, std) on [0, 1] (dataset_norm_stats)
    norm_stats: tuple | None = None
    mask_channel: bool = True  # False: the network never sees the mask (its channel is multiplied by 0; a variant)

    def __post_init__(self):
        self.label_names = tuple(self.label_names)
        if self.arch not in ARCHS:
            raise UserError(f"unknown classifier arch {self.arch!r}; choose one of {', '.join(ARCHS)}")
        if self.input_norm not in INPUT_NORMS:
            raise UserError(f"unknown input normalisation {self.input_norm!r}; choose one of {', '.join(INPUT_NORMS)}")
        if self.input_norm not in ("none", "dataset") and self.arch == "tiny":
            raise UserError(f"input_norm {self.input_norm!r} is for pretrained backbones, not arch 'tiny' (use none or dataset)")
        if (self.input_norm == "dataset") != (self.norm_stats is not None):
            raise UserError(f"input_norm 'dataset' goes with norm_stats (the training images' pixel mean and std), got "
                            f"input_norm {self.input_norm!r}, norm_stats {self.norm_stats}")
        if self.norm_stats is not None:
            mean, std = (tuple(float(v) for v in part) for part in self.norm_stats)
            if len(mean) != self.in_channels or len(std) != self.in_channels or min(std) <= 0:
                raise UserError(f"norm_stats must hold {self.in_channels} means and {self.in_channels} positive stds, "
                                f"got {self.norm_stats}")
            self.norm_stats = (mean, std)
        if self.encoder is not None and (self.arch, self.input_norm) != ("encoder", "vae"):  # encoder None: not built yet
            raise UserError(f"the encoder's fields go with arch 'encoder' and input_norm 'vae' (--init ipa:RUN or vae:RUN), "
                            f"got arch {self.arch!r}, input_norm {self.input_norm!r}")
        if self.encoder is not None:
            self.encoder = dict(self.encoder)
            missing = [k for k in ENCODER_FIELDS if k not in self.encoder]
            if missing or self.encoder["image_size"] != self.image_size or self.encoder["image_channels"] != self.in_channels:
                raise UserError(f"the encoder's fields must hold {', '.join(ENCODER_FIELDS)} for images {self.in_channels}x"
                                f"{self.image_size}px, got {self.encoder} (missing {missing})")
        if self.input_norm == "imagenet" and self.in_channels not in (1, 3):
            raise UserError(f"ImageNet normalisation needs 1 (grey) or 3 image channels, got {self.in_channels}")
        if self.input_norm == "xrv" and self.in_channels != 1:
            raise UserError(f"torchxrayvision normalisation needs 1 image channel, got {self.in_channels}")
        if self.image_size < 16:
            raise UserError(f"classifier image size must be >= 16, got {self.image_size}")
        if self.in_channels < 1 or self.width < 1 or self.pool < 1:
            raise UserError(f"in_channels, width and pool must be >= 1, got {self.in_channels}, {self.width}, {self.pool}")
        if not self.label_names:
            raise UserError("label_names is empty; give at least one label")

    @property
    def num_labels(self) -> int:  # K
        return len(self.label_names)

    @property
    def net_channels(self) -> int:
        """Image channels the backbone sees after :class:`InputNorm` (3 for ImageNet, else C)."""
        return 3 if self.input_norm == "imagenet" else self.in_channels


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


class EncoderNet(nn.Module):
    """The bottom-up VD-VAE encoder of a trained VAE or IPA (:class:`ipa_core.vae.Encoder`) as an
    AVP backbone: ``cat(x * m, m)`` standardised as the VAE does (input_norm "vae") -> the encoder's
    blocks down to resolution ``max(pool, S / 16)`` (S/16: where :class:`TinyCNN` pools too) ->
    ``pool x pool`` average pool -> linear. ``--init ipa:RUN`` starts it from IPA's partial
    encoder, which was trained to read exactly this input; ``vae:RUN`` from the VAE's encoder phi
    (its mask channel starts at zero weight). The in-domain, offline stand-in for ImageNet weights.
    """

    def __init__(self, encoder: dict, num_outputs: int, pool: int = 4):
        super().__init__()
        cfg = VAEConfig(**{k: encoder[k] for k in ENCODER_FIELDS})
        self.encoder = Encoder(cfg, in_channels=cfg.image_channels + 1)
        res, keep, target = cfg.image_size, 0, max(pool, cfg.image_size // 16)
        for down in (d for _, d in parse_layer_string(cfg.enc_blocks)):  # the blocks whose output is still >= target
            if res // (down or 1) < target:
                break
            res, keep = res // (down or 1), keep + 1
        self.res = res  # the resolution of the features the head reads
        self.encoder.enc_blocks = self.encoder.enc_blocks[:keep]
        self.pool = nn.AdaptiveAvgPool2d(pool)  # (B, W, pool, pool)
        self.head = nn.Linear(self.encoder.widths[res] * pool * pool, num_outputs)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        h = self.encoder(y)[self.res]  # (B, W, res, res)
        return self.head(self.pool(h).flatten(1))  # (B, K)


def _torchvision_backbone(arch: str, in_channels: int, num_outputs: int) -> nn.Module:
    """A torchvision backbone (weights=None) taking ``in_channels`` and giving ``num_outputs`` logits."""
    import torchvision  # here, not at the top: +4 s on `boed --help` (measured), only torchvision archs need it

    net = getattr(torchvision.models, arch)(weights=None, num_classes=num_outputs)
    name = _FIRST_CONV[arch]
    parent = net.features if arch == "densenet121" else net
    attr = name.split(".")[-1]
    old: nn.Conv2d = getattr(parent, attr)
    new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=old.bias is not None)
    setattr(parent, attr, new)
    return net


class InputNorm(nn.Module):
    """Pointwise input normalisation ``(B, C + 1, S, S) -> (B, C' + 1, S, S)``.

    Image channels ``x * m`` become ``(x - mean) / std * m`` (a grey channel is replicated when
    ``mean`` has 3 entries); the mask channel is passed through. Linear in ``y`` without a constant
    term, so zero padding and unobserved pixels both read as 0. ``mean``/``std`` are fixed
    (non-persistent buffers, rebuilt from the config): the state dict is the backbone's.
    """

    def __init__(self, in_channels: int, mean: tuple[float, ...], std: tuple[float, ...], mask_scale: float = 1.0):
        super().__init__()
        if len(mean) != len(std) or in_channels not in (1, len(mean)):
            raise UserError(f"cannot normalise {in_channels} image channels with {len(mean)} means")
        self.in_channels, self.mask_scale = in_channels, float(mask_scale)  # mask_scale 0: the mask is hidden
        # each output pixel from the same input pixel, channels kept (C = len(mean)): the patch-local engine's pointwise layer
        self.pointwise_same_channels = in_channels == len(mean)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("inv_std", 1 / torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        C = self.in_channels
        xm, m = y[:, :C], y[:, C:C + 1]  # (B, C, S, S) observed pixels, (B, 1, S, S) mask
        out = (xm - self.mean.to(y.dtype) * m) * self.inv_std.to(y.dtype)  # (B, C', S, S); C = 1 broadcasts
        return torch.cat([out, m * self.mask_scale], dim=1)  # (B, C' + 1, S, S)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, out_channels={self.mean.shape[1]}, mask_scale={self.mask_scale}"


def _norm_stats(c: AVPConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of ``c.input_norm`` on [0, 1] pixels; "vae": the VAE's ``(x_u8 + shift) * scale``,
    i.e. mean -shift / 255 and std 1 / (255 scale)."""
    if c.input_norm == "vae":
        return (-c.encoder["shift"] / 255,) * c.in_channels, (1 / (255 * c.encoder["scale"]),) * c.in_channels
    if c.input_norm == "dataset":
        return c.norm_stats
    if c.input_norm == "none":  # identity on the image (only built to hide the mask: mask_channel False)
        return (0.0,) * c.in_channels, (1.0,) * c.in_channels
    return _NORM_STATS[c.input_norm]


def dataset_norm_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel pixel (mean, std) on [0, 1] of uint8 training images ``(B, C, S, S)`` (input_norm "dataset")."""
    x = images.double().div(255).transpose(0, 1).reshape(images.shape[1], -1)  # (C, B S S)
    return tuple(x.mean(1).tolist()), tuple(x.std(1).clamp_min(1e-6).tolist())


class AVPClassifier(PretrainedMixin, nn.Module):
    """g(v | y): ``forward(y (B, C+1, S, S) float) -> logits (B, K)``."""

    model_type = "avp-cnn"  # recorded in config.json
    config_class = AVPConfig
    pretrained_what = "AVP model"
    extra_config_keys = ("train_config",)
    eval_on_load = True

    def __init__(self, config: AVPConfig | None = None):
        super().__init__()
        self.config = config or AVPConfig()
        c = self.config
        self.norm = (None if c.input_norm == "none" and c.mask_channel else
                     InputNorm(c.in_channels, *_norm_stats(c), mask_scale=1.0 if c.mask_channel else 0.0))
        if c.arch == "tiny":
            self.net = TinyCNN(c.net_channels + 1, c.num_labels, c.width, c.pool)
        elif c.arch == "encoder":
            if c.encoder is None or c.input_norm != "vae":
                raise UserError("an 'encoder' AVP is built from a trained VAE or IPA: pass --init ipa:RUN or vae:RUN")
            self.net = EncoderNet(c.encoder, c.num_labels, c.pool)
        else:
            self.net = _torchvision_backbone(c.arch, c.net_channels + 1, c.num_labels)
        with torch.no_grad():  # the mask channel starts at zero weight (see module docstring)
            self.first_conv.weight[:, c.net_channels:].zero_()
        self.channels_last = False  # inputs of predict_proba follow the weights' memory format
        self.train_config: dict | None = None  # how it was trained (boed.train_avp sets it; saved in config.json)

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
        if not callable(fn):
            return None
        return ([self.norm] if self.norm is not None else []) + fn()

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        c = self.config
        if y.dim() != 4 or y.shape[1] != c.in_channels + 1:
            raise UserError(f"AVP input must be (B, {c.in_channels + 1}, S, S) = cat(x * m, m), got {tuple(y.shape)}")
        return self.net(self.norm(y) if self.norm is not None else y)

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
    # save_pretrained / from_pretrained: PretrainedMixin. config.json holds the AVPConfig fields
    # (labels, normalisation, ...) and, when set, train_config (how the model was trained: masks,
    # init, loss); from_pretrained returns the model on map_location in eval mode.
    @classmethod
    def pretrained_hint(cls, path: str | Path) -> str:
        return f"train one with `boed train-avp --out {path}`"

    def extra_config(self) -> dict | None:
        return {"train_config": self.train_config} if self.train_config is not None else None

    def load_extra_config(self, raw: dict) -> None:
        self.train_config = raw.get("train_config")

    def save_pretrained(self, out_dir: str | Path) -> Path:
        ensure_writable_dir(Path(out_dir).parent)
        return super().save_pretrained(out_dir)


# ---------------------------------------------------------------- initialisation (--init, --init-weights)

INIT_CHOICES = "scratch, imagenet, xrv:NAME, ipa:RUN, vae:RUN or the path of an AVP model/run folder"
DEFAULT_INIT = "scratch"


@dataclass(frozen=True)
class InitSpec:
    """A parsed ``--init``: ``kind`` scratch | imagenet | xrv | avp | ipa | vae; ``name`` (xrv
    weights); ``path`` (the AVP folder for ``avp``, the model folder for ipa / vae, the local weights
    file for imagenet / xrv, None to download)."""

    kind: str
    name: str | None = None
    path: str | None = None

    @property
    def input_norm(self) -> str | None:
        """The input normalisation the initial weights expect (None: the AVP source's, or for scratch the config's own)."""
        return {"imagenet": "imagenet", "xrv": "xrv", "ipa": "vae", "vae": "vae"}.get(self.kind)

    def describe(self) -> dict:
        """What :func:`init_state` will load, as a JSON-able dict (for provenance records)."""
        d: dict = {"init": self.kind if self.kind != "xrv" else f"xrv:{self.name}"}
        if self.kind in ("ipa", "vae"):
            d.update(init_path=str(self.path), init_digest=model_digest(self.path))
        elif self.path is not None:
            p = Path(self.path)
            f = _avp_weights_file(p) if self.kind == "avp" else p
            d.update(init_path=str(p), init_digest=file_digest(f))
        elif self.kind == "imagenet":
            d["init_source"] = "torchvision IMAGENET1K_V1"
        elif self.kind == "xrv":
            d["init_source"] = f"torchxrayvision {self.name}"
        return d


def parse_init(spec: str | None, arch: str, weights_file: str | Path | None = None) -> InitSpec:
    """Check ``--init`` / ``--init-weights`` against ``--arch`` without loading anything (one-line errors)."""
    spec = DEFAULT_INIT if spec is None else str(spec).strip()
    if arch not in ARCHS:
        raise UserError(f"unknown --arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if weights_file is not None:
        wf = Path(weights_file)
        if spec not in ("imagenet",) and not spec.startswith("xrv:"):
            raise UserError(f"--init-weights {wf} is the local copy of --init imagenet or --init xrv:NAME weights, but --init is {spec!r}; "
                            "pass --init imagenet or --init xrv:NAME with it, or drop --init-weights")
        if not wf.is_file():
            raise UserError(f"--init-weights {wf}: no such file; give the path of a downloaded weights file (.pth, .pt or .safetensors)")
    if (arch == "encoder") != spec.startswith(("ipa:", "vae:")):
        raise UserError(f"--arch encoder is the VD-VAE encoder of a trained VAE or IPA and goes with --init ipa:RUN or vae:RUN, "
                        f"got --arch {arch} --init {spec}; pass both or neither")
    if spec == "scratch":
        return InitSpec("scratch")
    if spec.startswith(("ipa:", "vae:")):
        kind, path = spec[:3], spec[4:]
        want = {"ipa": IPA, "vae": VAE}[kind]
        d = resolve_model_dir(path, f"{kind.upper()} model", f"give a run folder written by `ipa_core train --stage {kind}`")
        if load_config_json(d / CONFIG_NAME).get("model_type") != want.model_type:
            raise UserError(f"--init {spec}: {d} holds a {load_config_json(d / CONFIG_NAME).get('model_type')!r} model, "
                            f"expected {want.model_type!r}; give a run folder of `ipa_core train --stage {kind}`")
        return InitSpec(kind, path=str(d))
    if spec == "imagenet":
        if arch == "tiny":
            raise UserError("--init imagenet: there are no ImageNet weights for --arch tiny; use --arch resnet18, resnet50 or densenet121, or --init scratch")
        return InitSpec("imagenet", path=None if weights_file is None else str(weights_file))
    if spec.startswith("xrv:"):
        name = spec[4:]
        if name not in XRV_MODELS:
            raise UserError(f"unknown torchxrayvision weights {name!r}; choose one of {', '.join(XRV_MODELS)} (e.g. --init xrv:densenet121-res224-nih)")
        if XRV_MODELS[name] != arch:
            raise UserError(f"--init xrv:{name} is a {XRV_MODELS[name]}, but --arch is {arch}; pass --arch {XRV_MODELS[name]}")
        return InitSpec("xrv", name=name, path=None if weights_file is None else str(weights_file))
    p = Path(spec)
    if not p.exists():
        raise UserError(f"--init {spec!r} is not one of {INIT_CHOICES} (no such path); "
                        "for a local ImageNet or torchxrayvision weights file use --init imagenet --init-weights FILE")
    _avp_weights_file(p)  # an AVP model or run folder, or the weights file inside one
    return InitSpec("avp", path=str(p))


def _avp_dir(p: Path) -> Path:
    """The AVP model folder of ``--init PATH`` (a model/run folder, or the weights file inside one)."""
    if p.is_file():
        if (p.parent / CONFIG_NAME).is_file():
            return p.parent
        raise UserError(f"--init {p} is a file without {CONFIG_NAME} beside it; give an AVP model or run folder, "
                        "or, for ImageNet/torchxrayvision weights, --init imagenet|xrv:NAME --init-weights FILE")
    return resolve_model_dir(p, "AVP model", "give a folder written by `boed train-avp`")


def _avp_weights_file(p: Path) -> Path:
    return _avp_dir(p) / WEIGHTS_NAME


def init_config(config: AVPConfig, init: InitSpec) -> AVPConfig:
    """``config`` with the input normalisation ``init`` needs (an AVP source's own, checked for ``arch``)."""

    if init.kind in ("ipa", "vae"):
        src = {"ipa": IPA, "vae": VAE}[init.kind].config_from_dir(init.path)
        if (src.image_size, src.image_channels) != (config.image_size, config.in_channels):
            raise UserError(f"--init {init.kind}:{init.path} was trained on {src.image_channels}x{src.image_size}px images, "
                            f"this classifier takes {config.in_channels}x{config.image_size}px; pass --image-size {src.image_size}")
        return replace(config, input_norm="vae", encoder={k: getattr(src, k) for k in ENCODER_FIELDS})
    if init.kind == "scratch":  # random weights: the config's own normalisation (none, or dataset for tiny)
        return config
    if init.kind != "avp":
        return replace(config, input_norm=init.input_norm)
    src = AVPClassifier.config_from_dir(_avp_dir(Path(init.path)))
    if src.arch != config.arch:
        raise UserError(f"--init {init.path} is a {src.arch} AVP model, but --arch is {config.arch}; pass --arch {src.arch}")
    return replace(config, input_norm=src.input_norm, norm_stats=src.norm_stats)


def _read_weights(path: Path, hint: str = "give a plain state dict of tensors (.pth, .pt or .safetensors)") -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"weights file {path} not found; check the path")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        sd = torch.load(path, map_location="cpu", weights_only=True)  # never unpickles code
    except Exception as e:  # corrupt files, or pickled whole models that weights_only refuses
        msg = str(e).splitlines()[0][:120] if str(e) else ""
        raise UserError(f"cannot read weights {path} ({type(e).__name__}: {msg}); {hint}") from None
    if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{path} does not hold a state dict of tensors; {hint}")
    return dict(sd)


# torchvision's DenseNet checkpoints name layers "norm.1", "conv.2", ...; the modules are "norm1", "conv2".
_OLD_DENSENET_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")


def _modern_keys(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        m = _OLD_DENSENET_KEY.match(k)
        out[m.group(1) + m.group(2) if m else k] = v
    return out


def _imagenet_state(arch: str, weights_file: str | None) -> tuple[dict[str, torch.Tensor], str]:
    from torchvision.models import get_model_weights  # +4 s at the top (see _torchvision_backbone)

    weights = get_model_weights(arch).IMAGENET1K_V1
    if weights_file is not None:
        return _read_weights(Path(weights_file)), str(weights_file)
    try:
        sd = weights.get_state_dict(progress=True, check_hash=True, weights_only=True, map_location="cpu")
    except (OSError, RuntimeError, ValueError) as e:  # URLError is an OSError; a bad hash a RuntimeError
        msg = str(e).splitlines()[0][:100] if str(e) else ""
        raise UserError(f"cannot download the ImageNet weights of {arch} from {weights.url} ({type(e).__name__}: {msg}); "
                        f"offline, copy that file here and pass --init imagenet --init-weights FILE") from None
    return sd, weights.url


def _xrv_state(name: str, weights_file: str | None) -> tuple[dict[str, torch.Tensor], str]:
    export = (f"export one where torchxrayvision works: python -c \"import torch, torchxrayvision as xrv; "
              f"torch.save(xrv.models.get_model('{name}').state_dict(), '{name}.pt')\"")
    if weights_file is not None:
        sd, source = _read_weights(Path(weights_file), hint=f"give a plain state dict ({export})"), str(weights_file)
    else:
        try:
            import torchxrayvision as xrv  # +4.6 s on `boed --help` at the top (measured); also may be missing
        except ImportError:
            raise UserError(f"--init xrv:{name} needs the torchxrayvision package to download its weights (pip install torchxrayvision); "
                            f"offline, pass a local state dict with --init-weights FILE ({export})") from None
        try:
            net = xrv.models.get_model(name)
        except Exception as e:  # requests/urllib errors offline, or a failed load
            msg = str(e).splitlines()[0][:100] if str(e) else ""
            raise UserError(f"cannot get the torchxrayvision weights {name} ({type(e).__name__}: {msg}); "
                            f"offline, pass a local state dict with --init xrv:{name} --init-weights FILE ({export})") from None
        inner = getattr(net, "model", None)  # xrv's ResNet wraps a torchvision model
        sd, source = (inner if isinstance(inner, nn.Module) else net).state_dict(), f"torchxrayvision {name}"
    # xrv's wrappers add "model." and fixed buffers (operating points, resizing) that are not backbone weights
    sd = {k.removeprefix("model."): v for k, v in sd.items() if k != "op_threshs" and not k.startswith("upsample")}
    return sd, source


def _load_backbone(model: "AVPClassifier", sd: Mapping[str, torch.Tensor], source: str) -> None:
    """Load an image-only backbone state dict into ``model.net``: zero mask channel, foreign head skipped."""
    arch, Cn = model.config.arch, model.config.net_channels
    sd = _modern_keys(sd)
    conv_key, head = f"{_FIRST_CONV[arch]}.weight", _HEAD[arch]
    if conv_key not in sd:
        raise UserError(f"{source} does not match a {arch} backbone: key {conv_key!r} is missing; pass the matching --arch")
    w = sd[conv_key]  # (O, C_src, k, k)
    if w.dim() != 4 or w.shape[1] != Cn:
        raise UserError(f"{source}: the first convolution {conv_key!r} has shape {tuple(w.shape)}, expected {Cn} image channels "
                        f"for input normalisation {model.config.input_norm!r}; is it the right weights file for this --init?")
    sd[conv_key] = torch.cat([w, w.new_zeros(w.shape[0], 1, *w.shape[2:])], dim=1)  # (O, Cn + 1, k, k): zero mask channel
    own = model.net.state_dict()
    for k in own:  # old checkpoints (torchvision's DenseNet file) predate BatchNorm's step counter
        if k.endswith(".num_batches_tracked") and k not in sd:
            sd[k] = own[k]
    for k in (f"{head}.weight", f"{head}.bias"):
        if k in sd and k in own and sd[k].shape != own[k].shape:
            log.info("--init: skipping head %s (%s outputs, model has %s)", k, tuple(sd[k].shape), tuple(own[k].shape))
            sd[k] = own[k]
    load_state_checked(model.net, sd, source=f"{source} ({arch})", hint="pass the --arch these weights were made for")


def _load_encoder(model: "AVPClassifier", init: InitSpec) -> None:
    """The encoder weights of ``init``'s model into an "encoder" AVP: IPA's partial encoder psi
    (it reads ``cat(x * m, m)`` already) or the VAE's encoder phi with a zero mask channel; the
    blocks below the AVP's feature resolution and the head are not used (the head starts fresh)."""
    src = (IPA if init.kind == "ipa" else VAE).from_pretrained(init.path)
    prefix = "part_encoder." if init.kind == "ipa" else "encoder."
    own = model.net.encoder.state_dict()
    sd = {k[len(prefix):]: v for k, v in src.state_dict().items() if k.startswith(prefix) and k[len(prefix):] in own}
    w = sd["in_conv.weight"]  # (O, C or C + 1, 3, 3)
    if w.shape[1] == model.config.in_channels:  # phi reads the image alone: add a zero mask channel
        sd["in_conv.weight"] = torch.cat([w, w.new_zeros(w.shape[0], 1, *w.shape[2:])], dim=1)
    load_state_checked(model.net.encoder, sd, source=f"{init.kind}:{init.path}", hint="pass --arch encoder with matching --image-size")


def load_state_checked(module: nn.Module, state: Mapping[str, torch.Tensor], source: str = "checkpoint",
                       hint: str = "check --arch/--image-size against the checkpoint") -> None:
    """``load_state_dict`` that raises a one-line UserError naming the first missing/extra/mis-shaped key."""
    strict_load(module, state, source, hint=hint)


def init_state(model: "AVPClassifier", init: InitSpec) -> "AVPClassifier":
    """Load the initial weights ``init`` into ``model`` (built with :func:`init_config`); returns it.

    imagenet / xrv: the backbone's weights (downloaded, or ``init.path``) with a zero mask channel;
    the classification head is left freshly initialised when its size differs (1000 ImageNet
    classes, 18 torchxrayvision outputs). avp: the full AVP state of a model/run folder.
    """
    if init.kind == "scratch":
        return model
    want = init.input_norm
    if want is not None and model.config.input_norm != want:
        raise UserError(f"--init {init.kind} needs input_norm {want!r}, the model has {model.config.input_norm!r}; build it with init_config")
    if init.kind == "avp":
        d = _avp_dir(Path(init.path))
        src = AVPClassifier.from_pretrained(d)
        if (src.config.arch, src.config.input_norm) != (model.config.arch, model.config.input_norm):
            raise UserError(f"--init {init.path} is a {src.config.arch} AVP model with input_norm {src.config.input_norm!r}, "
                            f"this model is {model.config.arch} with {model.config.input_norm!r}; pass --arch {src.config.arch}")
        load_state_checked(model, src.state_dict(), source=str(d))
        return model
    if init.kind in ("ipa", "vae"):
        _load_encoder(model, init)
        return model
    sd, source = _imagenet_state(model.config.arch, init.path) if init.kind == "imagenet" else _xrv_state(init.name, init.path)
    _load_backbone(model, sd, source)
    return model


def load_init(model: AVPClassifier, path: str | Path) -> AVPClassifier:
    """Initialise ``model`` from an AVP model/run folder (``--init PATH``); never downloads."""
    return init_state(model, parse_init(str(path), model.config.arch))
