"""GDFS peer (Covert et al., ICML 2023, "Learning to maximize mutual information for dynamic feature
selection"): a policy network that picks each scan patch with no generative model.

Training follows the published method, adapted to the scan grid:

- a selector pi(l | cat(x * m, m)) (:class:`boed.amortised.PolicyNet`, L logits) and a predictor
  (the AVP-CNN loaded from ``--avp``: like the paper, a predictor pre-trained on random masks);
- at each step t = 1..T the selector's logits (fully observed candidates masked out) are relaxed
  with a Concrete (Gumbel-softmax) sample ``s = softmax((logits + g) / temp)``; the predictor sees the
  soft observation ``m_soft = max(m, sum_l s_l * patch_l)`` and its BCE on the illness is added
  to the loss (summed over t, so later scans count as much as the first);
- the state then moves on with the hard choice ``argmax(logits + g)`` (the same Gumbel draw);
- the temperature is annealed geometrically from ``temp_start`` to ``temp_end`` in ``temp_stages``
  piecewise-constant stages over the training steps (the paper: 2.0 -> 0.1 in 5 stages);
- the selector and the predictor are trained jointly (``predictor="finetune"``, the paper's
  setting); ``predictor="frozen"`` keeps the AVP-CNN fixed.

Simplification against the paper: one run over the whole schedule with the last weights kept,
instead of early stopping per temperature with the best zero-temperature checkpoint.
At test time the policy is the argmax of the selector's logits among not-yet-observed candidates
(:class:`boed.amortised.AmortisedPolicy`); the saved model is the selector only (evaluation scores
its choices with the shared AVP-CNN, like every other method).
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from boed.classifier import AVPClassifier
from boed.geometry import ScanGeometry
from boed.policies import ScanState, patch_masks_of
from ipa_core.seeding import draw
from xray.dataset import dataset_images
from xray.errors import UserError
from xray.labels import resolve_illness

from .network import AmortisedPolicy, PolicyConfig, PolicyNet, masked_logits

PREDICTOR_MODES = ("finetune", "frozen")


@dataclass
class GDFSConfig:
    scans: int = 5  # T, selections per training image
    temp_start: float = 2.0
    temp_end: float = 0.1
    temp_stages: int = 5
    predictor: str = "finetune"  # "finetune" (joint, the paper) | "frozen"
    eval_images: int = 256  # test images of the end-of-run AUROC report

    def __post_init__(self):
        if self.predictor not in PREDICTOR_MODES:
            raise UserError(f"unknown GDFS predictor mode {self.predictor!r}; choose one of {', '.join(PREDICTOR_MODES)}")
        if not (self.temp_start > 0 and self.temp_end > 0 and self.temp_stages >= 1 and self.scans >= 1):
            raise UserError(f"GDFS needs temperatures > 0, temp_stages >= 1 and scans >= 1, got "
                            f"{self.temp_start}, {self.temp_end}, {self.temp_stages}, {self.scans}")

    def to_dict(self) -> dict:
        return asdict(self)


def temperature_at(step: int, total_steps: int, cfg: GDFSConfig) -> float:
    """The Concrete temperature of training step ``step``: ``temp_stages`` geometric levels, each
    held for an equal share of ``total_steps``."""
    n = cfg.temp_stages
    stage = min(n - 1, step * n // max(total_steps, 1))
    if n == 1:
        return cfg.temp_start
    return cfg.temp_start * (cfg.temp_end / cfg.temp_start) ** (stage / (n - 1))


def gumbel_noise(shape, generator: torch.Generator | None, device) -> Tensor:
    u = draw(torch.rand, shape, generator, device).clamp_(1e-10, 1 - 1e-7)
    return -torch.log(-torch.log(u))


def concrete_sample(logits: Tensor, temp: float, noise: Tensor | None = None,
                    generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Concrete (Gumbel-softmax) relaxation of a categorical draw over ``logits (B, L)``.

    Returns ``(soft (B, L), hard (B,))``: ``softmax((logits + g) / temp)`` and ``argmax(logits + g)``
    for one Gumbel draw ``g`` (``noise`` when given). As ``temp -> 0`` ``soft`` tends to the one-hot
    of ``hard``.
    """
    g = gumbel_noise(logits.shape, generator, logits.device) if noise is None else noise
    z = logits + g  # (B, L)
    return torch.softmax(z / temp, dim=1), z.argmax(dim=1)


class GDFSModel(nn.Module):
    """Selector + predictor trained together; ``step`` (a buffer, saved in checkpoints) drives the
    temperature schedule so a resumed run continues it."""

    def __init__(self, selector: PolicyNet, predictor: AVPClassifier):
        super().__init__()
        self.selector, self.predictor = selector, predictor
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    @property
    def config(self):  # what the trainer records and checks on resume
        return self.selector.config

    def forward(self, y: Tensor) -> Tensor:
        return self.selector(y)


def illness_logit(logits: Tensor, illness) -> Tensor:
    """The logit of p(v = 1) from the predictor's K logits ``(B, K)`` -> ``(B,)``."""
    z = logits[:, illness.index]
    return -z if illness.negate else z


