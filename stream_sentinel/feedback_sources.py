"""Where feedback comes from: Kafka offset ranges, or JSONL files in ``feedback/``.

Kafka: :func:`plan_ranges` (called by the sensor) cuts offset ranges per partition under
the micro-batch policy and stores them before any run is requested; :func:`ingest_range`
(called by the run) reads exactly one range and writes it idempotently.

Files (the embedded default without Kafka): same contract, one line = one message at
position ``("file:<sha256>", 0, <line>)``; an unreadable file is quarantined like a
record file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone

from . import feedback as fb
from . import kafka as kf
from .atomic import pause_point, write_bytes_atomic
from .config import Paths, Settings
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
    lag: dict[int, int]  # per partition: offsets not recorded yet (see partition_lag)
    notes: list[str]
    unfinished: list[OffsetRange] = field(default_factory=list)  # requested before, not recorded yet


_DONE_RANGES = """SELECT r."partition", r.start_offset FROM feedback_ranges r WHERE r.topic = ? AND
       (SELECT count(*) FROM feedback_events e WHERE e.topic = r.topic AND e."partition" = r."partition"
          AND e."offset" BETWEEN r.start_offset AND r.end_offset)
     + (SELECT count(*) FROM feedback_rejects j WHERE j.topic = r.topic AND j."partition" = r."partition"
          AND j."offset" BETWEEN r.start_offset AND r.end_offset) > 0"""


def partition_lag(con, topic: str, partition: int, low: int, high: int) -> int:
    """Offsets of a partition not recorded yet: those never planned into a range, plus every
    planned range that is not recorded (queued, running, failed or parked). A range counts
    as recorded once its offsets are written (events and rejects land in one transaction)."""
    planned_next = con.execute(
        """SELECT max(end_offset) + 1 FROM feedback_ranges WHERE topic = ? AND "partition" = ?""",
        [topic, partition]).fetchone()[0]
    lag = max(0, high - max(planned_next if planned_next is not None else low, low))
    done = {s for p, s in con.execute(_DONE_RANGES, [topic]).fetchall() if p == partition}
    for start, end in con.execute(
            """SELECT start_offset, end_offset FROM feedback_ranges WHERE topic = ? AND "partition" = ?""",
            [topic, partition]).fetchall():
        if start not in done:
            lag += max(0, min(end + 1, high) - max(start, low))
    return lag


def plan_ranges(store: Store, cons, topic: str, cursor: dict[str, int], policy: Policy,
                flush: bool = False, now: float | None = None, timeout_s: float = 5.0,
                plan_new: bool = True) -> Plan:
    """Cut due offsets into ranges (stored before they are requested), and say which ranges
    the cursor has not requested yet and which requested ones are still not recorded.
    ``plan_new=False`` (a feedback run is still queued) cuts nothing new: the offsets join a
    larger range later."""
    now = time.time() if now is None else now
    states = kf.watermarks(cons, topic, timeout_s)
    notes: list[str] = []
    with store.connect(timeout_s=20) as con:
        planned = dict(con.execute(
            """SELECT "partition", max(end_offset) + 1 FROM feedback_ranges WHERE topic = ? GROUP BY 1""",
            [topic]).fetchall())
    new: list[OffsetRange] = []
    for st in states:
        nxt = planned.get(st.partition, st.low)
        if nxt < st.low:
            notes.append(f"partition {st.partition}: offsets {nxt}..{st.low - 1} expired before they were read")
            nxt = st.low
        pending = st.high - nxt
        if pending <= 0 or not plan_new:
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
    lag: dict[int, int] = {}
    with store.transaction(timeout_s=20, scope="feedback") as con:
        if new:
            con.executemany("INSERT INTO feedback_ranges VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                            [[r.topic, r.partition, r.start, r.end, r.run_key, datetime.now(timezone.utc)]
                             for r in new])
        rows = con.execute(
            """SELECT "partition", start_offset, end_offset FROM feedback_ranges
               WHERE topic = ? ORDER BY "partition", start_offset""", [topic]).fetchall()
        done = set(con.execute(_DONE_RANGES, [topic]).fetchall())
        # every partition, including those with nothing to read: lag 0 is a fact too
        observed = datetime.now(timezone.utc)
        for st in states:
            lag[st.partition] = partition_lag(con, topic, st.partition, st.low, st.high)
            con.execute("INSERT OR REPLACE INTO kafka_lag VALUES (?, ?, ?, ?, ?, ?)",
                        [topic, st.partition, st.high, st.high - lag[st.partition], lag[st.partition], observed])
    to_request: list[OffsetRange] = []
    unfinished: list[OffsetRange] = []
    new_cursor = dict(cursor)
    for p, s, e in rows:
        if (p, s) not in done:
            (to_request if s >= cursor.get(str(p), 0) else unfinished).append(OffsetRange(topic, p, s, e))
        new_cursor[str(p)] = max(new_cursor.get(str(p), 0), e + 1)
    return Plan(to_request, new_cursor, lag, notes, unfinished)


@dataclass
class RangeResult:
    read: int
    events_new: int
    rejects_new: int
    dlq_sent: int  # dead-letter messages delivered by this attempt (exact copies + references)
    lag: int
    seconds: float
    dlq_references: int = 0  # of which references to feedback_rejects.raw_bytes (too large to copy)
    dlq_failed: int = 0  # rejects the DLQ refused or timed out on: recorded, dlq_status 'failed: ...'
    dlq_error: str | None = None  # the first failure, for the run log


def record_lag(store: Store, topic: str, partition: int, high: int, next_offset: int | None = None) -> None:
    """Refresh one partition's row of ``kafka_lag`` after a run (see :func:`partition_lag`)."""
    with store.transaction(scope="feedback") as con:
        low = 0 if next_offset is None else min(next_offset, high)
        first = con.execute("""SELECT min(start_offset) FROM feedback_ranges WHERE topic = ? AND "partition" = ?""",
                            [topic, partition]).fetchone()[0]
        lag = partition_lag(con, topic, partition, first if first is not None else low, high)
        con.execute("INSERT OR REPLACE INTO kafka_lag VALUES (?, ?, ?, ?, ?, ?)",
                    [topic, partition, high, high - lag, lag, datetime.now(timezone.utc)])


