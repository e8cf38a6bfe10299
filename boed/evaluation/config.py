"""The evaluation's config and its fingerprint, the test subset and every seed of the protocol.

Determinism: the test subset is drawn from ``seed``; every policy-level random choice comes from
:func:`make_generator` over printable parts (seed, method, task, repeat, image or "prime"); the
t = 1 dataset draws of a (task, repeat) come from :func:`t1_generator`, the same for every method
(common random numbers).

Provenance: :meth:`EvalConfig.fingerprint` holds everything that changes the records (tasks,
methods, scans, seed, repeats, indices, N, n_sequences, temperature, rng, batch size, image size,
device type, precision, the test and train data fingerprints, the digests of every model). It is
stored in ``eval_config.json``, in the first (header) line of every records file, and as a short
digest ``fp`` in every record (:mod:`.records`). A resume that differs is refused naming the flag
that changed (:data:`FLAGS`), before any data is prepared (:func:`.records.precheck_resume`).

Growing ``--repeats`` extends an evaluation: a record of repeat r depends on (seed, method, task, r,
image) and never on R (every policy-level stream is drawn per repeat, below), so the records of an
R-repeat evaluation are records of the same evaluation with more repeats. A resume with a larger
``--repeats`` keeps them and computes only the new repeats (:meth:`EvalConfig.accepted_digests`;
a smaller one is refused). Tested: R = 2 extended to R = 3 gives the records of an R = 3 run.

Batch size is part of the fingerprint in both ``rng`` modes: under ``rng="image"`` the scanned
locations do not depend on it, but the classifier's probabilities do, at float32 rounding
(about 1e-7: its batched convolutions sum in another order), so a resume with another
``--batch-size`` is refused rather than mixing the two.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterable, Mapping

import numpy as np
import torch

from xray.errors import UserError
from xray.labels import resolve_illness
from xray.provenance import digest

from .methods import METHODS, MODEL_FLAGS, parse_methods

log = logging.getLogger(__name__)

DEFAULT_METHODS: tuple[str, ...] = ("eig-ipa", "epe-ipa", "uncond", "nongreedy", "random", "full")
PAPER_TASKS: tuple[str, ...] = ("Edema", "Effusion", "Infiltration", "No Finding")
CONFIG_NAME = "eval_config.json"
DEFAULT_REPEATS = 3
# EvalConfig fields that change the records; see fingerprint().
RECORD_KEYS = ("tasks", "methods", "scans", "seed", "repeats", "indices", "batch_size", "n_samples", "n_sequences",
               "temperature", "rng", "image_size", "device_type", "precision", "data", "models")
# The flag that sets each fingerprint field, in the order a changed resume is checked (the flag the
# user changed is named, not a field derived from it: --seed before the indices it draws).
FLAGS = {"seed": "--seed", "rng": "--rng", "batch_size": "--batch-size", "n_samples": "--n-samples",
         "n_sequences": "--n-sequences", "temperature": "--temperature", "scans": "--scans", "repeats": "--repeats",
         "methods": "--methods", "tasks": "--illness/--cross-task", "image_size": "--image-size",
         "device_type": "--device", "precision": "--precision", "models.avp": "--avp",
         **{f"models.{k}": mf.flag for k, mf in MODEL_FLAGS.items()},
         "data.test": "the test data (--data/--data-root)", "data.train": "the training data (--data/--data-root)",
         "indices": "--n-test (the test images drawn)"}
# Fingerprint fields a resume may raise: the records made with the smaller value stay valid (module doc).
GROWS = ("repeats",)
# Fields known before the test data is opened (a resume is checked on these before any cache is built).
PRE_DATA_KEYS = tuple(k for k in RECORD_KEYS if k not in ("indices", "data"))


def check_numbers(*, scans: int, repeats: int, batch_size: int, n_samples: int, n_sequences: int, temperature: float,
                  n_boot: int, n_test: int | None = None) -> None:
    """The one check of the evaluation's numbers (flags and :class:`EvalConfig`): one-line UserError."""
    checks = [("--repeats", repeats, 1, "policy seeds"), ("--n-samples", n_samples, 1, "completions"),
              ("--n-sequences", n_sequences, 1, "candidate sets"), ("--batch-size", batch_size, 1, "images"),
              ("--scans", scans, 1, "scans"), ("--n-boot", n_boot, 0, "resamples")]
    for flag, v, lo, what in checks:
        if v < lo:
            raise UserError(f"{flag} must be >= {lo} ({what}), got {v}")
    if n_test is not None and n_test < 1:
        raise UserError(f"--n-test must be >= 1, got {n_test}")
    if not temperature > 0:
        raise UserError(f"--temperature must be > 0, got {temperature}")


