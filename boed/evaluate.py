"""Scan test images with each policy and record the classifier's probabilities after t = 0..T scans.

The evaluation of paper sec. 5 / fig. 5, 8, 9. For every (method, scan task, test image) the loop
runs ``state = ScanState.empty(...)``; for t = 1..T ``state = state.scan(x, policy.next_locations
(state, generator), geometry)``, and records all K = 15 probabilities of the AVP-CNN at every t
(``full``: the whole image at every t). Records are JSON lines appended to ``records*.jsonl``
(flushed and fsynced after each batch), so a killed run resumes where it stopped.

Determinism: the test subset is drawn from ``seed``; with ``rng="image"`` (default) the policy
is called per image with a generator seeded by (seed, method, scan task, image index), so records
do not depend on batch size, sharding or resume point. ``rng="batch"`` calls the policy once per
batch (faster where a sampler gains from batching) with a generator per (seed, method, task,
first image of the batch): records then depend on ``batch_size`` (checked on resume). Policies
that cache a test-image-independent choice (the t = 1 choice of greedy BOED, the Uncond
sequences) are primed first with a generator per (seed, method, task), so the cached choice does
not depend on which image came first either.

Sharding: global batches of ``batch_size`` positions go round-robin to shards (``--shard i/n`` or
torchrun rank/world); each shard writes its own records file; the metrics come from the union.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from xray.dataset import dataset_images
from xray.errors import UserError
from xray.io import atomic_write_json, ensure_writable_dir
from xray.labels import LABELS, resolve_illness

from .geometry import ScanGeometry

log = logging.getLogger(__name__)

# CLI spelling -> CSV method name (paper fig. 5/8 legend order).
METHOD_ALIASES = {
    "eig": "eig-ipa", "eig-ipa": "eig-ipa", "epe": "epe-ipa", "epe-ipa": "epe-ipa", "random": "random",
    "uncond": "uncond", "nongreedy": "nongreedy", "non-greedy": "nongreedy", "full": "full",
}
METHODS: tuple[str, ...] = ("eig-ipa", "epe-ipa", "uncond", "nongreedy", "random", "full")
# Methods whose scan locations do not depend on the task: scanned once, scored for every task.
TASK_FREE = ("random", "full")
PAPER_TASKS: tuple[str, ...] = ("Edema", "Effusion", "Infiltration", "No Finding")
CONFIG_NAME = "eval_config.json"
# Config keys that change the records; a resumed run must match them.
_RECORD_KEYS = ("tasks", "scans", "seed", "indices", "n_samples", "rng", "image_size", "methods", "model_hashes")


def parse_methods(spec: str | Sequence[str]) -> tuple[str, ...]:
    """``"eig,epe,random"`` -> canonical CSV names, deduplicated in order; UserError on unknown names."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for raw in items:
        key = raw.strip().lower()
        if not key:
            continue
        if key not in METHOD_ALIASES:
            raise UserError(f"unknown method {raw.strip()!r}; choose from eig, epe, random, uncond, nongreedy, full")
        if METHOD_ALIASES[key] not in out:
            out.append(METHOD_ALIASES[key])
    if not out:
        raise UserError("no methods given; pass e.g. --methods eig,random,full")
    return tuple(out)


def parse_shard(spec: str | None) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with 0 <= i < n; None -> (0, 1)."""
    if spec is None:
        return 0, 1
    try:
        i, n = (int(v) for v in spec.split("/"))
    except ValueError:
        raise UserError(f"--shard must look like i/n (e.g. 0/4), got {spec!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise UserError(f"--shard {spec}: need 0 <= i < n, got i={i}, n={n}")
    return i, n


def canonical_tasks(names: Iterable[str]) -> tuple[str, ...]:
    """Illness names -> canonical names, deduplicated in order (UserError on unknown)."""
    out: list[str] = []
    for n in names:
        c = resolve_illness(n).name
        if c not in out:
            out.append(c)
    return tuple(out)


def select_test_indices(n_total: int, n_test: int | None, seed: int) -> list[int]:
    """``n_test`` dataset indices drawn without replacement from ``seed`` (all, shuffled, when None or too many)."""
    if n_total < 1:
        raise UserError("the test split is empty; prepare the data first (see `xray prepare`)")
    if n_test is not None and n_test < 1:
        raise UserError(f"--n-test must be >= 1, got {n_test}")
    if n_test is not None and n_test > n_total:
        warnings.warn(f"--n-test {n_test} is larger than the test set ({n_total} images); using all {n_total}", stacklevel=2)
    k = n_total if n_test is None else min(n_test, n_total)
    return np.random.default_rng(seed).permutation(n_total)[:k].tolist()


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any printable parts (stable across runs and platforms)."""
    h = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def make_generator(*parts: Any) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))


