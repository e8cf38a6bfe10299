"""Teacher data for the distilled policy: greedy EIG-IPA's EIG maps on training images, in resumable shards.

For every training image the teacher (:class:`boed.policies.GreedyPolicy`, IPA completions) scans
its own greedy sequence; at each state t = 1..T-1 (t scans done) the EIG of all L candidates is
stored (0 on candidates already fully observed). DAgger-style, each image also gets
``off_policy`` extra states a student may reach but the teacher would not: a greedy prefix of
random length followed by random scans, up to t in 1..T-1. The t = 1 choice (nothing observed,
completions drawn from the dataset) is the same for every image: it is computed once and kept in
``teacher/config.json``.

Layout of ``OUT/teacher/``: ``config.json`` (settings, model digests, data fingerprint, first
location) and ``shard-00000.pt`` ... one per ``shard_size`` images, each written atomically. A shard
depends only on its index (own generator), so a killed run continues where it stopped, shards can
be split across processes (``--shard i/n``, or torchrun rank/world: shard k goes to worker
k mod n) and the result is the same as one uninterrupted run.

A state is stored as (dataset index, scanned locations): ``x_obs`` and the mask are rebuilt from the
training image, so a shard of 32 images and 6 states each takes ~0.3 MB at any image size.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from boed.geometry import ScanGeometry
from boed.policies import ScanState, patch_masks_of
from xray.dataset import dataset_images
from xray.errors import UserError
from xray.io import atomic_path, atomic_write_json
from xray.provenance import check_same, digest

log = logging.getLogger(__name__)
SHARD_FORMAT = "shard-{:05d}.pt"
KIND_GREEDY, KIND_OFF_POLICY = 0, 1


@dataclass
class TeacherConfig:
    illness: str = "Effusion"
    scans: int = 5  # T; states t = 1..T-1 are stored
    n_images: int = 256  # training images visited (a seeded random subset of the train split)
    off_policy: int = 2  # extra off-trajectory states per image
    n_samples: int = 10  # N completions per EIG estimate
    shard_size: int = 32  # images per shard
    val_shards: int = 1  # the last shards are held out to validate the student
    temperature: float = 1.0  # IPA sampling temperature
    seed: int = 0

    def __post_init__(self):
        checks = [(self.scans >= 2, f"--scans must be >= 2 to have states t = 1..T-1 to learn from, got {self.scans}"),
                  (self.n_images >= 1, f"--teacher-images must be >= 1, got {self.n_images}"),
                  (self.off_policy >= 0, f"--off-policy must be >= 0, got {self.off_policy}"),
                  (self.n_samples >= 1, f"--n-samples must be >= 1, got {self.n_samples}"),
                  (self.shard_size >= 1, f"--shard-size must be >= 1, got {self.shard_size}"),
                  (self.val_shards >= 0, f"--val-shards must be >= 0, got {self.val_shards}"),
                  (self.temperature > 0, f"--temperature must be > 0, got {self.temperature}")]
        for ok, msg in checks:
            if not ok:
                raise UserError(msg)

    @property
    def n_shards(self) -> int:
        return -(-self.n_images // self.shard_size)

    def check_split(self) -> None:
        """One line, before any teacher work, when the shards cannot give both a training and the
        asked-for validation part (else the student would silently validate on 0 states)."""
        if self.val_shards >= self.n_shards:
            raise UserError(f"--teacher-images {self.n_images} at --shard-size {self.shard_size} make {self.n_shards} shard(s), "
                            f"but --val-shards {self.val_shards} holds out {self.val_shards} and one must train: raise "
                            "--teacher-images or lower --shard-size (or --val-shards 0: no validation)")

    def train_val_shards(self) -> tuple[list[int], list[int]]:
        """Shard indices used for training and for validation (at least one shard trains)."""
        n = self.n_shards
        v = min(self.val_shards, n - 1)
        return list(range(n - v)), list(range(n - v, n))

    def to_dict(self) -> dict:
        return asdict(self)


def image_indices(n_train: int, cfg: TeacherConfig) -> Tensor:
    """The training images the teacher visits: a seeded random subset, ``(min(n_images, n_train),)``."""
    perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(cfg.seed))
    return perm[:cfg.n_images]


def shard_path(teacher_dir: str | Path, k: int) -> Path:
    return Path(teacher_dir) / SHARD_FORMAT.format(k)


def states_of(x: Tensor, locations: Tensor, geometry: ScanGeometry) -> ScanState:
    """Scan states of images ``x uint8 (B, C, S, S)`` after ``locations (B, t_max)`` (-1 = padding)."""
    B, C, S, _ = x.shape
    m = torch.zeros(B, 1, S, S)
    for j in range(locations.shape[1]):
        col = locations[:, j]
        ok = col >= 0
        if ok.any():
            m[ok] = torch.maximum(m[ok], patch_masks_of(geometry, col[ok]))  # (b, 1, S, S)
    x_obs = x * m.to(torch.uint8)  # (B, C, S, S)
    locs = [[int(l) for l in row if l >= 0] for row in locations]
    return ScanState(x_obs=x_obs, mask=m, locations=locs)


def _pad(rows: list[list[int]], width: int) -> Tensor:
    out = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def generate_shard(k: int, teacher, train_set, indices: Tensor, cfg: TeacherConfig, first_location: int) -> dict:
    """The teacher records of shard ``k`` (images ``indices[k * shard_size: ...]``).

    ``teacher`` is a :class:`boed.policies.GreedyPolicy` (``score(state, generator)``).
    Returns ``images (M,)``, ``locations (M, T - 1)`` (-1 padded), ``eig (M, L)``, ``kind (M,)``.
    """
    geometry: ScanGeometry = teacher.geometry
    L, T = geometry.num_locations, cfg.scans
    gen = torch.Generator().manual_seed(int(digest({"seed": cfg.seed, "shard": k}), 16) % 2**62)
    idx = indices[k * cfg.shard_size:(k + 1) * cfg.shard_size]
    x = dataset_images(train_set, idx)  # (b, C, S, S)
    b = x.shape[0]
    images, locs, eigs, kinds = [], [], [], []

    state = ScanState.empty(b, x.shape[1], x.shape[-1]).scan(x, torch.full((b,), first_location), geometry)
    for t in range(1, T):  # the teacher's own trajectory
        res = teacher.score(state, gen)
        images.append(idx)
        locs.append(_pad(state.locations, T - 1))
        eigs.append(res.eig.float().cpu())
        kinds.append(torch.full((b,), KIND_GREEDY, dtype=torch.uint8))
        if t < T - 1:
            state = state.scan(x, res.choose("eig").cpu(), geometry)
    greedy = [list(r) for r in state.locations]  # (b, T - 1) the greedy sequence

    for _ in range(cfg.off_policy):  # off-trajectory states: greedy prefix, then random scans
        t = torch.randint(1, T, (b,), generator=gen)  # (b,) scans in the state
        keep = (torch.rand(b, generator=gen) * t).long()  # (b,) greedy prefix length in 0..t-1
        rand = torch.rand(b, L, generator=gen).argsort(dim=1)  # (b, L) random order of locations
        rows = []
        for i in range(b):
            row = greedy[i][:int(keep[i])]
            for l in rand[i].tolist():
                if len(row) >= int(t[i]):
                    break
                if l not in row:
                    row.append(l)
            rows.append(row)
        padded = _pad(rows, T - 1)
        res = teacher.score(states_of(x, padded, geometry), gen)
        images.append(idx)
        locs.append(padded)
        eigs.append(res.eig.float().cpu())
        kinds.append(torch.full((b,), KIND_OFF_POLICY, dtype=torch.uint8))
    return {"images": torch.cat(images), "locations": torch.cat(locs), "eig": torch.cat(eigs),
            "kind": torch.cat(kinds), "shard": k}


def teacher_settings(cfg: TeacherConfig, provenance: dict) -> dict:
    """What the teacher data depends on (checked when a run resumes)."""
    return {"teacher": cfg.to_dict(), **provenance}


def prepare_teacher_dir(teacher_dir: Path, cfg: TeacherConfig, provenance: dict, first_location_fn) -> int:
    """Write (or check, on resume) ``teacher/config.json``; returns the t = 1 location.

    ``first_location_fn()`` computes the teacher's t = 1 choice; it runs only on a fresh folder.
    """
    path = teacher_dir / "config.json"
    settings = teacher_settings(cfg, provenance)
    if path.is_file():
        old = json.loads(path.read_text())
        check_same(f"the teacher data in {teacher_dir}", {k: v for k, v in old.items() if k != "first_location"}, settings)
        return int(old["first_location"])
    first = int(first_location_fn())
    teacher_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {**settings, "first_location": first})
    return first


def generate_teacher_data(teacher_dir: str | Path, teacher, train_set, cfg: TeacherConfig, provenance: dict,
                          first_location_fn, shard: tuple[int, int] = (0, 1), max_shards: int | None = None,
                          progress: bool = True) -> list[int]:
    """Write every missing shard of worker ``shard = (i, n)`` (shards k with k % n == i).

    ``max_shards`` stops after writing that many (for tests of resuming). Returns the shard indices
    still missing in ``teacher_dir`` (of all workers).
    """
    teacher_dir = Path(teacher_dir)
    if cfg.n_images > len(train_set):
        raise UserError(f"--teacher-images {cfg.n_images} exceeds the {len(train_set)} training images; use at most {len(train_set)}")
    first = prepare_teacher_dir(teacher_dir, cfg, provenance, first_location_fn)
    indices = image_indices(len(train_set), cfg)
    mine = [k for k in range(cfg.n_shards) if k % shard[1] == shard[0] and not shard_path(teacher_dir, k).is_file()]
    written = 0
    for tmp in teacher_dir.glob(".shard-*"):  # left by a kill during a write
        tmp.unlink(missing_ok=True)
    for k in tqdm(mine, desc="teacher shards", disable=not progress or None):
        if max_shards is not None and written >= max_shards:
            break
        t0 = time.perf_counter()
        rec = generate_shard(k, teacher, train_set, indices, cfg, first)
        with atomic_path(shard_path(teacher_dir, k)) as tmp:
            torch.save(rec, tmp)
        written += 1
        log.info("teacher shard %d: %d states in %.1f s", k, rec["eig"].shape[0], time.perf_counter() - t0)
    return missing_shards(teacher_dir, cfg)


def missing_shards(teacher_dir: str | Path, cfg: TeacherConfig) -> list[int]:
    return [k for k in range(cfg.n_shards) if not shard_path(teacher_dir, k).is_file()]


def load_shards(teacher_dir: str | Path, ks: list[int]) -> dict:
    """The records of shards ``ks`` concatenated (``images, locations, eig, kind``)."""
    recs = []
    for k in ks:
        p = shard_path(teacher_dir, k)
        try:
            recs.append(torch.load(p, map_location="cpu", weights_only=True))
        except Exception as e:  # a damaged file (the writes are atomic, so only outside interference)
            raise UserError(f"cannot read teacher shard {p} ({type(e).__name__}); delete it and re-run to regenerate it") from None
    return {key: torch.cat([r[key] for r in recs]) for key in ("images", "locations", "eig", "kind")}


class TeacherStates:
    """The stored teacher states as a training set for :func:`ipa_core.trainer.fit`.

    ``get_batch(idx)`` -> uint8 ``(b, C + 1, S, S)``: the scanned pixels and the mask (0/1) as one
    image; ``get_labels(idx)`` -> the EIG maps ``(b, L)`` float32.
    """

    item_name = "states"  # what the trainer's log counts (not images: each image gives T - 1 states and more)

    def __init__(self, teacher_dir: str | Path, shards: list[int], train_set, geometry: ScanGeometry):
        self.records = load_shards(teacher_dir, shards)
        self.train_set, self.geometry = train_set, geometry
        self.image_size = geometry.image_size
        files = {k: os.path.getsize(shard_path(teacher_dir, k)) for k in shards}
        self._fingerprint = digest({"data": getattr(train_set, "fingerprint", None), "shards": files,
                                    "eig": float(self.records["eig"].double().sum())})

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def __len__(self) -> int:
        return int(self.records["eig"].shape[0])

    def states(self, idx) -> ScanState:
        idx = torch.as_tensor(idx).long().reshape(-1)
        x = dataset_images(self.train_set, self.records["images"][idx])  # (b, C, S, S)
        return states_of(x, self.records["locations"][idx], self.geometry)

    def get_batch(self, idx) -> Tensor:
        s = self.states(idx)
        return torch.cat([s.x_obs, s.mask.to(torch.uint8)], dim=1)  # (b, C + 1, S, S) uint8

    def get_labels(self, idx) -> Tensor:
        return self.records["eig"][torch.as_tensor(idx).long().reshape(-1)]  # (b, L)

    def __getitem__(self, i: int):
        return self.get_batch([i])[0], self.get_labels([i])[0]
