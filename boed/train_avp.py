"""Training the AVP-CNN on partially observed images (paper I.4): a :class:`ipa_core.trainer.TrainTask`.

Training masks (:func:`sample_training_masks`, appendix I.4): "almost the same mask distribution as
for training the image completion networks; the only difference is that patches now have 25 %
rather than 35 % of the image width". By default that is :data:`ipa_core.masks.
CLASSIFIER_TRAINING_MASKS`: with probability ``p_freeform`` = 1/2 a free-form mask (strokes and
boxes, Zhao et al. 2021 / Yu et al. 2018, observed-fraction bin uniform), else 0..5 random square
patches of 25 % of the width whose centres are uniform over the image (clipped at the border).
``p_full`` (default 0) is an optional extra share of fully observed images, not in the paper.
``patch_layout`` "scan" (not in the paper) replaces the uniform patches by unions of 0..5
distinct patches of the scan grid (:class:`boed.geometry.ScanGeometry`), the masks the
evaluation's policies make (:func:`scan_patch_masks`); the free-form share is unchanged.
Free-form masks come from a :class:`ipa_core.masks.MaskBank` of ``freeform_bank`` masks drawn once
(0: drawn fresh each time, exact but ~10 ms of Python per mask).

The loss is the binary cross-entropy over the K = 15 outputs, optionally with per-label
``pos_weight`` = negatives / positives of the training labels (clipped).

The end-of-run report is the per-label AUROC on the full image and after one random scan patch
(a uniformly random location of the 17 x 17 scan grid, the ``t = 1`` of the Random baseline).
The :class:`AVPTrainConfig` is checkpointed through :meth:`AVPTrainTask.provenance` and saved in the
model's ``config.json`` (``train_config``), so a run folder records how its classifier was trained.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor, nn
from tqdm.auto import tqdm

from ipa_core.masks import CLASSIFIER_TRAINING_MASKS, MaskBank, MaskMixture, freeform_masks
from xray.dataset import dataset_images
from xray.errors import UserError
from xray.io import atomic_path
from xray.labels import LABELS

from .classifier import AVPClassifier, dataset_norm_stats
from .geometry import ScanGeometry, observe

log = logging.getLogger(__name__)


# Defaults of the training distribution, shared with the CLI help.
DEFAULT_MASKS = CLASSIFIER_TRAINING_MASKS
DEFAULT_P_FULL = 0.0
DEFAULT_FREEFORM_BANK = 512  # ~6 s to draw at 64 px; 4 x 512 distinct masks under flips
PATCH_LAYOUTS = ("uniform", "scan")
DEFAULT_PATCH_LAYOUT = "uniform"


@dataclass
class AVPTrainConfig:
    """The training distribution, loss and initialisation of the AVP-CNN (optimiser settings live in ``TrainConfig``)."""

    patch_frac: float = DEFAULT_MASKS.patch_frac  # patch side / image side (25 %, appendix I.4)
    max_patches: int = DEFAULT_MASKS.max_patches  # 0..max_patches patches, uniform
    p_freeform: float = DEFAULT_MASKS.p_freeform  # share of free-form masks among the partial masks
    p_full: float = DEFAULT_P_FULL  # probability of a fully observed training image (not in the paper)
    freeform_bank: int = DEFAULT_FREEFORM_BANK  # free-form masks drawn once and reused under flips; 0 = fresh each time
    patch_layout: str = DEFAULT_PATCH_LAYOUT  # "uniform": patch centres uniform (I.4); "scan": unions of scan-grid patches
    pos_weight: str = "none"  # "none" | "auto" (negatives / positives per label, clipped to [1, max_pos_weight])
    max_pos_weight: float = 50.0
    init: str = "scratch"  # --init: scratch | imagenet | xrv:NAME | an AVP model path
    init_weights: str | None = None  # --init-weights: local copy of the imagenet / xrv weights
    init_digest: str | None = None  # digest of the local initial weights file (None: downloaded or scratch)
    eval_images: int | None = 5000  # test images scored by the end-of-run report (None = all)
    eval_batch: int = 256
    seed: int = 0  # of the mask bank, the report's random patches and the preview masks

    def __post_init__(self):
        if not 0 < self.patch_frac <= 1:
            raise UserError(f"patch fraction must be in (0, 1], got {self.patch_frac}")
        if self.max_patches < 0:
            raise UserError(f"max_patches must be >= 0, got {self.max_patches}")
        if not (0 <= self.p_full <= 1 and 0 <= self.p_freeform <= 1):
            raise UserError(f"--p-full and --p-freeform must be in [0, 1], got {self.p_full} and {self.p_freeform}")
        if self.freeform_bank < 0:
            raise UserError(f"--freeform-bank must be >= 0 (0 = draw every free-form mask fresh), got {self.freeform_bank}")
        if self.patch_layout not in PATCH_LAYOUTS:
            raise UserError(f"--patch-layout is {self.patch_layout!r}; expected one of {', '.join(PATCH_LAYOUTS)}")
        if self.pos_weight not in ("none", "auto"):
            raise UserError(f"pos_weight must be 'none' or 'auto', got {self.pos_weight!r}")

    @property
    def masks(self) -> MaskMixture:
        """The partial-view mixture (free-form or patches), drawn for the images that are not fully observed."""
        return MaskMixture(p_freeform=self.p_freeform, patch_frac=self.patch_frac, max_patches=self.max_patches)

    def to_dict(self) -> dict:
        return asdict(self)


def scan_patch_masks(B: int, geometry: ScanGeometry, max_patches: int, generator: torch.Generator | None = None) -> Tensor:
    """``(B, 1, S, S)``: the union of a uniform number in 0..``max_patches`` of distinct scan-grid
    patches (uniform without replacement): the masks a policy makes after that many scans."""
    S, L = geometry.image_size, geometry.num_locations
    counts = torch.randint(0, max_patches + 1, (B,), generator=generator)  # (B,)
    order = torch.rand(B, L, generator=generator).argsort(dim=1).argsort(dim=1)  # (B, L) rank of each location
    chosen = (order < counts[:, None]).float()  # (B, L)
    pm = geometry.patch_masks().reshape(L, S * S)  # (L, S * S)
    return (chosen @ pm).clamp_(max=1.0).reshape(B, 1, S, S)  # (B, 1, S, S)


def sample_training_masks(B: int, S: int, cfg: AVPTrainConfig, generator: torch.Generator | None = None,
                          bank: MaskBank | None = None) -> Tensor:
    """Training masks ``(B, 1, S, S)`` float on the CPU: fully observed with probability ``p_full``,
    else a draw of ``cfg.masks`` (free-form masks from ``bank`` when given); with ``patch_layout``
    "scan" the patch masks are :func:`scan_patch_masks` (``bank`` then holds free-form masks only)."""
    m = torch.ones(B, 1, S, S)
    partial = torch.rand(B, generator=generator) >= cfg.p_full  # (B,)
    n = int(partial.sum())
    if n and cfg.patch_layout == "scan":
        use_ff = torch.rand(n, generator=generator) < cfg.p_freeform  # (n,)
        part = scan_patch_masks(n, ScanGeometry(S), cfg.max_patches, generator)  # (n, 1, S, S)
        n_ff = int(use_ff.sum())
        if n_ff:
            part[use_ff] = bank.sample(n_ff, generator) if bank is not None else freeform_masks(n_ff, S, generator)
        m[partial] = part
    elif n:
        m[partial] = bank.sample(n, generator) if bank is not None else cfg.masks.sample(n, S, generator)
    return m


NORM_STATS_IMAGES = 1024  # training images whose pixels give input_norm "dataset" its mean and std


def training_norm_stats(train_set, seed: int, n: int = NORM_STATS_IMAGES) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """input_norm "dataset"'s (mean, std): :func:`dataset_norm_stats` of ``n`` training images drawn
    without replacement with ``seed`` (all of them when the set is smaller), the same on every resume."""
    idx = np.random.default_rng(seed).permutation(len(train_set))[:n].tolist()
    return dataset_norm_stats(dataset_images(train_set, idx))  # ((C,), (C,))


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
    from sklearn.metrics import roc_auc_score  # +2.3 s on `boed --help` at the top (measured); only evaluation needs it

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
        self._bank: MaskBank | None = None  # built at the first batch (it needs S)
        model.train_config = self.provenance()  # saved in config.json with the model

    def provenance(self) -> dict:
        """Every setting of this task that changes the trained model (checkpointed by ``ipa_core.trainer.fit``)."""
        keep = {k: v for k, v in self.cfg.to_dict().items() if k not in ("eval_images", "eval_batch")}
        if keep["patch_layout"] == DEFAULT_PATCH_LAYOUT:  # runs from before the flag resume unchanged
            del keep["patch_layout"]
        return {**keep, "arch": self.model.config.arch, "input_norm": self.model.config.input_norm}

    def mask_bank(self, S: int) -> MaskBank | None:
        """The free-form mask bank for images of side ``S`` (None when ``freeform_bank`` is 0)."""
        if self.cfg.freeform_bank == 0 or self.cfg.p_freeform == 0:
            return None
        if self._bank is None or self._bank.S != S:
            log.info("drawing a bank of %d free-form %dx%d masks (seed %d)", self.cfg.freeform_bank, S, S, self.cfg.seed)
            mixture = self.cfg.masks
            if self.cfg.patch_layout == "scan":  # the bank only serves the free-form draws
                mixture = MaskMixture(p_freeform=1.0, patch_frac=mixture.patch_frac, max_patches=mixture.max_patches)
            self._bank = MaskBank(mixture, S, self.cfg.freeform_bank, seed=self.cfg.seed)
        return self._bank

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor], generator: torch.Generator) -> tuple[Tensor, dict]:
        images, labels = batch  # uint8 (B, C, S, S), float (B, K)
        B, _, S, _ = images.shape
        if labels.shape[1] != self.model.config.num_labels:
            raise UserError(f"the data has {labels.shape[1]} labels, the AVP-CNN {self.model.config.num_labels}; use an xray.dataset split")
        m = sample_training_masks(B, S, self.cfg, _cpu_generator(generator), self.mask_bank(S)).to(images.device, non_blocking=True)
        y = observe(images.float() / 255, m)  # (B, C + 1, S, S)
        logits = model(y).float()  # (B, K)
        pw = self.pos_weight.to(logits.device) if self.pos_weight is not None else None
        per_label = nn.functional.binary_cross_entropy_with_logits(logits, labels.float(), pos_weight=pw, reduction="none").mean(0)  # (K,)
        loss = per_label.mean()
        return loss, {"bce": loss.detach(), "observed": m.mean().detach()}

    @torch.no_grad()
    def on_sample(self, model: nn.Module, step: int, out_png: Path) -> None:
        """A grid of masked preview images titled with the most likely label and its probability."""
        if self.preview is None or len(self.preview) == 0:
            return
        n = min(8, len(self.preview))
        idx = list(range(n))
        x = dataset_images(self.preview, idx)
        S = x.shape[-1]
        m = sample_training_masks(n, S, self.cfg, torch.Generator().manual_seed(self.cfg.seed), self.mask_bank(S))
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
        model.train_config = self.provenance()  # the EMA copy too
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
