"""Checkpoint integrity: a flipped bit anywhere falls back to the previous good checkpoint."""

from __future__ import annotations

import struct
import warnings
import zipfile

import pytest
import torch

from ipa_core.checkpoint import checkpoint_paths, load_latest_checkpoint, read_checkpoint, save_checkpoint
from ipa_core.trainer import fit
from ipa_core.vae_task import VAETask
from tests.ipa_core.test_trainer import ImageSet, flat, new_vae, tcfg
from xray.errors import UserError
from xray.integrity import sidecar_path

torch.set_num_threads(1)


def payload_offset(path, pick=max) -> int:
    """Byte offset of the middle of a tensor payload (the largest ``data/N`` entry) in a torch.save zip."""
    with zipfile.ZipFile(path) as z:
        info = pick((i for i in z.infolist() if "/data/" in i.filename and not i.filename.endswith("/")),
                    key=lambda i: i.file_size)
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        head = f.read(30)
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    return info.header_offset + 30 + name_len + extra_len + info.file_size // 2


def flip_bit(path, offset: int, bit: int = 3) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    fit(VAETask(new_vae()), ImageSet(), tcfg(steps=6, ckpt_every=3), run)
    ref = fit(VAETask(new_vae()), ImageSet(), tcfg(steps=6, ckpt_every=3), run.parent / "ref")
    return run, flat(ref)


def test_every_checkpoint_has_a_digest(trained):
    run, _ = trained
    for p in checkpoint_paths(run):
        assert sidecar_path(p).read_text().split() == [__import__("hashlib").sha256(p.read_bytes()).hexdigest(), p.name]


@pytest.mark.parametrize("where", ["tensor", "key"])
def test_flipped_bit_falls_back_to_the_previous_checkpoint(trained, tmp_path, where):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    latest = checkpoint_paths(run)[0]
    if where == "tensor":
        off = payload_offset(latest)
    else:  # a key name inside data.pkl (stored uncompressed)
        off = latest.read_bytes().index(b"decoder") + 2
    flip_bit(latest, off)
    with pytest.warns(UserWarning, match=r"ckpt-00000006.pt is damaged \(SHA-256.*falling back"):
        state = load_latest_checkpoint(run)
    assert state["step"] == 3
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        out = fit(VAETask(new_vae()), ImageSet(), tcfg(steps=6, ckpt_every=3), run)
    assert torch.equal(flat(out), trained[1])  # redone from step 3: the same model as an uninterrupted run


def test_checkpoint_without_digest_is_read_with_a_warning(trained, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    latest = checkpoint_paths(run)[0]
    sidecar_path(latest).unlink()
    with pytest.warns(UserWarning, match="no recorded digest"):
        assert read_checkpoint(latest)["step"] == 6


def test_full_disk_is_one_line_and_leaves_old_checkpoints(tmp_path, monkeypatch):
    import errno

    fit(VAETask(new_vae()), ImageSet(), tcfg(steps=3, ckpt_every=3), tmp_path)
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    state = read_checkpoint(checkpoint_paths(tmp_path)[0])
    real_save = torch.save

    def full(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1024 vs 960")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(UserError, match=r"^no space left on /\S*.*need about .* MB, have .* MB") as e:
        save_checkpoint(tmp_path, {**state, "step": 9}, [3])
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before  # no temp file, no sidecar
    monkeypatch.setattr(torch, "save", real_save)
    monkeypatch.setattr("shutil.disk_usage", lambda p: type("U", (), {"free": 1000})())
    with pytest.raises(UserError, match="no space left.*need about"):  # checked before writing anything
        save_checkpoint(tmp_path, {**state, "step": 9}, [3])
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before
    assert errno.ENOSPC  # (the errno the atomic writer maps, with EFBIG and EDQUOT)
