"""ipa_core/persist.py: the one save/load mixin every model inherits (round trip, strict load, errors)."""

from __future__ import annotations

import json

import pytest
import torch

from ipa_core.ipa import IPA
from ipa_core.persist import CONFIG_NAME, WEIGHTS_NAME, PretrainedMixin, weights_digest
from ipa_core.vae import VAE
from tests.ipa_core.test_vae import small
from xray.errors import UserError


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
