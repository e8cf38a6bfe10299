"""Scan test images with each policy and record the classifier's probabilities after t = 0..T scans.

The evaluation of paper sec. 5 / fig. 5, 8, 9, repeated over R policy seeds. For every (method,
scan task, repeat, test image) the loop runs ``state = ScanState.empty(...)``; for t = 1..T
``state = state.scan(x, policy.next_locations(state, generator), geometry)``, and records all
K = 15 probabilities of the AVP-CNN at every t (``full``: the whole image at every t; per-budget
policies such as non-greedy: the budget-t set at t). Records are JSON lines appended to this
writer's own ``records*.jsonl`` (flushed and fsynced after each batch), so a killed run resumes
where it stopped.

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
repeat (methods in :data:`REPEAT_FREE`): they are computed once, with ``repeat = None``, and the
metrics use them for every repeat. ``boed evaluate --repeats`` defaults to :data:`DEFAULT_REPEATS`
= 3 (the fewest that give a between-repeat spread worth reading); :class:`EvalConfig` defaults to
1 for library use. R repeats cost R x one evaluation minus what is shared (measured in
``benchmarks/bench_repeats.py``: 0.99 x for R = 3).

Determinism: the test subset is drawn from ``seed``; with ``rng="image"`` (default) records do not
depend on batch size, sharding or resume point. ``rng="batch"`` calls the policy once per batch
with a generator per (seed, method, task, repeat, first image of the batch): records then depend on
``batch_size`` (part of the fingerprint in that mode).

Provenance. :meth:`EvalConfig.fingerprint` holds everything that changes the records (tasks,
methods, scans, seed, repeats, indices, N, n_sequences, temperature, rng, batch size under
rng=batch, image size, device type, precision, the test and train data fingerprints, the digests
of every model). It is stored in ``eval_config.json``, in the first (header) line of every records
file, and as a short digest ``fp`` in every record, and checked on every resume and merge with
:func:`xray.provenance.check_same` (one-line error; ``--restart`` starts over).

Writers. Global batches of ``batch_size`` positions go round-robin to shards (``--shard i/n``);
under torchrun the batches of a shard are split again round-robin over the ranks. Every writer
process appends to its own file (``records-<i>-of-<n>[-rank-<r>-of-<w>].jsonl``), holds an
exclusive ``flock`` on it while running, repairs only its own torn last line, and reads the other
files without modifying them (a torn last line there is skipped). The metrics come from the union.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from xray.dataset import dataset_images
from xray.errors import UserError
from xray.io import atomic_write_json, ensure_writable_dir
from xray.labels import LABELS, resolve_illness
from xray.provenance import check_same, digest

from .geometry import ScanGeometry

log = logging.getLogger(__name__)

# CLI spelling -> CSV method name (paper fig. 5/8 legend order). The one place for method names:
# a new method adds its spellings here and a builder in boed.commands.evaluate.METHOD_BUILDERS.
METHOD_ALIASES = {
    "eig": "eig-ipa", "eig-ipa": "eig-ipa", "epe": "epe-ipa", "epe-ipa": "epe-ipa", "random": "random",
    "uncond": "uncond", "nongreedy": "nongreedy", "non-greedy": "nongreedy", "full": "full",
    "eig-ipar": "eig-ipar", "ipar": "eig-ipar", "eig-retrieval": "eig-retrieval", "retrieval": "eig-retrieval",
    "eig-ipa-under": "eig-ipa-under", "ipa-under": "eig-ipa-under",
    "distilled": "distilled", "distill": "distilled", "gdfs": "gdfs",
}
METHODS: tuple[str, ...] = ("eig-ipa", "epe-ipa", "uncond", "nongreedy", "random", "full")  # the default set
# Methods whose scan locations do not depend on the task: scanned once, scored for every task.
TASK_FREE = ("random", "full")
# Methods whose records do not depend on the repeat (no policy randomness): computed once, repeat None.
REPEAT_FREE = ("full",)
PAPER_TASKS: tuple[str, ...] = ("Edema", "Effusion", "Infiltration", "No Finding")
CONFIG_NAME = "eval_config.json"
DEFAULT_REPEATS = 3
# EvalConfig fields that change the records (batch_size too when rng == "batch"); see fingerprint().
RECORD_KEYS = ("tasks", "methods", "scans", "seed", "repeats", "indices", "n_samples", "n_sequences", "temperature",
               "rng", "image_size", "device_type", "precision", "data", "models")


def method_names() -> list[str]:
    """Canonical method names, in the order of :data:`METHOD_ALIASES`."""
    return list(dict.fromkeys(METHOD_ALIASES.values()))


def parse_methods(spec: str | Sequence[str]) -> tuple[str, ...]:
    """``"eig,epe,random"`` -> canonical CSV names, deduplicated in order; UserError on unknown names."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for raw in items:
        key = raw.strip().lower()
        if not key:
            continue
        if key not in METHOD_ALIASES:
            raise UserError(f"unknown method {raw.strip()!r}; choose from {', '.join(method_names())} "
                            "(short forms: eig, epe, ipar, retrieval, ipa-under, distill)")
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