class GDFSTask:
    """:class:`ipa_core.trainer.TrainTask` of GDFS (batches of training images and labels)."""

    find_unused_parameters = False

    def __init__(self, model: GDFSModel, cfg: GDFSConfig, total_steps: int, progress: bool = True):
        self.model, self.cfg, self.total_steps, self.progress = model, cfg, int(total_steps), progress
        pc = model.selector.config
        self.illness = resolve_illness(pc.illness)
        self.geometry: ScanGeometry = pc.geometry
        if cfg.predictor == "frozen":
            model.predictor.requires_grad_(False)
        self._pm: Tensor | None = None

    def provenance(self) -> dict:
        return {"method": "gdfs", **self.cfg.to_dict(), **self.model.selector.config.provenance}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def patch_matrix(self, device) -> Tensor:
        """All patch masks as a matrix ``(L, S * S)`` (cached)."""
        if self._pm is None or self._pm.device != torch.device(device):
            self._pm = self.geometry.patch_masks(device).flatten(1)  # (L, S * S)
        return self._pm

    def rollout_loss(self, model: GDFSModel, x: Tensor, target: Tensor, temp: float,
                     generator: torch.Generator | None) -> tuple[Tensor, list[Tensor]]:
        """Sum over t = 1..T of the predictor's BCE on the soft observation; also the hard masks."""
        B, C, S, _ = x.shape
        pm = self.patch_matrix(x.device)
        m = torch.zeros(B, 1, S, S, device=x.device)
        total, masks = x.new_zeros(()), []
        for _ in range(self.cfg.scans):
            skip = self.geometry.fully_observed(m)  # (B, L)
            logits = masked_logits(model.selector(torch.cat([x * m, m], 1)).float(), skip)  # (B, L)
            soft, hard = concrete_sample(logits, temp, generator=generator)
            m_soft = torch.maximum(m, (soft @ pm).reshape(B, 1, S, S))  # (B, 1, S, S)
            z = illness_logit(model.predictor(torch.cat([x * m_soft, m_soft], 1)).float(), self.illness)  # (B,)
            total = total + nn.functional.binary_cross_entropy_with_logits(z, target)
            m = torch.maximum(m, patch_masks_of(self.geometry, hard.detach()))  # (B, 1, S, S)
            masks.append(m)
        return total, masks

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor], generator: torch.Generator) -> tuple[Tensor, dict]:
        images, labels = batch  # uint8 (B, C, S, S), float (B, K)
        core: GDFSModel = getattr(model, "module", model)  # DDP-wrapped or not
        if self.cfg.predictor == "frozen":
            core.predictor.eval()
        temp = temperature_at(int(core.step), self.total_steps, self.cfg)
        x = images.float() / 255
        target = self.illness.target(labels.float())  # (B,)
        loss, _ = self.rollout_loss(core, x, target, temp, generator)
        with torch.no_grad():
            core.step += 1
        return loss, {"bce_sum": loss.detach(), "temp": torch.tensor(temp)}

    def on_sample(self, model: nn.Module, step: int, out_png: Path) -> None:
        return None

    @torch.no_grad()
    def evaluate(self, model: nn.Module, dataset) -> dict[str, float]:
        """AUROC of the (trained) predictor after t = 1..T hard (argmax) selections on test images."""
        from sklearn.metrics import roc_auc_score  # +2.3 s on `boed --help` at the top (measured): only the end-of-run report needs it

        core: GDFSModel = getattr(model, "module", model)
        dev = next(core.parameters()).device
        policy = AmortisedPolicy(core.selector, dev)
        n = min(self.cfg.eval_images, len(dataset))
        probs = [[] for _ in range(self.cfg.scans)]
        targets = []
        for i0 in range(0, n, 128):
            idx = list(range(i0, min(i0 + 128, n)))
            x = dataset_images(dataset, idx).to(dev)
            labels = torch.as_tensor(dataset.get_labels(idx) if hasattr(dataset, "get_labels")
                                     else [dataset[i][1] for i in idx]).float()
            targets.append(self.illness.target(labels))
            state = ScanState.empty(len(idx), x.shape[1], x.shape[-1], dev)
            for t in range(self.cfg.scans):
                state = state.scan(x, policy.next_locations(state), self.geometry)
                p = torch.sigmoid(illness_logit(core.predictor(torch.cat([state.x_obs.float() / 255, state.mask], 1)).float(),
                                                self.illness))
                probs[t].append(p.cpu())
        core.selector.train(model.training)
        y = torch.cat(targets).numpy()
        out = {"n_images": float(n)}
        for t in range(self.cfg.scans):
            p = torch.cat(probs[t]).numpy()
            out[f"auroc_t{t + 1}"] = float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else math.nan
        return out

    def save_pretrained(self, model: nn.Module, out_dir: Path) -> None:
        getattr(model, "module", model).selector.save_pretrained(out_dir)


def build_gdfs(avp: AVPClassifier, illness: str, geometry: ScanGeometry, arch: str = "small", width: int = 16,
               cfg: GDFSConfig | None = None, provenance: dict | None = None) -> GDFSModel:
    """A fresh selector beside a copy of ``avp`` (the predictor), ready for :class:`GDFSTask`."""
    cfg = cfg or GDFSConfig()
    pc = PolicyConfig(method="gdfs", illness=illness, image_size=geometry.image_size, patch_size=geometry.patch_size,
                      grid=geometry.grid, in_channels=avp.config.in_channels, label_names=avp.config.label_names,
                      arch=arch, width=width, scans=cfg.scans, tau=cfg.temp_end, provenance=dict(provenance or {}))
    predictor = copy.deepcopy(avp).train()
    predictor.channels_last = False
    return GDFSModel(PolicyNet(pc), predictor)
