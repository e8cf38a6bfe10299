"""ipa_core/persist.py: the one save/load mixin every model inherits (round trip, strict load, errors),
its digests recorded and checked, normal permissions, clean errors."""

from __future__ import annotations

import json
import os
import stat
import warnings

import pytest
import torch

from ipa_core import VAE
from ipa_core.ipa import IPA
from ipa_core.persist import CONFIG_NAME, WEIGHTS_NAME, PretrainedMixin, model_digest, save_pretrained, weights_digest
from tests.ipa_core.test_vae import small
from tests.ipa_core.test_trainer import micro_cfg
from xray.errors import UserError
from xray.integrity import FOLDER_DIGEST, DamagedError

torch.set_num_threads(1)


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    VAE(micro_cfg()).save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def test_digest_written_and_round_trip_is_silent(saved):
    rec = json.loads((saved / FOLDER_DIGEST).read_text())
    assert sorted(rec["files"]) == ["config.json", "model.safetensors"] and rec["algorithm"] == "sha256"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        VAE.from_pretrained(saved)


def test_flipped_exponent_bit_in_weights_is_refused(saved):
    from safetensors import safe_open

    f = saved / "model.safetensors"
    data = bytearray(f.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    with safe_open(str(f), "pt") as sf:
        name = sorted(sf.keys())[0]
    meta = json.loads(data[8:header])[name]
    off = header + meta["data_offsets"][0] + 3  # the high byte of the first float32: sign and exponent
    data[off] ^= 0x40
    f.write_bytes(bytes(data))
    with pytest.raises(DamagedError) as e:
        VAE.from_pretrained(saved)
    msg = str(e.value)
    assert "model.safetensors is damaged" in msg and "retrain" in msg and "\n" not in msg


def test_edited_config_is_refused(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["image_size"] = 16
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"config.json is damaged: its SHA-256 .*edited after saving"):
        VAE.from_pretrained(saved)


def test_old_folder_without_digest_loads_with_a_warning(saved):
    (saved / FOLDER_DIGEST).unlink()
    with pytest.warns(UserWarning, match="no digest.json"):
        VAE.from_pretrained(saved)


@pytest.mark.parametrize("content", [b"\xff\xfe\x00bad", b"[1, 2]"])
def test_unreadable_config_is_one_line(saved, content):
    (saved / FOLDER_DIGEST).unlink()
    (saved / "config.json").write_bytes(content)
    with pytest.raises(UserError, match="config.json") as e, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        VAE.from_pretrained(saved)
    assert "\n" not in str(e.value)


def test_normal_permissions_stale_temps_removed_and_digest(saved, tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(saved.stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((saved / "model.safetensors").stat().st_mode) == 0o666 & ~umask
    (tmp_path / ".m.abc123").mkdir()  # left by a killed save
    d0 = model_digest(saved)
    torch.manual_seed(1)
    save_pretrained(VAE(micro_cfg()), saved)
    assert not (tmp_path / ".m.abc123").exists()
    assert model_digest(saved) != d0 and len(d0) == 16


def test_full_disk_on_save_is_one_line(saved, monkeypatch):
    import ipa_core.persist as persist

    before = sorted(p.name for p in saved.parent.iterdir())

    def full(sd, path, *a, **k):
        with open(path, "wb") as f:
            f.write(b"x" * 100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(persist, "save_file", full)
    with pytest.raises(UserError, match=r"no space left on /.*need about .* MB, have") as e:
        save_pretrained(VAE(micro_cfg()), saved)
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in saved.parent.iterdir()) == before  # the old model kept, no temp folder




def own_names(cls) -> set[str]:
    """What ``cls`` and its bases below the mixin define themselves."""
    mro = cls.__mro__
    return {name for klass in mro[:mro.index(PretrainedMixin)] for name in vars(klass)}


@pytest.mark.parametrize("cls", [VAE, IPA])
def test_models_inherit_the_mixin_without_their_own_copy(cls):
    assert issubclass(cls, PretrainedMixin)
    assert not {"config_from_dir", "save_pretrained"} & own_names(cls)


def test_round_trip_is_exact_and_strict(tmp_path):
    vae = small()
    vae.save_pretrained(tmp_path / "vae" / "model")  # a run dir holding model/
    assert json.loads((tmp_path / "vae" / "model" / CONFIG_NAME).read_text())["model_type"] == "vae"
    back = VAE.from_pretrained(tmp_path / "vae")
    assert back.config == vae.config
    for k, v in vae.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    assert weights_digest(tmp_path / "vae") == weights_digest(tmp_path / "vae" / "model")
    with pytest.raises(UserError, match="unconditional VAE"):
        IPA.from_pretrained(tmp_path / "vae")
    with pytest.raises(UserError, match="does not exist"):
        VAE.from_pretrained(tmp_path / "nothing")
    (tmp_path / "vae" / "model" / WEIGHTS_NAME).write_bytes(b"broken")
    with pytest.raises(UserError, match="damaged"):
        VAE.from_pretrained(tmp_path / "vae")
