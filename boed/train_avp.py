"""Training the AVP-CNN on partially observed images (paper I.4): a :class:`ipa_core.trainer.TrainTask`.

Each training image gets a mask from :func:`sample_training_masks`: with probability ``p_full`` the
whole image, else 0..5 random square patches of 25 % of the width (``ipa_core.masks.
random_patch_masks``: centres uniform over the image, so patches are clipped at the border), or
(with ``p_freeform``) a free-form mask as in IPA's own training mixture. The loss is the binary
cross-entropy over the K = 15 outputs, optionally with per-label ``pos_weight`` = negatives /
positives of the training labels (clipped).

The end-of-run report is the per-label AUROC on the full image and after one random scan patch
(a uniformly random location of the 17 x 17 scan grid, the ``t = 1`` of the Random baseline).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from xray.dataset import dataset_images
from xray.errors import UserError
from xray.labels import LABELS

from .classifier import AVPClassifier
from .geometry import ScanGeometry, observe

log = logging.getLogger(__name__)


@dataclass
class AVPTrainConfig:
    """The training distribution and loss of the AVP-CNN (optimiser settings live in ``TrainConfig``)."""

    patch_frac: float = 0.25  # patch side / image side
    max_patches: int = 5
    p_full: float = 0.2  # probability of a fully observed training image
    p_freeform: float = 0.0  # probability of an IPA-style free-form mask instead of patches
    pos_weight: str = "none"  # "none" | "auto" (negatives / positives per label, clipped to [1, max_pos_weight])
    max_pos_weight: float = 50.0
    eval_images: int | None = 5000  # test images scored by the end-of-run report (None = all)
    eval_batch: int = 256
    seed: int = 0  # of the report's random patches and preview masks

    def __post_init__(self):
        if not 0 < self.patch_frac <= 1:
            raise UserError(f"patch fraction must be in (0, 1], got {self.patch_frac}")
        if self.max_patches < 0:
            raise UserError(f"max_patches must be >= 0, got {self.max_patches}")
        if not (0 <= self.p_full <= 1 and 0 <= self.p_freeform <= 1 and self.p_full + self.p_freeform <= 1):
            raise UserError(f"p_full and p_freeform must be in [0, 1] with sum <= 1, got {self.p_full} and {self.p_freeform}")
        if self.pos_weight not in ("none", "auto"):
            raise UserError(f"pos_weight must be 'none' or 'auto', got {self.pos_weight!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def sample_training_masks(B: int, S: int, cfg: AVPTrainConfig, generator: torch.Generator | None = None) -> Tensor:
    """Training masks ``(B, 1, S, S)`` float on the CPU: full image / free-form / 0..max random patches."""
    from ipa_core.masks import freeform_masks, random_patch_masks

    m = random_patch_masks(B, S, cfg.patch_frac, max_patches=cfg.max_patches, generator=generator)  # (B, 1, S, S)
    u = torch.rand(B, generator=generator)  # (B,) which kind of mask each image gets
    full = u < cfg.p_full
    m[full] = 1.0
    ff = (u >= cfg.p_full) & (u < cfg.p_full + cfg.p_freeform)
    if ff.any():
        m[ff] = freeform_masks(int(ff.sum()), S, generator)
    return m


def positive_weights(labels: np.ndarray, max_weight: float = 50.0) -> Tensor:
    """Per-label ``negatives / positives`` of a label table ``(n, K)``, clipped to [1, max_weight]."""
    y = np.asarray(labels, dtype=np.float64)
    pos = y.sum(0)
    w = (len(y) - pos) / np.maximum(pos, 1.0)
    return torch.as_tensor(np.clip(w, 1.0, max_weight), dtype=torch.float32)


def _cpu_generator(generator: torch.Generator | None) -> torch.Generator | None:
    """A CPU generator seeded from ``generator`` (any device): masks are drawn on the CPU."""
    if generator is None or generator.device.type == "cpu":
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def label_aurocs(model: AVPClassifier, dataset, masks_fn, n_images: int | None = None, batch_size: int = 256,
                 progress: bool = True, desc: str = "eval") -> dict[str, float]:
    """AUROC of each of the model's labels on ``dataset`` with masks ``masks_fn(idx) -> (b, 1, S, S)``.

    Labels with a single class in the evaluated images give NaN. Also returns ``mean`` (over finite).
    """
    from sklearn.metrics import roc_auc_score

    n = len(dataset) if n_images is None else min(n_images, len(dataset))
    probs, labels = [], []
    for start in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, leave=False):
        idx = list(range(start, min(start + batch_size, n)))
        x = dataset_images(dataset, idx)  # (b, C, S, S) uint8
        probs.append(model.predict_proba(x, masks_fn(idx)).cpu())
        labels.append(torch.as_tensor(_labels(dataset, idx)))
    P = torch.cat(probs).double().numpy()  # (n, K)
    Y = torch.cat(labels).double().numpy()  # (n, K)
    out = {}
    for k, name in enumerate(model.label_names):
        y = Y[:, k]
        out[name] = float(roc_auc_score(y, P[:, k])) if 0 < y.sum() < len(y) else float("nan")
    finite = [v for v in out.values() if math.isfinite(v)]
    out["mean"] = float(np.mean(finite)) if finite else float("nan")
    return out


def _labels(dataset, idx) -> np.ndarray:
    if hasattr(dataset, "labels"):
        return np.asarray(dataset.labels)[idx]
    return np.stack([np.asarray(dataset[i][1]) for i in idx])


class AVPTrainTask:
    """:class:`ipa_core.trainer.TrainTask` for the AVP-CNN (BCE over K outputs on masked images)."""

    find_unused_parameters = False

    def __init__(self, model: AVPClassifier, cfg: AVPTrainConfig | None = None, train_labels: np.ndarray | None = None,
                 preview=None, progress: bool = True):
        self.model = model
        self.cfg = cfg or AVPTrainConfig()
        self.progress = progress
        K = model.config.num_labels
        if self.cfg.pos_weight == "auto":
            if train_labels is None:
                raise UserError("pos_weight='auto' needs the training labels")
            self.pos_weight = positive_weights(train_labels, self.cfg.max_pos_weight)
        else:
            self.pos_weight = None
        if self.pos_weight is not None and self.pos_weight.numel() != K:
            raise UserError(f"the training labels have {self.pos_weight.numel()} columns, the model {K} outputs")
        self.preview = preview  # a dataset to draw the sample-grid images from (e.g. the test split)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor], generator: torch.Generator) -> tuple[Tensor, dict]:
        images, labels = batch  # uint8 (B, C, S, S), float (B, K)
        B, _, S, _ = images.shape
        if labels.shape[1] != self.model.config.num_labels:
            raise UserError(f"the data has {labels.shape[1]} labels, the AVP-CNN {self.model.config.num_labels}; use an xray.dataset split")
        m = sample_training_masks(B, S, self.cfg, _cpu_generator(generator)).to(images.device, non_blocking=True)
        y = observe(images.float() / 255, m)  # (B, C + 1, S, S)
        logits = model(y).float()  # (B, K)
        pw = self.pos_weight.to(logits.device) if self.pos_weight is not None else None
        per_label = nn.functional.binary_cross_entropy_with_logits(logits, labels.float(), pos_weight=pw, reduction="none").mean(0)  # (K,)
        loss = per_label.mean()
        return loss, {"bce": loss.detach(), "observed": m.mean().detach()}

    @torch.no_grad()
    def on_sample(self, model: nn.Module, step: int, out_png: Path) -> None:
        """A grid of masked preview images titled with the most likely label and its probability."""
        from matplotlib.figure import Figure

        from xray.io import atomic_path

        if self.preview is None or len(self.preview) == 0:
            return
        n = min(8, len(self.preview))
        idx = list(range(n))
        x = dataset_images(self.preview, idx)
        S = x.shape[-1]
        m = sample_training_masks(n, S, AVPTrainConfig(p_full=0.25), torch.Generator().manual_seed(self.cfg.seed))
        p = model.predict_proba(x, m).cpu()  # (n, K)
        y = _labels(self.preview, idx)
        fig = Figure(figsize=(2 * n, 2.4), layout="constrained")
        for j, ax in enumerate(fig.subplots(1, n, squeeze=False)[0]):
            shown = (x[j, 0].float() * (0.25 + 0.75 * m[j, 0])).numpy()  # unobserved pixels dimmed
            ax.imshow(shown, cmap="gray", vmin=0, vmax=255)
            k = int(p[j].argmax())
            ax.set_title(f"{model.label_names[k][:12]} {p[j, k]:.2f} (y={int(y[j][k])})", fontsize=7)
            ax.axis("off")
        fig.suptitle(f"step {step}", fontsize=8)
        with atomic_path(out_png) as tmp:
            fig.savefig(tmp, format="png", dpi=80)

    def evaluate(self, model: nn.Module, dataset) -> dict[str, float]:
        """Per-label AUROC on the full image (``full/<label>``) and after one random scan (``patch1/<label>``)."""
        S = model.config.image_size
        geom = ScanGeometry(S)
        pm = geom.patch_masks()  # (L, 1, S, S)
        n = len(dataset) if self.cfg.eval_images is None else min(self.cfg.eval_images, len(dataset))
        locs = torch.randint(geom.num_locations, (n,), generator=torch.Generator().manual_seed(self.cfg.seed))  # (n,)
        full = label_aurocs(model, dataset, lambda idx: torch.ones(len(idx), 1, S, S), n, self.cfg.eval_batch,
                            self.progress, "eval full")
        one = label_aurocs(model, dataset, lambda idx: pm[locs[idx]], n, self.cfg.eval_batch, self.progress, "eval 1 patch")
        out = {f"full/{k}": v for k, v in full.items()}
        out.update({f"patch1/{k}": v for k, v in one.items()})
        out["n_images"] = float(n)
        return out

    def save_pretrained(self, model: nn.Module, out_dir: Path) -> None:
        model.save_pretrained(out_dir)


def format_auroc_table(results: dict[str, float], label_names=LABELS) -> str:
    """The report as a table: label, AUROC on the full image, AUROC after one random patch."""
    lines = [f"{'label':<20} {'full':>6} {'1 patch':>8}"]
    for name in list(label_names) + ["mean"]:
        f, p = results.get(f"full/{name}", float("nan")), results.get(f"patch1/{name}", float("nan"))
        lines.append(f"{name:<20} {f:6.3f} {p:8.3f}")
    if "n_images" in results:
        lines.append(f"({int(results['n_images'])} test images)")
    return "\n".join(lines)
