"""Saving and loading models: ``save_pretrained(dir)`` writes ``config.json`` beside
``model.safetensors``; ``from_pretrained(dir)`` is the one loader (a model dir, or a training run
dir holding ``model/``). Mismatched weights are refused with the first key that differs.

Every save also writes ``digest.json`` (the SHA-256 of ``model.safetensors`` and ``config.json``,
:mod:`xray.integrity`), and every load checks it first: a flipped bit in the weights or an edited
config is a one-line :class:`UserError` naming the file. A folder saved before digests existed
loads with a warning. Model folders get the user's normal permissions (umask), not 0700.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import tempfile
import zipfile
from dataclasses import asdict, fields
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from xray.errors import UserError
from xray.integrity import FOLDER_DIGEST, folder_digest, verify_folder, write_folder_digest
from xray.io import atomic_write_json, check_free_space, disk_full_error, is_disk_full, normal_mode
from xray.provenance import file_digest

from .config import check_config_types, load_config_json

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"


class DictConfig:
    """``to_dict``/``from_dict`` for a config dataclass saved as ``config.json`` (tuples become
    lists; an unknown key is a one-line :class:`UserError` naming the expected ones)."""

    _config_name = "config"  # how errors name it, e.g. "AVP config"

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"unknown {cls._config_name} keys {unknown}; expected a subset of {sorted(known)}")
        check_config_types(cls, d, cls._config_name)
        return cls(**dict(d))


def resolve_model_dir(path: str | Path, what: str = "model", hint: str = "train one first or pass the right path") -> Path:
    """A model folder (with config.json and weights), or a run folder whose ``model/`` holds one."""
    p = Path(path)
    for cand in (p, p / "model"):
        if (cand / CONFIG_NAME).is_file():
            if not (cand / WEIGHTS_NAME).is_file():
                raise UserError(f"{cand} has {CONFIG_NAME} but no {WEIGHTS_NAME}; the save was interrupted: {hint}")
            return cand
    if not p.exists():
        raise UserError(f"no {what} at {p}: the folder does not exist; {hint}")
    raise UserError(f"no {what} at {p} (no {CONFIG_NAME} there or in {p / 'model'}); {hint}")


def save_pretrained(model: nn.Module, out_dir: str | Path, extra_config: dict | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` into ``out_dir``, replacing it atomically."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(out)
    sd = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    need = sum(v.numel() * v.element_size() for v in sd.values()) + (1 << 20)
    check_free_space(out.parent, need)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    os.chmod(tmp, normal_mode(directory=True))  # mkdtemp makes 0700
    try:
        try:
            save_file(sd, str(tmp / WEIGHTS_NAME))
            os.chmod(tmp / WEIGHTS_NAME, normal_mode())
            atomic_write_json(tmp / CONFIG_NAME, {"model_type": model.model_type, **model.config.to_dict(), **(extra_config or {})})
            write_folder_digest(tmp, (WEIGHTS_NAME, CONFIG_NAME))
        except (OSError, RuntimeError) as e:
            if is_disk_full(e):
                raise disk_full_error(e, out / WEIGHTS_NAME, need) from None
            raise
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _remove_stale_temps(out: Path) -> None:
    """Temp folders of a killed save of ``out`` (``.<name>.<random>``, ``.<name>.old``)."""
    for p in out.parent.glob(f".{out.name}.*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def model_digest(path: str | Path) -> str:
    """A short identity of a saved model folder (or a run folder holding ``model/``): the digest of
    its ``digest.json``, or of its weights' bytes for a folder saved before digests existed."""
    d = resolve_model_dir(path)
    return folder_digest(d) or file_digest(d / WEIGHTS_NAME)


def verify_model_dir(d: Path, what: str = "model") -> bool:
    """Check ``d/digest.json`` against the files (one-line :class:`UserError` on a mismatch)."""
    return verify_folder(d, what=f"{what} folder", hint="the file was damaged or edited after saving; restore "
                         f"the folder from a backup or retrain it (deleting {FOLDER_DIGEST} accepts the files unchecked)")


