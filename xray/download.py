"""Download the NIH ChestX-ray14 release into an NIH-format folder, resumably and verified.

``download(out, parts=range(1, 13), jobs=2)`` fetches the chosen image archives of
:data:`xray.nih_release.PARTS` (or the same file names under a ``mirror`` URL prefix), ``jobs``
at a time, with one progress bar in bytes. Each archive:

1. is downloaded to ``out/.download/images_NN.tar.gz.part``; a dropped connection or a killed
   run continues from the bytes already there (HTTP ``Range``); a server that ignores ``Range``
   is read again from the start;
2. is unpacked in one pass into a hidden folder beside the result while it is verified: gzip
   integrity (CRC and length, to the end of the stream), tar integrity, only regular files
   ``images/<name>.png`` (no links, no paths outside), exactly the expected number of images,
   all within the part's name range;
3. only then is renamed to ``out/images_0NN`` (``images_0NN/images/*.png``, the NIH layout) with
   a ``.complete.json`` marker, and the archive is deleted. A part that fails verification is
   reported and fetched once more from scratch; a rerun skips every part whose folder is marked
   complete, so it is idempotent and fast.

Then the metadata: ``Data_Entry_2017_v2020.csv`` and ``BBox_List_2017.csv`` from the mirror when
it has them, else from torchxrayvision's shipped copies; ``train_val_list.txt``/``test_list.txt``
from the mirror when it has them, else the toolkit's split by patient id is used. Files already
in ``out`` are kept.
"""

from __future__ import annotations

import errno
import gzip
import http.client
import importlib.util
import json
import logging
import os
import re
import shutil
import socket
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from tqdm.auto import tqdm

from . import nih_release
from .errors import UserError
from .io import atomic_path, atomic_write_json, ensure_writable_dir
from .nih_release import Part

log = logging.getLogger(__name__)

DEFAULT_JOBS = 2
DEFAULT_PARTS = f"1-{len(nih_release.PARTS)}"  # all of them
DEFAULT_RETRIES = 5  # connection attempts per archive (each resumes where the last stopped)
DEFAULT_TIMEOUT = 60.0  # seconds without a byte before a connection counts as dropped
BLOCK = 1 << 20
STAGING = ".download"
MARKER = ".complete.json"
USER_AGENT = "boed-xray-download/1"
_NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, ConnectionError, socket.timeout, TimeoutError)


def parse_parts(spec: str | Iterable[int] | None, n_parts: int = len(nih_release.PARTS)) -> list[int]:
    """``"1-12"``, ``"1,3,5"``, ``"2-4,7"`` (or numbers) -> sorted part numbers; UserError otherwise."""
    if spec is None:
        return list(range(1, n_parts + 1))
    if not isinstance(spec, str):
        nums = sorted(set(int(x) for x in spec))
    else:
        nums = set()
        for item in spec.replace(" ", "").split(","):
            m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
            if not m:
                raise UserError(f"--parts {spec!r}: {item!r} is not a part number or range; expected e.g. 1-12, 1,3,5 or 2-4,7")
            a, b = int(m.group(1)), int(m.group(2) or m.group(1))
            if a > b:
                raise UserError(f"--parts {spec!r}: range {item} runs backwards; write it as {b}-{a}")
            nums.update(range(a, b + 1))
        nums = sorted(nums)
    bad = [x for x in nums if not 1 <= x <= n_parts]
    if bad or not nums:
        raise UserError(f"--parts {spec!r} names part {bad[0] if bad else 'none'}; the release has parts 1-{n_parts}")
    return nums


def check_mirror(mirror: str | None) -> str | None:
    if mirror is None:
        return None
    if not re.match(r"^https?://[^/\s]+", mirror):
        raise UserError(f"--mirror {mirror!r} is not an http(s) URL prefix; expected e.g. https://host/path/ "
                        "serving images_01.tar.gz ... images_12.tar.gz")
    return mirror.rstrip("/") + "/"


@dataclass
class PartResult:
    number: int
    status: str  # "present" (already complete), "downloaded"
    images: int
    bytes: int = 0
    attempts: int = 0


@dataclass
class DownloadReport:
    out: Path
    parts: list[PartResult] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)  # file -> where it came from

    def lines(self) -> list[str]:
        done = [p for p in self.parts if p.status == "downloaded"]
        kept = [p for p in self.parts if p.status == "present"]
        out = [f"{self.out}: {len(done)} part(s) downloaded ({sum(p.bytes for p in done) / 1e9:.2f} GB), "
               f"{len(kept)} already complete; {sum(p.images for p in self.parts)} images in parts "
               f"{','.join(str(p.number) for p in self.parts)}"]
        out += [f"  {name}: {how}" for name, how in self.metadata.items()]
        return out