def t1_generator(seed: int, task: str | None, repeat: int | None) -> torch.Generator:
    """The t = 1 dataset draws of (task, repeat): the same for every method (common random numbers)."""
    return make_generator(seed, task, repeat, "t1")


def weights_digest(model_dir: str | Path, name: str = "model.safetensors") -> str:
    """A short digest of a model folder's weights file (so a resume cannot mix two models' records)."""
    from xray.provenance import file_digest

    d = Path(model_dir)
    d = d if (d / name).is_file() else d / "model"
    path = d / name
    return file_digest(path) if path.is_file() else "missing"


def record_key(method: str, task: str | None, repeat: int | None, index: int) -> tuple:
    return method, task, None if repeat is None else int(repeat), int(index)


def key_of(rec: Mapping) -> tuple:
    return record_key(rec["method"], rec["task"], rec.get("repeat", 0), rec["index"])


@dataclass
class EvalConfig:
    """What an evaluation run computes (saved as ``eval_config.json`` in the output folder)."""

    tasks: tuple[str, ...] = ("Effusion",)  # scan tasks; tasks[0] is the main illness
    methods: tuple[str, ...] = METHODS
    scans: int = 5  # T
    seed: int = 0
    repeats: int = 1  # R policy seeds
    indices: list[int] = field(default_factory=list)  # dataset indices of the test images, in order
    batch_size: int = 16
    n_samples: int = 10
    n_sequences: int = 289  # candidate sets per budget of the non-greedy baseline
    temperature: float = 1.0  # IPA sampling temperature
    rng: str = "image"  # "image" | "batch"
    image_size: int = 64
    device_type: str = "cpu"
    precision: str = "float32"  # "float32" | "bf16-autocast"
    n_boot: int = 1000
    bootstrap_seed: int = 0
    cross_task: bool = False
    data: dict = field(default_factory=dict)  # {"test": fingerprint, "train": fingerprint or None}
    models: dict = field(default_factory=dict)  # {"avp": digest, "ipa": digest, ...} of every model used
    paths: dict = field(default_factory=dict)  # where the models were (not part of the fingerprint)

    def __post_init__(self):
        self.tasks = canonical_tasks(self.tasks)
        self.methods = parse_methods(self.methods)
        if self.scans < 1:
            raise UserError(f"--scans must be >= 1, got {self.scans}")
        if self.repeats < 1:
            raise UserError(f"--repeats must be >= 1 (policy seeds per evaluation), got {self.repeats}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.n_samples < 1:
            raise UserError(f"--n-samples must be >= 1, got {self.n_samples}")
        if self.n_sequences < 1:
            raise UserError(f"--n-sequences must be >= 1, got {self.n_sequences}")
        if not self.temperature > 0:
            raise UserError(f"--temperature must be > 0, got {self.temperature}")
        if self.rng not in ("image", "batch"):
            raise UserError(f"rng must be 'image' or 'batch', got {self.rng!r}")
        self.indices = [int(i) for i in self.indices]

    def scan_tasks(self, method: str) -> tuple[str | None, ...]:
        """Tasks whose locations ``method`` scans with (None = task-independent, scanned once)."""
        return (None,) if method in TASK_FREE else self.tasks

    def repeat_ids(self, method: str) -> tuple[int | None, ...]:
        """Repeats of ``method`` (``(None,)``: its records do not depend on the repeat)."""
        return (None,) if method in REPEAT_FREE else tuple(range(self.repeats))

    def jobs(self) -> list[tuple[str, str | None]]:
        return [(m, t) for m in self.methods for t in self.scan_tasks(m)]

    def expected_keys(self) -> set[tuple]:
        return {record_key(m, t, r, i) for m, t in self.jobs() for r in self.repeat_ids(m) for i in self.indices}

    def fingerprint(self) -> dict:
        """Everything that changes the records (checked on resume and merge)."""
        fp = {k: getattr(self, k) for k in RECORD_KEYS}
        if self.rng == "batch":
            fp["batch_size"] = self.batch_size
        return json.loads(json.dumps(fp, default=list))  # tuples -> lists, as read back from JSON

    def fingerprint_digest(self) -> str:
        return digest(self.fingerprint())

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tasks"], d["methods"] = list(self.tasks), list(self.methods)
        d["fingerprint"], d["fp"] = self.fingerprint(), self.fingerprint_digest()
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "EvalConfig":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def check_resume(out_dir: Path, cfg: EvalConfig) -> None:
    """Check that ``eval_config.json`` (when there) and every records file describe the same
    records as ``cfg`` (one-line UserError naming the first differing field); write the config."""
    path = out_dir / CONFIG_NAME
    new = cfg.fingerprint()
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise UserError(f"{path} is not valid JSON; pass --restart to start over (old outputs are moved aside)") from None
        if "fingerprint" not in old:
            raise UserError(f"{out_dir} holds an evaluation made by an older boed (no fingerprint in {CONFIG_NAME}); "
                            "pass --restart to start over or use a new --out")
        check_same(f"the evaluation in {out_dir}", old["fingerprint"], new)
    check_records_provenance(out_dir, cfg)
    atomic_write_json(path, cfg.to_dict())


# ----------------------------------------------------------------------------- records
def records_path(out_dir: Path, shard: tuple[int, int], rank: tuple[int, int] = (0, 1)) -> Path:
    """This writer's own records file."""
    (i, n), (r, w) = shard, rank
    if n == 1 and w == 1:
        return out_dir / "records.jsonl"
    if w == 1:
        return out_dir / f"records-{i:03d}-of-{n:03d}.jsonl"
    if n == 1:
        return out_dir / f"records-{r:03d}-of-{w:03d}.jsonl"
    return out_dir / f"records-{i:03d}-of-{n:03d}-rank-{r:03d}-of-{w:03d}.jsonl"


def read_records_file(path: Path) -> tuple[dict | None, list[dict], int]:
    """``(header, records, good_end)`` of one records file, never modifying it.

    A torn last line (a kill, or a writer still mid-line) is left out; ``good_end`` is the byte
    offset where the complete lines end. A damaged line elsewhere is a UserError.
    """
    with open(path, "rb") as f:
        data = f.read()
    header, recs, good_end = None, [], 0
    lines = data.split(b"\n")
    for n, line in enumerate(lines):
        is_last = n == len(lines) - 1
        if not line.strip():
            good_end += len(line) + (0 if is_last else 1)
            continue
        try:
            if is_last:  # complete JSON without its newline: the writer always ends lines, so it is torn
                raise ValueError
            rec = json.loads(line)
        except ValueError:
            if is_last or all(not l.strip() for l in lines[n + 1:]):
                break
            raise UserError(f"{path} line {n + 1} is not valid JSON; the records file is damaged: "
                            "delete it to recompute its records, or pass --restart") from None
        good_end += len(line) + 1
        if "header" in rec:
            header = header or rec["header"]
        else:
            recs.append(rec)
    return header, recs, good_end


def _records_files(out_dir: str | Path) -> list[Path]:
    return sorted(Path(out_dir).glob("records*.jsonl"))


def load_records(out_dir: str | Path, fp: str | None = None) -> list[dict]:
    """All records of every writer's file in ``out_dir`` (later duplicates of a key are dropped).

    Read-only: a torn last line of any file is skipped, never cut off. With ``fp`` every record
    must carry that fingerprint digest (UserError otherwise).
    """
    out: dict[tuple, dict] = {}
    for path in _records_files(out_dir):
        _, recs, _ = read_records_file(path)
        for rec in recs:
            if fp is not None and rec.get("fp") != fp:
                raise UserError(f"{path.name} holds records made with fingerprint {rec.get('fp')}, this run has {fp} "
                                "(other models, data or flags); use the same flags to resume, or pass --restart to start over")
            out.setdefault(key_of(rec), rec)
    return list(out.values())


def check_records_provenance(out_dir: Path, cfg: EvalConfig) -> None:
    """Every records file's header and every record must carry ``cfg``'s fingerprint (works
    without ``eval_config.json``)."""
    new, fp = cfg.fingerprint(), cfg.fingerprint_digest()
    for path in _records_files(out_dir):
        header, recs, _ = read_records_file(path)
        if header is not None:
            check_same(f"{path}", header.get("fingerprint", {}), new,
                       hint="use the same flags to resume, or pass --restart to start over (old outputs are moved aside)")
        elif recs:
            raise UserError(f"{path} has records but no provenance header (made by an older boed); "
                            "pass --restart to start over")
    load_records(out_dir, fp=fp)


def config_from_out(out_dir: Path) -> EvalConfig:
    """The evaluation config of ``out_dir``: ``eval_config.json``, else the records files' headers."""
    path = out_dir / CONFIG_NAME
    if path.is_file():
        try:
            return EvalConfig.from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError:
            raise UserError(f"{path} is not valid JSON; re-run any shard's command to rewrite it") from None
    for f in _records_files(out_dir):
        header, _, _ = read_records_file(f)
        if header is not None and "config" in header:
            return EvalConfig.from_dict(header["config"])
    raise UserError(f"no evaluation in {out_dir} (no {CONFIG_NAME} and no records); run `boed evaluate --out {out_dir} ...` first")


def check_shards(out_dir: Path, cfg: EvalConfig) -> None:
    """``--merge``: every shard's header and records must carry ``cfg``'s fingerprint."""
    new = cfg.fingerprint()
    for path in _records_files(out_dir):
        header, recs, _ = read_records_file(path)
        if header is None:
            if recs:
                raise UserError(f"shard file {path} has no provenance header (made by an older boed); re-run its shard with --restart")
            continue
        check_same(f"shard file {path}", new, header.get("fingerprint", {}),
                   hint="the shards were made with different models, data or flags: re-run that shard with the "
                        "flags of the others (or delete its file), then merge again")
    load_records(out_dir, fp=cfg.fingerprint_digest())


def _fmt(v: float) -> float:
    return float(f"{v:.7g}")  # float32 precision, short JSON


class RecordsWriter:
    """This process's records file: exclusive ``flock`` while open (a second writer of the same
    shard/rank is refused), its own torn last line cut off, a provenance header on the first line,
    appends flushed and fsynced. Never touches any other file."""

    def __init__(self, path: Path, header: dict):
        self.path = Path(path)
        self._f = open(self.path, "a+b")
        try:
            import fcntl

            fcntl.flock(self._f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # no flock on this platform: one writer per file is then the user's job
            pass
        except OSError as e:
            import errno

            if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):  # e.g. a file system without locks
                warnings.warn(f"cannot lock {self.path} ({e.strerror}); make sure each shard runs once at a time",
                              stacklevel=2)
            else:
                self._f.close()
                raise UserError(f"another process is writing {self.path} (the same shard/rank of this evaluation); "
                                "run each shard once at a time") from None
        _, _, good_end = read_records_file(self.path)
        size = self._f.seek(0, os.SEEK_END)
        if good_end < size:
            log.warning("%s: dropping a torn last record (%d bytes) from an interrupted run", self.path, size - good_end)
            self._f.truncate(good_end)
        if good_end == 0:
            self._write_text(json.dumps({"header": header}, separators=(",", ":")) + "\n")

    def _write_text(self, text: str) -> None:
        self._f.seek(0, os.SEEK_END)
        self._f.write(text.encode("utf-8"))
        self._f.flush()
        os.fsync(self._f.fileno())

    def append(self, records: list[dict]) -> None:
        if records:
            self._write_text("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records))

    def close(self) -> None:
        self._f.close()  # releases the lock


# ----------------------------------------------------------------------------- the loop
def prime_policy(policy, scans: int, channels: int, image_size: int, first_generator: torch.Generator,
                 generator: torch.Generator, device=None) -> None:
    """Start a repeat: forget the policy's cached choices, then compute its test-image-independent
    ones (t = 1 choice from ``first_generator``'s draws; sequences from ``generator``)."""
    from .policies import ScanState

    if hasattr(policy, "reset"):
        policy.reset()
    if hasattr(policy, "prime"):
        policy.prime(scans, first_generator, generator)
    elif hasattr(policy, "sequence"):
        policy.sequence(scans, generator)
    elif hasattr(policy, "first_location"):
        policy.first_location(ScanState.empty(1, channels, image_size, device), first_generator)


def _labels(dataset, idx: Sequence[int]) -> np.ndarray:
    if hasattr(dataset, "labels"):
        return np.asarray(dataset.labels)[list(idx)]
    return np.stack([np.asarray(dataset[int(i)][1]) for i in idx])


def _scan_set(state, x: torch.Tensor, locations: Sequence[int], geometry: ScanGeometry):
    """``state`` with the same ``locations`` scanned for every image of the batch."""
    for l in locations:
        state = state.scan(x, torch.full((state.batch_size,), int(l), dtype=torch.long), geometry)
    return state


def run_job(policy, classifier, dataset, positions: Sequence[int], cfg: EvalConfig, method: str, task: str | None,
            geometry: ScanGeometry, writer: RecordsWriter, done: set, device=None, progress: bool = True,
            repeat: int | None = 0) -> int:
    """Scan the images at ``positions`` (into ``cfg.indices``) with one policy in one repeat;
    append their records. Returns the number of records written.

    Batches are global (``positions`` are grouped by ``position // batch_size``) and images whose
    records exist are skipped.
    """
    from .policies import ScanState

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
    full = bool(getattr(policy, "observes_everything", False))
    per_budget = bool(getattr(policy, "per_budget", False))
    sets = [policy.budget_set(t) for t in range(1, T + 1)] if per_budget and not full else None
    written = 0
    desc = f"{method}/{task or 'any'}" + ("" if repeat is None else f"/r{repeat}")
    bar = tqdm(total=total, desc=desc, unit="img", disable=not progress, leave=False)
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


def _row(state, j: int):
    """The one-image ScanState of image ``j`` of a batch."""
    from .policies import ScanState

    return ScanState(state.x_obs[j:j + 1], state.mask[j:j + 1], [list(state.locations[j])])


def shard_positions(n_images: int, batch_size: int, shard: tuple[int, int], rank: tuple[int, int] = (0, 1)) -> list[int]:
    """Positions of this writer: global batches ``[k B, (k + 1) B)`` with ``k % n == i`` (shard
    i of n), and of those the ``j``-th with ``j % w == r`` (rank r of w under torchrun)."""
    (i, n), (r, w) = shard, rank
    return [p for p in range(n_images) if (p // batch_size) % n == i and ((p // batch_size) // n) % w == r]


def evaluate(policies: Mapping[tuple[str, str | None], Any], classifier, dataset, cfg: EvalConfig,
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
        done = {key_of(r) for r in load_records(out, fp=cfg.fingerprint_digest())}
        positions = shard_positions(len(cfg.indices), cfg.batch_size, shard, rank)
        geometry = ScanGeometry(cfg.image_size)
        dev = torch.device(device) if device is not None else next(classifier.parameters()).device
        C = int(getattr(getattr(classifier, "config", None), "in_channels", 1))
        for method, task in cfg.jobs():
            policy = policies[(method, task)]
            for repeat in cfg.repeat_ids(method):
                if not any(record_key(method, task, repeat, cfg.indices[p]) not in done for p in positions):
                    continue
                if repeat is not None:
                    prime_policy(policy, cfg.scans, C, cfg.image_size, t1_generator(cfg.seed, task, repeat),
                                 make_generator(cfg.seed, method, task, repeat, "prime"), dev)
                n = run_job(policy, classifier, dataset, positions, cfg, method, task, geometry, writer, done, dev,
                            progress, repeat)
                log.info("%s/%s/repeat %s: %d new records", method, task or "any", repeat, n)
    finally:
        writer.close()
    return writer.path


def missing_records(out_dir: str | Path, cfg: EvalConfig) -> int:
    have = {key_of(r) for r in load_records(out_dir, fp=cfg.fingerprint_digest())}
    return len(cfg.expected_keys() - have)