def canonical_tasks(names: Iterable[str]) -> tuple[str, ...]:
    """Illness names -> canonical names, deduplicated in order (UserError on unknown)."""
    out: list[str] = []
    for n in names:
        c = resolve_illness(n).name
        if c not in out:
            out.append(c)
    return tuple(out)


DRAWS = ("uniform", "stratified")
# The published results were drawn uniformly: "stratified" changes which images a seed draws (at
# --n-test 100 on the default phantom set, 28 Effusion positives instead of 22), hence their numbers.
DEFAULT_DRAW = "uniform"


def select_test_indices(n_total: int, n_test: int | None, seed: int, strata: np.ndarray | None = None) -> list[int]:
    """``n_test`` dataset indices drawn without replacement from ``seed`` (all, shuffled, when None or too many).

    ``strata`` (bool ``(n_total,)``, the task's label): a stratified draw that keeps the split's
    prevalence, ``round(n_test * P / n_total)`` positives, at least one positive and one negative
    when the split has both and ``n_test >= 2``. It walks the same permutation as the uniform draw
    and keeps the first positives and the first negatives it meets, in that order: where the uniform
    draw already holds that many positives, both draws are the same images.
    """
    if n_total < 1:
        raise UserError("the test split is empty; prepare the data first (see `xray prepare`)")
    if n_test is not None and n_test < 1:
        raise UserError(f"--n-test must be >= 1, got {n_test}")
    if n_test is not None and n_test > n_total:
        warnings.warn(f"--n-test {n_test} is larger than the test set ({n_total} images); using all {n_total}", stacklevel=2)
    k = n_total if n_test is None else min(n_test, n_total)
    perm = np.random.default_rng(seed).permutation(n_total)
    if strata is None or k == n_total:
        return perm[:k].tolist()
    y = np.asarray(strata, dtype=bool).reshape(-1)
    if y.shape != (n_total,):
        raise ValueError(f"strata has shape {y.shape}, expected ({n_total},)")
    P = int(y.sum())
    N = n_total - P
    k_pos = int(np.floor(k * P / n_total + 0.5))
    if P > 0 and N > 0 and k >= 2:
        k_pos = min(max(k_pos, 1), k - 1)
    k_pos = max(min(k_pos, P), k - N)  # never more than a class holds
    keep = np.zeros(n_total, dtype=bool)
    keep[perm[y[perm]][:k_pos]] = True
    keep[perm[~y[perm]][:k - k_pos]] = True
    return perm[keep[perm]].tolist()


FEW_OF_A_CLASS = 5  # fewer positives (or negatives) than this among the test images: a wide AUROC interval


