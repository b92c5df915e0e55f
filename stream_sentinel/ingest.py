"""From files in ``raw/`` to rows in DuckDB.

Three steps, each idempotent so any of them can be replayed after a crash:

1. :func:`scan` finds stable record files under ``raw/`` and registers each *content*
   (sha256) once in ``files``; a second name for the same bytes is a duplicate.
2. :func:`plan_batches` cuts pending files into micro-batches with deterministic run
   keys. The batch is stored before a run is requested, so a daemon that dies between
   the two re-requests the same key and Dagster drops the copy.
3. :func:`process_file` parses one file and commits it chunk by chunk, each chunk with the
   file's resume point, so memory stays flat however large the file and a replay after a
   crash goes on after the last commit (:func:`process_files` writes a group of small files
   in one transaction): valid records are inserted
   (an id seen before with the same content is skipped, with other content rejected),
   invalid ones land in ``rejects``; an unreadable file is moved to
   ``failed/<date>/`` beside a ``<name>.error.json`` that says what is wrong. A file that
   changed after it was registered is ``superseded`` (its new content is a new file); one
   whose end looks unfinished waits (``waiting``) while it is younger than the settle window.

Entries of ``raw/`` that cannot be read (FIFOs, sockets, devices, broken or looping symlinks,
files without read permission) never stop a scan: they are skipped without being opened and
listed, with the reason, in ``ScanResult.problems`` and the table ``scan_problems``.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import logging
import os
import re
import stat
import time
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from itertools import islice
from pathlib import Path
from typing import Callable

import duckdb
import pandas as pd

from .atomic import pause_point, write_json_atomic
from .config import DB_MEMORY_ENV, DEFAULT_SETTLE_S, SETTLE_ENV, Paths, env_num, memory_limit
from .records import FileUnparseable, Record, Reject, is_json_lines, is_record_file, read_records
from .store import Store

log = logging.getLogger(__name__)

CHUNK_RECORDS = 5000  # items (records and rejects) per transaction of a file


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
    # (rel path, reason) of entries that cannot be read: special files, broken or looping
    # symlinks, unreadable files or folders; also kept in the table scan_problems
    problems: list[tuple[str, str]] = field(default_factory=list)
    quarantined: list[str] = field(default_factory=list)  # copies of quarantined content, moved too
    superseded: list[str] = field(default_factory=list)  # waiting files that changed: new content registered
    waiting: list[str] = field(default_factory=list)  # unfinished-looking files inside the settle window


class NotRegularFile(OSError):
    """A path that is a FIFO, socket or device: never read (opening a FIFO blocks)."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "a special file"


def open_regular(path: str | os.PathLike[str]):
    """Open a file for binary reading without ever blocking: ``O_NONBLOCK`` (so a FIFO put in
    place after the walk does not hang the open), then anything but a regular file is refused
    with :class:`NotRegularFile`."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFile(errno.EINVAL, f"{_kind(mode)}, not a regular file", str(path))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_problem(exc: OSError) -> str:
    """Why a file could not be read, for ``scan_problems`` and the sensor's message."""
    if isinstance(exc, NotRegularFile):
        return f"{exc.strerror}: skipped without reading it"
    if isinstance(exc, PermissionError):
        return "cannot be read: permission denied"
    return f"cannot be read: {exc.strerror or exc}"


@dataclass
class Walk:
    files: list[tuple[Path, str, os.stat_result]] = field(default_factory=list)  # (path, rel, stat)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (rel, reason)
    outside_links: list[str] = field(default_factory=list)  # symlinks pointing out of the root


def walk_files(root: Path, accept: Callable[[str], bool], follow_links: bool = True) -> Walk:
    """Every regular file under ``root`` whose name ``accept`` takes, found without opening
    anything (``os.scandir`` and ``stat``), so one odd entry never stops the walk.

    Hidden entries (``.name``) are skipped. A broken or looping symlink, a FIFO, socket or
    device with an accepted name, and a folder that cannot be listed are *problems* with a
    reason. With ``follow_links`` a symlink to a file inside ``root`` is listed (a linked folder
    is never walked: loops and double counting) and one pointing out of ``root`` goes to
    ``outside_links``; without it, symlinks are ignored."""
    walk = Walk()
    root_real = os.path.realpath(root)
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except FileNotFoundError:
            continue
        except OSError as exc:
            rel = str(folder.relative_to(root)) if folder != root else "."
            walk.problems.append((rel, f"folder cannot be listed: {exc.strerror or exc}"))
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue  # hidden files and editors' temp files
            path = Path(entry.path)
            rel = str(path.relative_to(root))
            try:
                if entry.is_symlink():
                    if follow_links:
                        real = os.path.realpath(path)
                        if real != root_real and not real.startswith(root_real.rstrip(os.sep) + os.sep):
                            walk.outside_links.append(rel)
                            continue
                    try:
                        st = os.stat(path)
                    except FileNotFoundError:
                        walk.problems.append((rel, f"broken symlink: its target {os.readlink(path)!r} does not exist"))
                        continue
                    except OSError as exc:
                        walk.problems.append((rel, "symlink loop" if exc.errno == errno.ELOOP
                                              else f"symlink cannot be followed: {exc.strerror or exc}"))
                        continue
                    if not follow_links or stat.S_ISDIR(st.st_mode):
                        continue
                elif entry.is_dir(follow_symlinks=False):
                    stack.append(path)
                    continue
                elif not accept(entry.name):
                    continue
                else:
                    st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed while we looked
            if not accept(entry.name):
                continue
            if not stat.S_ISREG(st.st_mode):
                walk.problems.append((rel, f"{_kind(st.st_mode)}, not a regular file: skipped without reading it"))
                continue
            walk.files.append((path, rel, st))
    return walk


