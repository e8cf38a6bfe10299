"""The evaluation loop: scan test images with each policy and record the classifier's probabilities after t = 0..T scans.

The evaluation of paper sec. 5 / fig. 5, 8, 9, repeated over R policy seeds. For every (method,
scan task, repeat, test image) the loop runs ``state = ScanState.empty(...)``; for t = 1..T
``state = state.scan(x, policy.next_locations(state, generator), geometry)``, and records all
K = 15 probabilities of the AVP-CNN at every t (``full``: the whole image at every t; per-budget
policies such as non-greedy: the budget-t set at t).

Fair comparison (common random numbers). Per (scan task, repeat) there is ONE generator of t = 1
dataset draws, ``make_generator(seed, task, repeat, "t1")``, whatever the method: every method that
applies eq. 10 to dataset draws at t = 1 (eig-ipa, uncond, eig-ipar, eig-retrieval, eig-ipa-under)
makes the same computation from the same draws and so takes the same first location (computed
once and shared through a :class:`boed.policies.FirstChoiceCache`); EPE-IPA and non-greedy use
the same draws with their own estimators. The same test images are scored by every method.

Repeats. Every policy-level random choice is redrawn per repeat: the t = 1 draws, the Uncond and
non-greedy sequences (from ``make_generator(seed, method, task, repeat, "prime")``), the per-image
streams (IPA samples, Random) from ``make_generator(seed, method, task, repeat, index)``. Policies
are ``reset()`` and primed again for every repeat. The full-image records do not depend on the
repeat (``repeat_free`` in :data:`.methods.METHODS`): they are computed once, with ``repeat = None``, and the
metrics use them for every repeat. ``boed evaluate --repeats`` defaults to :data:`.config.DEFAULT_REPEATS`
= 3 (the fewest that give a between-repeat spread worth reading); :class:`EvalConfig` defaults to
1 for library use. R repeats cost R x one evaluation minus what is shared (measured in
``benchmarks/bench_repeats.py``: 0.99 x for R = 3).

Determinism: the test subset is drawn from ``seed``; records do not depend on sharding, torchrun
ranks or the resume point: a global batch ``[k B, (k + 1) B)`` always runs whole, in one writer,
also when some of its records exist (a kill mid-write), so every image is scored in the same batch.
With ``rng="image"`` (default) the scanned locations do not depend on the batch size either, but
the probabilities do at float32 rounding (about 1e-7, the classifier's batched convolutions).
``rng="batch"`` calls the policy once per batch with a generator per (seed, method, task, repeat,
first image of the batch): the locations then depend on ``batch_size`` too. ``batch_size`` is part
of the fingerprint in both modes.

Provenance and the records format: :mod:`.config` (the fingerprint) and :mod:`.records` (one
JSON-lines file per writer, resumable, checked on every resume and merge).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from xray.dataset import dataset_images
from xray.errors import UserError
from xray.io import ensure_writable_dir
from xray.labels import LABELS

from ..geometry import ScanGeometry
from ..policies import Policy, ScanState
from .config import EvalConfig, make_generator, record_key, t1_generator
from .records import RecordsWriter, check_resume, key_of, load_records, records_path

log = logging.getLogger(__name__)


def _fmt(v: float) -> float:
    return float(f"{v:.7g}")  # float32 precision, short JSON


def prime_policy(policy: Policy, scans: int, first_generator: torch.Generator, generator: torch.Generator) -> None:
    """Start a repeat: forget the policy's cached choices, then compute its test-image-independent
    ones (t = 1 choice from ``first_generator``'s draws; sequences from ``generator``)."""
    policy.reset()
    policy.prime(scans, first_generator, generator)


def _labels(dataset, idx: Sequence[int]) -> np.ndarray:
    if hasattr(dataset, "labels"):
        return np.asarray(dataset.labels)[list(idx)]
    return np.stack([np.asarray(dataset[int(i)][1]) for i in idx])


def _scan_set(state, x: torch.Tensor, locations: Sequence[int], geometry: ScanGeometry):
    """``state`` with the same ``locations`` scanned for every image of the batch."""
    for l in locations:
        state = state.scan(x, torch.full((state.batch_size,), int(l), dtype=torch.long), geometry)
    return state


def run_job(policy: Policy, classifier, dataset, positions: Sequence[int], cfg: EvalConfig, method: str, task: str | None,
            geometry: ScanGeometry, writer: RecordsWriter, done: set, device=None, progress: bool = True,
            repeat: int | None = 0) -> int:
    """Scan the images at ``positions`` (into ``cfg.indices``) with one policy in one repeat;
    append their records. Returns the number of records written.

    Batches are global (``positions`` are grouped by ``position // batch_size``) and run whole
    (every image scored in the same batch as in an uninterrupted run); only records that do not
    exist yet are written.
    """
    device = torch.device(device) if device is not None else next(classifier.parameters()).device
    T, B = cfg.scans, cfg.batch_size
    fp = cfg.fingerprint_digest()
    todo: dict[int, list[int]] = {}
    for pos in positions:
        if record_key(method, task, repeat, cfg.indices[pos]) not in done:
            todo.setdefault(pos // B, []).append(pos)
    total = sum(len(v) for v in todo.values())
    if not total:
        return 0
    full = policy.observes_everything
    sets = [policy.budget_set(t) for t in range(1, T + 1)] if policy.per_budget and not full else None
    written = 0
    desc = f"{method}/{task or 'any'}" + ("" if repeat is None else f"/r{repeat}")
    bar = tqdm(total=total, desc=desc, unit="img", disable=not progress, leave=False)
    for batch_no, batch_pos in sorted(todo.items()):
        # the whole global batch runs (it belongs to this writer): the classifier and, under rng="batch",
        # the policy see the same inputs as in an uninterrupted run
        batch_pos = list(range(batch_no * B, min((batch_no + 1) * B, len(cfg.indices))))
        idx = [cfg.indices[p] for p in batch_pos]
        x = dataset_images(dataset, idx).to(device)  # (b, C, S, S) uint8
        b, C, S, _ = x.shape
        if S != geometry.image_size:
            raise UserError(f"test images are {S} px but the models work at {geometry.image_size} px; use --image-size {geometry.image_size}")
        probs = []  # T + 1 tensors (b, K)
        state = ScanState.empty(b, C, S, device)
        if policy.reads_truth:  # a reference bound (clairvoyant): the whole images, never the labels
            state.truth = x
        if full:
            p_full = classifier.predict_proba(x, torch.ones(b, 1, S, S, device=device), chunk_size=B)
            probs = [p_full] * (T + 1)
        elif sets is not None:  # budget t is scored with the budget-t set
            probs.append(classifier.predict_proba(state.x_obs, state.mask, chunk_size=B))
            for s in sets:
                state = _scan_set(ScanState.empty(b, C, S, device), x, s, geometry)
                probs.append(classifier.predict_proba(state.x_obs, state.mask, chunk_size=B))
        else:
            probs.append(classifier.predict_proba(state.x_obs, state.mask, chunk_size=B))
            gens = ([make_generator(cfg.seed, method, task, repeat, i) for i in idx] if cfg.rng == "image"
                    else [make_generator(cfg.seed, method, task, repeat, "batch", idx[0])])
            for _ in range(T):
                if cfg.rng == "image":
                    locs = torch.cat([torch.as_tensor(policy.next_locations(state.row(j), gens[j])).reshape(-1).cpu()
                                      for j in range(b)])  # (b,)
                else:
                    locs = torch.as_tensor(policy.next_locations(state, gens[0])).reshape(-1).cpu()  # (b,)
                state = state.scan(x, locs, geometry)
                probs.append(classifier.predict_proba(state.x_obs, state.mask, chunk_size=B))
        P = torch.stack(probs, dim=1).float().cpu().numpy()  # (b, T + 1, K)
        Y = _labels(dataset, idx)  # (b, K)
        recs = []
        for j, i in enumerate(idx):
            if record_key(method, task, repeat, i) in done:
                continue
            rec = {"method": method, "task": task, "repeat": repeat, "index": int(i), "pos": int(batch_pos[j]),
                   "locations": [] if full else [int(l) for l in state.locations[j]],
                   "probs": [[_fmt(v) for v in row] for row in P[j].tolist()],
                   "labels": [int(round(v)) for v in Y[j].tolist()], "fp": fp}
            if sets is not None:
                rec["sets"] = [list(map(int, s)) for s in sets]
            recs.append(rec)
            done.add(record_key(method, task, repeat, i))
        writer.append(recs)
        written += len(recs)
        bar.update(len(recs))
    bar.close()
    return written


def shard_positions(n_images: int, batch_size: int, shard: tuple[int, int], rank: tuple[int, int] = (0, 1)) -> list[int]:
    """Positions of this writer: global batches ``[k B, (k + 1) B)`` with ``k % n == i`` (shard
    i of n), and of those the ``j``-th with ``j % w == r`` (rank r of w under torchrun)."""
    (i, n), (r, w) = shard, rank
    return [p for p in range(n_images) if (p // batch_size) % n == i and ((p // batch_size) // n) % w == r]


def evaluate(policies: Mapping[tuple[str, str | None], Policy], classifier, dataset, cfg: EvalConfig,
             out_dir: str | Path, shard: tuple[int, int] = (0, 1), device=None, progress: bool = True,
             rank: tuple[int, int] = (0, 1)) -> Path:
    """Run every (method, scan task) policy for every repeat on this writer's test images;
    returns its records file.

    ``policies`` maps each of ``cfg.jobs()`` to a policy. Existing records are kept (resume) after
    checking their provenance against ``cfg``.
    """
    out = ensure_writable_dir(out_dir)
    if tuple(getattr(classifier, "label_names", LABELS)) != tuple(LABELS):
        raise UserError(f"the AVP classifier's labels {list(classifier.label_names)} differ from xray.labels.LABELS; retrain it")
    missing = [j for j in cfg.jobs() if j not in policies]
    if missing:
        raise UserError(f"no policy for {missing[0]}; build policies for every (method, task) of the config")
    check_resume(out, cfg)
    header = {"config": cfg.to_dict(), "fingerprint": cfg.fingerprint(), "fp": cfg.fingerprint_digest(),
              "writer": {"shard": list(shard), "rank": list(rank)}}
    writer = RecordsWriter(records_path(out, shard, rank), header)
    try:
        done = {key_of(r) for r in load_records(out, fp=cfg.accepted_digests())}
        positions = shard_positions(len(cfg.indices), cfg.batch_size, shard, rank)
        geometry = ScanGeometry(cfg.image_size)
        dev = torch.device(device) if device is not None else next(classifier.parameters()).device
        for method, task in cfg.jobs():
            policy = policies[(method, task)]
            for repeat in cfg.repeat_ids(method):
                if not any(record_key(method, task, repeat, cfg.indices[p]) not in done for p in positions):
                    continue
                if repeat is not None:
                    prime_policy(policy, cfg.scans, t1_generator(cfg.seed, task, repeat),
                                 make_generator(cfg.seed, method, task, repeat, "prime"))
                n = run_job(policy, classifier, dataset, positions, cfg, method, task, geometry, writer, done, dev,
                            progress, repeat)
                log.info("%s/%s/repeat %s: %d new records", method, task or "any", repeat, n)
    finally:
        writer.close()
    return writer.path
