"""The records format: JSON lines, one file per writer, a provenance header on the first line.

Records are JSON lines appended to this writer's own ``records*.jsonl`` (flushed and fsynced after
each batch), so a killed run resumes where it stopped. Global batches of ``batch_size`` positions
go round-robin to shards (``--shard i/n``); under torchrun the batches of a shard are split again
round-robin over the ranks. Every writer process appends to its own file
(``records-<i>-of-<n>[-rank-<r>-of-<w>].jsonl``), holds an exclusive ``flock`` on it while
running, repairs only its own torn last line, and reads the other files without modifying them (a
torn last line there is skipped). The fingerprint (:meth:`.config.EvalConfig.fingerprint`) is
checked on every resume and merge with :func:`xray.provenance.check_same` (one-line error;
``--restart`` starts over), except that ``--repeats`` may grow (:data:`.config.GROWS`: the records
of fewer repeats are kept, each record checked against the fingerprint it was made with). The
metrics come from the union of the files.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Mapping

from xray.errors import UserError
from xray.integrity import LINE_KEY, open_line, seal_line
from xray.io import atomic_write_json, disk_full_error, is_disk_full
from xray.provenance import check_same

from .config import CONFIG_NAME, FLAGS, GROWS, PRE_DATA_KEYS, EvalConfig, key_of

try:
    import fcntl
except ImportError:  # no flock on this platform: one writer per file is then the user's job
    fcntl = None

log = logging.getLogger(__name__)


def records_path(out_dir: Path, shard: tuple[int, int], rank: tuple[int, int] = (0, 1)) -> Path:
    """This writer's own records file."""
    (i, n), (r, w) = shard, rank
    if n == 1 and w == 1:
        return out_dir / "records.jsonl"
    if w == 1:
        return out_dir / f"records-{i:03d}-of-{n:03d}.jsonl"
    if n == 1:
        return out_dir / f"records-{r:03d}-of-{w:03d}.jsonl"
    return out_dir / f"records-{i:03d}-of-{n:03d}-rank-{r:03d}-of-{w:03d}.jsonl"


def read_records_file(path: Path) -> tuple[dict | None, list[dict], int]:
    """``(header, records, good_end)`` of one records file, never modifying it.

    A torn last line (a kill, or a writer still mid-line) is left out; ``good_end`` is the byte
    offset where the complete lines end. Every line carries a checksum (:func:`xray.integrity.seal_line`;
    files whose header has none were written before checksums and are read unchecked): a damaged
    or edited line elsewhere is a UserError.
    """
    with open(path, "rb") as f:
        data = f.read()
    header, recs, good_end, sealed = None, [], 0, None
    lines = data.split(b"\n")
    for n, line in enumerate(lines):
        is_last = n == len(lines) - 1
        if not line.strip():
            good_end += len(line) + (0 if is_last else 1)
            continue
        if sealed is None:  # the first line (the header) says whether the file's lines are sealed
            sealed = f'"{LINE_KEY}"'.encode() in line
        try:
            if is_last:  # complete JSON without its newline: the writer always ends lines, so it is torn
                raise ValueError
            rec = open_line(line.decode("utf-8", "replace"), source=str(path), lineno=n + 1, require=sealed)
        except ValueError as e:
            if is_last or (not sealed and all(not l.strip() for l in lines[n + 1:])):
                break  # torn: the writer ends every line, so only a line without its newline is half-written
            raise UserError(f"{e} (the records file is damaged: delete it to recompute its records, or pass --restart)"
                            if str(e) else f"{path} line {n + 1} is damaged; delete the file or pass --restart") from None
        good_end += len(line) + 1
        if "header" in rec:
            header = header or rec["header"]
        else:
            recs.append(rec)
    return header, recs, good_end


RESUME_HINT = ("use the same flags to resume (a larger --repeats extends the evaluation), or pass --restart to start "
               "over (old outputs are moved aside)")


def _records_files(out_dir: str | Path) -> list[Path]:
    return sorted(Path(out_dir).glob("records*.jsonl"))