def ingest_range(store: Store, settings: kf.KafkaSettings, rng: OffsetRange,
                 allowed_labels: frozenset[str] | None, timeout_s: float = 120.0,
                 dlq_timeout_s: float = 30.0) -> RangeResult:
    """Read exactly ``rng`` and record it; a retry of the same range adds nothing.

    Events and rejects (with the original bytes, ``dlq_status='pending'``) are recorded in
    one transaction first; then the rejects are dead-lettered to ``<topic>.dlq`` and marked
    ``sent`` / ``reference`` / ``failed: ...``. A DLQ failure never blocks the valid messages:
    the range counts as recorded, and the rejects still pending or failed are re-sent by the
    next attempt of the same range. So the table is exactly once and the DLQ at least once
    (a crash between sending and marking re-sends a copy)."""
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
            if isinstance(item, fb.Event):
                events.append(item)
            else:
                rejects.append(_with_original(item, msg))
        dlq = f"{rng.topic}.dlq"
        pause_point("feedback_before_write")
        new_e, new_r = fb.write(store, events, rejects, "kafka", dlq)
        pause_point("feedback_after_write")
        statuses: list[str] = []
        if rejects:
            known = fb.known_rejects(store, rng.topic, rng.partition, rng.start, rng.end)
            due = [r for r in rejects if fb.dlq_due(known.get(r.pos.offset))]
            if due:
                statuses = kf.send_dlq(kf.dlq_producer(settings, dlq_timeout_s), dlq, due, rng.topic,
                                       dlq_timeout_s)
                pause_point("feedback_after_dlq")
                fb.mark_dlq(store, rng.topic, rng.partition, {r.pos.offset: st for r, st in zip(due, statuses)})
        kf.commit_for_lag(cons, rng.topic, rng.partition, rng.end + 1)
        # the high watermark the last fetch reported; ask the broker only if there was none
        _, high = cons.get_watermark_offsets(_tp(rng.topic, rng.partition), cached=True)
        if high < 0:
            _, high = cons.get_watermark_offsets(_tp(rng.topic, rng.partition), timeout=10, cached=False)
    finally:
        cons.close()
    record_lag(store, rng.topic, rng.partition, high, rng.end + 1)
    failed = [st for st in statuses if st.startswith("failed")]
    return RangeResult(n, new_e, new_r, len(statuses) - len(failed), max(0, high - rng.end - 1),
                       time.perf_counter() - started, dlq_references=statuses.count("reference"),
                       dlq_failed=len(failed), dlq_error=failed[0] if failed else None)