class _Bar:
    """One byte-counting tqdm bar shared by the download threads (totals learnt as responses arrive)."""

    def __init__(self, progress: bool):
        self._bar = tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024, desc="download", disable=None if progress else True)
        self._lock = threading.Lock()

    def grow(self, n: int) -> None:
        with self._lock:
            self._bar.total = (self._bar.total or 0) + n
            self._bar.refresh()

    def update(self, n: int) -> None:
        with self._lock:
            self._bar.update(n)

    def close(self) -> None:
        self._bar.close()


class _Corrupt(Exception):
    """The archive is not a valid part (bad gzip/tar, wrong members): fetch it again."""


def _disk_full(e: OSError, path: Path) -> UserError:
    return UserError(f"no space left on the device holding {path} ({e.strerror or e}); free space (the full release needs "
                     "about 45 GB of archives in flight plus 45 GB unpacked) and rerun: finished parts are kept and "
                     "the download resumes")


def _content_range(value: str | None) -> tuple[int, int | None] | None:
    m = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", value or "")
    if not m:
        return None
    return int(m.group(1)), None if m.group(3) == "*" else int(m.group(3))


def fetch(url: str, dest: Path, bar: _Bar | None = None, retries: int = DEFAULT_RETRIES, timeout: float = DEFAULT_TIMEOUT,
          backoff: float = 1.0) -> int:
    """Download ``url`` to ``dest`` (a ``.part`` file), resuming from its current size; return the total bytes.

    Uses ``Range: bytes=<have>-``; a 206 answer is appended, a 200 answer (no Range support)
    restarts the file. A dropped connection or a short body is retried ``retries`` times, each
    resuming. Raises :class:`UserError` when every attempt failed or the server refuses the URL.
    """
    last_error = "no attempt"
    grown, counted = False, 0
    for attempt in range(max(retries, 1)):
        if attempt:
            time.sleep(backoff * min(2 ** (attempt - 1), 30))
        have = dest.stat().st_size if dest.is_file() else 0
        headers = {"User-Agent": USER_AGENT}
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:  # nothing after what we have: complete, or another file
                tail = (e.headers.get("Content-Range") or "").rsplit("/", 1)[-1]
                if tail.isdigit() and int(tail) == have:
                    return have
                dest.unlink()
                last_error = f"HTTP 416 with {have} bytes on disk; restarting"
                continue
            if e.code in (408, 429) or e.code >= 500:
                last_error = f"HTTP {e.code} {e.reason}"
                continue
            raise UserError(f"{url} answered HTTP {e.code} {e.reason}; check the URL (or --mirror) and retry later") from None
        except _NETWORK_ERRORS as e:
            last_error = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            continue
        with resp:
            length = resp.headers.get("Content-Length")
            length = int(length) if length and length.isdigit() else None
            if resp.status == 206:
                cr = _content_range(resp.headers.get("Content-Range"))
                if cr is None or cr[0] != have:  # not the bytes we asked for: start over
                    dest.unlink(missing_ok=True)
                    last_error = f"unexpected Content-Range {resp.headers.get('Content-Range')!r}"
                    continue
                total = cr[1]
                mode = "ab"
            else:  # 200: the whole file (the server ignores Range)
                if have:
                    log.info("%s: the server does not resume (no Range support); reading it again from the start", url)
                have, total, mode = 0, length, "wb"
            if bar is not None:
                if not grown:
                    bar.grow(total or 0)
                    grown = True
                bar.update(have - counted)  # the bar counts what is on disk for this file
                counted = have
            got = have
            try:
                with open(dest, mode) as f:
                    while True:
                        try:
                            block = resp.read(BLOCK)
                        except (http.client.IncompleteRead, *_NETWORK_ERRORS, OSError) as e:
                            if isinstance(e, OSError) and e.errno == errno.ENOSPC:
                                raise
                            last_error = f"connection dropped after {got} bytes ({type(e).__name__})"
                            break
                        if not block:
                            break
                        f.write(block)
                        got += len(block)
                        if bar is not None:
                            bar.update(len(block))
                            counted += len(block)
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    raise _disk_full(e, dest) from None
                raise UserError(f"cannot write {dest}: {e.strerror or e}; choose a writable --out") from None
            if total is None or got == total:
                return got
            if got > total:
                dest.unlink()
                last_error = f"received {got} bytes, more than the announced {total}"
                continue
            last_error = f"connection dropped after {got} of {total} bytes"
    raise UserError(f"download of {url} failed after {max(retries, 1)} attempt(s) ({last_error}); rerun to resume from "
                    f"the {dest.stat().st_size if dest.is_file() else 0} bytes kept in {dest}")