def hash_file(path: Path) -> tuple[str, int]:
    """sha256 of the bytes, streamed, and the number of newlines in them."""
    h = hashlib.sha256()
    newlines = 0
    with open_regular(path) as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
            newlines += chunk.count(b"\n")
    return h.hexdigest(), newlines


def _hash_and_count(path: Path) -> tuple[str, int]:
    """sha256 of the bytes, plus a cheap record estimate used to size micro-batches."""
    sha, newlines = hash_file(path)
    if path.name.lower().endswith(".gz"):
        est = max(1, path.stat().st_size // 400)  # unknown without inflating; ~400 B/record gz
    elif is_json_lines(path.name):
        est = max(1, newlines)
    else:
        est = max(1, newlines // 4) if newlines > 4 else 1
    return sha, est


def record_scan_problems(con, area: str, problems: list[tuple[str, str]], when: datetime) -> None:
    """Make ``scan_problems`` for ``area`` say what this (complete) scan found: new problems are
    added, lasting ones get a new ``last_seen``, paths that now scan fine (or are gone) leave."""
    current = dict(problems)
    old = {p for (p,) in con.execute("SELECT path FROM scan_problems WHERE area = ?", [area]).fetchall()}
    gone = old - current.keys()
    if gone:
        con.executemany("DELETE FROM scan_problems WHERE area = ? AND path = ?", [[area, p] for p in sorted(gone)])
    if current:
        con.executemany(
            """INSERT INTO scan_problems VALUES (?, ?, ?, ?, ?) ON CONFLICT (area, path)
               DO UPDATE SET reason = excluded.reason, last_seen = excluded.last_seen""",
            [[area, p, r, when, when] for p, r in sorted(current.items())])


def settle_seconds(given: float | None = None) -> float:
    """How long a file whose end looks unfinished is given to be completed (see :func:`process_file`):
    ``given`` (the ingest settings), else ``STREAM_SENTINEL_SETTLE_SECONDS``, else 60 s."""
    return float(given) if given is not None else env_num(SETTLE_ENV, DEFAULT_SETTLE_S)


def _supersede(con, sha: str, reason: str, out: "FileOutcome | None" = None) -> None:
    """The file changed after it was registered: its records stay (the new content, registered as
    a new file, skips them as identical), its rejects go (the new content is judged instead)."""
    counts = [out.ingested, out.rejected, out.skipped] if out else [None, None, None]
    con.execute("""UPDATE files SET status='superseded', error=?, processed_at=?, records_ingested=?,
                   records_rejected=?, records_skipped=? WHERE sha256=?""", [reason, utcnow(), *counts, sha])
    con.execute("DELETE FROM rejects WHERE file_sha256 = ?", [sha])
    con.execute("DELETE FROM file_progress WHERE sha256 = ?", [sha])


def scan(paths: Paths, store: Store, debounce_s: float = 2.0, now: datetime | None = None,
         lock_timeout_s: float | None = None, settle_s: float | None = None) -> ScanResult:
    """Register every stable, not yet known file under ``raw/``.

    A file is stable when its mtime is at least ``debounce_s`` old and its size and
    mtime did not change while it was hashed (a writer still appending changes both).
    ``now`` fixes the arrival time (tests, backfill demos); it defaults to the clock.

    Entries that cannot be read (see :func:`walk_files`) are listed in ``problems`` and in
    ``scan_problems``; everything else is registered. A copy of content that was quarantined
    is quarantined too. A ``waiting`` file goes back to ``pending`` once it is older than the
    settle window, or becomes ``superseded`` when it changed (its new content is registered).
    """
    if now is not None:  # files registered on a past day: that day becomes a partition too
        paths.note_arrival(now.astimezone(timezone.utc).date())
    now = now or utcnow()
    result = ScanResult()
    walk = walk_files(paths.raw, is_record_file)
    result.skipped_links, result.problems = walk.outside_links, list(walk.problems)
    with store.connect(timeout_s=lock_timeout_s) as con:
        known = {(p, s, m): sha for p, s, m, sha in con.execute(
            "SELECT path, size, mtime_ns, sha256 FROM file_paths").fetchall()}
        quarantined = {sha: (p, err) for sha, p, err in con.execute(
            "SELECT sha256, path, error FROM files WHERE status = 'quarantined'").fetchall()}
        waiting: dict[str, tuple[str, list[tuple[int, int]]]] = {}
        for sha, rel, size, mtime in con.execute(
                """SELECT f.sha256, f.path, fp.size, fp.mtime_ns FROM files f
                   LEFT JOIN file_paths fp ON fp.sha256 = f.sha256 AND fp.path = f.path
                   WHERE f.status = 'waiting'""").fetchall():
            waiting.setdefault(sha, (rel, []))[1].append((size, mtime))
        had_problems = con.execute("SELECT count(*) FROM scan_problems WHERE area = 'raw'").fetchone()[0]
    wall = time.time_ns()
    fresh: list[tuple[FileSeen, str, int]] = []
    copies: list[tuple[Path, FileSeen, str, bool]] = []  # (path, seen, sha, seen for the first time)
    for path, rel, st in walk.files:
        seen = FileSeen(rel, st.st_size, st.st_mtime_ns)
        sha = known.get((seen.rel_path, seen.size, seen.mtime_ns))
        if sha is not None:
            if sha in quarantined:
                copies.append((path, seen, sha, False))  # registered as a duplicate before its twin failed
            continue
        if wall - seen.mtime_ns < debounce_s * 1e9:
            result.unstable.append(seen.rel_path)
            continue
        try:
            sha, est = _hash_and_count(path)
            st = path.stat()
        except FileNotFoundError:
            continue
        except OSError as exc:  # unreadable, or a special file put in its place since the walk
            result.problems.append((seen.rel_path, read_problem(exc)))
            continue
        if (st.st_size, st.st_mtime_ns) != (seen.size, seen.mtime_ns):
            result.unstable.append(seen.rel_path)
            continue
        if sha in quarantined:
            copies.append((path, seen, sha, True))
            continue
        fresh.append((seen, sha, est))
    # copies of quarantined content: the report, then the move, then the database (a crash in
    # between leaves the report and the copy in failed/, or the copy in raw/ to be moved again)
    copied: list[tuple[FileSeen, str]] = []
    for path, seen, sha, first_time in copies:
        first, reason = quarantined[sha]
        err = FileUnparseable("copy_of_quarantined", f"same content as {first}, which was quarantined "
                                                     f"because: {reason}")
        try:
            _quarantine(paths, path, seen.rel_path, sha, err, utcnow(), {"copy_of": first})
        except FileNotFoundError:
            continue
        log.warning("quarantined %s: a copy of %s, which was quarantined", seen.rel_path, first)
        result.quarantined.append(seen.rel_path)
        if first_time:
            copied.append((seen, sha))
    settle_ns = settle_seconds(settle_s) * 1e9
    supersede: list[tuple[str, str]] = []
    ready: list[str] = []
    for sha, (rel, regs) in waiting.items():
        try:
            st = (paths.raw / rel).stat()
        except FileNotFoundError:
            ready.append(sha)  # processing says what became of it
            continue
        except OSError:
            continue
        regs = [r for r in regs if r != (None, None)]
        if regs and (st.st_size, st.st_mtime_ns) not in regs:
            supersede.append((sha, f"{rel} changed while it was waiting to be completed; the new content "
                                   "is registered as a new file"))
            result.superseded.append(rel)
        elif wall - st.st_mtime_ns >= settle_ns:
            ready.append(sha)
        else:
            result.waiting.append(rel)
    if not (fresh or copied or supersede or ready or result.problems or had_problems):
        return result
    with store.transaction(timeout_s=lock_timeout_s, scope="records") as con:
        for sha, reason in supersede:  # first: the same bytes may be registered again below
            _supersede(con, sha, reason)
        for seen, sha, est in fresh:
            exists = con.execute("SELECT status FROM files WHERE sha256 = ?", [sha]).fetchone()
            revive = exists is not None and exists[0] == "superseded"  # never fully read: a new file
            con.execute(
                "INSERT INTO file_paths VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                [seen.rel_path, seen.size, seen.mtime_ns, sha, exists is not None and not revive, now],
            )
            if exists and not revive:
                result.duplicates.append(seen.rel_path)
                continue
            if revive:  # batch_seq stays: a re-planned file gets a new run key (plan_batches)
                con.execute(
                    """UPDATE files SET path=?, size=?, arrived_at=?, arrival_date=?, est_records=?, status='pending',
                       error=NULL, quarantine_path=NULL, processed_at=NULL WHERE sha256=?""",
                    [seen.rel_path, seen.size, now, now.date(), est, sha])
            else:
                con.execute(
                    """INSERT INTO files (sha256, path, size, arrived_at, arrival_date, est_records, status)
                       VALUES (?, ?, ?, ?, ?, ?, 'pending')""",
                    [sha, seen.rel_path, seen.size, now, now.date(), est],
                )
            result.registered.append(sha)
        for seen, sha in copied:
            con.execute("INSERT INTO file_paths VALUES (?, ?, ?, ?, true, ?) ON CONFLICT DO NOTHING",
                        [seen.rel_path, seen.size, seen.mtime_ns, sha, now])
        if ready:
            con.executemany("UPDATE files SET status='pending', error=NULL WHERE sha256=? AND status='waiting'",
                            [[s] for s in ready])
        record_scan_problems(con, "raw", result.problems, utcnow())
    if result.problems:
        log.warning("raw/: %d entr%s cannot be read: %s", len(result.problems),
                    "y" if len(result.problems) == 1 else "ies",
                    "; ".join(f"{p}: {r}" for p, r in result.problems[:5]))
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
    with store.transaction(timeout_s=lock_timeout_s, scope="records") as con:
        rows = con.execute(
            """SELECT sha256, CAST(arrival_date AS VARCHAR), est_records, batch_seq FROM files
               WHERE status = 'pending' ORDER BY arrived_at, path""").fetchall()
        # a file planned before (it was waiting, or superseded and seen again) must not get the
        # run key of its earlier batch: Dagster would drop the request as already launched
        replanned = {sha for sha, _, _, prev in rows if prev is not None}
        groups: list[tuple[str, list[tuple[str, int]]]] = []
        for sha, part, est, _ in rows:
            if (not groups or groups[-1][0] != part or len(groups[-1][1]) >= max_files
                    or (groups[-1][1] and sum(e for _, e in groups[-1][1]) + est > max_records)):
                groups.append((part, []))
            groups[-1][1].append((sha, est))
        if tail_waits and len(groups) > 1 and groups[-1][0] == groups[-2][0]:
            groups.pop()  # the newest partition's partial tail; the groups before it are full
        for part, members in groups:
            shas = tuple(sorted(s for s, _ in members))
            seq = con.execute("SELECT nextval('batch_seq')").fetchone()[0]
            again = f"\nreplanned in batch {seq}" if replanned.intersection(shas) else ""
            digest = hashlib.sha256(("\n".join(shas) + again).encode()).hexdigest()[:16]
            run_key = f"raw:{part}:{digest}"
            est = sum(e for _, e in members)
            con.execute("INSERT INTO batches VALUES (?, ?, ?, ?, ?, ?)",
                        [seq, run_key, part, len(shas), est, utcnow()])
            con.executemany("UPDATE files SET status = 'batched', batch_seq = ? WHERE sha256 = ?",
                            [[seq, s] for s in shas])
            new.append(Batch(seq, run_key, part, shas, est))
    return new


def batches_after(store: Store, seq: int, lock_timeout_s: float | None = None) -> list[Batch]:
    """Batches cut after ``seq`` (what a sensor cursor has not requested yet)."""
    with store.connect(timeout_s=lock_timeout_s) as con:
        rows = con.execute(
            """SELECT b.seq, b.run_key, b.partition_key, b.est_records, array_agg(f.sha256 ORDER BY f.sha256)
               FROM batches b JOIN files f ON f.batch_seq = b.seq
               WHERE b.seq > ? GROUP BY b.seq, b.run_key, b.partition_key, b.est_records ORDER BY b.seq""", [seq]).fetchall()
    return [Batch(s, k, p, tuple(files), est) for s, k, p, est, files in rows]


def unfinished_batches(store: Store, lock_timeout_s: float | None = None) -> list[Batch]:
    """Batches with a file still waiting to be processed (``run --once``; the sensor's retries)."""
    with store.connect(timeout_s=lock_timeout_s) as con:
        rows = con.execute(
            """SELECT b.seq, b.run_key, b.partition_key, b.est_records, array_agg(f.sha256 ORDER BY f.sha256)
               FROM batches b JOIN files f ON f.batch_seq = b.seq
               GROUP BY b.seq, b.run_key, b.partition_key, b.est_records HAVING bool_or(f.status = 'batched') ORDER BY b.seq""").fetchall()
    return [Batch(s, k, p, tuple(files), est) for s, k, p, est, files in rows]


# --------------------------------------------------------------------------- processing


@dataclass
class FileOutcome:
    sha256: str
    path: str
    status: str  # processed | quarantined | missing | waiting | superseded (see process_file)
    # counts are the file's, including chunks committed by an earlier, interrupted call
    ingested: int = 0
    skipped: int = 0  # already present with identical content (idempotent replay)
    rejected: int = 0
    error: str | None = None


def files_for_partition(store: Store, partition_key: str) -> list[str]:
    with store.connect() as con:
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


def _erased(con):
    """id -> its erasure hash when the id was erased (and not lifted), else None; None when
    nothing was ever erased (no key is read or made)."""
    hashes = {r[0] for r in con.execute("SELECT id_hash FROM erasures WHERE lifted_at IS NULL").fetchall()}
    if not hashes:
        return None
    from .erasure.keys import IdHasher

    from .pgstore import dialect

    if dialect(con) == "postgres":
        if con.home is None:  # never a silent pass: an erased id must not come back
            raise RuntimeError("erased ids cannot be checked: this PostgreSQL store was opened without its data root")
        root = Path(con.home)
    else:
        root = Path(con.execute("SELECT path FROM duckdb_databases() WHERE database_name = current_database()"
                                ).fetchall()[0][0]).parent  # fetchall: no result left open on the connection
    hasher = IdHasher.for_root(root, create=False)
    if hasher is None:
        return None

    def check(record_id: str) -> str | None:
        h = hasher(record_id)
        return h if h in hashes else None

    return check


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
    erased = _erased(con) if recs else None
    fresh: list[tuple[Record, _Parsed]] = []
    for f in parsed:
        for r in f.recs:
            if erased is not None and (h := erased(r.id)) is not None:
                # neither the id nor the content is kept: the reject names the erasure
                f.rejects.append(Reject(r.position, "erased", f"the id of this record was erased (erasure "
                                        f"{h[:16]}); `stream-sentinel erase --lift` lets it in again", None, ""))
                continue
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


def quarantine_file(folder: Path, src: Path, sha: str, report: dict, home: Path) -> Path:
    """Move ``src`` into ``folder`` beside ``<name>.error.json`` (``report``, plus where it went).
    The report is written first, then the file moved: a crash in between leaves the file where
    it was, to retry. A name already taken in ``folder`` gets the sha prefix (and a number)."""
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / src.name
    n = 0
    while dest.exists():
        n += 1
        dest = folder / (f"{sha[:12]}-{src.name}" if n == 1 else f"{sha[:12]}-{n}-{src.name}")
    write_json_atomic(dest.with_name(dest.name + ".error.json"),
                      {**report, "quarantined_as": str(dest.relative_to(home))})
    os.replace(src, dest)
    return dest


def _quarantine(paths: Paths, src: Path, rel: str, sha: str, err: FileUnparseable, when: datetime,
                extra: dict | None = None) -> Path:
    report = {
        "file": rel,
        "sha256": sha,
        "rule": err.rule,
        "message": err.message,
        "line": err.line,
        "byte": err.byte,
        "error": str(err),
        "quarantined_at": when.isoformat(),
        "fix": "correct the file and drop it into raw/ again; it is registered by content, so the "
               "fixed version is picked up as a new file",
        **(extra or {}),
    }
    return quarantine_file(paths.failed / when.date().isoformat(), src, sha, report, paths.home)


# what a JSON Lines line cut short by a writer that paused looks like
TAIL_RULES = ("invalid_json", "not_utf8")
_CUT_SHORT_CHECK_MAX = 64 << 20
_PARTIAL_SCALAR = re.compile(r"t(r(ue?)?)?|f(a(l(se?)?)?)?|n(u(ll?)?)?|-?\d*(\.\d*)?([eE][-+]?\d*)?")


def _young(path: Path, settle_s: float) -> bool:
    try:
        return time.time_ns() - path.stat().st_mtime_ns < settle_s * 1e9
    except OSError:
        return False


def _ends_without_newline(path: Path) -> bool:
    try:
        with open_regular(path) as fh:
            size = os.fstat(fh.fileno()).st_size
            if size == 0:
                return False
            fh.seek(size - 1)
            return fh.read(1) != b"\n"
    except OSError:
        return False


def _maybe_unfinished_line(path: Path, item: Record | Reject) -> bool:
    """``item`` is the last of a plain JSON Lines file: a line that does not parse and has no
    newline after it may be one its writer has not finished."""
    return (isinstance(item, Reject) and item.rule in TAIL_RULES and is_json_lines(path.name)
            and not path.name.lower().endswith(".gz") and _ends_without_newline(path))


def _ends_mid_value(text: str) -> bool:
    """True when the first syntax error of this JSON text (one value, or several in a row) is
    that the text ends: a prefix of valid JSON, as a writer that paused leaves it."""
    dec = json.JSONDecoder()
    pos, end = 0, len(text)
    while True:
        while pos < end and text[pos] in " \t\r\n":
            pos += 1
        if pos == end:
            return False
        try:
            _, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            if exc.msg.startswith("Unterminated string"):
                return True  # the string runs to the end of the text
            return _PARTIAL_SCALAR.fullmatch(text[exc.pos:].strip()) is not None


def _cut_short(path: Path, err: FileUnparseable, held: Reject | None) -> bool:
    """Does this unparseable file look unfinished (its content ends too early) rather than broken?"""
    gz = path.name.lower().endswith(".gz")
    if err.rule == "unreadable_compressed_data":
        return "end-of-stream" in err.message  # gzip stream cut short
    if is_json_lines(path.name):
        return held is not None and not gz and _ends_without_newline(path)
    if err.rule == "empty_file":
        return True  # created, nothing written yet
    if err.rule == "not_utf8":
        return "truncated" in err.message  # a multi-byte character cut at the end
    if err.rule != "invalid_json":
        return False
    if err.message.startswith("unterminated array"):
        return True
    try:
        with (gzip.open(path, "rb") if gz else open_regular(path)) as fh:
            data = fh.read(_CUT_SHORT_CHECK_MAX + 1)
    except (OSError, EOFError):
        return False
    if len(data) > _CUT_SHORT_CHECK_MAX:
        return True  # too large to re-read here; it waits at most the settle window
    return _ends_mid_value(data.decode("utf-8", "replace"))


def _unchanged_source(paths: Paths, rel: str, regs: list[tuple[str, int, int]]) -> str | None:
    """A registered path of the content that still has the registered size and mtime (``rel``
    preferred), or None when all of them changed (or are gone)."""
    if not regs:
        return rel  # nothing to compare with
    for p in sorted({p for p, _, _ in regs}, key=lambda p: p != rel):
        try:
            st = (paths.raw / p).stat()
        except OSError:
            continue
        if (st.st_size, st.st_mtime_ns) in {(s, m) for q, s, m in regs if q == p}:
            return p
    return None


def _changed_reason(rel: str) -> str:
    return (f"{rel} changed after it was registered (its size or mtime differ): its writer was not done; "
            "the new content is registered as a new file")


def _save_progress(con, out: FileOutcome, items_done: int) -> None:
    con.execute("INSERT OR REPLACE INTO file_progress VALUES (?, ?, ?, ?, ?, ?)",
                [out.sha256, items_done, out.ingested, out.skipped, out.rejected, utcnow()])


def _parsed(out: FileOutcome, arrival: date, items: list[Record | Reject]) -> _Parsed:
    return _Parsed(out, arrival, [i for i in items if isinstance(i, Record)],
                   [i for i in items if not isinstance(i, Record)])


def _drop_partial(con, sha: str) -> None:
    """Rows that chunks of a file committed before the file turned out unparseable: a
    quarantined file adds nothing."""
    con.execute("DELETE FROM records WHERE file_sha256 = ?", [sha])
    con.execute("DELETE FROM rejects WHERE file_sha256 = ?", [sha])
    con.execute("DELETE FROM file_progress WHERE sha256 = ?", [sha])


class _MemoryCap:
    """DuckDB's memory limit while one file is written (``STREAM_SENTINEL_INGEST_DB_MEMORY``,
    ``off`` for DuckDB's default of 80 % of RAM). Should DuckDB ever need more (a very large
    table), :meth:`lift` restores the limit from before and the file is processed again from
    its last commit."""

    def __init__(self, store: Store, want: str | None = None):
        limit = memory_limit(os.environ.get(DB_MEMORY_ENV, "") if want is None else want)
        self.store, self.prev, self.want = store, None, limit or "off"
        if limit is None or store.backend != "duckdb":  # a PostgreSQL server manages its own memory
            return
        with store.connect() as con:
            prev = con.execute("SELECT current_setting('memory_limit')").fetchone()[0]
            con.execute(f"SET memory_limit = '{self.want}'")
        self.prev = prev

    def lift(self) -> bool:
        """Back to the limit from before; False when there is no cap (left) to lift."""
        if self.prev is None:
            return False
        with self.store.connect() as con:
            con.execute(f"SET memory_limit = '{self.prev}'")
        self.prev = None
        return True


def _write(store: Store, out: FileOutcome, arrival: date, items: list[Record | Reject],
           then: Callable[[duckdb.DuckDBPyConnection], None]) -> None:
    """One transaction: ``items`` of one file, then ``then(con)`` (its resume point or status)."""
    with store.transaction(scope="records") as con:
        _flush(con, [_parsed(out, arrival, items)])
        then(con)


def process_file(paths: Paths, store: Store, sha: str, settle_s: float | None = None,
                 db_memory: str | None = None) -> FileOutcome:
    """Ingest one registered file; safe to call again for the same file.

    The file is committed every ``CHUNK_RECORDS`` items, each chunk in one transaction with the
    file's resume point (``file_progress``): memory does not grow with the file, and a replay
    after a crash goes on after the last commit, so no record is lost or counted twice.

    Before anything is rejected or quarantined, the file must still be what was registered
    (size and mtime in ``file_paths``): one that changed is ``superseded`` and its new content is
    registered by the next scan. One whose end looks unfinished (a JSON Lines last line without
    its newline that does not parse, a JSON document or gzip stream that ends too early, an
    empty file) stays ``waiting`` while it is younger than the settle window
    (``settle_s``, else ``STREAM_SENTINEL_SETTLE_SECONDS``); the scan re-examines it. ``db_memory``
    caps DuckDB while the file is written (else ``STREAM_SENTINEL_INGEST_DB_MEMORY``)."""
    with store.session():
        cap = _MemoryCap(store, db_memory)
        try:
            try:
                return _process_file(paths, store, sha, settle_s)
            except duckdb.OutOfMemoryException:
                want = cap.want
                if not cap.lift():
                    raise
                log.warning("DuckDB needed more than %s=%s for %s; processing it again, from its last commit, "
                            "without that cap", DB_MEMORY_ENV, want, sha)
                return _process_file(paths, store, sha, settle_s)  # idempotent: the failed transaction rolled back
        finally:
            cap.lift()


def _process_file(paths: Paths, store: Store, sha: str, settle_s: float | None = None) -> FileOutcome:
    with store.connect() as con:
        row = con.execute("SELECT path, arrival_date, status, quarantine_path, error FROM files WHERE sha256 = ?",
                          [sha]).fetchone()
        regs = con.execute("SELECT path, size, mtime_ns FROM file_paths WHERE sha256 = ?", [sha]).fetchall()
        prog = con.execute("SELECT items_done, ingested, skipped, rejected FROM file_progress WHERE sha256 = ?",
                           [sha]).fetchone()
    if row is None:
        raise KeyError(f"file {sha} is not registered")
    rel, arrival, status, qpath, error = row
    if status == "quarantined":
        return FileOutcome(sha, rel, "quarantined", error=f"quarantined as {qpath}")
    if status == "superseded":
        return FileOutcome(sha, rel, "superseded", error=error)
    src = paths.raw / rel
    if not src.exists():
        # e.g. crash after the move to failed/ but before the database said so
        moved = sorted(paths.failed.glob(f"*/*{Path(rel).name}.error.json"))
        for report in moved:
            info = json.loads(report.read_text())
            if info.get("sha256") == sha and "copy_of" not in info:
                with store.transaction(scope="records") as con:
                    con.execute("""UPDATE files SET status='quarantined', error=?, quarantine_path=?,
                                   processed_at=? WHERE sha256=?""",
                                [info["error"], info["quarantined_as"], utcnow(), sha])
                    _drop_partial(con, sha)
                return FileOutcome(sha, rel, "quarantined", error=info["error"])
        if status == "processed":
            return FileOutcome(sha, rel, "processed")  # already in; the file was since removed
        with store.transaction(scope="records") as con:
            con.execute("UPDATE files SET status='missing', error=? WHERE sha256=?",
                        ["file vanished from raw/ before it was processed", sha])
        return FileOutcome(sha, rel, "missing", error="file vanished from raw/ before it was processed")
    source = _unchanged_source(paths, rel, regs)
    if source is None:
        return _superseded(store, FileOutcome(sha, rel, "superseded"), _changed_reason(rel))
    src = paths.raw / source
    mine = [r for r in regs if r[0] == source]

    out = FileOutcome(sha, rel, "processed")
    done = 0
    if prog is not None:
        done, out.ingested, out.skipped, out.rejected = prog
    plain_lines = is_json_lines(src.name) and not src.name.lower().endswith(".gz")
    settle_s = settle_seconds(settle_s)
    chunk: list[Record | Reject] = []
    held: Reject | None = None  # a line that did not parse, kept until we know it is not the last
    consumed = 0
    committed = prog is not None
    reader = read_records(src)
    try:
        for item in reader:
            consumed += 1
            if consumed <= done:
                continue  # committed before a crash: resume after it
            if held is not None:
                chunk.append(held)
                held = None
            if plain_lines and isinstance(item, Reject) and item.rule in TAIL_RULES:
                held = item
                continue
            chunk.append(item)
            if len(chunk) >= CHUNK_RECORDS:
                _write(store, out, arrival, chunk, lambda con: _save_progress(con, out, consumed))
                chunk, committed = [], True
                pause_point("ingest_between_chunks")
    except FileUnparseable as err:
        if _unchanged_source(paths, source, mine) is None:
            return _superseded(store, out, _changed_reason(source))
        if _young(src, settle_s) and _cut_short(src, err, held):
            reason = (f"{err}; the file ends too early and its writer may not be done: re-examined once it is "
                      f"{settle_s:g} s old")
            with store.transaction(scope="records") as con:
                con.execute("UPDATE files SET status='waiting', error=? WHERE sha256=?", [reason, sha])
            log.info("waiting for %s: %s", source, reason)
            return FileOutcome(sha, rel, "waiting", out.ingested, out.skipped, out.rejected, reason)
        when = utcnow()
        dest = _quarantine(paths, src, source, sha, err, when)
        log.warning("quarantined %s: %s", source, err)
        with store.transaction(scope="records") as con:
            con.execute("""UPDATE files SET status='quarantined', error=?, quarantine_path=?, processed_at=?
                           WHERE sha256=?""", [str(err), str(dest.relative_to(paths.home)), when, sha])
            if committed:
                _drop_partial(con, sha)
        return FileOutcome(sha, rel, "quarantined", error=str(err))
    finally:
        reader.close()
    if _unchanged_source(paths, source, mine) is None:
        return _superseded(store, out, _changed_reason(source))
    if held is not None:
        if _young(src, settle_s) and _ends_without_newline(src):
            reason = (f"{held.position} has no newline after it and does not parse ({held.rule}); its writer may "
                      f"not be done: re-examined once the file is {settle_s:g} s old")

            def waiting(con) -> None:
                _save_progress(con, out, consumed - 1)
                con.execute("""UPDATE files SET status='waiting', error=?, records_ingested=?, records_rejected=?,
                               records_skipped=? WHERE sha256=?""",
                            [reason, out.ingested, out.rejected, out.skipped, sha])

            _write(store, out, arrival, chunk, waiting)
            log.info("waiting for %s: %s", source, reason)
            out.status, out.error = "waiting", reason
            return out
        chunk.append(held)

    def finished(con) -> None:
        con.execute(
            """UPDATE files SET status='processed', records_ingested=?, records_rejected=?,
               records_skipped=?, processed_at=?, error=NULL WHERE sha256=?""",
            [out.ingested, out.rejected, out.skipped, utcnow(), sha])
        if committed:
            con.execute("DELETE FROM file_progress WHERE sha256 = ?", [sha])

    _write(store, out, arrival, chunk, finished)
    return out


def _superseded(store: Store, out: FileOutcome, reason: str) -> FileOutcome:
    with store.transaction(scope="records") as con:
        _supersede(con, out.sha256, reason, out)
    log.info("superseded %s: %s", out.path, reason)
    out.status, out.error = "superseded", reason
    return out


def process_files(paths: Paths, store: Store, shas: list[str], settle_s: float | None = None,
                  db_memory: str | None = None) -> list[FileOutcome]:
    """Ingest registered files, in order; safe to call again for the same files.

    Small, readable files (the common micro-batch: many files of tens of records) are parsed
    first and then written in one transaction: per-file statements and commits were most of
    the cost (5,000 records in 100 files: 1.7 s). The group is atomic, so a crash replays it
    whole. Anything unusual (a quarantined, vanished, changed, unparseable, unfinished-looking,
    partly written or large file) goes through :func:`process_file` on its own, with the same
    outcome as ever."""
    if not shas:
        return []
    with store.session():
        with store.connect() as con:
            con.register("want_files", pd.DataFrame({"sha256": list(shas)}))
            rows = {r[0]: r[1:] for r in con.execute(
                """SELECT f.sha256, f.path, f.arrival_date, f.status, f.est_records, p.sha256 IS NOT NULL
                   FROM files f JOIN want_files USING (sha256) LEFT JOIN file_progress p USING (sha256)""").fetchall()}
            regs: dict[str, list[tuple[str, int, int]]] = {}
            for sha, p, s, m in con.execute(
                    "SELECT sha256, path, size, mtime_ns FROM file_paths JOIN want_files USING (sha256)").fetchall():
                regs.setdefault(sha, []).append((p, s, m))
            con.unregister("want_files")
        outcomes: dict[str, FileOutcome] = {}
        parsed: list[_Parsed] = []

        def write_group() -> None:
            if parsed:
                with store.transaction(scope="records") as con:
                    _flush(con, parsed)
                    con.executemany(
                        """UPDATE files SET status='processed', records_ingested=?, records_rejected=?,
                           records_skipped=?, processed_at=?, error=NULL WHERE sha256=?""",
                        [[f.out.ingested, f.out.rejected, f.out.skipped, utcnow(), f.out.sha256] for f in parsed])
                parsed.clear()

        for sha in shas:
            items = None
            row = rows.get(sha)
            if (row is not None and row[2] in ("pending", "batched", "processed") and (row[3] or 0) <= CHUNK_RECORDS
                    and not row[4] and _unchanged_source(paths, row[0], regs.get(sha, [])) == row[0]):
                src = paths.raw / row[0]
                reader = read_records(src)
                try:  # at most one chunk in memory: a large file streams through process_file
                    items = list(islice(reader, CHUNK_RECORDS + 1))
                except (FileUnparseable, FileNotFoundError):
                    items = None  # process_file quarantines it, or records it missing
                finally:
                    reader.close()
                if items and _maybe_unfinished_line(src, items[-1]):
                    items = None  # process_file decides: wait for the writer, or reject the line
            if items is None or len(items) > CHUNK_RECORDS:
                write_group()  # files stay in order: the first occurrence of an id wins
                outcomes[sha] = process_file(paths, store, sha, settle_s, db_memory)
                continue
            out = outcomes[sha] = FileOutcome(sha, row[0], "processed")
            parsed.append(_parsed(out, row[1], items))
        write_group()
    return [outcomes[sha] for sha in shas]


def partition_data_version(store: Store, partition_key: str) -> str:
    """Changes exactly when the set of records in a partition changes."""
    with store.connect() as con:
        row = con.execute(
            """SELECT count(*), coalesce(sum(hash(id, content_hash)), 0) FROM records
               WHERE arrival_date = CAST(? AS DATE)""", [partition_key]).fetchone()
    return hashlib.sha256(f"{row[0]}:{row[1]}".encode()).hexdigest()[:16]


def files_outside_partition(store: Store, shas: list[str], partition_key: str) -> list[str]:
    if not shas:
        return []
    with store.connect() as con:
        con.register("want", pd.DataFrame({"sha256": shas}))
        rows = con.execute(
            """SELECT w.sha256 FROM want w LEFT JOIN files f USING (sha256)
               WHERE f.sha256 IS NULL OR f.arrival_date <> CAST(? AS DATE)""", [partition_key]).fetchall()
    return [r[0] for r in rows]


def partition_record_count(store: Store, partition_key: str) -> int:
    with store.connect() as con:
        return int(con.execute("SELECT count(*) FROM records WHERE arrival_date = CAST(? AS DATE)",
                               [partition_key]).fetchone()[0])