def load_records(out_dir: str | Path, fp: str | Mapping[str, int] | None = None) -> list[dict]:
    """All records of every writer's file in ``out_dir`` (later duplicates of a key are dropped).

    Read-only: a torn last line of any file is skipped, never cut off. With ``fp`` every record
    must carry that fingerprint digest (UserError otherwise); ``fp`` may be
    :meth:`.config.EvalConfig.accepted_digests` (digest -> repeats), then a record's repeat must
    also be one of its own fingerprint's.
    """
    # digest -> the repeats its records may have (None: any); this run's own digest is the one with the most
    accepted = None if fp is None else {fp: None} if isinstance(fp, str) else dict(fp)
    this = None if fp is None else fp if isinstance(fp, str) else max(accepted, key=accepted.get)

    def made_here(rec: dict) -> bool:
        if rec.get("fp") not in accepted:
            return False
        limit, repeat = accepted[rec["fp"]], rec.get("repeat")
        return limit is None or repeat is None or repeat < limit

    out: dict[tuple, dict] = {}
    for path in _records_files(out_dir):
        _, recs, _ = read_records_file(path)
        for rec in recs:
            if accepted is not None and not made_here(rec):
                raise UserError(f"{path.name} holds records made with fingerprint {rec.get('fp')}, this run has {this} "
                                f"(other models, data or flags); {RESUME_HINT}")
            first = out.setdefault(key_of(rec), rec)
            if first is not rec and first != rec:
                raise UserError(f"{path.name} holds two different records of {key_of(rec)}; the records were edited: "
                                "delete the file to recompute its records, or pass --restart")
    return list(out.values())


def grown(old: Mapping, new: Mapping) -> Mapping:
    """``old`` (a stored fingerprint) with the :data:`.config.GROWS` fields that ``new`` raises set to
    ``new``'s: an evaluation that a resume with more repeats extends compares equal."""
    up = {k: new[k] for k in GROWS if isinstance(old.get(k), int) and isinstance(new.get(k), int) and old[k] <= new[k]}
    return {**old, **up}


def check_records_provenance(out_dir: Path, cfg: EvalConfig) -> None:
    """Every records file's header and every record must carry ``cfg``'s fingerprint, or one with
    fewer repeats (works without ``eval_config.json``)."""
    new = cfg.fingerprint()
    for path in _records_files(out_dir):
        header, recs, _ = read_records_file(path)
        if header is not None:
            check_same(f"{path}", grown(header.get("fingerprint", {}), new), new, flags=FLAGS,
                       hint=RESUME_HINT)
        elif recs:
            raise UserError(f"{path} has records but no provenance header (made by an older boed); "
                            "pass --restart to start over")
    load_records(out_dir, fp=cfg.accepted_digests())


def config_from_out(out_dir: Path) -> EvalConfig:
    """The evaluation config of ``out_dir``: ``eval_config.json``, else the records files' headers."""
    path = out_dir / CONFIG_NAME
    if path.is_file():
        try:
            return EvalConfig.from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError:
            raise UserError(f"{path} is not valid JSON; re-run any shard's command to rewrite it") from None
    for f in _records_files(out_dir):
        header, _, _ = read_records_file(f)
        if header is not None and "config" in header:
            return EvalConfig.from_dict(header["config"])
    raise UserError(f"no evaluation in {out_dir} (no {CONFIG_NAME} and no records); run `boed evaluate --out {out_dir} ...` first")


def check_shards(out_dir: Path, cfg: EvalConfig) -> None:
    """``--merge``: every shard's header and records must carry ``cfg``'s fingerprint."""
    new = cfg.fingerprint()
    for path in _records_files(out_dir):
        header, recs, _ = read_records_file(path)
        if header is None:
            if recs:
                raise UserError(f"shard file {path} has no provenance header (made by an older boed); re-run its shard with --restart")
            continue
        check_same(f"shard file {path}", new, grown(header.get("fingerprint", {}), new),
                   hint="the shards were made with different models, data or flags: re-run that shard with the "
                        "flags of the others (or delete its file), then merge again")
    load_records(out_dir, fp=cfg.accepted_digests())


def _stored_fingerprint(out_dir: Path) -> dict | None:
    """The fingerprint in ``out_dir/eval_config.json`` (None when there is no such file)."""
    path = out_dir / CONFIG_NAME
    if not path.is_file():
        return None
    try:
        old = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path} is not valid JSON; pass --restart to start over (old outputs are moved aside)") from None
    if not isinstance(old, dict) or not isinstance(old.get("fingerprint"), dict):
        raise UserError(f"{out_dir} holds an evaluation made by an older boed (no fingerprint in {CONFIG_NAME}); "
                        "pass --restart to start over or use a new --out")
    return old["fingerprint"]


