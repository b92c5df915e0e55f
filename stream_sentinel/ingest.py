"""From files in ``raw/`` to rows in DuckDB.

Three steps, each idempotent so any of them can be replayed after a crash:

1. :func:`scan` finds stable record files under ``raw/`` and registers each *content*
   (sha256) once in ``files``; a second name for the same bytes is a duplicate.
2. :func:`plan_batches` cuts pending files into micro-batches with deterministic run
   keys. The batch is stored before a run is requested, so a daemon that dies between
   the two re-requests the same key and Dagster drops the copy.
3. :func:`process_file` parses one file in one transaction (:func:`process_files` a group
   of small ones in one): valid records are inserted
   (an id seen before with the same content is skipped, with other content rejected),
   invalid ones land in ``rejects``; an unreadable file is moved to
   ``failed/<date>/`` beside a ``<name>.error.json`` that says what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from itertools import islice
from pathlib import Path
from typing import Iterable

import pandas as pd

from .atomic import write_json_atomic
from .config import Paths
from .records import FileUnparseable, Record, Reject, is_json_lines, is_record_file, read_records
from .store import Store

log = logging.getLogger(__name__)

CHUNK_RECORDS = 5000


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


# --------------------------------------------------------------------------- scanning


@dataclass(frozen=True)
class FileSeen:
    rel_path: str
    size: int
    mtime_ns: int


@dataclass
class ScanResult:
    registered: list[str] = field(default_factory=list)  # sha256 of new contents
    duplicates: list[str] = field(default_factory=list)  # rel paths whose content was known
    unstable: list[str] = field(default_factory=list)  # still being written
    skipped_links: list[str] = field(default_factory=list)  # symlinks pointing out of raw/


def _walk(raw: Path, result: ScanResult) -> Iterable[tuple[Path, FileSeen]]:
    raw_real = raw.resolve()
    stack = [raw]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except FileNotFoundError:
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue  # hidden files and editors' temp files
            path = Path(entry.path)
            if entry.is_symlink():
                target = path.resolve()
                if not target.is_relative_to(raw_real):
                    result.skipped_links.append(str(path.relative_to(raw)))
                    continue
                if target.is_dir():
                    continue  # never walk into linked folders: loops and double counting
            if entry.is_dir(follow_symlinks=False):
                stack.append(path)
                continue
            if not is_record_file(entry.name):
                continue
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            yield path, FileSeen(str(path.relative_to(raw)), st.st_size, st.st_mtime_ns)


def _hash_and_count(path: Path) -> tuple[str, int]:
    """sha256 of the bytes, plus a cheap record estimate used to size micro-batches."""
    h = hashlib.sha256()
    newlines = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
            newlines += chunk.count(b"\n")
    if path.name.lower().endswith(".gz"):
        est = max(1, path.stat().st_size // 400)  # unknown without inflating; ~400 B/record gz
    elif is_json_lines(path.name):
        est = max(1, newlines)
    else:
        est = max(1, newlines // 4) if newlines > 4 else 1
    return h.hexdigest(), est


def scan(paths: Paths, store: Store, debounce_s: float = 2.0, now: datetime | None = None,
         lock_timeout_s: float | None = None) -> ScanResult:
    """Register every stable, not yet known file under ``raw/``.

    A file is stable when its mtime is at least ``debounce_s`` old and its size and
    mtime did not change while it was hashed (a writer still appending changes both).
    ``now`` fixes the arrival time (tests, backfill demos); it defaults to the clock.
    """
    now = now or utcnow()
    result = ScanResult()
    candidates = list(_walk(paths.raw, result))
    if not candidates:
        return result
    with store.connect(read_only=True, timeout_s=lock_timeout_s) as con:
        known = {(p, s, m) for p, s, m in con.execute("SELECT path, size, mtime_ns FROM file_paths").fetchall()}
    wall = time.time_ns()
    fresh: list[tuple[FileSeen, str, int]] = []
    for path, seen in candidates:
        if (seen.rel_path, seen.size, seen.mtime_ns) in known:
            continue
        if wall - seen.mtime_ns < debounce_s * 1e9:
            result.unstable.append(seen.rel_path)
            continue
        try:
            sha, est = _hash_and_count(path)
            st = path.stat()
        except FileNotFoundError:
            continue
        if (st.st_size, st.st_mtime_ns) != (seen.size, seen.mtime_ns):
            result.unstable.append(seen.rel_path)
            continue
        fresh.append((seen, sha, est))
    if not fresh:
        return result
    with store.transaction(timeout_s=lock_timeout_s) as con:
        for seen, sha, est in fresh:
            exists = con.execute("SELECT 1 FROM files WHERE sha256 = ?", [sha]).fetchone()
            con.execute(
                "INSERT INTO file_paths VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                [seen.rel_path, seen.size, seen.mtime_ns, sha, exists is not None, now],
            )
            if exists:
                result.duplicates.append(seen.rel_path)
                continue
            con.execute(
                """INSERT INTO files (sha256, path, size, arrived_at, arrival_date, est_records, status)
                   VALUES (?, ?, ?, ?, ?, ?, 'pending')""",
                [sha, seen.rel_path, seen.size, now, now.date(), est],
            )
            result.registered.append(sha)
    return result


# --------------------------------------------------------------------------- batching


@dataclass(frozen=True)
class Batch:
    seq: int
    run_key: str
    partition_key: str
    files: tuple[str, ...]  # sha256s
    est_records: int


def plan_batches(store: Store, max_files: int = 100, max_records: int = 5000,
                 lock_timeout_s: float | None = None, tail_waits: bool = False) -> list[Batch]:
    """Cut pending files into micro-batches and persist them; returns the new ones.

    ``tail_waits`` (the sensor's setting): when a backlog fills at least one whole batch of a
    partition, the partial batch left over at its end stays pending. It would run after the
    full ones anyway, and by the time the sensor plans again (once those have started) it has
    grown by what arrived meanwhile: under a backlog every run is a full one, instead of a full
    one followed by a small one that pays a whole run's start-up for a few files."""
    new: list[Batch] = []
    with store.transaction(timeout_s=lock_timeout_s) as con:
        rows = con.execute(
            """SELECT sha256, CAST(arrival_date AS VARCHAR), est_records FROM files
               WHERE status = 'pending' ORDER BY arrived_at, path""").fetchall()
        groups: list[tuple[str, list[tuple[str, int]]]] = []
        for sha, part, est in rows:
            if (not groups or groups[-1][0] != part or len(groups[-1][1]) >= max_files
                    or (groups[-1][1] and sum(e for _, e in groups[-1][1]) + est > max_records)):
                groups.append((part, []))
            groups[-1][1].append((sha, est))
        if tail_waits and len(groups) > 1 and groups[-1][0] == groups[-2][0]:
            groups.pop()  # the newest partition's partial tail; the groups before it are full
        for part, members in groups:
            shas = tuple(sorted(s for s, _ in members))
            digest = hashlib.sha256("\n".join(shas).encode()).hexdigest()[:16]
            run_key = f"raw:{part}:{digest}"
            seq = con.execute("SELECT nextval('batch_seq')").fetchone()[0]
            est = sum(e for _, e in members)
            con.execute("INSERT INTO batches VALUES (?, ?, ?, ?, ?, ?)",
                        [seq, run_key, part, len(shas), est, utcnow()])
            con.executemany("UPDATE files SET status = 'batched', batch_seq = ? WHERE sha256 = ?",
                            [[seq, s] for s in shas])
            new.append(Batch(seq, run_key, part, shas, est))
    return new


def batches_after(store: Store, seq: int, lock_timeout_s: float | None = None) -> list[Batch]:
    """Batches cut after ``seq`` (what a sensor cursor has not requested yet)."""
    with store.connect(read_only=True, timeout_s=lock_timeout_s) as con:
        rows = con.execute(
            """SELECT b.seq, b.run_key, b.partition_key, b.est_records, list(f.sha256 ORDER BY f.sha256)
               FROM batches b JOIN files f ON f.batch_seq = b.seq
               WHERE b.seq > ? GROUP BY ALL ORDER BY b.seq""", [seq]).fetchall()
    return [Batch(s, k, p, tuple(files), est) for s, k, p, est, files in rows]


def unfinished_batches(store: Store) -> list[Batch]:
    """Batches whose files are not all processed or quarantined (for ``run --once``)."""
    with store.connect(read_only=True) as con:
        rows = con.execute(
            """SELECT b.seq, b.run_key, b.partition_key, b.est_records, list(f.sha256 ORDER BY f.sha256)
               FROM batches b JOIN files f ON f.batch_seq = b.seq
               GROUP BY ALL HAVING bool_or(f.status = 'batched') ORDER BY b.seq""").fetchall()
    return [Batch(s, k, p, tuple(files), est) for s, k, p, est, files in rows]


# --------------------------------------------------------------------------- processing


@dataclass
class FileOutcome:
    sha256: str
    path: str
    status: str  # processed | quarantined | missing
    ingested: int = 0
    skipped: int = 0  # already present with identical content (idempotent replay)
    rejected: int = 0
    error: str | None = None


def files_for_partition(store: Store, partition_key: str) -> list[str]:
    with store.connect(read_only=True) as con:
        return [r[0] for r in con.execute(
            """SELECT sha256 FROM files WHERE arrival_date = CAST(? AS DATE)
               AND status IN ('pending', 'batched', 'processed') ORDER BY arrived_at, path""",
            [partition_key]).fetchall()]


@dataclass
class _Parsed:
    """One file's parsed content on its way into the database."""

    out: FileOutcome
    arrival: date
    recs: list[Record]
    rejects: list[Reject]


def _record_rows(fresh: list[tuple[Record, _Parsed]], now: datetime) -> pd.DataFrame:
    dump = lambda v: None if v is None else json.dumps(v, ensure_ascii=False)  # noqa: E731
    recs = [r for r, _ in fresh]
    return pd.DataFrame({
        "id": [r.id for r in recs],
        "text": [r.text for r in recs],
        "event_time": pd.to_datetime([r.event_time for r in recs], utc=True),
        "features": [dump(r.features) for r in recs],
        "label": [dump(r.label) for r in recs],
        "extra": [dump(r.extra) if r.extra else None for r in recs],
        "content_hash": [r.content_hash for r in recs],
        "file_sha256": [f.out.sha256 for _, f in fresh],
        "position": [r.position for r in recs],
        "arrival_date": pd.to_datetime([f.arrival for _, f in fresh]),
        "ingested_at": pd.Timestamp(now),
    })


def _flush(con, parsed: list[_Parsed]) -> None:
    """Insert the records and rejects of one or more files (in order) in the caller's
    transaction. An id seen before is skipped when its content is identical and rejected
    when it is not; inside the batch the first occurrence wins, the same rule."""
    now = utcnow()
    recs = [r for f in parsed for r in f.recs]
    existing: dict[str, str] = {}
    if recs:
        con.register("chunk_ids", pd.DataFrame({"id": [r.id for r in recs]}))
        existing = dict(con.execute(
            "SELECT r.id, r.content_hash FROM records r JOIN chunk_ids c USING (id)").fetchall())
        con.unregister("chunk_ids")
    fresh: list[tuple[Record, _Parsed]] = []
    for f in parsed:
        for r in f.recs:
            prev = existing.get(r.id)
            if prev is None:
                existing[r.id] = r.content_hash
                fresh.append((r, f))
                f.out.ingested += 1
            elif prev == r.content_hash:
                f.out.skipped += 1
            else:
                f.rejects.append(Reject(r.position, "duplicate_id",
                                        f"id {r.id!r} was already ingested with different content", r.id,
                                        json.dumps({"id": r.id, "text": r.text}, ensure_ascii=False)))
    if fresh:
        con.register("chunk_rows", _record_rows(fresh, now))
        con.execute("""INSERT INTO records
            SELECT id, nextval('vec_id_seq'), text, event_time, features, label, extra, content_hash,
                   file_sha256, position, CAST(arrival_date AS DATE), ingested_at FROM chunk_rows""")
        con.unregister("chunk_rows")
    rows = [[f.out.sha256, j.position, f.out.path, j.record_id, j.rule, j.message, j.raw, f.arrival, now]
            for f in parsed for j in f.rejects]
    if rows:
        con.executemany("INSERT INTO rejects VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING", rows)
    for f in parsed:
        f.out.rejected += len(f.rejects)


def _quarantine(paths: Paths, src: Path, rel: str, sha: str, err: FileUnparseable, when: datetime) -> Path:
    dest_dir = paths.failed / when.date().isoformat()
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / src.name
    if dest.exists():
        dest = dest_dir / f"{sha[:12]}-{src.name}"
    report = {
        "file": rel,
        "sha256": sha,
        "rule": err.rule,
        "message": err.message,
        "line": err.line,
        "byte": err.byte,
        "error": str(err),
        "quarantined_as": str(dest.relative_to(paths.home)),
        "quarantined_at": when.isoformat(),
        "fix": "correct the file and drop it into raw/ again; it is registered by content, so the "
               "fixed version is picked up as a new file",
    }
    # the report first, then the move: a crash in between leaves the file in raw/ to retry
    write_json_atomic(dest.with_name(dest.name + ".error.json"), report)
    os.replace(src, dest)
    return dest


def process_file(paths: Paths, store: Store, sha: str) -> FileOutcome:
    """Ingest one registered file; safe to call again for the same file."""
    with store.connect(read_only=True) as con:
        row = con.execute("SELECT path, arrival_date, status, quarantine_path FROM files WHERE sha256 = ?",
                          [sha]).fetchone()
    if row is None:
        raise KeyError(f"file {sha} is not registered")
    rel, arrival, status, qpath = row
    if status == "quarantined":
        return FileOutcome(sha, rel, "quarantined", error=f"quarantined as {qpath}")
    src = paths.raw / rel
    if not src.exists():
        # e.g. crash after the move to failed/ but before the database said so
        moved = sorted(paths.failed.glob(f"*/*{Path(rel).name}.error.json"))
        for report in moved:
            info = json.loads(report.read_text())
            if info.get("sha256") == sha:
                with store.transaction() as con:
                    con.execute("""UPDATE files SET status='quarantined', error=?, quarantine_path=?,
                                   processed_at=? WHERE sha256=?""",
                                [info["error"], info["quarantined_as"], utcnow(), sha])
                return FileOutcome(sha, rel, "quarantined", error=info["error"])
        if status == "processed":
            return FileOutcome(sha, rel, "processed")  # already in; the file was since removed
        with store.transaction() as con:
            con.execute("UPDATE files SET status='missing', error=? WHERE sha256=?",
                        ["file vanished from raw/ before it was processed", sha])
        return FileOutcome(sha, rel, "missing", error="file vanished from raw/ before it was processed")

    out = FileOutcome(sha, rel, "processed")
    try:
        with store.transaction() as con:
            chunk = _Parsed(out, arrival, [], [])
            for item in read_records(src):
                (chunk.recs if isinstance(item, Record) else chunk.rejects).append(item)
                if len(chunk.recs) + len(chunk.rejects) >= CHUNK_RECORDS:
                    _flush(con, [chunk])
                    chunk = _Parsed(out, arrival, [], [])
            _flush(con, [chunk])
            con.execute(
                """UPDATE files SET status='processed', records_ingested=?, records_rejected=?,
                   records_skipped=?, processed_at=?, error=NULL WHERE sha256=?""",
                [out.ingested, out.rejected, out.skipped, utcnow(), sha])
    except FileUnparseable as err:
        when = utcnow()
        dest = _quarantine(paths, src, rel, sha, err, when)
        log.warning("quarantined %s: %s", rel, err)
        with store.transaction() as con:
            con.execute("""UPDATE files SET status='quarantined', error=?, quarantine_path=?, processed_at=?
                           WHERE sha256=?""", [str(err), str(dest.relative_to(paths.home)), when, sha])
        return FileOutcome(sha, rel, "quarantined", error=str(err))
    return out



def process_files(paths: Paths, store: Store, shas: list[str]) -> list[FileOutcome]:
    """Ingest registered files, in order; safe to call again for the same files.

    Small, readable files (the common micro-batch: many files of tens of records) are parsed
    first and then written in one transaction: per-file statements and commits were most of
    the cost (5,000 records in 100 files: 1.7 s). The group is atomic, so a crash replays it
    whole. Anything unusual (a quarantined, vanished, unparseable or large file) goes through
    :func:`process_file` on its own, with the same outcome as ever."""
    if not shas:
        return []
    with store.session():
        with store.connect(read_only=True) as con:
            con.register("want_files", pd.DataFrame({"sha256": list(shas)}))
            rows = {r[0]: r[1:] for r in con.execute(
                """SELECT f.sha256, f.path, f.arrival_date, f.status, f.est_records
                   FROM files f JOIN want_files USING (sha256)""").fetchall()}
            con.unregister("want_files")
        outcomes: dict[str, FileOutcome] = {}
        parsed: list[_Parsed] = []

        def write_group() -> None:
            if parsed:
                with store.transaction() as con:
                    _flush(con, parsed)
                    con.executemany(
                        """UPDATE files SET status='processed', records_ingested=?, records_rejected=?,
                           records_skipped=?, processed_at=?, error=NULL WHERE sha256=?""",
                        [[f.out.ingested, f.out.rejected, f.out.skipped, utcnow(), f.out.sha256] for f in parsed])
                parsed.clear()

        for sha in shas:
            items = None
            row = rows.get(sha)
            if row is not None and row[2] in ("pending", "batched", "processed") and (row[3] or 0) <= CHUNK_RECORDS:
                reader = read_records(paths.raw / row[0])
                try:  # at most one chunk in memory: a large file streams through process_file
                    items = list(islice(reader, CHUNK_RECORDS + 1))
                except (FileUnparseable, FileNotFoundError):
                    items = None  # process_file quarantines it, or records it missing
                finally:
                    reader.close()
            if items is None or len(items) > CHUNK_RECORDS:
                write_group()  # files stay in order: the first occurrence of an id wins
                outcomes[sha] = process_file(paths, store, sha)
                continue
            out = outcomes[sha] = FileOutcome(sha, row[0], "processed")
            parsed.append(_Parsed(out, row[1], [i for i in items if isinstance(i, Record)],
                                  [i for i in items if not isinstance(i, Record)]))
        write_group()
    return [outcomes[sha] for sha in shas]


def partition_data_version(store: Store, partition_key: str) -> str:
    """Changes exactly when the set of records in a partition changes."""
    with store.connect(read_only=True) as con:
        row = con.execute(
            """SELECT count(*), coalesce(sum(hash(id, content_hash)), 0) FROM records
               WHERE arrival_date = CAST(? AS DATE)""", [partition_key]).fetchone()
    return hashlib.sha256(f"{row[0]}:{row[1]}".encode()).hexdigest()[:16]


def files_outside_partition(store: Store, shas: list[str], partition_key: str) -> list[str]:
    if not shas:
        return []
    with store.connect(read_only=True) as con:
        con.register("want", pd.DataFrame({"sha256": shas}))
        rows = con.execute(
            """SELECT w.sha256 FROM want w LEFT JOIN files f USING (sha256)
               WHERE f.sha256 IS NULL OR f.arrival_date <> CAST(? AS DATE)""", [partition_key]).fetchall()
    return [r[0] for r in rows]


def partition_record_count(store: Store, partition_key: str) -> int:
    with store.connect(read_only=True) as con:
        return int(con.execute("SELECT count(*) FROM records WHERE arrival_date = CAST(? AS DATE)",
                               [partition_key]).fetchone()[0])
