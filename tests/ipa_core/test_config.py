"""Model configs read from JSON: types checked field by field, one line per problem."""

from __future__ import annotations

import json

import pytest

from ipa_core.config import VAEConfig, check_config_types, get_config, load_config_json
from ipa_core.ipa import IPAConfig
from xray.errors import UserError


def test_a_saved_config_round_trips():
    cfg = get_config("tiny")
    assert VAEConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("field,value,said", [
    ("image_size", "banana", 'image_size is "banana"; expected an integer'),
    ("image_size", 64.0, "expected an integer"),
    ("width", True, "expected an integer"),
    ("scale", float("nan"), "expected a finite number or null"),
    ("low_bit", "no", "expected true or false"),
    ("enc_blocks", [1, 2], "expected a string"),
])
def test_wrong_types_are_one_line_errors(field, value, said):
    d = {**get_config("tiny").to_dict(), field: value}
    with pytest.raises(UserError, match=said.replace("(", r"\(")) as e:
        VAEConfig.from_dict(d)
    assert "\n" not in str(e.value)


def test_ipa_config_and_non_object_json(tmp_path):
    with pytest.raises(UserError, match="IPAConfig field zdim"):
        check_config_types(IPAConfig, {"zdim": "8"}, "IPAConfig")
    (tmp_path / "config.json").write_text(json.dumps([1, 2]))
    with pytest.raises(UserError, match="holds a JSON list, expected an object"):
        load_config_json(tmp_path / "config.json")
    (tmp_path / "config.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(UserError, match="cannot read"):
        load_config_json(tmp_path / "config.json")