def _check_member(m: tarfile.TarInfo, part: Part) -> str | None:
    """The image name of a valid member, None for a directory; _Corrupt for anything else."""
    if m.isdir():
        if m.name.strip("/") not in ("images", ".", ""):
            raise _Corrupt(f"unexpected folder {m.name!r} in the archive")
        return None
    if not m.isfile():
        raise _Corrupt(f"member {m.name!r} is not a regular file (links are refused)")
    parts = m.name.lstrip("./").split("/")
    if len(parts) != 2 or parts[0] != "images" or not parts[1].endswith(".png") or parts[1].startswith("."):
        raise _Corrupt(f"member {m.name!r} is not images/<name>.png")
    name = parts[1]
    if len(name.encode()) > 255:  # no file system takes it (ENAMETOOLONG): a damaged or forged archive
        raise _Corrupt(f"member name {name[:40]!r}... is {len(name.encode())} bytes long, more than a file name can be")
    if not part.first <= name <= part.last:
        raise _Corrupt(f"image {name} does not belong to part {part.number} ({part.first} .. {part.last})")
    return name


def unpack_verified(archive: Path, part: Part, dest: Path) -> int:
    """Unpack ``archive`` into a new folder ``dest`` (``dest/images/*.png`` + marker) after verifying all of it.

    One pass: members go to a hidden temp folder beside ``dest`` while gzip and tar integrity, the
    member names and their count are checked; ``dest`` appears (by rename) only when everything
    passed. Raises ``_Corrupt`` for a bad archive, :class:`UserError` for a full disk.
    """
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.unpack-"))
    try:
        (tmp / "images").mkdir()
        seen: set[str] = set()
        try:
            with open(archive, "rb") as raw, gzip.GzipFile(fileobj=raw, mode="rb") as gz:
                with tarfile.open(fileobj=gz, mode="r|") as tf:
                    for m in tf:
                        name = _check_member(m, part)
                        if name is None:
                            continue
                        if name in seen:
                            raise _Corrupt(f"image {name} appears twice in the archive")
                        seen.add(name)
                        src = tf.extractfile(m)
                        with open(tmp / "images" / name, "wb") as f:
                            shutil.copyfileobj(src, f, BLOCK)
                            written = f.tell()
                        if written != m.size:
                            raise _Corrupt(f"image {name} is truncated in the archive")
                while gz.read(BLOCK):  # drain to the end of the gzip stream: checks its CRC and length
                    pass
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise _Corrupt(f"{type(e).__name__}: {e}") from None
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise _disk_full(e, dest) from None
            raise
        if len(seen) != part.n_images:
            raise _Corrupt(f"{len(seen)} images where part {part.number} holds {part.n_images}")
        atomic_write_json(tmp / MARKER, {"part": part.number, "images": len(seen), "archive": part.archive,
                                         "archive_bytes": archive.stat().st_size})
        if dest.exists():  # an incomplete folder from elsewhere: replaced, never merged
            shutil.rmtree(dest)
        os.rename(tmp, dest)
        return len(seen)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def is_complete(out: Path, part: Part) -> bool:
    """True when ``out/images_0NN`` holds this part: marked complete by an earlier run, or unpacked
    by hand (exactly the part's image names and count), which is then marked; never re-downloaded."""
    folder = out / part.folder
    try:
        with os.scandir(folder / "images") as it:
            names = [e.name for e in it]
    except OSError:
        return False
    if len(names) != part.n_images:
        return False
    try:
        marker = json.loads((folder / MARKER).read_text())
        return marker.get("images") == part.n_images
    except (OSError, ValueError):
        pass
    if all(n.endswith(".png") and part.first <= n <= part.last for n in names):
        atomic_write_json(folder / MARKER, {"part": part.number, "images": part.n_images, "archive": None,
                                            "note": "found unpacked; names and count checked"})
        return True
    return False


def _one_part(out: Path, part: Part, url: str, bar: _Bar, retries: int, timeout: float, backoff: float) -> PartResult:
    if is_complete(out, part):
        return PartResult(part.number, "present", part.n_images)
    staging = out / STAGING
    staging.mkdir(exist_ok=True)
    archive = staging / f"{part.archive}.part"
    for attempt in (1, 2):
        size = fetch(url, archive, bar, retries=retries, timeout=timeout, backoff=backoff)
        try:
            n = unpack_verified(archive, part, out / part.folder)
        except _Corrupt as e:
            archive.unlink(missing_ok=True)
            if attempt == 2:
                raise UserError(f"part {part.number} ({url}) is corrupt twice in a row ({e}); the source may be damaged: "
                                "try again later or use --mirror") from None
            log.warning("part %d: corrupt archive (%s); fetching it again", part.number, e)
            continue
        archive.unlink(missing_ok=True)
        return PartResult(part.number, "downloaded", n, size, attempt)
    raise AssertionError("unreachable")