def _with_original(item: fb.Rejected, msg) -> fb.Rejected:
    """The reject with the Kafka message's exact value, key, headers and timestamp."""
    ts_type, ts = msg.timestamp()
    return dataclasses.replace(item, raw_bytes=msg.value(), key_bytes=msg.key(),
                               headers=tuple(msg.headers() or ()),
                               timestamp_ms=ts if ts_type and ts >= 0 else None)


def _tp(topic: str, partition: int):
    from confluent_kafka import TopicPartition

    return TopicPartition(topic, partition)


# ------------------------------------------------------------------------------ drop folder


def scan_files(paths: Paths, store: Store, debounce_s: float = 2.0) -> list[str]:
    """Register stable ``feedback/**/*.jsonl`` files by sha256; returns the pending ones.

    Nothing but regular files is opened, and they are hashed streaming. Entries that cannot be
    read (a FIFO, socket or device, a broken or looping symlink, a file without read
    permission) are skipped and listed in ``scan_problems`` (area ``feedback``); other symlinks
    are ignored. A copy of a quarantined file's content is quarantined too."""
    from .ingest import hash_file, quarantine_file, read_problem, record_scan_problems, walk_files

    wall = time.time()
    walk = walk_files(paths.feedback, lambda name: name.endswith(".jsonl"), follow_links=False)
    problems = list(walk.problems)
    with store.connect(timeout_s=20) as con:
        # (path, size, mtime) already hashed: a tick re-reads only new or changed files
        seen = set(con.execute("SELECT path, size, mtime_ns FROM feedback_files").fetchall())
        quarantined = {sha: (p, err) for sha, p, err in con.execute(
            "SELECT sha256, path, error FROM feedback_files WHERE status = 'quarantined'").fetchall()}
    found = []
    for path, rel, st in sorted(walk.files, key=lambda f: f[1]):
        if wall - st.st_mtime < debounce_s or (rel, st.st_size, st.st_mtime_ns) in seen:
            continue
        try:
            sha, _ = hash_file(path)
            after = path.stat()
        except FileNotFoundError:
            continue
        except OSError as exc:  # unreadable, or a special file put in its place since the walk
            problems.append((rel, read_problem(exc)))
            continue
        if (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
            continue  # still being written
        if sha in quarantined:
            first, reason = quarantined[sha]
            now = datetime.now(timezone.utc)
            quarantine_file(paths.failed / "feedback" / now.date().isoformat(), path, sha, {
                "file": f"feedback/{rel}", "sha256": sha, "rule": "copy_of_quarantined", "copy_of": f"feedback/{first}",
                "message": f"same content as feedback/{first}, which was quarantined because: {reason}",
                "quarantined_at": now.isoformat()}, paths.home)
            continue
        found.append((rel, st, sha))
    with store.transaction(timeout_s=20, scope="feedback") as con:
        for rel, st, sha in found:
            con.execute("INSERT INTO feedback_files (sha256, path, size, mtime_ns, status, arrived_at) "
                        "VALUES (?, ?, ?, ?, 'pending', ?) ON CONFLICT DO NOTHING",
                        [sha, rel, st.st_size, st.st_mtime_ns, datetime.now(timezone.utc)])
        record_scan_problems(con, "feedback", problems, datetime.now(timezone.utc))
        return [r[0] for r in con.execute(
            "SELECT sha256 FROM feedback_files WHERE status = 'pending' ORDER BY arrived_at, path").fetchall()]


def ingest_file(paths: Paths, store: Store, sha: str, allowed_labels: frozenset[str] | None) -> dict:
    from .ingest import open_regular, quarantine_file

    with store.connect() as con:
        row = con.execute("SELECT path, status FROM feedback_files WHERE sha256 = ?", [sha]).fetchone()
    if row is None:
        raise KeyError(f"feedback file {sha} is not registered")
    rel, status = row
    if status in ("quarantined", "missing"):
        return {"file": rel, "status": status, "events": 0, "rejects": 0}
    src = paths.feedback / rel
    topic = f"file:{sha}"
    events: list[fb.Event] = []
    rejects: list[fb.Rejected] = []
    good = 0
    try:
        fh = open_regular(src)
    except FileNotFoundError:
        with store.transaction(scope="feedback") as con:
            con.execute("UPDATE feedback_files SET status='missing', error=?, processed_at=? WHERE sha256=?",
                        ["file vanished from feedback/ before it was processed", datetime.now(timezone.utc), sha])
        return {"file": rel, "status": "missing", "events": 0, "rejects": 0}
    with fh:
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
        first = rejects[0]
        quarantine_file(paths.failed / "feedback" / now.date().isoformat(), src, sha, {
            "file": f"feedback/{rel}", "sha256": sha, "rule": first.rule, "line": first.pos.offset,
            "message": first.error, "quarantined_at": now.isoformat()}, paths.home)
        with store.transaction(scope="feedback") as con:
            con.execute("UPDATE feedback_files SET status='quarantined', error=?, processed_at=? WHERE sha256=?",
                        [f"{first.rule} at line {first.pos.offset}: {first.error}", now, sha])
        return {"file": rel, "status": "quarantined", "events": 0, "rejects": 0}
    new_e, new_r = fb.write(store, events, rejects, "file")
    with store.transaction(scope="feedback") as con:
        con.execute("UPDATE feedback_files SET status='processed', events=?, rejects=?, processed_at=? WHERE sha256=?",
                    [len(events), len(rejects), now, sha])
    return {"file": rel, "status": "processed", "events": new_e, "rejects": new_r}


# ------------------------------------------------------------------ drop-folder batches


@dataclass(frozen=True)
class FileBatch:
    seq: int
    run_key: str
    files: tuple[str, ...]  # sha256s


def plan_file_batches(store: Store, max_files: int = 100) -> list[FileBatch]:
    """Cut pending feedback files that are in no batch yet into batches, stored before any
    run is requested (as :func:`ingest.plan_batches` does for raw files)."""
    new: list[FileBatch] = []
    with store.transaction(timeout_s=20, scope="feedback") as con:
        shas = [r[0] for r in con.execute(
            """SELECT sha256 FROM feedback_files WHERE status = 'pending' AND batch_seq IS NULL
               ORDER BY arrived_at, path""").fetchall()]
        for start in range(0, len(shas), max_files):
            group = tuple(sorted(shas[start:start + max_files]))
            run_key = "feedback-files:" + hashlib.sha256("\n".join(group).encode()).hexdigest()[:16]
            seq = con.execute("SELECT nextval('feedback_batch_seq')").fetchone()[0]
            con.execute("INSERT INTO feedback_file_batches VALUES (?, ?, ?, ?)",
                        [seq, run_key, len(group), datetime.now(timezone.utc)])
            con.executemany("UPDATE feedback_files SET batch_seq = ? WHERE sha256 = ?", [[seq, s] for s in group])
            new.append(FileBatch(seq, run_key, group))
    return new


def file_batches(store: Store, after_seq: int = 0) -> list[FileBatch]:
    """Batches cut after ``after_seq`` that still have a pending file: what a cursor has not
    requested yet (``after_seq`` = the cursor), or what is not done (``after_seq`` = 0)."""
    with store.connect(timeout_s=20) as con:
        rows = con.execute(
            """SELECT b.seq, b.run_key, array_agg(f.sha256 ORDER BY f.sha256) FROM feedback_file_batches b
               JOIN feedback_files f ON f.batch_seq = b.seq
               WHERE b.seq > ? GROUP BY b.seq, b.run_key HAVING bool_or(f.status = 'pending') ORDER BY b.seq""",
            [after_seq]).fetchall()
    return [FileBatch(seq, key, tuple(files)) for seq, key, files in rows]


MAX_MESSAGE_BYTES = 900_000  # a feedback message's JSON, under the producer's message.max.bytes (1 MB)


class NotDelivered(RuntimeError):
    """Kafka refused or did not confirm some messages (``failed``: their indexes) in time."""

    def __init__(self, message: str, delivered: int, failed: list[int]):
        super().__init__(message)
        self.delivered, self.failed = delivered, failed


class FeedbackSender:
    """Feedback messages to Kafka when KAFKA_BOOTSTRAP_SERVERS is set, else one file per call in
    the feedback/ drop folder (the CLI's `feedback send`, the API's POST /v1/feedback).

    One idempotent producer for the sender's life (the API keeps one: a producer per request
    took a new broker connection each, and a 60 s flush that held a server thread while the
    broker was away). Each message's delivery is confirmed on its own within ``timeout_s``,
    which is also librdkafka's ``message.timeout.ms``: a message is reported delivered or failed
    within it (one that timed out in flight may still have reached the broker: sending it again
    can duplicate it, which label consensus counts once per record and source); the client
    library's errors (a full local queue, a refused message, a fatal error, after which the
    next send makes a new producer) end as :class:`NotDelivered` naming which messages went
    and which did not, never as another exception."""

    def __init__(self, settings: Settings, paths: Paths, timeout_s: float = 60.0):
        self.settings, self.paths, self.timeout_s = settings, paths, float(timeout_s)
        self.kafka = kf.KafkaSettings.from_env()
        self._producer = None
        self._lock = threading.Lock()

    def _get_producer(self):
        with self._lock:
            if self._producer is None:
                self._producer = kf.producer(self.kafka, **{"message.timeout.ms": max(1, int(self.timeout_s * 1000))})
            return self._producer

    def send(self, messages: list[dict]) -> str:
        """Where the messages went; raises NotDelivered when Kafka does not confirm each of them."""
        if self.kafka is None:
            name = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}.jsonl"
            # a hidden temp name, fsync, rename: the drop-folder sensor never sees half a file
            write_bytes_atomic(self.paths.feedback / name, "".join(json.dumps(m) + "\n" for m in messages).encode())
            return str(self.paths.feedback / name)
        from confluent_kafka import KafkaException

        prod, topic = self._get_producer(), self.settings.feedback_topic
        reports: dict[int, object] = {}
        for i, m in enumerate(messages):
            try:
                prod.produce(topic, key=m["record_id"].encode(), value=json.dumps(m).encode(),
                             on_delivery=lambda err, msg, i=i: reports.__setitem__(i, err))
            except BufferError:
                reports[i] = "the producer's local queue is full"
            except KafkaException as exc:  # refused before sending (too large, or the producer is dead)
                reports[i] = exc.args[0] if exc.args else exc
            prod.poll(0)
        deadline = time.monotonic() + self.timeout_s + 5  # message.timeout.ms reports each before this
        while len(reports) < len(messages) and time.monotonic() < deadline:
            prod.poll(0.05)  # delivery reports run in whichever thread polls: ours are in ``reports``
        failed = [i for i in range(len(messages)) if reports.get(i, "no delivery report") is not None]
        if any(getattr(err, "fatal", lambda: False)() for err in reports.values() if err is not None):
            with self._lock:  # a fatal error ends a producer (idempotence broken): the next send makes a new one
                if self._producer is prod:
                    self._producer = None
        if failed:
            first = reports.get(failed[0], "no delivery report")
            why = f"{first.name()}: {first.str()}" if hasattr(first, "name") else str(first)
            raise NotDelivered(f"{len(failed)} of {len(messages)} feedback message(s) not acknowledged by "
                               f"{self.kafka.bootstrap_servers} within {self.timeout_s:g} s ({why[:200]})",
                               len(messages) - len(failed), failed)
        return f"kafka topic {topic}"

    def close(self) -> None:
        with self._lock:
            prod, self._producer = self._producer, None
        if prod is not None:
            prod.flush(5)


def send_feedback(messages: list[dict], settings: Settings, paths: Paths) -> str:
    """:meth:`FeedbackSender.send` once (the CLI): waits up to 60 s for Kafka to confirm them."""
    sender = FeedbackSender(settings, paths, 60.0)
    try:
        return sender.send(messages)
    finally:
        sender.close()
