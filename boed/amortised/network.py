"""The policy network pi(l | y) of an amortised scan policy, and the policy object built on it.

``PolicyNet`` maps the observation ``y = cat(x * m, m)`` ``(B, C + 1, S, S)`` to ``L`` logits, one
per candidate location of the scan grid. :class:`AmortisedPolicy` wraps it as a
:class:`boed.policies.Policy`: candidates already fully observed are masked out, the choice is the
argmax of the remaining logits (one forward pass, no completions, no classifier calls).

Both the distilled EIG policy (:mod:`boed.amortised.distill`) and the GDFS peer
(:mod:`boed.amortised.gdfs`) save a ``PolicyNet``; ``config.json`` says which (``method``) and for what
(illness, image size, grid, patch size, labels), and :func:`load_policy` checks those against the
caller's task before anything runs.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from boed.classifier import _torchvision_backbone
from boed.geometry import ScanGeometry
from boed.policies import Policy, ScanState
from ipa_core.persist import DictConfig, PretrainedMixin
from xray.errors import UserError
from xray.labels import LABELS, resolve_illness

METHODS = ("distill", "gdfs")  # how the network was trained
POLICY_NAMES = {"distill": "distilled", "gdfs": "gdfs"}  # the method name in evaluation records
ARCHS = ("small", "resnet18")
MASKED_LOGIT = -1e4  # logit given to candidates that add nothing (finite: no NaN in softmax/KL gradients)


@dataclass
class PolicyConfig(DictConfig):
    _config_name = "policy config"  # in error messages
    method: str = "distill"  # "distill" | "gdfs"
    illness: str = "Effusion"  # canonical name (xray.labels.resolve_illness)
    image_size: int = 64  # S
    patch_size: int = 16  # P
    grid: int = 17  # G, L = G * G
    in_channels: int = 1  # C; the network takes C + 1 with the mask
    label_names: tuple[str, ...] = field(default_factory=lambda: tuple(LABELS))
    arch: str = "small"  # "small" (CPU CNN) | "resnet18" (torchvision, mask channel added)
    width: int = 16  # small only: stem channels
    scans: int = 5  # T the policy was trained for
    tau: float | None = None  # distill: softmax temperature of the EIG target (nats); gdfs: final Concrete temperature
    first_location: int | None = None  # distill: the teacher's t = 1 choice (same for every image), used when nothing is observed
    provenance: dict = field(default_factory=dict)  # teacher/predictor digests and training-data fingerprint

    def __post_init__(self):
        self.label_names = tuple(self.label_names)
        if self.method not in METHODS:
            raise UserError(f"unknown policy method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.arch not in ARCHS:
            raise UserError(f"unknown policy arch {self.arch!r}; choose one of {', '.join(ARCHS)}")
        self.illness = resolve_illness(self.illness).name
        ScanGeometry(self.image_size, self.patch_size, self.grid)  # validates the geometry
        if self.width < 1 or self.in_channels < 1 or self.scans < 1:
            raise UserError(f"width, in_channels and scans must be >= 1, got {self.width}, {self.in_channels}, {self.scans}")
        if self.first_location is not None and not 0 <= self.first_location < self.grid ** 2:
            raise UserError(f"first_location {self.first_location} is outside the grid 0..{self.grid ** 2 - 1}")

    @property
    def geometry(self) -> ScanGeometry:
        return ScanGeometry(self.image_size, self.patch_size, self.grid)

    @property
    def num_locations(self) -> int:  # L
        return self.grid * self.grid


class SmallPolicyCNN(nn.Module):
    """Three stride-2 conv blocks, then two heads summed into L logits.

    A spatial head (1x1 conv on the S/8 feature map, resampled to the G x G grid) says where
    each candidate lies; a global head (features pooled to 4 x 4, linear) lets every logit depend
    on the whole observation (what has been seen decides what is worth seeing next).
    At S = 64, width 16: about 4 MFLOPs per observation.
    """

    def __init__(self, in_channels: int, grid: int, width: int = 16):
        super().__init__()
        w, self.grid = width, grid

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.trunk = nn.Sequential(*block(in_channels, w), *block(w, 2 * w), *block(2 * w, 4 * w))  # (B, 4w, S/8, S/8)
        self.local = nn.Conv2d(4 * w, 1, 1)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.glob = nn.Linear(4 * w * 16, grid * grid)

    def forward(self, y: Tensor) -> Tensor:
        h = self.trunk(y)  # (B, 4w, S/8, S/8)
        local = nn.functional.interpolate(self.local(h), size=(self.grid, self.grid), mode="bilinear",
                                          align_corners=True)  # (B, 1, G, G)
        return local.flatten(1) + self.glob(self.pool(h).flatten(1))  # (B, L)


class PolicyNet(PretrainedMixin, nn.Module):
    """pi(l | y): ``forward(y (B, C+1, S, S) float in [0, 1]) -> logits (B, L)`` (unmasked)."""

    model_type = "scan-policy"  # recorded in config.json
    config_class = PolicyConfig
    pretrained_what = "scan policy"
    eval_on_load = True

    def __init__(self, config: PolicyConfig | None = None):
        super().__init__()
        self.config = config or PolicyConfig()
        c = self.config
        if c.arch == "small":
            self.net = SmallPolicyCNN(c.in_channels + 1, c.grid, c.width)
        else:
            self.net = _torchvision_backbone(c.arch, c.in_channels + 1, c.num_locations)

    def forward(self, y: Tensor) -> Tensor:
        c = self.config
        if y.dim() != 4 or y.shape[1] != c.in_channels + 1 or y.shape[-1] != c.image_size:
            raise UserError(f"policy input must be (B, {c.in_channels + 1}, {c.image_size}, {c.image_size}) = cat(x * m, m), "
                            f"got {tuple(y.shape)}")
        return self.net(y)

    def observe(self, x_obs_u8: Tensor, mask: Tensor) -> Tensor:
        """The network input from a scan state: ``cat(x_obs / 255, m)`` ``(B, C + 1, S, S)``."""
        dev = next(self.parameters()).device
        C = self.config.in_channels
        x = x_obs_u8[:, :C].to(dev).float().div_(255)  # (B, C, S, S), already zero where unobserved
        return torch.cat([x, mask.to(dev, torch.float32)], dim=1)  # (B, C + 1, S, S)

    # ---------------------------------------------------------------- persistence
    # save_pretrained / from_pretrained (on map_location, eval mode): PretrainedMixin
    @classmethod
    def pretrained_hint(cls, path: str | Path) -> str:
        return f"train one with `boed train-policy --out {shlex.quote(str(path))}`"


def masked_logits(logits: Tensor, skip: Tensor) -> Tensor:
    """``logits (B, L)`` with candidates in ``skip (B, L)`` set to :data:`MASKED_LOGIT`."""
    return logits.masked_fill(skip.to(logits.device), MASKED_LOGIT)


class AmortisedPolicy(Policy):
    """A trained :class:`PolicyNet` as a scan policy: one forward pass per decision, argmax over the
    candidates not yet fully observed (ties -> lowest index). Deterministic: ``generator`` is unused.

    When nothing is observed and the config holds ``first_location`` (the distilled teacher's t = 1
    choice, the same for every image) that location is scanned, as greedy EIG-IPA does.
    """

    def __init__(self, net: PolicyNet, device: torch.device | str | None = None, name: str | None = None):
        self.device = torch.device(device) if device is not None else next(net.parameters()).device
        self.net = net.to(self.device).eval()  # decisions run under inference_mode: no gradients
        self.config = net.config
        self.geometry = net.config.geometry
        self.illness = resolve_illness(net.config.illness)
        self.name = name or POLICY_NAMES[net.config.method]

    @torch.inference_mode()
    def logits(self, state: ScanState) -> tuple[Tensor, Tensor]:
        """``(masked logits (B, L), skip (B, L))`` of a :class:`boed.policies.ScanState`."""
        mask = state.mask.to(self.device)
        skip = self.geometry.fully_observed(mask)  # (B, L)
        return masked_logits(self.net(self.net.observe(state.x_obs, mask)).float(), skip), skip

    @torch.inference_mode()
    def probs(self, state: ScanState) -> Tensor:
        """pi(l | state) ``(B, L)`` on the CPU, 0 on fully observed candidates (the first-scan rule aside)."""
        logits, skip = self.logits(state)
        return torch.softmax(logits, dim=1).masked_fill(skip, 0.0).cpu()

    @torch.inference_mode()
    def next_locations(self, state: ScanState, generator: torch.Generator | None = None) -> Tensor:
        logits, skip = self.logits(state)
        out = logits.argmax(dim=1)  # (B,) first maximum on ties
        first = self.config.first_location
        if first is not None:
            empty = state.mask.to(self.device).flatten(1).amax(1) <= 0  # (B,)
            out = torch.where(empty, torch.full_like(out, first), out)
        return out.long().cpu()


def load_policy(run_dir: str | Path, illness, geometry: ScanGeometry, device: torch.device | str = "cpu") -> AmortisedPolicy:
    """The amortised policy saved in ``run_dir`` (a `boed train-policy` run or its ``model/``), checked
    against the caller's task: the same illness, image size, patch size and grid, else a one-line
    UserError naming both values."""
    net = PolicyNet.from_pretrained(run_dir, map_location=device)
    c = net.config
    want = resolve_illness(illness.name if hasattr(illness, "name") else illness).name
    where = f"the policy in {run_dir}"
    if c.illness != want:
        raise UserError(f"{where} was trained for {c.illness}, not {want}; train one with "
                        f"`boed train-policy --illness {shlex.quote(want.lower())} ...` or pass a matching policy")
    for what, have, need in (("image size", c.image_size, geometry.image_size), ("grid", c.grid, geometry.grid),
                             ("patch size", c.patch_size, geometry.patch_size)):
        if have != need:
            raise UserError(f"{where} was trained for {what} {have}, the evaluation uses {need}; "
                            "train a policy with the same models and data")
    return AmortisedPolicy(net, device)
