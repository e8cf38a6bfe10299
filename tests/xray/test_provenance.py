import pytest

from xray.errors import UserError
from xray.provenance import check_same, digest, file_digest, first_difference, move_aside


def test_digest_ignores_key_order_and_tuple_vs_list():
    assert digest({"a": 1, "b": (1, 2)}) == digest({"b": [1, 2], "a": 1})
    assert digest({"a": 1}) != digest({"a": 2})


def test_first_difference_nested_and_missing():
    assert first_difference({"a": {"x": 1, "y": 2}}, {"a": {"x": 1, "y": 3}}) == ("a.y", 2, 3)
    assert first_difference({"a": 1}, {"a": 1, "b": 2}) == ("b", "<missing>", 2)
    assert first_difference({"a": 1}, {"a": 1}) is None


def test_check_same_names_field_and_values():
    check_same("run", {"seed": 0}, {"seed": 0})
    with pytest.raises(UserError, match=r"seed=0, this run has seed=1; .*--restart"):
        check_same("run R", {"seed": 0}, {"seed": 1})


def test_check_same_names_the_flag_before_derived_fields():
    old = {"indices": [3, 1], "seed": 0, "rng": "image", "models": {"avp": "aa"}}
    new = {"indices": [2, 0], "seed": 1, "rng": "image", "models": {"avp": "aa"}, "batch_size": 4}
    flags = {"seed": "--seed", "rng": "--rng", "batch_size": "--batch-size", "models.avp": "--avp"}
    with pytest.raises(UserError, match=r"^--seed changed: run R was made with 0, this run has 1; .*--restart to start over$"):
        check_same("run R", old, new, flags=flags)
    with pytest.raises(UserError, match=r"^--rng changed: run R was made with image, this run has batch;"):
        check_same("run R", old, {**old, "rng": "batch", "batch_size": 4}, flags=flags)  # not batch_size=<missing>
    with pytest.raises(UserError, match=r"^--avp changed: run R was made with aa, this run has bb;"):
        check_same("run R", old, {**old, "models": {"avp": "bb"}}, flags=flags)


def test_move_aside_and_file_digest(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("x")
    d = file_digest(f)
    moved = move_aside(f)
    assert not f.exists() and moved.read_text() == "x" and file_digest(moved) == d
    assert move_aside(tmp_path / "none") is None
