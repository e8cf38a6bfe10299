"""Distilling greedy EIG-IPA into a policy network: the loss, the metrics and the training task.

The student pi(l | cat(x * m, m)) is trained on the teacher states of :mod:`boed.amortised.teacher`
with ``KL(softmax(EIG / tau) || pi)`` over the candidates not yet fully observed. ``tau`` (nats)
sets how sharp the target is; by default it is measured from the training data as
``tau_scale`` x the median over states of (max EIG - mean EIG), so the target's peak stands
``1 / tau_scale`` temperature units above the average candidate at any EIG scale (image size,
illness prevalence, N).

Reported on held-out teacher states: top-1 agreement with the greedy argmax, and the EIG regret
``EIG(teacher's choice) - EIG(student's choice)`` (nats; also relative to the teacher's EIG).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from boed.geometry import ScanGeometry
from boed.policies import select

from .network import PolicyNet, masked_logits


def distill_loss(logits: Tensor, eig: Tensor, skip: Tensor, tau: float) -> Tensor:
    """Mean over states of ``KL(softmax(eig / tau) || softmax(logits))`` on candidates not in ``skip``.

    ``logits, eig (B, L)``, ``skip (B, L)`` bool. Skipped candidates get zero target mass and
    (through :data:`MASKED_LOGIT`) no student mass.
    """
    q_logits = masked_logits(eig.float() / tau, skip)  # (B, L)
    log_q = torch.log_softmax(q_logits, dim=1)
    log_p = torch.log_softmax(masked_logits(logits.float(), skip), dim=1)  # (B, L)
    kl = (log_q.exp() * (log_q - log_p)).masked_fill(skip, 0.0)  # (B, L)
    return kl.sum(1).mean()


def auto_tau(eig: Tensor, skip: Tensor, tau_scale: float = 0.25) -> float:
    """``tau_scale`` x median over states of (max - mean) EIG of the open candidates (``eig, skip (M, L)``)."""
    open_ = (~skip).float()
    mean = (eig * open_).sum(1) / open_.sum(1).clamp_min(1)  # (M,)
    spread = eig.masked_fill(skip, float("-inf")).amax(1) - mean  # (M,)
    spread = spread[torch.isfinite(spread) & (spread > 0)]
    return float(tau_scale * spread.median()) if spread.numel() else 1e-3


@torch.no_grad()
def choice_metrics(student_logits: Tensor, eig: Tensor, skip: Tensor) -> dict[str, float]:
    """Top-1 agreement with the teacher's argmax and EIG regret (nats and relative), averaged over states."""
    teacher = select(eig, skip)  # (M,)
    student = masked_logits(student_logits.float(), skip).argmax(1)  # (M,)
    e_t = eig.gather(1, teacher[:, None])[:, 0]  # (M,)
    e_s = eig.gather(1, student[:, None])[:, 0]  # (M,)
    regret = e_t - e_s
    return {"top1_agreement": float((teacher == student).float().mean()), "eig_regret": float(regret.mean()),
            "eig_regret_rel": float(regret.sum() / e_t.sum().clamp_min(1e-12)),
            "teacher_eig": float(e_t.mean()), "n_states": float(len(teacher))}


class DistillTask:
    """:class:`ipa_core.trainer.TrainTask` of the distilled policy (batches from :class:`TeacherStates`)."""

    find_unused_parameters = False

    def __init__(self, model: PolicyNet, tau: float, eval_batch: int = 256, progress: bool = True):
        self.model = model
        self.tau = float(tau)
        self.geometry: ScanGeometry = model.config.geometry
        self.eval_batch, self.progress = eval_batch, progress

    def provenance(self) -> dict:
        return {"method": "distill", "tau": self.tau, **self.model.config.provenance}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def _split(self, y_u8: Tensor) -> tuple[Tensor, Tensor]:
        C = self.model.config.in_channels
        m = y_u8[:, C:].float()  # (B, 1, S, S)
        return torch.cat([y_u8[:, :C].float() / 255, m], dim=1), m  # (B, C + 1, S, S), (B, 1, S, S)

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor], generator: torch.Generator) -> tuple[Tensor, dict]:
        y_u8, eig = batch  # uint8 (B, C + 1, S, S), float (B, L)
        y, m = self._split(y_u8)
        skip = self.geometry.fully_observed(m)  # (B, L)
        logits = model(y)  # (B, L)
        loss = distill_loss(logits, eig, skip, self.tau)
        with torch.no_grad():
            agree = (masked_logits(logits.float(), skip).argmax(1) == select(eig, skip)).float().mean()
        return loss, {"kl": loss.detach(), "agree": agree}

    def on_sample(self, model: nn.Module, step: int, out_png: Path) -> None:
        return None  # no image samples for a policy; validation metrics are in eval.json

    @torch.no_grad()
    def evaluate(self, model: nn.Module, dataset) -> dict[str, float]:
        """:func:`choice_metrics` on held-out teacher states (a :class:`TeacherStates`)."""
        dev = next(model.parameters()).device
        logits, eigs, skips = [], [], []
        for i0 in range(0, len(dataset), self.eval_batch):
            idx = list(range(i0, min(i0 + self.eval_batch, len(dataset))))
            y, m = self._split(dataset.get_batch(idx).to(dev))
            logits.append(model(y).float().cpu())
            eigs.append(dataset.get_labels(idx))
            skips.append(self.geometry.fully_observed(m).cpu())
        return choice_metrics(torch.cat(logits), torch.cat(eigs), torch.cat(skips))

    def save_pretrained(self, model: nn.Module, out_dir: Path) -> None:
        model.save_pretrained(out_dir)
