"""The integrity layer: file digests, folder digests, sealed record lines, disk-space messages."""

from __future__ import annotations

import json
import random

import pytest

from xray.errors import UserError
from xray.integrity import (DamagedError, open_line, read_sidecar, seal_line, verify_file, verify_folder,
                            write_folder_digest, write_sidecar)
from xray.io import atomic_write_text, check_free_space


def test_sidecar_round_trip_and_bit_flip(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(bytes(range(256)) * 10)
    assert verify_file(f) is False  # no digest recorded: the caller decides
    write_sidecar(f)
    assert read_sidecar(f) and (tmp_path / "w.bin.sha256").read_text().endswith("  w.bin\n")  # sha256sum -c format
    assert verify_file(f) is True
    data = bytearray(f.read_bytes())
    data[1234] ^= 0x10
    f.write_bytes(bytes(data))
    with pytest.raises(DamagedError, match=r"w.bin is damaged: its SHA-256 is .*, recorded .*; restore") as e:
        verify_file(f)
    assert isinstance(e.value, UserError) and "\n" not in str(e.value)
    f.unlink()
    with pytest.raises(DamagedError, match="missing although its digest is recorded"):
        verify_file(f)


def test_folder_digest_catches_each_file(tmp_path):
    for n in ("a", "b"):
        (tmp_path / n).write_text(n * 100)
    write_folder_digest(tmp_path, ["a", "b"])
    assert verify_folder(tmp_path)
    (tmp_path / "b").write_text("b" * 99 + "c")
    with pytest.raises(DamagedError, match="/b is damaged"):
        verify_folder(tmp_path)
    (tmp_path / "digest.json").write_text("{not json")
    with pytest.raises(DamagedError, match="digest.json is damaged"):
        verify_folder(tmp_path)


RECORD = {"key": "eig-ipa/3/0", "probs": [0.25, 0.125], "labels": [1, 0], "fp": "abc", "t": 3}


def test_sealed_line_round_trip_is_exact():
    line = seal_line(RECORD)
    assert "\n" not in line and json.loads(line)["_sum"]
    assert open_line(line) == RECORD
    assert seal_line(dict(reversed(list(RECORD.items())))) == line  # key order does not matter


@pytest.mark.parametrize("edit", [
    lambda d: d["probs"].__setitem__(0, 0.26),  # a changed probability (valid JSON)
    lambda d: d.__setitem__("labels", [0, 1]),  # flipped labels
    lambda d: d.__setitem__("kez", d.pop("key")),  # a damaged key
])
def test_valid_json_edits_of_a_record_are_refused(edit):
    d = json.loads(seal_line(RECORD))
    edit(d)
    with pytest.raises(DamagedError, match="records.jsonl line 7 does not match its checksum; .*delete that line"):
        open_line(json.dumps(d), source="records.jsonl", lineno=7)


def test_random_bit_flips_in_record_lines_are_all_caught():
    rng = random.Random(0)
    line = seal_line(RECORD).encode()
    caught = 0
    for _ in range(200):
        b = bytearray(line)
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(7)  # stays ASCII
        try:
            open_line(b.decode())
        except DamagedError:
            caught += 1
    # every flip is caught except the few that leave the JSON value unchanged (a space, a key-order-neutral byte)
    assert caught >= 195


def test_unsealed_lines():
    with pytest.raises(DamagedError, match="no checksum"):
        open_line(json.dumps(RECORD))
    assert open_line(json.dumps(RECORD), require=False) == RECORD
    with pytest.raises(DamagedError, match="not valid JSON"):
        open_line('{"a": ')
    with pytest.raises(DamagedError, match="JSON list, expected an object"):
        open_line("[1]")


def test_full_disk_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    import pathlib

    def full(self, text, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_text", full)
    with pytest.raises(UserError, match=r"^no space left on /\S* \(writing .*out.json\): need more, have .* MB; free some"):
        atomic_write_text(tmp_path / "out.json", "x")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UserError, match=r"no space left on .*need about 1000000 GB|no space left on .*need about"):
        check_free_space(tmp_path, 10 ** 18)


def test_damaged_line_is_a_value_error_for_torn_line_readers():
    from xray.integrity import DamagedLineError

    with pytest.raises(ValueError):
        open_line(seal_line(RECORD)[:-5])
    with pytest.raises(DamagedLineError):
        open_line(seal_line(RECORD).replace("0.25", "0.26"))