def load_pretrained(cls, path: str | Path, map_location: str | torch.device = "cpu",
                    what: str = "model", hint: str = "train one first or pass the right path"):
    """Build ``cls`` from ``config.json`` and load its weights strictly (``what``/``hint`` word the errors)."""
    d = resolve_model_dir(path, what, hint)
    verify_model_dir(d, what)
    kind = load_config_json(d / CONFIG_NAME).get("model_type")
    if kind != cls.model_type:
        raise UserError(f"{d} holds a {kind!r} model, expected {cls.model_type!r} ({what}); {hint}")
    model = cls(cls.config_from_dir(d))
    try:
        sd = load_file(str(d / WEIGHTS_NAME), device=str(map_location))
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise UserError(f"cannot read {d / WEIGHTS_NAME}: {e}; the file is damaged, re-export it") from None
    strict_load(model, sd, source=str(d))
    return model


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """``torch.load`` a plain state dict to the CPU with ``weights_only=True``; clear errors."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"checkpoint {p} does not exist")
    try:
        sd = torch.load(p, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, KeyError) as e:
        raise UserError(f"cannot read checkpoint {p} ({type(e).__name__}: {str(e).splitlines()[0][:120]}); the file is truncated or not a state dict") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{p} is not a plain state dict of tensors")
    return sd


def state_digest(sd: Mapping[str, torch.Tensor], keys=None, size: int = 8) -> str:
    """A short digest of a state dict's names, dtypes, shapes and bytes (``keys``: a subset, in any order).

    The identity of a set of weights: an IPA records the digest of the frozen VAE it wraps, so a
    resume on another VAE is caught (:meth:`ipa_core.ipa_task.IPATask.provenance`).
    """
    h = hashlib.blake2b(digest_size=size)
    for k in sorted(sd if keys is None else keys):
        t = sd[k].detach().to("cpu").contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def strict_load(model: nn.Module, sd: Mapping[str, torch.Tensor], source: str,
                hint: str = "was it saved from another config?") -> None:
    """``load_state_dict(strict=True)`` with a one-line error naming the first key that differs."""
    own = model.state_dict()
    for k, v in own.items():
        if k not in sd:
            raise UserError(f"{source} does not match this model: key {k!r} (shape {tuple(v.shape)}) is missing; {hint}")
        if tuple(sd[k].shape) != tuple(v.shape):
            raise UserError(f"{source} does not match this model: key {k!r} has shape {tuple(sd[k].shape)}, expected {tuple(v.shape)}; {hint}")
    extra = [k for k in sd if k not in own]
    if extra:
        raise UserError(f"{source} does not match this model: unexpected key {extra[0]!r} ({len(extra)} extra); {hint}")
    model.load_state_dict(dict(sd), strict=True)


def weights_digest(path: str | Path) -> str:
    """The digest of the weights file of the model in ``path`` (a model dir or a run dir holding
    ``model/``): what records, teacher data and policies name as the model they were made with."""
    return file_digest(resolve_model_dir(path) / WEIGHTS_NAME)


class PretrainedMixin:
    """``save_pretrained`` / ``config_from_dir`` / ``from_pretrained``, written once for every model
    (diffusers' ``ModelMixin``): ``config.json`` (``model_type`` + the config's fields + the
    model's :meth:`extra_config`) beside ``model.safetensors``, loaded strictly.

    A model class sets ``model_type`` and ``config_class`` (a :class:`DictConfig` dataclass) and,
    when it needs them, ``pretrained_what`` / :meth:`pretrained_hint` (how errors name the model
    and what to do), ``extra_config_keys`` with :meth:`extra_config` / :meth:`load_extra_config`
    (what config.json holds beside the config, e.g. how the model was trained), and
    ``eval_on_load`` (``from_pretrained`` returns the model on ``map_location`` in eval mode).
    """

    model_type: str
    config_class: type
    pretrained_what: str = "model"
    extra_config_keys: tuple[str, ...] = ()
    eval_on_load: bool = False

    @classmethod
    def pretrained_hint(cls, path: str | Path) -> str:
        return "train one first or pass the right path"

    def extra_config(self) -> dict | None:
        """What config.json holds beside the config's fields (None: nothing)."""
        return None

    def load_extra_config(self, raw: dict) -> None:
        """Take back :meth:`extra_config` from the loaded config.json (no-op by default)."""

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``out_dir`` (replaced atomically)."""
        return save_pretrained(self, out_dir, extra_config=self.extra_config())

    @classmethod
    def config_from_dir(cls, path: str | Path):
        raw = load_config_json(Path(path) / CONFIG_NAME)
        for key in ("model_type", *cls.extra_config_keys):
            raw.pop(key, None)
        return cls.config_class.from_dict(raw)

    @classmethod
    def from_pretrained(cls, path: str | Path, map_location: str | torch.device = "cpu"):
        """Load from a model dir (``config.json`` + ``model.safetensors``) or a run dir holding ``model/``."""
        what, hint = cls.pretrained_what, cls.pretrained_hint(path)
        model = load_pretrained(cls, path, map_location, what=what, hint=hint)
        if cls.eval_on_load:
            model = model.to(map_location).eval()
        if cls.extra_config_keys:
            model.load_extra_config(load_config_json(resolve_model_dir(path, what, hint) / CONFIG_NAME))
        return model
