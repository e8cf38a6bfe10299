"""Training checkpoints: what they hold, how they are written, found, pruned and read back.

A checkpoint ``run_dir/checkpoints/ckpt-<step>.pt`` holds only tensors and plain containers
(numbers, strings, lists, dicts; RNG states as tensors) and is read with
``torch.load(weights_only=True)``: a file holding pickled Python objects is refused, so a run
folder from someone else cannot execute code. Each one stores the run's *provenance* (the settings
and data that change the result, see :func:`train_provenance`), compared on every resume.
``run_dir/provenance.json`` is a readable copy of the latest one.

**Damage is detected.** Each checkpoint's SHA-256 is recorded in ``ckpt-<step>.pt.sha256`` before
the file is renamed into place (:mod:`xray.integrity`) and checked before it is read: a flipped bit
anywhere (a tensor payload, a key name) makes it *damaged*, and the resume falls back to the
previous checkpoint with a one-line warning. A checkpoint without a sidecar (written before the
digests existed) is read with a warning, and its contents are checked against the model being
trained (every entry, key name and tensor shape the resume reads): a damaged name falls back too. Free space for the state's tensors is checked before the
write; a full disk is a one-line :class:`UserError` and leaves the previous checkpoints as they were.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle
import random
import re
import threading
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from xray.errors import UserError
from xray.integrity import read_sidecar, sha256_file, sidecar_path, write_sidecar
from xray.io import atomic_path, atomic_write_json
from xray.provenance import canonical

log = logging.getLogger("ipa_core.trainer")

CKPT_DIR, CKPT_PATTERN, KEEP_CKPTS = "checkpoints", re.compile(r"^ckpt-(\d+)\.pt$"), 2
CKPT_FORMAT = 2  # 2: weights_only contents and a provenance dict
PROVENANCE_FILE = "provenance.json"


# ----------------------------------------------------------------------------------------------
# provenance


def train_provenance(cfg, world: int, train_set, task) -> dict:
    """What the weights of a run depend on: the result-changing TrainConfig fields, the number of
    processes, the training data (fingerprint and size) and the task's own ``provenance()``."""
    task_prov = task.provenance() if callable(getattr(task, "provenance", None)) else None
    return canonical({"train": cfg.provenance(), "world": world,
                      "data": {"fingerprint": getattr(train_set, "fingerprint", None), "size": len(train_set)},
                      "task": task_prov})


def read_provenance(run_dir: Path) -> dict | None:
    """The provenance the run folder's latest checkpoint was written with (from provenance.json), if any."""
    p = Path(run_dir) / PROVENANCE_FILE
    if not p.is_file() or not checkpoint_paths(Path(run_dir)):
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def config_dict(model: nn.Module) -> dict | None:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dataclasses.asdict(cfg)


def merge_model_config(model: nn.Module, saved: dict | None) -> None:
    """Refuse a resume with a different model config; fill fields left None (measured) from the checkpoint."""
    current = config_dict(model)
    if current is None or saved is None:
        return
    for k in sorted(set(current) | set(saved)):
        a, b = current.get(k), saved.get(k)
        if a is None and b is not None:
            setattr(model.config, k, b)
        elif a != b and not (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and list(a) == list(b)):
            raise UserError(f"the run folder was trained with a different model config ({k} = {b!r}, now {a!r}); use a new --out folder, the original config, or --restart")


# ----------------------------------------------------------------------------------------------
# RNG states as tensors (weights_only-loadable)


def rng_state(generator: torch.Generator) -> dict:
    """Every RNG the training touches, as tensors and ints."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(), "generator": generator.get_state(),
            "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python": {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64),
                       "gauss_next": gauss_next}}


def set_rng_state(d: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(d["torch"])
    n = d["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    py = d["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["internal"].tolist()), py["gauss_next"]))
    if d["cuda"] and torch.cuda.is_available() and len(d["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(d["cuda"])
    generator.set_state(d["generator"])


# ----------------------------------------------------------------------------------------------
# files


def checkpoint_step(path: Path) -> int:
    return int(CKPT_PATTERN.match(path.name).group(1))


def checkpoint_paths(run_dir: Path) -> list[Path]:
    """Checkpoint files of a run, highest step first (by number, not by name)."""
    d = Path(run_dir) / CKPT_DIR
    if not d.is_dir():
        return []
    return sorted((p for p in d.iterdir() if CKPT_PATTERN.match(p.name)), key=checkpoint_step, reverse=True)


def save_checkpoint(run_dir: Path, state: dict, readable: list[int]) -> Path:
    """Write ``checkpoints/ckpt-<step>.pt`` (and provenance.json) atomically, add its step to
    ``readable`` (the steps known to load) and prune.

    Pruning keeps the newest :data:`KEEP_CKPTS` readable checkpoints and deletes only files with a
    lower step than all of them: a stale unreadable checkpoint with a higher step (an older format,
    a torch upgrade) never makes a fresh one disappear.
    """
    path = Path(run_dir) / CKPT_DIR / f"ckpt-{state['step']:08d}.pt"
    with atomic_path(path, need=state_nbytes(state) + (1 << 20)) as tmp:
        torch.save(state, tmp)
        write_sidecar(path, content_of=tmp)  # digest first, rename second: never an unrecorded checkpoint
    atomic_write_json(Path(run_dir) / PROVENANCE_FILE, {"step": state["step"], **state["provenance"]})
    readable[:] = sorted(set(readable) | {int(state["step"])})
    kept = readable[-KEEP_CKPTS:]
    for old in checkpoint_paths(run_dir):
        if checkpoint_step(old) < kept[0]:
            old.unlink(missing_ok=True)
            sidecar_path(old).unlink(missing_ok=True)
    _remove_stray_files(path.parent)
    readable[:] = kept
    return path


def state_nbytes(obj) -> int:
    """Bytes of the tensors in a (nested) checkpoint state: about the size of its file."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(state_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_nbytes(v) for v in obj)
    return 0


