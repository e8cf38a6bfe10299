"""`xray download` against a local HTTP server on 127.0.0.1 serving small fake parts (never the internet)."""

from __future__ import annotations

import errno
import gzip
import io
import logging
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.xray.conftest import image_for
from xray import download as dl
from xray import nih_release
from xray.errors import UserError
from xray.nih_release import Part

PER_PART = 6


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image_for(i, 16)).save(buf, format="PNG")
    return buf.getvalue()


def _names(k: int) -> list[str]:
    return [f"{(k - 1) * PER_PART // 2 + j // 2 + 1:08d}_{j % 2:03d}.png" for j in range(PER_PART)]


def make_part(k: int, names: list[str] | None = None) -> bytes:
    """A tar.gz holding images/<name>.png like the NIH archives."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tf:
        d = tarfile.TarInfo("images")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)
        for j, name in enumerate(names or _names(k)):
            data = _png(k * 100 + j)
            info = tarfile.TarInfo(f"images/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), mtime=0)


class Server:
    """http.server in a thread: files by path, optional Range support, one-shot drops and corruptions."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.ranges = True
        self.drop_once: set[str] = set()
        self.corrupt: dict[str, int] = {}  # path -> how many more times to serve corrupted bytes
        self.requests: list[tuple[str, str | None]] = []
        srv = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                srv.requests.append((self.path, self.headers.get("Range")))
                data = srv.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                if srv.corrupt.get(self.path, 0) > 0:
                    srv.corrupt[self.path] -= 1
                    data = bytearray(data)
                    mid = len(data) // 2
                    data[mid:mid + 16] = bytes(16)  # damage inside the deflate stream
                    data = bytes(data)
                start = 0
                rng = self.headers.get("Range")
                if srv.ranges and rng and rng.startswith("bytes="):
                    start = int(rng[6:].split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.path in srv.drop_once:
                    srv.drop_once.discard(self.path)
                    self.wfile.write(body[:len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def table_for(server: Server, n_parts: int = 2) -> list[Part]:
    parts = []
    for k in range(1, n_parts + 1):
        names = _names(k)
        server.files[f"/p{k}.gz"] = make_part(k)
        parts.append(Part(k, f"{server.url}/p{k}.gz", PER_PART, names[0], names[-1]))
    return parts


def _csv(out: Path, n_parts: int = 2) -> None:
    """A small label CSV in the out folder, so metadata is 'already present' (no torchxrayvision copy)."""
    from xray.nih import write_labels_csv

    rows = [{"Image Index": n, "Finding Labels": "No Finding", "Patient ID": int(n[:8])}
            for k in range(1, n_parts + 1) for n in _names(k)]
    out.mkdir(parents=True, exist_ok=True)
    write_labels_csv(out / "Data_Entry_2017_v2020.csv", rows)
    (out / "BBox_List_2017.csv").write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\n")


def run(out, table, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("backoff", 0.0)
    kw.setdefault("timeout", 5.0)
    return dl.download(out, table=table, **kw)


def _check_layout(out: Path, k: int):
    folder = out / f"images_{k:03d}" / "images"
    assert sorted(p.name for p in folder.iterdir()) == _names(k)
    got = np.asarray(Image.open(folder / _names(k)[1]))
    np.testing.assert_array_equal(got, image_for(k * 100 + 1, 16))


def test_downloads_verifies_unpacks_then_rerun_is_idempotent(server, tmp_path):
    table = table_for(server)
    out = tmp_path / "nih"
    _csv(out)
    report = run(out, table, jobs=2)
    assert [(p.number, p.status, p.images) for p in report.parts] == [(1, "downloaded", 6), (2, "downloaded", 6)]
    for k in (1, 2):
        _check_layout(out, k)
        assert (out / f"images_{k:03d}" / dl.MARKER).is_file()
    assert not (out / dl.STAGING).exists() and not list(out.glob(".images_*"))  # no archives, no temp folders
    n = len(server.requests)
    again = run(out, table, jobs=2)
    assert [p.status for p in again.parts] == ["present", "present"] and len(server.requests) == n  # nothing fetched
    from xray import nih
    assert len(nih.find_images(out)) == 12
    assert "toolkit's split by patient" in report.metadata["split"]


def test_metadata_from_torchxrayvision_copies(tmp_path):
    if dl._shipped(nih_release.LABELS_CSV) is None:
        pytest.skip("torchxrayvision is not installed")
    where = dl.fetch_metadata(tmp_path, None)
    assert where["Data_Entry_2017_v2020.csv"] == where["BBox_List_2017.csv"] == "torchxrayvision's shipped copy"
    from xray import nih
    lines = (tmp_path / "Data_Entry_2017_v2020.csv").read_text().splitlines()
    assert lines[0].startswith("Image Index,Finding Labels") and len(lines) == nih_release.N_IMAGES + 1
    assert len(nih.read_bboxes(tmp_path / "BBox_List_2017.csv")) > 900
    assert dl.fetch_metadata(tmp_path, None)["Data_Entry_2017_v2020.csv"] == "already present"


def test_a_part_unpacked_by_hand_is_adopted_not_refetched(server, tmp_path):
    table = table_for(server, 1)
    out = tmp_path / "nih"
    _csv(out, 1)
    folder = out / "images_001" / "images"
    folder.mkdir(parents=True)
    for j, name in enumerate(_names(1)):
        (folder / name).write_bytes(_png(100 + j))
    assert [p.status for p in run(out, table, parts="1").parts] == ["present"] and server.requests == []
    assert (out / "images_001" / dl.MARKER).is_file()
    (folder / _names(1)[0]).unlink()  # one image short: fetched and replaced by the verified archive
    run(out, table, parts="1")
    _check_layout(out, 1)


def test_dropped_connection_resumes_with_range(server, tmp_path):
    table = table_for(server, 1)
    server.drop_once.add("/p1.gz")
    out = tmp_path / "nih"
    _csv(out, 1)
    run(out, table, parts="1")
    _check_layout(out, 1)
    gets = [r for r in server.requests if r[0] == "/p1.gz"]
    half = len(server.files["/p1.gz"]) // 2
    assert gets == [("/p1.gz", None), ("/p1.gz", f"bytes={half}-")]  # the second asks for the rest only


def test_killed_download_resumes_from_part_file(server, tmp_path):
    table = table_for(server, 1)
    out = tmp_path / "nih"
    _csv(out, 1)
    (out / dl.STAGING).mkdir()
    (out / dl.STAGING / "images_01.tar.gz.part").write_bytes(server.files["/p1.gz"][:100])
    run(out, table, parts="1")
    _check_layout(out, 1)
    assert server.requests[-1] == ("/p1.gz", "bytes=100-")


def test_server_without_range_support_restarts(server, tmp_path):
    table = table_for(server, 1)
    server.ranges = False
    server.drop_once.add("/p1.gz")
    out = tmp_path / "nih"
    _csv(out, 1)
    run(out, table, parts="1")
    _check_layout(out, 1)
    assert len([r for r in server.requests if r[0] == "/p1.gz"]) == 2


def test_corrupt_part_is_reported_and_fetched_again(server, tmp_path, caplog):
    table = table_for(server, 1)
    server.corrupt["/p1.gz"] = 1
    out = tmp_path / "nih"
    _csv(out, 1)
    with caplog.at_level(logging.WARNING, logger="xray.download"):
        run(out, table, parts="1")
    assert "part 1: corrupt archive" in caplog.text
    _check_layout(out, 1)
    # corrupt every time: a one-line error, nothing unpacked, no temp folders
    out2 = tmp_path / "nih2"
    _csv(out2, 1)
    server.corrupt["/p1.gz"] = 5
    with pytest.raises(UserError, match="corrupt twice"):
        run(out2, table, parts="1")
    assert not (out2 / "images_001").exists() and not list(out2.glob(".images_*"))


def test_wrong_members_are_refused(server, tmp_path):
    table = table_for(server, 1)
    server.files["/p1.gz"] = make_part(1, _names(1)[:-1])  # one image short
    out = tmp_path / "nih"
    _csv(out, 1)
    with pytest.raises(UserError, match="5 images where part 1 holds 6"):
        run(out, table, parts="1")
    server.files["/p1.gz"] = make_part(1, _names(1)[:-1] + ["00099999_000.png"])
    with pytest.raises(UserError, match="does not belong to part 1"):
        run(out, table, parts="1")
    assert not (out / "images_001").exists()
    long = _names(1)[0][:-4] + "x" * 300 + ".png"  # sorts inside the part's range; no file system takes it
    server.files["/p1.gz"] = make_part(1, _names(1)[:-1] + [long])
    with pytest.raises(UserError, match="bytes long, more than a file name can be") as e:
        run(out, table, parts="1")
    assert "\n" not in str(e.value) and not (out / "images_001").exists()


def test_cli_with_mirror_ends_with_info(server, tmp_path, monkeypatch, capsys):
    from xray.cli import main

    table = table_for(server)
    # the official links point nowhere reachable: only the mirror can succeed
    monkeypatch.setattr(nih_release, "PARTS", tuple(Part(p.number, "http://127.0.0.1:9/nope", p.n_images, p.first, p.last) for p in table))
    for p in table:
        server.files[f"/mirror/{p.archive}"] = server.files[f"/p{p.number}.gz"]
    src = tmp_path / "src"
    _csv(src)
    names = [n for k in (1, 2) for n in _names(k)]
    server.files["/mirror/Data_Entry_2017_v2020.csv"] = (src / "Data_Entry_2017_v2020.csv").read_bytes()
    server.files["/mirror/BBox_List_2017.csv"] = (src / "BBox_List_2017.csv").read_bytes()
    server.files["/mirror/test_list.txt"] = "\n".join(names[:4]).encode()
    server.files["/mirror/train_val_list.txt"] = "\n".join(names[4:]).encode()
    out = tmp_path / "nih"
    with pytest.raises(SystemExit) as e:
        main(["download", "--out", str(out), "--parts", "1-2", "--mirror", f"{server.url}/mirror/", "--no-progress"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "2 part(s) downloaded" in text and "official lists" in text
    assert f"NIH-format folder {out}" in text and "missing images: 0 of 12" in text  # the `xray info` summary
    assert not any("nope" in r[0] for r in server.requests)


def test_partial_download_then_present_only_prepare(server, tmp_path):
    from xray import cache

    table = table_for(server, 2)
    out = tmp_path / "nih"
    _csv(out, 2)
    run(out, table, parts="2")
    with pytest.raises(UserError, match="6 of 12 images are missing"):
        cache.prepare(out, 8, workers=0, progress=False)
    c = cache.prepare(out, 8, workers=0, progress=False, present_only=True)
    assert cache.read_manifest(c)["n_images"] == 6 and cache.read_manifest(c)["n_absent"] == 6


class _FullDisk(io.RawIOBase):
    def write(self, b):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_is_one_line_and_leaves_nothing_unpacked(server, tmp_path, monkeypatch, capsys):
    from xray.cli import main

    table = table_for(server, 1)
    monkeypatch.setattr(nih_release, "PARTS", tuple(table))
    out = tmp_path / "nih"
    _csv(out, 1)

    def full(src, dst, length=0):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dl.shutil, "copyfileobj", full)  # unpacking hits a full disk
    with pytest.raises(SystemExit) as e:
        main(["download", "--out", str(out), "--parts", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "no space left" in err
    assert not (out / "images_001").exists() and not list(out.glob(".images_*"))
    assert (out / dl.STAGING / "images_01.tar.gz.part").is_file()  # the verified archive stays for the rerun
    monkeypatch.undo()
    (out / dl.STAGING / "images_01.tar.gz.part").unlink()

    real_open = open

    def open_full(path, mode="r", *a, **k):  # the download itself hits a full disk
        if str(path).endswith(".part") and "b" in mode and ("a" in mode or "w" in mode):
            return _FullDisk()
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr(nih_release, "PARTS", tuple(table))
    monkeypatch.setattr(dl, "open", open_full, raising=False)
    with pytest.raises(SystemExit) as e:
        main(["download", "--out", str(out), "--parts", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "no space left" in err and "resumes" in err
    assert not (out / "images_001").exists()


@pytest.mark.parametrize("argv, message", [
    (["--parts", "0"], "the release has parts 1-"),
    (["--parts", "13"], "the release has parts 1-"),
    (["--parts", "a"], "is not a part number"),
    (["--parts", "3-1"], "runs backwards"),
    (["--jobs", "0"], "--jobs is 0"),
    (["--mirror", "ftp://x/"], "not an http"),
    (["--timeout", "0"], "--timeout: 0 is out of range"),
    (["--timeout", "nan"], "--timeout: 'nan' is not finite"),
])
def test_bad_flags_exit_2_and_create_nothing(tmp_path, capsys, argv, message):
    from xray.cli import main

    out = tmp_path / "new"
    with pytest.raises(SystemExit) as e:
        main(["download", "--out", str(out), "--no-progress", *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("\n") == 1
    assert not out.exists()


def test_unwritable_out(tmp_path, capsys):
    from xray.cli import main

    blocker = tmp_path / "file"
    blocker.write_text("x")
    for out in (blocker, blocker / "sub"):
        with pytest.raises(SystemExit) as e:
            main(["download", "--out", str(out), "--parts", "1", "--no-progress"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and ("is a file" in err or "cannot write" in err)
    assert blocker.read_text() == "x"


def test_release_table_is_consistent():
    parts = nih_release.PARTS
    assert [p.number for p in parts] == list(range(1, 13)) and sum(p.n_images for p in parts) == nih_release.N_IMAGES
    assert all(a.last < b.first for a, b in zip(parts, parts[1:]))
    assert all(p.url.startswith("https://nihcc.box.com/shared/static/") and p.url.endswith(".gz") for p in parts)
    assert (parts[0].archive, parts[0].folder) == ("images_01.tar.gz", "images_001")
    assert dl.parse_parts("2-4,7, 3") == [2, 3, 4, 7] and dl.parse_parts(None) == list(range(1, 13))


def test_release_table_matches_the_shipped_csv():
    """Counts and name ranges agree with the real label CSV torchxrayvision ships."""
    import pandas as pd

    shipped = dl._shipped(nih_release.LABELS_CSV)
    if shipped is None:
        pytest.skip("torchxrayvision is not installed")
    names = sorted(pd.read_csv(shipped, usecols=["Image Index"])["Image Index"])
    assert len(names) == nih_release.N_IMAGES
    for p in nih_release.PARTS:
        inside = [n for n in names if p.first <= n <= p.last]
        assert len(inside) == p.n_images and inside[0] == p.first and inside[-1] == p.last
