"""Where feedback comes from: Kafka offset ranges, or JSONL files in ``feedback/``.

Kafka: :func:`plan_ranges` (called by the sensor) cuts offset ranges per partition under
the micro-batch policy and stores them before any run is requested; :func:`ingest_range`
(called by the run) reads exactly one range and writes it idempotently.

Files (the embedded default without Kafka): same contract, one line = one message at
position ``("file:<sha256>", 0, <line>)``; an unreadable file is quarantined like a
record file.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from . import feedback as fb
from . import kafka as kf
from .atomic import pause_point, write_json_atomic
from .config import Paths
from .store import Store


@dataclass(frozen=True)
class Policy:
    min_batch: int = 10  # launch when a partition has at least this many new messages ...
    max_wait_s: float = 30.0  # ... or its oldest pending message is older than this
    max_range: int = 50_000  # at most this many offsets per run


@dataclass(frozen=True)
class OffsetRange:
    topic: str
    partition: int
    start: int
    end: int  # inclusive

    @property
    def run_key(self) -> str:
        return f"{self.topic}:{self.partition}:{self.start}-{self.end}"

    @property
    def size(self) -> int:
        return self.end - self.start + 1


@dataclass
class Plan:
    to_request: list[OffsetRange]
    cursor: dict[str, int]
    lag: dict[int, int]  # per partition: high watermark - next offset not yet requested
    notes: list[str]


def plan_ranges(store: Store, cons, topic: str, cursor: dict[str, int], policy: Policy,
                flush: bool = False, now: float | None = None, timeout_s: float = 5.0) -> Plan:
    now = time.time() if now is None else now
    states = kf.watermarks(cons, topic, timeout_s)
    notes: list[str] = []
    with store.connect(read_only=True, timeout_s=20) as con:
        planned = dict(con.execute(
            """SELECT "partition", max(end_offset) + 1 FROM feedback_ranges WHERE topic = ? GROUP BY 1""",
            [topic]).fetchall())
    new: list[OffsetRange] = []
    lag: dict[int, int] = {}
    for st in states:
        nxt = planned.get(st.partition, st.low)
        if nxt < st.low:
            notes.append(f"partition {st.partition}: offsets {nxt}..{st.low - 1} expired before they were read")
            nxt = st.low
        pending = st.high - nxt
        if pending <= 0:
            continue
        due = flush or pending >= policy.min_batch
        if not due:
            ts = kf.message_timestamp(cons, topic, st.partition, nxt, timeout_s=min(timeout_s, 3.0))
            due = ts is not None and now - ts >= policy.max_wait_s
        if not due:
            notes.append(f"partition {st.partition}: {pending} message(s) waiting for the batch policy")
            continue
        for start in range(nxt, st.high, policy.max_range):
            new.append(OffsetRange(topic, st.partition, start, min(st.high, start + policy.max_range) - 1))
    with store.transaction(timeout_s=20) as con:
        if new:
            con.executemany("INSERT INTO feedback_ranges VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                            [[r.topic, r.partition, r.start, r.end, r.run_key, datetime.now(timezone.utc)]
                             for r in new])
        rows = con.execute(
            """SELECT "partition", start_offset, end_offset FROM feedback_ranges
               WHERE topic = ? ORDER BY "partition", start_offset""", [topic]).fetchall()
        done = {(p, s) for p, s in con.execute(
            """SELECT r."partition", r.start_offset FROM feedback_ranges r WHERE r.topic = ? AND
               (SELECT count(*) FROM feedback_events e WHERE e.topic = r.topic AND e."partition" = r."partition"
                  AND e."offset" BETWEEN r.start_offset AND r.end_offset)
             + (SELECT count(*) FROM feedback_rejects j WHERE j.topic = r.topic AND j."partition" = r."partition"
                  AND j."offset" BETWEEN r.start_offset AND r.end_offset) > 0""", [topic]).fetchall()}
    to_request = []
    new_cursor = dict(cursor)
    for p, s, e in rows:
        if s >= cursor.get(str(p), 0) and (p, s) not in done:
            to_request.append(OffsetRange(topic, p, s, e))
        new_cursor[str(p)] = max(new_cursor.get(str(p), 0), e + 1)
    for st in states:
        lag[st.partition] = max(0, st.high - new_cursor.get(str(st.partition), st.low))
    return Plan(to_request, new_cursor, lag, notes)


@dataclass
class RangeResult:
    read: int
    events_new: int
    rejects_new: int
    dlq_sent: int
    lag: int
    seconds: float


def record_lag(store: Store, topic: str, partition: int, high: int, next_offset: int) -> None:
    with store.transaction() as con:
        con.execute("""INSERT OR REPLACE INTO kafka_lag VALUES (?, ?, ?, ?, ?, ?)""",
                    [topic, partition, high, next_offset, max(0, high - next_offset), datetime.now(timezone.utc)])


def ingest_range(store: Store, settings: kf.KafkaSettings, rng: OffsetRange,
                 allowed_labels: frozenset[str] | None, timeout_s: float = 120.0) -> RangeResult:
    """Read exactly ``rng`` and record it; a retry of the same range adds nothing."""
    started = time.perf_counter()
    cons = kf.consumer(settings)
    try:
        events: list[fb.Event] = []
        rejects: list[fb.Rejected] = []
        n = 0
        for msg in kf.read_range(cons, rng.topic, rng.partition, rng.start, rng.end, timeout_s):
            n += 1
            item = fb.validate(fb.Position(rng.topic, rng.partition, msg.offset()), msg.value(), msg.key(),
                               allowed_labels)
            (events if isinstance(item, fb.Event) else rejects).append(item)
        dlq = f"{rng.topic}.dlq"
        known = fb.known_rejects(store, rng.topic, rng.partition, rng.start, rng.end) if rejects else set()
        fresh_rejects = [r for r in rejects if r.pos.offset not in known]
        if fresh_rejects:  # dead-letter first, then record: a crash in between re-sends, never loses
            prod = kf.producer(settings)
            kf.send_dlq(prod, dlq, fresh_rejects, rng.topic)
        pause_point("feedback_before_write")
        new_e, new_r = fb.write(store, events, rejects, "kafka", dlq)
        pause_point("feedback_after_write")
        kf.commit_for_lag(cons, rng.topic, rng.partition, rng.end + 1)
        # the high watermark the last fetch reported; ask the broker only if there was none
        _, high = cons.get_watermark_offsets(_tp(rng.topic, rng.partition), cached=True)
        if high < 0:
            _, high = cons.get_watermark_offsets(_tp(rng.topic, rng.partition), timeout=10, cached=False)
    finally:
        cons.close()
    record_lag(store, rng.topic, rng.partition, high, rng.end + 1)
    return RangeResult(n, new_e, new_r, len(fresh_rejects), max(0, high - rng.end - 1), time.perf_counter() - started)


def _tp(topic: str, partition: int):
    from confluent_kafka import TopicPartition

    return TopicPartition(topic, partition)


# ------------------------------------------------------------------------------ drop folder


def scan_files(paths: Paths, store: Store, debounce_s: float = 2.0) -> list[str]:
    """Register stable ``feedback/**/*.jsonl`` files by sha256; returns the pending ones."""
    wall = time.time()
    with store.connect(read_only=True, timeout_s=20) as con:
        # (path, size, mtime) already hashed: a tick re-reads only new or changed files
        seen = set(con.execute("SELECT path, size, mtime_ns FROM feedback_files").fetchall())
    found = []
    for path in sorted(paths.feedback.rglob("*.jsonl")):
        rel = str(path.relative_to(paths.feedback))
        if any(part.startswith(".") for part in path.relative_to(paths.feedback).parts) or path.is_symlink():
            continue
        st = path.stat()
        if wall - st.st_mtime < debounce_s or (rel, st.st_size, st.st_mtime_ns) in seen:
            continue
        found.append((rel, st, hashlib.sha256(path.read_bytes()).hexdigest()))
    with store.transaction(timeout_s=20) as con:
        for rel, st, sha in found:
            con.execute("INSERT INTO feedback_files (sha256, path, size, mtime_ns, status, arrived_at) "
                        "VALUES (?, ?, ?, ?, 'pending', ?) ON CONFLICT DO NOTHING",
                        [sha, rel, st.st_size, st.st_mtime_ns, datetime.now(timezone.utc)])
        return [r[0] for r in con.execute(
            "SELECT sha256 FROM feedback_files WHERE status = 'pending' ORDER BY arrived_at, path").fetchall()]


def ingest_file(paths: Paths, store: Store, sha: str, allowed_labels: frozenset[str] | None) -> dict:
    with store.connect(read_only=True) as con:
        row = con.execute("SELECT path, status FROM feedback_files WHERE sha256 = ?", [sha]).fetchone()
    if row is None:
        raise KeyError(f"feedback file {sha} is not registered")
    rel, status = row
    if status == "quarantined":
        return {"file": rel, "status": status, "events": 0, "rejects": 0}
    src = paths.feedback / rel
    topic = f"file:{sha}"
    events: list[fb.Event] = []
    rejects: list[fb.Rejected] = []
    good = 0
    with open(src, "rb") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            item = fb.validate(fb.Position(topic, 0, lineno), line.strip(), None, allowed_labels)
            if isinstance(item, fb.Event):
                good += 1
                events.append(item)
            else:
                rejects.append(item)
    now = datetime.now(timezone.utc)
    if good == 0 and rejects and all(r.rule in ("invalid_json", "not_utf8") for r in rejects):
        dest = paths.failed / "feedback" / now.date().isoformat() / Path(rel).name
        dest.parent.mkdir(parents=True, exist_ok=True)
        first = rejects[0]
        write_json_atomic(dest.with_name(dest.name + ".error.json"), {
            "file": f"feedback/{rel}", "sha256": sha, "rule": first.rule, "line": first.pos.offset,
            "message": first.error, "quarantined_at": now.isoformat()})
        os.replace(src, dest)
        with store.transaction() as con:
            con.execute("UPDATE feedback_files SET status='quarantined', error=?, processed_at=? WHERE sha256=?",
                        [f"{first.rule} at line {first.pos.offset}: {first.error}", now, sha])
        return {"file": rel, "status": "quarantined", "events": 0, "rejects": 0}
    new_e, new_r = fb.write(store, events, rejects, "file")
    with store.transaction() as con:
        con.execute("UPDATE feedback_files SET status='processed', events=?, rejects=?, processed_at=? WHERE sha256=?",
                    [len(events), len(rejects), now, sha])
    return {"file": rel, "status": "processed", "events": new_e, "rejects": new_r}