def check_task_classes(labels: np.ndarray, indices: Iterable[int], tasks: Iterable[str]) -> dict[str, tuple[int, int]]:
    """Count each task's positives and negatives among the selected test images, before any compute.

    ``labels``: the whole test split's label table ``(n, K)``; ``indices``: the selected images.
    A task with no positive or no negative among them has no AUROC: a one-line :class:`UserError`.
    Fewer than :data:`FEW_OF_A_CLASS` of either class: one logged warning (the interval will be wide).
    Returns ``{task: (positives, negatives)}`` among the selected images. The selection itself is
    not changed (published results depend on the draw).
    """
    labels = np.asarray(labels)
    idx = np.asarray(list(indices), dtype=np.int64)
    counts, few = {}, []
    for task in tasks:
        ill = resolve_illness(task)
        split = ill.target(labels) > 0.5  # (n,)
        pos = int(split[idx].sum())
        counts[ill.name] = (pos, len(idx) - pos)
        for kind, got, total in (("positives", pos, int(split.sum())), ("negatives", len(idx) - pos, int((~split).sum()))):
            if got == 0:
                advice = ("raise --n-test, draw with --draw stratified, or drop the task" if total > 0 else
                          "the split has none: drop the task or use other data")
                raise UserError(f"{ill.name} has 0 {kind} among the {len(idx)} test images (of {total} {kind} in "
                                f"the test split); {advice}")
            if got < FEW_OF_A_CLASS:
                few.append(f"{ill.name}: {got} {kind} of {len(idx)}")
    if few:
        log.warning("few test images of a class (%s): the AUROC interval will be wide; raise --n-test for a tighter one",
                    "; ".join(few))
    return counts


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any printable parts (stable across runs and platforms)."""
    h = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def make_generator(*parts: Any) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))


def t1_generator(seed: int, task: str | None, repeat: int | None) -> torch.Generator:
    """The t = 1 dataset draws of (task, repeat): the same for every method (common random numbers)."""
    return make_generator(seed, task, repeat, "t1")


def record_key(method: str, task: str | None, repeat: int | None, index: int) -> tuple:
    return method, task, None if repeat is None else int(repeat), int(index)


def key_of(rec: Mapping) -> tuple:
    return record_key(rec["method"], rec["task"], rec.get("repeat", 0), rec["index"])


@dataclass
class EvalConfig:
    """What an evaluation run computes (saved as ``eval_config.json`` in the output folder)."""

    tasks: tuple[str, ...] = ("Effusion",)  # scan tasks; tasks[0] is the main illness
    methods: tuple[str, ...] = DEFAULT_METHODS
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
    # False for an evaluation begun before --batch-size was fingerprinted: its records keep the
    # fingerprint they were made with (batch_size left out), so they resume and merge as before.
    batch_in_fingerprint: bool = True

    def __post_init__(self):
        self.tasks = canonical_tasks(self.tasks)
        self.methods = parse_methods(self.methods)
        check_numbers(scans=self.scans, repeats=self.repeats, batch_size=self.batch_size, n_samples=self.n_samples,
                      n_sequences=self.n_sequences, temperature=self.temperature, n_boot=self.n_boot)
        if self.rng not in ("image", "batch"):
            raise UserError(f"rng must be 'image' or 'batch', got {self.rng!r}")
        self.indices = [int(i) for i in self.indices]

    def scan_tasks(self, method: str) -> tuple[str | None, ...]:
        """Tasks whose locations ``method`` scans with (None = task-independent, scanned once)."""
        return (None,) if METHODS[method].task_free else self.tasks

    def repeat_ids(self, method: str) -> tuple[int | None, ...]:
        """Repeats of ``method`` (``(None,)``: its records do not depend on the repeat)."""
        return (None,) if METHODS[method].repeat_free else tuple(range(self.repeats))

    def jobs(self) -> list[tuple[str, str | None]]:
        return [(m, t) for m in self.methods for t in self.scan_tasks(m)]

    def expected_keys(self) -> set[tuple]:
        return {record_key(m, t, r, i) for m, t in self.jobs() for r in self.repeat_ids(m) for i in self.indices}

    def fingerprint(self) -> dict:
        """Everything that changes the records (checked on resume and merge)."""
        fp = {k: getattr(self, k) for k in RECORD_KEYS if k != "batch_size" or self.batch_in_fingerprint}
        return json.loads(json.dumps(fp, default=list))  # tuples -> lists, as read back from JSON

    def fingerprint_digest(self) -> str:
        return digest(self.fingerprint())

    def accepted_digests(self) -> dict[str, int]:
        """The fingerprint digests whose records this run keeps, each mapped to its number of repeats:
        this config's own and those of the same evaluation with fewer repeats (a record of repeat r
        does not depend on R, so a larger ``--repeats`` extends an evaluation)."""
        return {replace(self, repeats=r).fingerprint_digest(): r for r in range(1, self.repeats + 1)}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tasks"], d["methods"] = list(self.tasks), list(self.methods)
        d["fingerprint"], d["fp"] = self.fingerprint(), self.fingerprint_digest()
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "EvalConfig":
        kw = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if isinstance(d.get("fingerprint"), Mapping) and "batch_size" not in d["fingerprint"]:
            kw["batch_in_fingerprint"] = False  # saved before --batch-size was fingerprinted
        return cls(**kw)
