"""Training both amortised policies from trained models: the calls behind `boed train-policy`.

- :func:`train_distilled`: teacher data (greedy EIG-IPA, :mod:`boed.amortised.teacher`) in
  ``OUT/teacher/``, then the student with :func:`ipa_core.trainer.fit` (checkpoints, resume,
  EMA) into ``OUT/model/``; validation agreement and EIG regret in ``OUT/eval.json``.
- :func:`train_gdfs`: the GDFS selector (:mod:`boed.amortised.gdfs`) trained with the AVP-CNN as predictor, into ``OUT/model/``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import torch

from boed.geometry import ScanGeometry
from boed.policies import GreedyPolicy, ScanState
from boed.samplers import DatasetSampler, IPASampler
from ipa_core.persist import weights_digest
from ipa_core.seeding import seeded
from ipa_core.trainer import TrainConfig, fit
from xray.errors import UserError
from xray.labels import resolve_illness

from .distill import DistillTask, auto_tau
from .gdfs import GDFSTask, build_gdfs
from .network import PolicyConfig, PolicyNet
from .teacher import TeacherStates, generate_teacher_data, missing_shards

log = logging.getLogger(__name__)


def distill_defaults():
    return TrainConfig(steps=1500, batch_size=64, lr=2e-3, warmup=50, weight_decay=1e-4, ema_rate=0.99,
                       grad_clip=10.0, skip_threshold=None, log_every=50, sample_every=10**9, ckpt_every=250)


def gdfs_defaults():
    return TrainConfig(steps=600, batch_size=24, lr=1e-3, warmup=50, weight_decay=1e-4, ema_rate=0.99,
                       grad_clip=10.0, skip_threshold=None, log_every=50, sample_every=10**9, ckpt_every=200)


def _wait_for_shards(teacher_dir: Path, cfg, poll_s: float = 10.0) -> None:
    """Under torchrun: wait until every worker has written its shards (they are files, so no
    process group is needed yet)."""
    t0 = time.time()
    while missing := missing_shards(teacher_dir, cfg):
        if time.time() - t0 > 60:
            log.info("waiting for %d teacher shards of other workers", len(missing))
            t0 = time.time()
        time.sleep(poll_s)


def train_distilled(out: str | Path, ipa, avp, ipa_path, avp_path, train_set, teacher_cfg, train_cfg,
                    arch: str = "small", width: int = 16, tau: float | None = None, tau_scale: float = 0.25,
                    device: torch.device | str = "cpu", shard: tuple[int, int] = (0, 1), torchrun: bool = False,
                    progress: bool = True) -> dict | None:
    """Teacher data then student; returns the validation metrics, or None when this worker's
    shards are done but other workers' are missing (``--shard i/n``: rerun without it to train)."""
    out = Path(out)
    illness = resolve_illness(teacher_cfg.illness)
    S, C = avp.config.image_size, avp.config.in_channels
    geometry = ScanGeometry(S)
    provenance = {"ipa": weights_digest(ipa_path), "avp": weights_digest(avp_path),
                  "data": getattr(train_set, "fingerprint", None)}
    teacher = GreedyPolicy(avp, IPASampler(ipa, temperature=teacher_cfg.temperature), illness, geometry,
                           n_samples=teacher_cfg.n_samples, first_sampler=DatasetSampler(train_set), device=device)

    def first_location() -> int:
        return teacher.first_location(ScanState.empty(1, C, S, device), torch.Generator().manual_seed(teacher_cfg.seed))

    teacher_dir = out / "teacher"
    t0 = time.perf_counter()
    missing = generate_teacher_data(teacher_dir, teacher, train_set, teacher_cfg, provenance, first_location,
                                    shard=shard, progress=progress)
    if shard[1] > 1 and not torchrun:  # --shard i/n: teacher data only; one later run without --shard trains
        print(f"shard {shard[0]}/{shard[1]}: teacher shards done ({len(missing)} of other workers missing). "
              f"When all have finished, rerun without --shard to train the student.")
        return None
    if missing:
        if not torchrun:
            raise UserError(f"teacher shards {missing[:5]} are missing in {teacher_dir}; rerun to generate them")
        _wait_for_shards(teacher_dir, teacher_cfg)
    teacher_s = time.perf_counter() - t0
    first = int(json.loads((teacher_dir / "config.json").read_text())["first_location"])

    train_ks, val_ks = teacher_cfg.train_val_shards()
    train_states = TeacherStates(teacher_dir, train_ks, train_set, geometry)
    val_states = TeacherStates(teacher_dir, val_ks, train_set, geometry) if val_ks else None
    eig = train_states.records["eig"]
    if tau is None:
        tau = auto_tau(eig, eig <= 0, tau_scale)  # the teacher writes exactly 0 on fully observed candidates
    pc = PolicyConfig(method="distill", illness=illness.name, image_size=S, patch_size=geometry.patch_size,
                      grid=geometry.grid, in_channels=C, label_names=avp.config.label_names, arch=arch, width=width,
                      scans=teacher_cfg.scans, tau=float(f"{tau:.6g}"), first_location=first,
                      provenance={**provenance, "teacher": teacher_cfg.to_dict()})
    with seeded(train_cfg.seed):  # the initial weights depend on the seed alone
        model = PolicyNet(pc)
    tcfg = dataclasses.replace(train_cfg, device=str(device))
    t1 = time.perf_counter()
    fit(DistillTask(model, pc.tau, progress=progress), train_states, tcfg, out, test_set=val_states)
    results = json.loads((out / "eval.json").read_text()) if (out / "eval.json").is_file() else {}
    return {**results, "tau": pc.tau, "first_location": first, "train_states": len(train_states),
            "teacher_seconds": teacher_s, "student_seconds": time.perf_counter() - t1}


def train_gdfs(out: str | Path, avp, avp_path, train_set, test_set, illness: str, gdfs_cfg, train_cfg,
               arch: str = "small", width: int = 16, device: torch.device | str = "cpu", progress: bool = True) -> dict:
    """GDFS selector with the AVP-CNN as predictor; returns the end-of-run AUROC per t."""
    geometry = ScanGeometry(avp.config.image_size)
    provenance = {"avp": weights_digest(avp_path), "data": getattr(train_set, "fingerprint", None),
                  "gdfs": gdfs_cfg.to_dict()}
    with seeded(train_cfg.seed):  # the initial weights depend on the seed alone
        model = build_gdfs(avp, resolve_illness(illness).name, geometry, arch, width, gdfs_cfg, provenance)
    tcfg = dataclasses.replace(train_cfg, device=str(device))
    t0 = time.perf_counter()
    fit(GDFSTask(model, gdfs_cfg, tcfg.steps, progress), train_set, tcfg, out, test_set=test_set)
    results = json.loads((Path(out) / "eval.json").read_text()) if (Path(out) / "eval.json").is_file() else {}
    return {**results, "seconds": time.perf_counter() - t0}
