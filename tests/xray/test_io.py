"""xray.io: atomic writes leave either the old or the new file, with normal permissions."""

import os

import pytest

from xray.errors import UserError
from xray.io import atomic_path, atomic_write_json, atomic_write_text, ensure_writable_dir, remove_temp_files, run_lock


def test_atomic_write_replaces_and_respects_umask(tmp_path):
    p = tmp_path / "a.txt"
    atomic_write_text(p, "one")
    atomic_write_text(p, "two")
    assert p.read_text() == "two"
    mask = os.umask(0)
    os.umask(mask)
    assert p.stat().st_mode & 0o777 == 0o666 & ~mask
    assert [f.name for f in tmp_path.iterdir()] == ["a.txt"]


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    p = tmp_path / "b.json"
    atomic_write_json(p, {"x": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(p) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert p.read_text().strip().startswith("{") and '"x": 1' in p.read_text()
    assert [f.name for f in tmp_path.iterdir()] == ["b.json"]


def test_unwritable_dir_is_a_user_error(tmp_path):
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(UserError, match="cannot write"):
        ensure_writable_dir(f / "sub")



def test_atomic_write_where_no_folder_can_be_made_is_one_line(tmp_path):
    import pytest

    from xray.errors import UserError
    from xray.io import atomic_write_text

    (tmp_path / "file").write_text("")  # a path through a file (as root, the one unwritable place there is)
    with pytest.raises(UserError, match=r"cannot write .*file/sub/x.txt: .*; choose a writable path") as e:
        atomic_write_text(tmp_path / "file" / "sub" / "x.txt", "x")
    assert "\n" not in str(e.value)


def test_run_lock_is_exclusive_and_released_on_exit(tmp_path):
    out = tmp_path / "a" / "run"
    with run_lock(out) as lock:
        assert lock == out / ".lock" and lock.read_text().strip() == str(os.getpid())
        with pytest.raises(UserError, match=rf"^another training is writing {out} \(pid {os.getpid()}\); wait for it or use another --out$"):
            with run_lock(out):
                pass
    with run_lock(out):  # released: the next writer gets it
        pass
    assert [p.name for p in out.iterdir()] == [".lock"]


def test_remove_temp_files_takes_only_killed_writes_temps(tmp_path):
    import os
    import time

    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "a.json") as tmp:
            tmp.write_text("half")
            killed = tmp.with_name(tmp.name + "-copy.tmp")  # what a kill -9 leaves: atomic_path's own cleanup never ran
            killed.write_text("half")
            raise RuntimeError
    (tmp_path / "keep.tmp").write_text("not ours")  # no leading dot: not an atomic_path temp
    young = tmp_path / ".b.json.x.tmp"
    young.write_text("live")
    past = time.time() - 100
    os.utime(killed, (past, past))
    assert remove_temp_files(tmp_path, min_age_s=50) == [killed]
    assert young.exists() and (tmp_path / "keep.tmp").exists() and not (tmp_path / "a.json").exists()
    assert remove_temp_files(tmp_path) == [young] and remove_temp_files(tmp_path / "none") == []