def _remove_stray_files(ckpt_dir: Path) -> None:
    """Sidecars whose checkpoint is gone and temp files of killed writes (``.ckpt-*.tmp``)."""
    for f in ckpt_dir.iterdir():
        if f.name.endswith(".pt.sha256") and not f.with_name(f.name[:-len(".sha256")]).exists():
            f.unlink(missing_ok=True)
        elif f.name.startswith(".ckpt-") and f.name.endswith(".tmp"):
            f.unlink(missing_ok=True)


class _Hasher:
    """``sha256_file(path)`` in a background thread (hashlib releases the GIL on large blocks)."""

    def __init__(self, path: Path):
        self._value: str | None = None
        self._thread = threading.Thread(target=self._run, args=(path,), daemon=True)
        self._thread.start()

    def _run(self, path: Path) -> None:
        try:
            self._value = sha256_file(path)
        except OSError as e:
            self._value = f"unreadable ({e.strerror})"

    def result(self) -> str:
        self._thread.join()
        return self._value or ""


def read_checkpoint(path: Path) -> dict:
    """``torch.load(weights_only=True)`` of one checkpoint. A file holding pickled objects raises a
    one-line :class:`UserError`; a damaged one (its SHA-256 differs from the recorded one, or it
    does not parse) raises ``ValueError``. The SHA-256 is computed in a thread while ``torch.load``
    (weights_only: safe on any bytes) reads the file, which hides most of its cost."""
    expected = read_sidecar(path)
    hasher = _Hasher(path) if expected is not None else None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not zipfile.is_zipfile(path):  # not a torch.save file at all: damaged
            raise ValueError("not a zip archive written by torch.save") from None
        if hasher is not None and hasher.result() != expected:  # a flipped bit in a name can look like a foreign class: damaged, not hostile
            raise ValueError("SHA-256 differs from the recorded one (unpickling failed)") from None
        found = next((l.strip() for l in str(e).splitlines() if "GLOBAL" in l), "")
        found = re.sub(r"^.*?(GLOBAL \S+).*$", r"\1", found)
        raise UserError(f"checkpoint {path} holds pickled Python objects, not only tensors and plain containers"
                        f"{f' ({found})' if found else ''}; it was not written by this version of the trainer and "
                        "loading it could run code, so it is refused: pass --restart to move the run aside and start over") from None
    except Exception as e:  # truncated zip, bad header, ...
        raise ValueError(f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:100]}") from None
    if hasher is not None:
        actual = hasher.result()
        if actual != expected:
            raise ValueError(f"SHA-256 {actual[:12]}... differs from the recorded {expected[:12] or '(unreadable)'}...")
    if not isinstance(state, dict) or state.get("format") != CKPT_FORMAT:
        raise ValueError(f"not a checkpoint of format {CKPT_FORMAT} (found {state.get('format') if isinstance(state, dict) else type(state).__name__})")
    if expected is None:
        msg = f"checkpoint {path} has no recorded digest (written by an older version); it cannot be checked for damage"
        log.warning(msg)
        warnings.warn(msg, stacklevel=3)
    return state


def load_latest_checkpoint(run_dir: Path, check=None) -> dict | None:
    """The checkpoint with the highest step that reads back; a damaged one is reported and the
    previous one used. ``state["path"]`` names the file.

    ``check(state)`` (raising ``ValueError``) is applied to checkpoints without a recorded digest:
    their damage shows only in what they hold (a flipped bit in a key name), and the trainer's
    check (:func:`ipa_core.trainer.state_check`) finds it before anything is loaded from them."""
    for path in checkpoint_paths(run_dir):
        try:
            unchecked = read_sidecar(path) is None
            state = read_checkpoint(path)
            if unchecked and check is not None:
                check(state)
        except ValueError as e:
            msg = f"checkpoint {path} is damaged ({e}); falling back to the previous one"
            log.warning(msg)
            warnings.warn(msg, stacklevel=2)
            continue
        state["path"] = str(path)
        return state
    return None