def weights_digest(model_dir: str | Path, name: str = "model.safetensors") -> str:
    """A short digest of a model folder's weights file (so a resume cannot mix two models' records)."""
    d = Path(model_dir)
    d = d if (d / name).is_file() else d / "model"
    path = d / name
    if not path.is_file():
        return "missing"
    h = hashlib.blake2b(digest_size=8)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def record_key(method: str, task: str | None, index: int) -> tuple[str, str | None, int]:
    return method, task, int(index)


@dataclass
class EvalConfig:
    """What an evaluation run computes (saved as ``eval_config.json`` in the output folder)."""

    tasks: tuple[str, ...] = ("Effusion",)  # scan tasks; tasks[0] is the main illness
    methods: tuple[str, ...] = METHODS
    scans: int = 5  # T
    seed: int = 0
    indices: list[int] = field(default_factory=list)  # dataset indices of the test images, in order
    batch_size: int = 16
    n_samples: int = 10
    rng: str = "image"  # "image" | "batch"
    image_size: int = 64
    n_boot: int = 1000
    bootstrap_seed: int = 0
    cross_task: bool = False
    avp: str | None = None
    ipa: str | None = None
    model_hashes: dict = field(default_factory=dict)  # {"avp": ..., "ipa": ...} weight-file digests

    def __post_init__(self):
        self.tasks = canonical_tasks(self.tasks)
        self.methods = parse_methods(self.methods)
        if self.scans < 1:
            raise UserError(f"--scans must be >= 1, got {self.scans}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.rng not in ("image", "batch"):
            raise UserError(f"rng must be 'image' or 'batch', got {self.rng!r}")
        self.indices = [int(i) for i in self.indices]

    def scan_tasks(self, method: str) -> tuple[str | None, ...]:
        """Tasks whose locations ``method`` scans with (None = task-independent, scanned once)."""
        return (None,) if method in TASK_FREE else self.tasks

    def jobs(self) -> list[tuple[str, str | None]]:
        return [(m, t) for m in self.methods for t in self.scan_tasks(m)]

    def expected_keys(self) -> set[tuple[str, str | None, int]]:
        return {record_key(m, t, i) for m, t in self.jobs() for i in self.indices}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tasks"], d["methods"] = list(self.tasks), list(self.methods)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "EvalConfig":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def check_resume(out_dir: Path, cfg: EvalConfig) -> None:
    """Write ``eval_config.json``, or check that the one there describes the same records."""
    path = out_dir / CONFIG_NAME
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise UserError(f"{path} is not valid JSON; delete it or use a new --out") from None
        new = cfg.to_dict()
        keys = _RECORD_KEYS + (("batch_size",) if cfg.rng == "batch" else ())
        for k in keys:
            if old.get(k) != new[k]:
                shown = (lambda v: f"{len(v)} indices" if k == "indices" and isinstance(v, list) else v)
                raise UserError(f"{out_dir} holds an evaluation with {k}={shown(old.get(k))}, this run has "
                                f"{k}={shown(new[k])}; use the same flags to resume or a new --out")
    atomic_write_json(path, cfg.to_dict())


# ----------------------------------------------------------------------------- records
def records_path(out_dir: Path, shard: tuple[int, int]) -> Path:
    i, n = shard
    return out_dir / ("records.jsonl" if n == 1 else f"records-{i:03d}-of-{n:03d}.jsonl")


def _read_lines(path: Path, repair: bool) -> Iterator[dict]:
    """JSON records of one file. A torn last line (a kill mid-write) is dropped (and cut off if ``repair``)."""
    with open(path, "rb") as f:
        data = f.read()
    good_end = 0
    lines = data.split(b"\n")
    for n, line in enumerate(lines):
        is_last = n == len(lines) - 1
        if not line.strip():
            good_end += len(line) + (0 if is_last else 1)
            continue
        try:
            rec = json.loads(line)
            if is_last:  # complete JSON without its newline: keep it, the writer always ends lines
                raise ValueError
        except ValueError:
            if is_last or all(not l.strip() for l in lines[n + 1:]):
                if repair:
                    log.warning("%s: dropping a torn last record (%d bytes) from an interrupted run", path, len(line))
                    with open(path, "r+b") as f:
                        f.truncate(good_end)
                return
            raise UserError(f"{path} line {n + 1} is not valid JSON; the records file is damaged, delete it to recompute") from None
        good_end += len(line) + 1
        yield rec


def load_records(out_dir: str | Path, repair: bool = False) -> list[dict]:
    """All records of every shard file in ``out_dir`` (later duplicates of a key are dropped)."""
    out: dict[tuple, dict] = {}
    for path in sorted(Path(out_dir).glob("records*.jsonl")):
        for rec in _read_lines(path, repair):
            out.setdefault(record_key(rec["method"], rec["task"], rec["index"]), rec)
    return list(out.values())


def _fmt(v: float) -> float:
    return float(f"{v:.7g}")  # float32 precision, short JSON


def _append_records(path: Path, records: list[dict]) -> None:
    if not records:
        return
    text = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------- the loop
def prime_policy(policy, scans: int, channels: int, image_size: int, generator: torch.Generator, device=None) -> None:
    """Compute a policy's test-image-independent cached choices with a fixed generator."""
    from .policies import ScanState

    if hasattr(policy, "sequence"):
        policy.sequence(scans, generator)
    elif hasattr(policy, "first_location"):
        policy.first_location(ScanState.empty(1, channels, image_size, device), generator)


def _labels(dataset, idx: Sequence[int]) -> np.ndarray:
    if hasattr(dataset, "labels"):
        return np.asarray(dataset.labels)[list(idx)]
    return np.stack([np.asarray(dataset[int(i)][1]) for i in idx])


def run_job(policy, classifier, dataset, positions: Sequence[int], cfg: EvalConfig, method: str, task: str | None,
            geometry: ScanGeometry, out_path: Path, done: set, device=None, progress: bool = True) -> int:
    """Scan the images at ``positions`` (into ``cfg.indices``) with one policy; append their records.

    Returns the number of records written. Batches are global (``positions`` are grouped by
    ``position // batch_size``) and images whose records exist are skipped.
    """
    from .policies import ScanState

    device = torch.device(device) if device is not None else next(classifier.parameters()).device
    T, B = cfg.scans, cfg.batch_size
    todo: dict[int, list[int]] = {}
    for pos in positions:
        if record_key(method, task, cfg.indices[pos]) not in done:
            todo.setdefault(pos // B, []).append(pos)
    total = sum(len(v) for v in todo.values())
    if not total:
        return 0
    full = bool(getattr(policy, "observes_everything", False))
    written = 0
    bar = tqdm(total=total, desc=f"{method}/{task or 'any'}", unit="img", disable=not progress, leave=False)
    for batch_no, batch_pos in sorted(todo.items()):
        if cfg.rng == "batch":  # the whole global batch runs so the policy sees the same inputs
            batch_pos = list(range(batch_no * B, min((batch_no + 1) * B, len(cfg.indices))))
        idx = [cfg.indices[p] for p in batch_pos]
        x = dataset_images(dataset, idx).to(device)  # (b, C, S, S) uint8
        b, C, S, _ = x.shape
        if S != geometry.image_size:
            raise UserError(f"test images are {S} px but the models work at {geometry.image_size} px; use --image-size {geometry.image_size}")
        probs = []  # T + 1 tensors (b, K)
        state = ScanState.empty(b, C, S, device)
        if full:
            p_full = classifier.predict_proba(x, torch.ones(b, 1, S, S, device=device), chunk_size=B)
            probs = [p_full] * (T + 1)
        else:
            probs.append(classifier.predict_proba(state.x_obs, state.mask, chunk_size=B))
            gens = ([make_generator(cfg.seed, method, task, i) for i in idx] if cfg.rng == "image"
                    else [make_generator(cfg.seed, method, task, "batch", idx[0])])
            for _ in range(T):
                if cfg.rng == "image":
                    locs = torch.cat([torch.as_tensor(policy.next_locations(_row(state, j), gens[j])).reshape(-1).cpu()
                                      for j in range(b)])  # (b,)
                else:
                    locs = torch.as_tensor(policy.next_locations(state, gens[0])).reshape(-1).cpu()  # (b,)
                state = state.scan(x, locs, geometry)
                probs.append(classifier.predict_proba(state.x_obs, state.mask, chunk_size=B))
        P = torch.stack(probs, dim=1).float().cpu().numpy()  # (b, T + 1, K)
        Y = _labels(dataset, idx)  # (b, K)
        recs = []
        for j, i in enumerate(idx):
            if record_key(method, task, i) in done:
                continue
            recs.append({
                "method": method, "task": task, "index": int(i), "pos": int(batch_pos[j]),
                "locations": [] if full else [int(l) for l in state.locations[j]],
                "probs": [[_fmt(v) for v in row] for row in P[j].tolist()],
                "labels": [int(round(v)) for v in Y[j].tolist()],
            })
            done.add(record_key(method, task, i))
        _append_records(out_path, recs)
        written += len(recs)
        bar.update(len(recs))
    bar.close()
    return written


def _row(state, j: int):
    """The one-image ScanState of image ``j`` of a batch."""
    from .policies import ScanState

    return ScanState(state.x_obs[j:j + 1], state.mask[j:j + 1], [list(state.locations[j])])


def shard_positions(n_images: int, batch_size: int, shard: tuple[int, int]) -> list[int]:
    """Positions of this shard: global batches ``[k B, (k + 1) B)`` with ``k % n == i``."""
    i, n = shard
    return [p for p in range(n_images) if (p // batch_size) % n == i]


def evaluate(policies: Mapping[tuple[str, str | None], Any], classifier, dataset, cfg: EvalConfig,
             out_dir: str | Path, shard: tuple[int, int] = (0, 1), device=None, progress: bool = True) -> Path:
    """Run every (method, scan task) policy on this shard's test images; returns the records file.

    ``policies`` maps each of ``cfg.jobs()`` to a policy. Existing records are kept (resume).
    """
    out = ensure_writable_dir(out_dir)
    if tuple(getattr(classifier, "label_names", LABELS)) != tuple(LABELS):
        raise UserError(f"the AVP classifier's labels {list(classifier.label_names)} differ from xray.labels.LABELS; retrain it")
    missing = [j for j in cfg.jobs() if j not in policies]
    if missing:
        raise UserError(f"no policy for {missing[0]}; build policies for every (method, task) of the config")
    check_resume(out, cfg)
    path = records_path(out, shard)
    done = {record_key(r["method"], r["task"], r["index"]) for r in load_records(out, repair=True)}
    positions = shard_positions(len(cfg.indices), cfg.batch_size, shard)
    geometry = ScanGeometry(cfg.image_size)
    path.touch()
    dev = torch.device(device) if device is not None else next(classifier.parameters()).device
    C = int(getattr(getattr(classifier, "config", None), "in_channels", 1))
    for method, task in cfg.jobs():
        policy = policies[(method, task)]
        if any(record_key(method, task, cfg.indices[p]) not in done for p in positions):
            prime_policy(policy, cfg.scans, C, cfg.image_size, make_generator(cfg.seed, method, task, "prime"), dev)
        n = run_job(policy, classifier, dataset, positions, cfg, method, task, geometry, path, done, dev, progress)
        log.info("%s/%s: %d new records", method, task or "any", n)
    return path


def missing_records(out_dir: str | Path, cfg: EvalConfig) -> int:
    have = {record_key(r["method"], r["task"], r["index"]) for r in load_records(out_dir)}
    return len(cfg.expected_keys() - have)