def batch_fingerprinted(out_dir: str | Path) -> bool:
    """False when ``out_dir`` holds an evaluation begun before ``--batch-size`` was part of the
    fingerprint (its ``eval_config.json`` or a records header has none): such a folder resumes and
    merges with the fingerprint it was made with, under the batch size of the resuming run."""
    out_dir = Path(out_dir)
    fps = []
    try:
        if (out_dir / CONFIG_NAME).is_file():
            fps.append(json.loads((out_dir / CONFIG_NAME).read_text()).get("fingerprint"))
        for path in _records_files(out_dir):
            with open(path, "rb") as f:
                fps.append((json.loads(f.readline()) or {}).get("header", {}).get("fingerprint"))
    except (OSError, ValueError, AttributeError):
        return True  # unreadable or damaged: the full checks report it
    return not any(isinstance(fp, dict) and "batch_size" not in fp for fp in fps)


def precheck_resume(out_dir: str | Path, cfg: EvalConfig) -> None:
    """:func:`check_resume` on the fields known before the test data is opened (:data:`.config.PRE_DATA_KEYS`:
    flags and model digests), reading nothing but ``eval_config.json`` and the records files' first
    lines: a resume with a changed flag is refused before any prepared cache is built or folder made.
    ``cfg`` may hold placeholder ``indices`` and ``data``; they are not compared."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return

    def part(fp: dict) -> dict:
        return {k: v for k, v in fp.items() if k in PRE_DATA_KEYS}

    new = part(cfg.fingerprint())
    old = _stored_fingerprint(out_dir)
    if old is not None:
        check_same(f"the evaluation in {out_dir}", part(grown(old, new)), new, flags=FLAGS, hint=RESUME_HINT)
    for path in _records_files(out_dir):
        try:
            with open(path, "rb") as f:
                header = json.loads(f.readline()).get("header")
        except (OSError, ValueError, AttributeError):
            continue  # unreadable or damaged: the full check reports it
        if isinstance(header, dict) and isinstance(header.get("fingerprint"), dict):
            check_same(f"{path}", part(grown(header["fingerprint"], new)), new, flags=FLAGS,
                       hint=RESUME_HINT)


def check_resume(out_dir: Path, cfg: EvalConfig) -> None:
    """Check that ``eval_config.json`` (when there) and every records file describe the same
    records as ``cfg`` (one-line UserError naming the flag that changed, else the first differing
    field); write the config."""
    path = out_dir / CONFIG_NAME
    old, new = _stored_fingerprint(out_dir), cfg.fingerprint()
    if old is not None:
        if grown(old, new) != old:
            log.info("%s: --repeats %d extends the evaluation's %d repeats (their records are kept)", out_dir,
                     new["repeats"], old["repeats"])
        check_same(f"the evaluation in {out_dir}", grown(old, new), new, flags=FLAGS, hint=RESUME_HINT)
    check_records_provenance(out_dir, cfg)
    atomic_write_json(path, cfg.to_dict())


class RecordsWriter:
    """This process's records file: exclusive ``flock`` while open (a second writer of the same
    shard/rank is refused), its own torn last line cut off, a provenance header on the first line,
    appends flushed and fsynced. Never touches any other file."""

    def __init__(self, path: Path, header: dict):
        self.path = Path(path)
        self._f = open(self.path, "a+b")
        try:
            if fcntl is not None:
                fcntl.flock(self._f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):  # e.g. a file system without locks
                warnings.warn(f"cannot lock {self.path} ({e.strerror}); make sure each shard runs once at a time",
                              stacklevel=2)
            else:
                self._f.close()
                raise UserError(f"another process is writing {self.path} (the same shard/rank of this evaluation); "
                                "run each shard once at a time") from None
        _, _, good_end = read_records_file(self.path)
        size = self._f.seek(0, os.SEEK_END)
        if good_end < size:
            log.warning("%s: dropping a torn last record (%d bytes) from an interrupted run", self.path, size - good_end)
            self._f.truncate(good_end)
        if good_end == 0:
            self._write_text(seal_line({"header": header}) + "\n")

    def _write_text(self, text: str) -> None:
        """Append whole lines; on a full disk cut back to the last complete line and say so in one line."""
        end = self._f.seek(0, os.SEEK_END)
        try:
            self._f.write(text.encode("utf-8"))
            self._f.flush()
            os.fsync(self._f.fileno())
        except OSError as e:
            if not is_disk_full(e):
                raise
            self._f.truncate(end)
            raise disk_full_error(e, self.path, len(text)) from None

    def append(self, records: list[dict]) -> None:
        if records:
            self._write_text("".join(seal_line(r) + "\n" for r in records))

    def close(self) -> None:
        self._f.close()  # releases the lock


def missing_records(out_dir: str | Path, cfg: EvalConfig) -> int:
    have = {key_of(r) for r in load_records(out_dir, fp=cfg.accepted_digests())}
    return len(cfg.expected_keys() - have)