def _get_small(url: str, dest: Path, timeout: float) -> bool:
    """Fetch a small file to ``dest`` atomically; False when the server does not have it (4xx)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": USER_AGENT}), timeout=timeout) as r:
            data = r.read()
    except urllib.error.HTTPError as e:
        if 400 <= e.code < 500:
            return False
        raise UserError(f"{url} answered HTTP {e.code} {e.reason}; retry later") from None
    except _NETWORK_ERRORS as e:
        raise UserError(f"cannot fetch {url}: {getattr(e, 'reason', e)}; check the network or --mirror and rerun") from None
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)
    return True


def _shipped(name: str) -> Path | None:
    """torchxrayvision's gzipped copy of ``name``, found without importing it (that takes seconds)."""
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "data" / f"{name}.gz"
    return p if p.is_file() else None


def fetch_metadata(out: Path, mirror: str | None, timeout: float = DEFAULT_TIMEOUT) -> dict[str, str]:
    """Put the label CSV, the box list and (when available) the split lists into ``out``; -> {file: source}."""
    where: dict[str, str] = {}
    for name in (nih_release.LABELS_CSV, nih_release.BBOX_CSV):
        dest = out / name
        if dest.is_file():
            where[name] = "already present"
        elif mirror and _get_small(mirror + name, dest, timeout):
            where[name] = f"from {mirror}"
        elif (src := _shipped(name)) is not None:
            with gzip.open(src, "rb") as f, atomic_path(dest) as tmp:
                tmp.write_bytes(f.read())
            where[name] = "torchxrayvision's shipped copy"
        else:
            where[name] = f"MISSING: install torchxrayvision or put {name} from {nih_release.BOX_FOLDER} here"
    have = []
    for name in nih_release.SPLIT_LISTS:
        dest = out / name
        if dest.is_file() or (mirror and _get_small(mirror + name, dest, timeout)):
            have.append(name)
    if len(have) == 2:
        where["split"] = "official lists (train_val_list.txt, test_list.txt)"
    else:
        where["split"] = ("the toolkit's split by patient id (the official train_val_list.txt / test_list.txt have no "
                          f"static link: put them from {nih_release.BOX_FOLDER} into {out} to use them)")
    return where


def download(out: str | os.PathLike, parts: str | Sequence[int] | None = None, jobs: int = DEFAULT_JOBS,
             mirror: str | None = None, retries: int = DEFAULT_RETRIES, timeout: float = DEFAULT_TIMEOUT,
             backoff: float = 1.0, progress: bool = True, table: Sequence[Part] | None = None) -> DownloadReport:
    """Download parts of the NIH release into the NIH-format folder ``out`` (see the module docstring).

    ``table``: the parts to choose from (default :data:`xray.nih_release.PARTS`). Validates every
    argument before creating anything; failures are one-line :class:`UserError` s.
    """
    table = nih_release.PARTS if table is None else table
    numbers = parse_parts(parts, len(table))
    mirror = check_mirror(mirror)
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise UserError(f"--jobs is {jobs!r}; expected a positive number of parallel downloads (e.g. {DEFAULT_JOBS})")
    if retries < 1:
        raise UserError(f"--retries is {retries}; expected at least 1")
    out_path = Path(out).expanduser()
    if out_path.exists() and not out_path.is_dir():
        raise UserError(f"--out {out_path} is a file; expected a folder (new or an earlier download)")
    out_path = ensure_writable_dir(out_path)
    by_number = {p.number: p for p in table}
    report = DownloadReport(out_path)
    try:
        report.metadata = fetch_metadata(out_path, mirror, timeout)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise _disk_full(e, out_path) from None
        raise
    bar = _Bar(progress)
    errors: dict[int, str] = {}
    try:
        with ThreadPoolExecutor(max_workers=min(jobs, len(numbers))) as pool:
            futures = {n: pool.submit(_one_part, out_path, by_number[n], (mirror + by_number[n].archive) if mirror else by_number[n].url,
                                      bar, retries, timeout, backoff) for n in numbers}
            for n, fut in futures.items():
                try:
                    report.parts.append(fut.result())
                except UserError as e:
                    errors[n] = str(e)
    finally:
        bar.close()
        staging = out_path / STAGING
        if staging.is_dir() and not any(staging.iterdir()):
            staging.rmdir()
    if errors:
        first = min(errors)
        raise UserError(f"{len(errors)} of {len(numbers)} part(s) failed (parts {','.join(map(str, sorted(errors)))}); "
                        f"part {first}: {errors[first]}")
    return report
