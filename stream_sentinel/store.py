"""DuckDB storage: the file registry, records, rejects, embeddings and index history.

``Store(path)`` is the embedded default, one DuckDB file; ``Store(url)`` with a
``postgresql+psycopg2://`` URL is the same store on PostgreSQL (``pgstore``: the same schema
and statements, written by several processes at once).

DuckDB lets one process hold a read-write handle at a time. The sensor (in the
daemon), the run workers and the CLI are separate processes, so every caller opens a
short-lived connection through :meth:`Store.connect`, which waits (with backoff) while
another process holds the lock instead of failing. Keep work that does not need the
database (embedding, parsing) outside the ``with`` block.
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time
from pathlib import Path
from typing import Iterator

import duckdb

from . import pgstore

SCHEMA = """
CREATE SEQUENCE IF NOT EXISTS vec_id_seq START 1;
CREATE SEQUENCE IF NOT EXISTS batch_seq START 1;

-- every distinct file content ever seen in raw/, keyed by sha256 (the durable registry)
CREATE TABLE IF NOT EXISTS files (
    sha256 VARCHAR PRIMARY KEY,
    path VARCHAR NOT NULL,              -- relative to raw/, where it was first seen
    size BIGINT NOT NULL,
    arrived_at TIMESTAMPTZ NOT NULL,
    arrival_date DATE NOT NULL,         -- the raw_records / embeddings partition
    est_records BIGINT,
    status VARCHAR NOT NULL,            -- pending | batched | processed | quarantined | missing
    batch_seq BIGINT,
    records_ingested BIGINT,
    records_rejected BIGINT,
    records_skipped BIGINT,
    error VARCHAR,
    quarantine_path VARCHAR,
    processed_at TIMESTAMPTZ
);

-- every (path, size, mtime) the sensor has hashed, so it never re-hashes a known file;
-- duplicate = true when the content was already registered under another path
CREATE TABLE IF NOT EXISTS file_paths (
    path VARCHAR NOT NULL,
    size BIGINT NOT NULL,
    mtime_ns BIGINT NOT NULL,
    sha256 VARCHAR NOT NULL,
    duplicate BOOLEAN NOT NULL,
    seen_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (path, size, mtime_ns)
);

-- micro-batches the sensor cut; run_key is deterministic so a replayed tick dedupes
CREATE TABLE IF NOT EXISTS batches (
    seq BIGINT PRIMARY KEY,
    run_key VARCHAR UNIQUE NOT NULL,
    partition_key VARCHAR NOT NULL,
    n_files BIGINT NOT NULL,
    est_records BIGINT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL
);

CREATE TABLE IF NOT EXISTS records (
    id VARCHAR PRIMARY KEY,
    vec_id BIGINT NOT NULL UNIQUE,      -- stable int64 id used by the FAISS index
    text VARCHAR NOT NULL,
    event_time TIMESTAMPTZ NOT NULL,
    features JSON,
    label JSON,
    extra JSON,
    content_hash VARCHAR NOT NULL,
    file_sha256 VARCHAR NOT NULL,
    position VARCHAR,
    arrival_date DATE NOT NULL,
    ingested_at TIMESTAMPTZ NOT NULL
);

CREATE TABLE IF NOT EXISTS rejects (
    file_sha256 VARCHAR NOT NULL,
    position VARCHAR NOT NULL,
    file_path VARCHAR,
    record_id VARCHAR,
    rule VARCHAR NOT NULL,
    message VARCHAR NOT NULL,
    raw VARCHAR,
    arrival_date DATE,
    rejected_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (file_sha256, position)
);

CREATE TABLE IF NOT EXISTS embeddings (
    record_id VARCHAR NOT NULL,
    model_id VARCHAR NOT NULL,
    vec_id BIGINT NOT NULL,
    dim INTEGER NOT NULL,
    vector FLOAT[] NOT NULL,            -- L2-normalized
    created_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (record_id, model_id)
);

CREATE TABLE IF NOT EXISTS index_versions (
    version VARCHAR PRIMARY KEY,
    parent_version VARCHAR,
    model_id VARCHAR NOT NULL,
    mode VARCHAR NOT NULL,              -- rebuild | incremental
    index_type VARCHAR NOT NULL,
    dim INTEGER NOT NULL,
    ntotal BIGINT NOT NULL,
    n_added BIGINT NOT NULL,
    data_version VARCHAR NOT NULL,
    duration_ms DOUBLE NOT NULL,
    built_at TIMESTAMPTZ NOT NULL
);

CREATE TABLE IF NOT EXISTS feedback_events (
    topic VARCHAR NOT NULL,
    "partition" INTEGER NOT NULL,
    "offset" BIGINT NOT NULL,
    record_id VARCHAR NOT NULL,
    label VARCHAR NOT NULL,
    source VARCHAR NOT NULL,
    confidence DOUBLE NOT NULL,
    ts TIMESTAMPTZ NOT NULL,
    source_kind VARCHAR NOT NULL,       -- kafka | file
    ingested_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (topic, "partition", "offset")
);
CREATE TABLE IF NOT EXISTS feedback_rejects (
    topic VARCHAR NOT NULL,
    "partition" INTEGER NOT NULL,
    "offset" BIGINT NOT NULL,
    msg_key VARCHAR,
    raw VARCHAR,
    rule VARCHAR NOT NULL,
    error VARCHAR NOT NULL,
    source_kind VARCHAR NOT NULL,
    dlq_topic VARCHAR,
    rejected_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (topic, "partition", "offset")
);
-- offset ranges the Kafka sensor has cut; run keys derive from them
CREATE TABLE IF NOT EXISTS feedback_ranges (
    topic VARCHAR NOT NULL,
    "partition" INTEGER NOT NULL,
    start_offset BIGINT NOT NULL,
    end_offset BIGINT NOT NULL,          -- inclusive
    run_key VARCHAR NOT NULL UNIQUE,
    created_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (topic, "partition", start_offset)
);
CREATE TABLE IF NOT EXISTS kafka_lag (
    topic VARCHAR NOT NULL,
    "partition" INTEGER NOT NULL,
    end_offset BIGINT NOT NULL,          -- high watermark
    next_offset BIGINT NOT NULL,         -- next offset not yet processed
    lag BIGINT NOT NULL,
    observed_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (topic, "partition")
);
CREATE TABLE IF NOT EXISTS feedback_files (
    sha256 VARCHAR PRIMARY KEY,
    path VARCHAR NOT NULL,
    size BIGINT,
    mtime_ns BIGINT,
    status VARCHAR NOT NULL,             -- pending | processed | quarantined
    events BIGINT,
    rejects BIGINT,
    error VARCHAR,
    arrived_at TIMESTAMPTZ NOT NULL,
    processed_at TIMESTAMPTZ
);
CREATE TABLE IF NOT EXISTS labels (
    record_id VARCHAR PRIMARY KEY,
    label VARCHAR,
    weight DOUBLE NOT NULL,              -- winning label's share of the vote weight
    margin DOUBLE NOT NULL,              -- (top - runner-up) / total weight
    n_votes INTEGER NOT NULL,
    n_reviewers INTEGER NOT NULL,
    conflict BOOLEAN NOT NULL,           -- margin under the threshold: held out of training
    status VARCHAR NOT NULL,             -- resolved | conflict | pending (record not ingested yet)
    resolved_at TIMESTAMPTZ,
    last_vote_at TIMESTAMPTZ NOT NULL
);
CREATE TABLE IF NOT EXISTS reviewer_reliability (
    source VARCHAR PRIMARY KEY,
    reliability DOUBLE NOT NULL,
    n_votes BIGINT NOT NULL,
    n_scored BIGINT NOT NULL,            -- votes on records with a non-conflicting consensus
    n_agree BIGINT NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL
);

-- model lineage: a training set is identified by the hash of its label set
CREATE TABLE IF NOT EXISTS training_sets (
    data_version VARCHAR PRIMARY KEY,
    embedding_model_id VARCHAR NOT NULL,
    positive_label VARCHAR NOT NULL,
    n_train BIGINT NOT NULL,
    n_valid BIGINT NOT NULL,
    n_golden BIGINT NOT NULL,
    label_counts JSON,
    created_at TIMESTAMPTZ NOT NULL
);
CREATE TABLE IF NOT EXISTS training_set_rows (
    data_version VARCHAR NOT NULL,
    record_id VARCHAR NOT NULL,
    label VARCHAR NOT NULL,
    split VARCHAR NOT NULL,              -- train | valid | golden
    PRIMARY KEY (data_version, record_id)
);
CREATE TABLE IF NOT EXISTS model_versions (
    version VARCHAR PRIMARY KEY,
    semver VARCHAR NOT NULL,
    parent_version VARCHAR,
    status VARCHAR NOT NULL,             -- candidate | champion | challenger | rejected | archived
    strategy VARCHAR NOT NULL,           -- full | incremental
    params JSON,
    metrics JSON,
    training_samples BIGINT NOT NULL,
    training_set_version VARCHAR NOT NULL,
    embedding_model_id VARCHAR NOT NULL,
    path VARCHAR NOT NULL,
    sha256 VARCHAR NOT NULL,
    created_at TIMESTAMPTZ NOT NULL,
    promoted_at TIMESTAMPTZ,
    promoted_score DOUBLE,
    reason VARCHAR
);
CREATE SEQUENCE IF NOT EXISTS learning_event_seq START 1;
CREATE TABLE IF NOT EXISTS learning_events (
    event_id BIGINT PRIMARY KEY DEFAULT nextval('learning_event_seq'),
    event_type VARCHAR NOT NULL,         -- update | update_failed | promotion | rejection | rollback | ab_decision
    model_version VARCHAR,
    batch_size BIGINT,
    samples_processed BIGINT,
    metrics_before JSON,
    metrics_after JSON,
    improvement DOUBLE,
    duration_ms DOUBLE,
    detail JSON,
    created_at TIMESTAMPTZ NOT NULL
);
CREATE TABLE IF NOT EXISTS predictions (
    record_id VARCHAR NOT NULL,
    model_version VARCHAR NOT NULL,
    role VARCHAR NOT NULL,               -- champion | challenger
    probability DOUBLE NOT NULL,
    label VARCHAR NOT NULL,
    served BOOLEAN NOT NULL,             -- the A/B route sent this record to this model (else: shadow)
    scored_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (record_id, model_version)
);
-- the champion's answer for each record (follows promotions and rollbacks)
-- the served answer for each record: the champion's own when it scored the record, else the
-- newest answer of a version that served as champion (a promotion rescored only a recent window)
CREATE OR REPLACE VIEW current_predictions AS
    SELECT * EXCLUDE (rank_) FROM (
        SELECT p.*, row_number() OVER (PARTITION BY p.record_id ORDER BY (m.status = 'champion') DESC,
                                       p.scored_at DESC, p.model_version DESC) AS rank_
        FROM predictions p JOIN model_versions m ON m.version = p.model_version
        WHERE m.status = 'champion' OR p.role = 'champion')
    WHERE rank_ = 1;

-- drift: one row per report (a daily partition or an ad-hoc window), one per tested column
CREATE TABLE IF NOT EXISTS drift_reports (
    window_key VARCHAR PRIMARY KEY,      -- the partition date, or <time_field>:<from>..<to>
    kind VARCHAR NOT NULL,               -- partition | adhoc | recent (the rolling report, by vec_id)
    time_field VARCHAR NOT NULL,         -- arrival | event_time
    start VARCHAR NOT NULL,
    "end" VARCHAR NOT NULL,
    status VARCHAR NOT NULL,             -- ok | insufficient_data | no_champion
    message VARCHAR,
    n_current BIGINT,
    n_reference BIGINT,
    n_labelled BIGINT,
    share_drifted DOUBLE,                -- drifted feature columns / feature columns
    n_drifted BIGINT,
    n_features BIGINT,
    embedding_drift DOUBLE,
    embedding_drifted BOOLEAN,
    prediction_drifted BOOLEAN,
    label_drifted BOOLEAN,
    accuracy DOUBLE,                     -- the champion on the window's labelled records
    reference_accuracy DOUBLE,           -- the champion's validation accuracy
    accuracy_dropped BOOLEAN,
    drifted BOOLEAN NOT NULL,
    report_path VARCHAR,
    reference_data_version VARCHAR,      -- the champion's training set: the reference window
    model_version VARCHAR,
    created_at TIMESTAMPTZ NOT NULL
);
CREATE TABLE IF NOT EXISTS drift_metrics (
    window_key VARCHAR NOT NULL,
    column_name VARCHAR NOT NULL,
    column_group VARCHAR NOT NULL,       -- feature | embedding | prediction | label | accuracy
    method VARCHAR NOT NULL,
    score DOUBLE,
    threshold DOUBLE,
    drifted BOOLEAN NOT NULL,
    reference_data_version VARCHAR,
    model_version VARCHAR,
    created_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (window_key, column_name)
);
-- units of work (a raw batch, a Kafka range, a feedback file) whose runs kept failing; still
-- retried slowly, listed until done (stream_sentinel/retry.py)
CREATE TABLE IF NOT EXISTS parked_units (
    unit_key VARCHAR PRIMARY KEY,
    kind VARCHAR NOT NULL,               -- raw_batch | kafka_range | feedback_file
    attempts INTEGER NOT NULL,
    last_error VARCHAR,
    last_run_id VARCHAR,
    parked_at TIMESTAMPTZ NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL
);
-- drop-folder feedback files cut into runs, like raw batches (the plan is durable, the
-- run key deterministic, so a replayed tick asks for the same run and retries know the files)
CREATE SEQUENCE IF NOT EXISTS feedback_batch_seq START 1;
CREATE TABLE IF NOT EXISTS feedback_file_batches (
    seq BIGINT PRIMARY KEY,
    run_key VARCHAR UNIQUE NOT NULL,
    n_files BIGINT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL
);
ALTER TABLE feedback_files ADD COLUMN IF NOT EXISTS batch_seq BIGINT;
-- facts a run hands from one step to the next (e.g. the training set version for the model
-- step), keyed by the run: never "the latest materialization event"
CREATE TABLE IF NOT EXISTS run_facts (
    run_id VARCHAR NOT NULL,
    fact VARCHAR NOT NULL,
    value VARCHAR NOT NULL,
    PRIMARY KEY (run_id, fact)
);
-- feedback_rejects keeps the original message bytes (null value / null key stay NULL) and
-- the dead-letter outcome: pending | sent | reference (too large: the DLQ got a reference to
-- raw_bytes) | failed: <reason>; NULL = no DLQ (file rows, or recorded before this column)
ALTER TABLE feedback_rejects ADD COLUMN IF NOT EXISTS raw_bytes BLOB;
ALTER TABLE feedback_rejects ADD COLUMN IF NOT EXISTS key_bytes BLOB;
ALTER TABLE feedback_rejects ADD COLUMN IF NOT EXISTS dlq_status VARCHAR;
-- entries the scans of raw/ and feedback/ cannot read (a FIFO, socket or device, a broken or
-- looping symlink, a file or folder without read permission): upserted by every scan, removed
-- once the path scans fine or is gone. files.status has two more values besides those above:
-- waiting (its end looks unfinished and it is younger than the settle window; the scan
-- re-examines it) and superseded (it changed after it was registered; the new content is
-- registered as a new file, these records stay, these rejects are dropped); feedback_files.status
-- also has missing (the file vanished before it was read)
CREATE TABLE IF NOT EXISTS scan_problems (
    area VARCHAR NOT NULL,               -- raw | feedback
    path VARCHAR NOT NULL,               -- relative to raw/ or feedback/
    reason VARCHAR NOT NULL,
    first_seen TIMESTAMPTZ NOT NULL,
    last_seen TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (area, path)
);
-- a file is committed chunk by chunk; how far it got (items of read_records done, counts so
-- far), written in each chunk's transaction so a replay resumes there; deleted when it is done
CREATE TABLE IF NOT EXISTS file_progress (
    sha256 VARCHAR PRIMARY KEY,
    items_done BIGINT NOT NULL,
    ingested BIGINT NOT NULL,
    skipped BIGINT NOT NULL,
    rejected BIGINT NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL
);
-- the class a training set's model answers when it does not answer positive_label: the other
-- configured label, or (any label accepted) the data's most frequent other one
ALTER TABLE training_sets ADD COLUMN IF NOT EXISTS negative_label VARCHAR;
-- drift_reports.accuracy is prequential (answers served before their labels arrived); n_accuracy
-- counts them; reference_excluded: reference rows left out because they were current rows too
ALTER TABLE drift_reports ADD COLUMN IF NOT EXISTS n_accuracy BIGINT;
ALTER TABLE drift_reports ADD COLUMN IF NOT EXISTS reference_excluded BIGINT;
-- the API's answers (served.py): one row per answer, the served one and the shadow one
CREATE TABLE IF NOT EXISTS served_predictions (
    request_id VARCHAR NOT NULL,
    i INTEGER NOT NULL,                  -- the record's place in the request
    role VARCHAR NOT NULL,               -- champion | challenger
    record_id VARCHAR NOT NULL,
    routing_key VARCHAR NOT NULL,
    model_version VARCHAR NOT NULL,
    served BOOLEAN NOT NULL,             -- this answer was returned (else scored in shadow)
    probability DOUBLE NOT NULL,
    label VARCHAR NOT NULL,
    input VARCHAR NOT NULL,              -- stored (a known record's embedding) | text
    served_at TIMESTAMPTZ NOT NULL,
    file VARCHAR NOT NULL,
    file_offset BIGINT NOT NULL,
    loaded_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (request_id, i, role)
);
CREATE TABLE IF NOT EXISTS served_files (
    path VARCHAR PRIMARY KEY,            -- relative to served/
    bytes_done BIGINT NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL
);
CREATE TABLE IF NOT EXISTS served_rejects (
    file VARCHAR NOT NULL,
    file_offset BIGINT NOT NULL,
    rule VARCHAR NOT NULL,
    raw BLOB NOT NULL,
    created_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (file, file_offset)
);
-- a training set's rows in the order their labels became known (learning order); NULL in
-- sets made before it was kept (those fall back to event time)
ALTER TABLE training_set_rows ADD COLUMN IF NOT EXISTS position BIGINT;

-- declared windows (stream_sentinel.windows): what the stored state was computed with
CREATE TABLE IF NOT EXISTS window_defs (
    name VARCHAR PRIMARY KEY,
    digest VARCHAR NOT NULL,            -- of the declaration; a change recomputes the window
    spec JSON NOT NULL,
    lateness_us BIGINT NOT NULL,
    watermark_us BIGINT,                -- newest event time seen; records older than it minus the lateness are late
    declared_at TIMESTAMPTZ NOT NULL,
    ingested_through TIMESTAMPTZ        -- every record ingested before this has values (NULL: look at all)
);
-- the windows' state: each keyed record's event time and aggregated field, per window
CREATE TABLE IF NOT EXISTS window_events (
    name VARCHAR NOT NULL,
    record_id VARCHAR NOT NULL,
    key VARCHAR NOT NULL,               -- the key's value as JSON text
    t BIGINT NOT NULL,                  -- event time, microseconds since the epoch (UTC)
    num DOUBLE,                         -- the field as a number (sum/mean/min/max)
    tok VARCHAR,                        -- the field as JSON text (distinct); NULL: absent
    dropped BOOLEAN NOT NULL,           -- later than the allowed lateness: in no other record's value
    PRIMARY KEY (name, record_id)
);
-- the order events were appended in (1, 2, ...; NULL before it was kept): a reader that holds
-- the state in memory (the API) loads only what came after what it has
ALTER TABLE window_events ADD COLUMN IF NOT EXISTS seq BIGINT;
-- each record's window values, the features win_<name> the model sees
CREATE TABLE IF NOT EXISTS window_features (
    record_id VARCHAR PRIMARY KEY,
    "values" JSON NOT NULL,             -- {"win_<name>": value}; null: no key or an empty mean/min/max
    late BOOLEAN NOT NULL,              -- arrived later than the allowed lateness
    digest VARCHAR NOT NULL,            -- the window set it was computed with
    computed_at TIMESTAMPTZ NOT NULL
);
-- erasures (stream_sentinel.erasure): one row per erased record id, named by its keyed hash;
-- the id and the content are never stored
CREATE TABLE IF NOT EXISTS erasures (
    id_hash VARCHAR PRIMARY KEY,        -- HMAC-SHA256 of the record id (erasure.keys)
    reason VARCHAR,
    status VARCHAR NOT NULL,            -- running | completed
    requested_at TIMESTAMPTZ NOT NULL,
    started_at TIMESTAMPTZ NOT NULL,
    completed_at TIMESTAMPTZ,
    counts JSON,                        -- what was removed, per place
    plan JSON,                          -- while running: vec_ids, model versions, reports to remove
    retrain_needed BOOLEAN,             -- it withdrew a model: erasure_retrain_sensor starts a full retrain
    lifted_at TIMESTAMPTZ               -- set: a record with this id may arrive again
);
-- the erasure whose record a model version was trained on (NULL: none); such a version is
-- never served, promoted or rolled back to
ALTER TABLE model_versions ADD COLUMN IF NOT EXISTS tainted_by VARCHAR;
-- records with their window values merged into features: what training, scoring, serving and
-- drift read, so a window feature is computed one way everywhere
CREATE OR REPLACE VIEW records_w AS
    SELECT r.* REPLACE (CASE WHEN w.record_id IS NULL THEN r.features
                        ELSE json_merge_patch(coalesce(r.features, '{}'), w."values") END AS features)
    FROM records r LEFT JOIN window_features w ON w.record_id = r.id;
"""

# The order in which the model learns labels: when each became known (labels.resolved_at, kept
# while a label stays the same), then event time, then id. Not event time alone: a stream
# delivers late records (older event times) after newer ones, and what arrived last is what
# the stream is now. Used over ``labels l JOIN records r``.
LEARNING_ORDER = "l.resolved_at, r.event_time, l.record_id"


STORE_URL_ENV = "STREAM_SENTINEL_STORE_URL"


def store_url(environ=None) -> str | None:
    """The metrics store's PostgreSQL URL from ``STREAM_SENTINEL_STORE_URL`` (None: DuckDB).
    Refused, naming the variable but never the value, unless it is a PostgreSQL URL."""
    from .config import SettingError

    url = (os.environ if environ is None else environ).get(STORE_URL_ENV, "").strip()
    if url and not url.startswith("postgresql+psycopg2://"):
        raise SettingError(f"{STORE_URL_ENV} must be a postgresql+psycopg2:// URL (or unset for DuckDB)")
    return url or None


def location(db_path: Path, environ=None) -> str | Path:
    """Where the store is: ``STREAM_SENTINEL_STORE_URL`` when set, else the DuckDB file."""
    return store_url(environ) or db_path


def vectors_from_arrow(column, n: int):
    """A vector column read as Arrow as an (n, dim) float32 array, without a Python loop: a
    DuckDB FLOAT[] (Arrow list), or PostgreSQL's BYTEA of big-endian float32 (Arrow binary,
    see ``pgstore.VECTOR_DTYPE``)."""
    import numpy as np
    import pyarrow as pa

    if n == 0:
        return np.zeros((0, 0), dtype=np.float32)
    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        flat = np.frombuffer(b"".join(column.to_pylist()), dtype=pgstore.VECTOR_DTYPE)
        return flat.astype(np.float32).reshape(n, -1)
    flat = column.combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(flat, dtype=np.float32).reshape(n, -1)


# database files whose schema this process already created: sensors and assets make a new
# Store per tick or run, and the DDL need not run again each time
_SCHEMA_DONE: set[str] = set()


def table_columns(table: str) -> list[tuple[str, str, bool, str]]:
    """(name, type, nullable, comment) of a table or view of ``SCHEMA``, in column order.

    Read from an in-memory database made from the schema itself, so the data catalog's
    column lists cannot drift from the DDL and need no data file (the code location asks
    when it loads). The comment is the column's ``--`` note in ``SCHEMA``, if any.
    """
    return list(_schema_columns().get(table, ()))


def _schema_columns() -> dict[str, tuple[tuple[str, str, bool, str], ...]]:
    global _COLUMNS
    if _COLUMNS is None:
        con = duckdb.connect(":memory:")
        try:
            con.execute(SCHEMA)
            rows = con.execute("""SELECT table_name, column_name, data_type, is_nullable = 'YES'
                                  FROM information_schema.columns ORDER BY table_name, ordinal_position""").fetchall()
        finally:
            con.close()
        notes = _column_notes()
        out: dict[str, list] = {}
        for table, name, dtype, nullable in rows:
            out.setdefault(table, []).append((name, dtype, bool(nullable), notes.get((table, name), "")))
        _COLUMNS = {t: tuple(cols) for t, cols in out.items()}
    return _COLUMNS


_COLUMNS: dict[str, tuple[tuple[str, str, bool, str], ...]] | None = None
_TRANSLATOR: pgstore.Translator | None = None


def _translator() -> pgstore.Translator:
    """DuckDB statements -> PostgreSQL, knowing each table's columns and primary key (for
    ``INSERT OR REPLACE``), read from the schema itself."""
    global _TRANSLATOR
    if _TRANSLATOR is None:
        con = duckdb.connect(":memory:")
        try:
            con.execute(SCHEMA)
            keys = {t: list(cols) for t, cols in con.execute(
                "SELECT table_name, constraint_column_names FROM duckdb_constraints() "
                "WHERE constraint_type = 'PRIMARY KEY'").fetchall()}
        finally:
            con.close()
        columns = {t: [c[0] for c in cols] for t, cols in _schema_columns().items()}
        _TRANSLATOR = pgstore.Translator(keys, columns)
    return _TRANSLATOR


def _column_notes() -> dict[tuple[str, str], str]:
    """The ``-- note`` after a column in ``SCHEMA``, by (table, column)."""
    notes, table = {}, None
    for line in SCHEMA.splitlines():
        head = line.strip()
        if head.upper().startswith("CREATE TABLE"):
            table = head.split()[-2] if head.endswith("(") else None
        elif table and "--" in head and not head.startswith("--"):
            col, note = head.split("--", 1)
            name = col.strip().split(" ", 1)[0]
            if name:
                notes[(table, name)] = note.strip()
    return notes


class ChangeWatch:
    """Whether a store may have changed since it was last read, known without opening it.

    Opening the DuckDB file costs a process ~20 ms of CPU, and closing it as much again
    (2-core AMD EPYC, a 100k-record file): a server that polled it every few seconds for
    labels and lag took a CPU from its embedder in 40-100 ms bursts, the search tail of
    bench/serving_search.py. A file that nobody wrote keeps its (inode, size, mtime) and
    so does its write-ahead log, so a poller reads only after a write (:meth:`Store.stamp`),
    and at least every ``max_age_s`` in any case. The stamp is taken *before* the read, so
    a write during the read is seen by the next poll. On PostgreSQL there is no stamp
    (pooled connections cost little): every poll reads."""

    def __init__(self, max_age_s: float = 60.0):
        self.max_age_s = max_age_s
        self._seen: tuple | None = None
        self._read_at = float("-inf")

    def changed(self, stamp: tuple | None) -> bool:
        return (stamp is None or stamp != self._seen
                or time.monotonic() - self._read_at >= self.max_age_s)

    def read(self, stamp: tuple | None) -> None:
        """Say that a read taken after ``stamp`` succeeded."""
        self._seen, self._read_at = stamp, time.monotonic()


class StoreBusy(RuntimeError):
    """Another process held the DuckDB file for longer than we were willing to wait."""


def _is_lock_error(exc: BaseException) -> bool:
    msg = str(exc).lower()
    return "lock" in msg and ("conflicting" in msg or "could not set" in msg)


class _Shared:
    """One open DuckDB database per file and process, shared by its threads through cursors.

    DuckDB's model is one database instance per process with a cursor per thread: two
    threads that each ``duckdb.connect`` the same file race in DuckDB's instance cache
    (``Unique file handle conflict: Cannot attach "metrics"``, seen from sensors running in
    the daemon's threads). Across processes the file has one writer at a time, so the
    instance is closed as soon as its last user in this process leaves."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # guards opening and closing, never held during queries
        self.con: duckdb.DuckDBPyConnection | None = None
        self.users = 0


_SHARED: dict[str, _Shared] = {}
_SHARED_LOCK = threading.Lock()


def _shared(key: str) -> _Shared:
    with _SHARED_LOCK:
        return _SHARED.setdefault(key, _Shared())


class _PgPool:
    """Idle PostgreSQL connections of this process, per URL (a connect costs a few ms; a
    learning step opens the store dozens of times). A forked child starts with none."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.idle: dict[tuple[int, str], list] = {}

    def take(self, url: str, timeout_s: float):
        import psycopg2

        with self.lock:
            idle = self.idle.get((os.getpid(), url))
            raw = idle.pop() if idle else None
        if raw is None or raw.closed:
            raw = psycopg2.connect(pgstore.dsn(url), connect_timeout=max(1, int(timeout_s)))
            raw.autocommit = True
        return raw

    def give(self, url: str, raw) -> None:
        import psycopg2.extensions as ext

        if raw.closed or raw.get_transaction_status() != ext.TRANSACTION_STATUS_IDLE:
            raw.close()
            return
        with raw.cursor() as cur:
            cur.execute("DISCARD TEMP")  # the registered DataFrames of the last user
        with self.lock:
            idle = self.idle.setdefault((os.getpid(), url), [])
            if len(idle) < 4:
                idle.append(raw)
                return
        raw.close()


_PG_POOL = _PgPool()


class Store:
    def __init__(self, path: str | Path, lock_timeout_s: float = 120.0, home: Path | None = None):
        # a postgresql URL selects the PostgreSQL backend; anything else is a DuckDB file
        self.url = str(path) if pgstore.is_url(path) else None
        self.path = None if self.url else Path(path)
        # the data root the store belongs to (the erasure key lives there); a DuckDB file's folder
        self.home = Path(home) if home is not None else (self.path.parent if self.path else None)
        self.lock_timeout_s = lock_timeout_s
        self._key = self.url or str(self.path.absolute())

    @classmethod
    def of(cls, paths, lock_timeout_s: float = 120.0, environ=None) -> "Store":
        """The data root's store: ``STREAM_SENTINEL_STORE_URL`` when set, else its DuckDB file."""
        return cls(location(paths.db, environ), lock_timeout_s=lock_timeout_s, home=paths.home)

    @property
    def backend(self) -> str:
        return "postgres" if self.url else "duckdb"

    def stamp(self) -> tuple | None:
        """(inode, size, mtime) of the DuckDB file and of its write-ahead log: what every
        committed write changes (see :class:`ChangeWatch`); None on PostgreSQL."""
        if self.url:
            return None
        out = []
        for path in (self.path, self.path.with_name(self.path.name + ".wal")):
            try:
                st = os.stat(path)
            except FileNotFoundError:
                out.append(None)
            else:
                out.append((st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(out)

    def __repr__(self) -> str:
        return f"Store({pgstore.redacted(self.url) if self.url else str(self.path)!r})"

    @contextlib.contextmanager
    def session(self, timeout_s: float | None = None) -> Iterator["Store"]:
        """Keep the file open for a block of work (a learning step opens it dozens of times,
        at ~10 ms each); every ``connect`` inside it, from any thread of this process, is a
        cursor of the same instance. Other processes wait for the block, so keep it to one
        run's step."""
        if self.url:  # PostgreSQL serves many processes at once: nothing to hold
            yield self
            return
        self._acquire(timeout_s)
        try:
            yield self
        finally:
            self._release()

    def _acquire(self, timeout_s: float | None) -> duckdb.DuckDBPyConnection:
        """Register a user of this process's instance, opening the file if needed."""
        shared = _shared(self._key)
        deadline = time.monotonic() + (self.lock_timeout_s if timeout_s is None else timeout_s)
        if not shared.lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise StoreBusy(f"{self.path} is being opened by another thread for too long")
        try:
            if shared.con is None:
                shared.con = self._open(deadline)
            shared.users += 1
            return shared.con
        finally:
            shared.lock.release()

    def _release(self) -> None:
        shared = _shared(self._key)
        with shared.lock:
            shared.users -= 1
            if shared.users == 0 and shared.con is not None:
                con, shared.con = shared.con, None
                con.close()

    def _open(self, deadline: float) -> duckdb.DuckDBPyConnection:
        """Open the file read-write, waiting (with backoff) while another process holds it."""
        delay = 0.02
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                con = duckdb.connect(str(self.path))
                break
            except (duckdb.IOException, duckdb.ConnectionException) as exc:
                if not _is_lock_error(exc):
                    raise
                if time.monotonic() >= deadline:
                    raise StoreBusy(f"{self.path} is locked by another process") from exc
                time.sleep(delay * (1 + random.random()))
                delay = min(delay * 2, 0.5)
        if self._key not in _SCHEMA_DONE:
            try:
                con.execute(SCHEMA)
            except BaseException:
                con.close()
                raise
            _SCHEMA_DONE.add(self._key)
        return con

    @contextlib.contextmanager
    def connect(self, timeout_s: float | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
        """A cursor of this process's instance of the file (opened on demand, closed after
        its last user); waits while another process holds the file. Connections are always
        read-write: DuckDB opens a file in one mode per process, and every caller in a
        process shares that one instance. On PostgreSQL: a pooled connection, as a
        ``pgstore.PgConnection`` (the same methods)."""
        if self.url:
            with self._pg(timeout_s) as con:
                yield con
            return
        con = self._acquire(timeout_s)
        try:
            cur = con.cursor()
            try:
                yield cur
            finally:
                cur.close()
        finally:
            self._release()

    @contextlib.contextmanager
    def _pg(self, timeout_s: float | None) -> Iterator[pgstore.PgConnection]:
        raw = _PG_POOL.take(self.url, self.lock_timeout_s if timeout_s is None else timeout_s)
        ok = False
        try:
            if self._key not in _SCHEMA_DONE:
                with raw.cursor() as cur:  # one process creates or migrates at a time
                    cur.execute("SELECT pg_advisory_lock(%s)", [pgstore._DDL_LOCK])
                    try:
                        for stmt in pgstore.schema_statements(SCHEMA):
                            cur.execute(stmt)
                    finally:
                        cur.execute("SELECT pg_advisory_unlock(%s)", [pgstore._DDL_LOCK])
                _SCHEMA_DONE.add(self._key)
            con = pgstore.PgConnection(raw, _translator(), home=self.home)
            try:
                yield con
            finally:
                con.close()
            ok = True
        finally:
            if ok:
                _PG_POOL.give(self.url, raw)
            else:
                raw.close()

    @contextlib.contextmanager
    def transaction(self, timeout_s: float | None = None, scope: str | None = None
                    ) -> Iterator[duckdb.DuckDBPyConnection]:
        """A write transaction. ``scope`` (one of ``pgstore.SCOPES``) lets it commit beside
        transactions of other scopes on PostgreSQL, where runs overlap; it must write only that
        scope's tables. Without one it runs alone. DuckDB has one writer either way."""
        if scope is not None and scope not in pgstore.SCOPES:
            raise ValueError(f"unknown write scope {scope!r} (one of {', '.join(pgstore.SCOPES)})")
        with self.connect(timeout_s=timeout_s) as con:
            if self.url:
                con.begin(scope)
            else:
                con.execute("BEGIN TRANSACTION")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    def init(self) -> "Store":
        with self.connect():
            pass
        return self

    # ---- read helpers shared by the CLI, asset checks and tests ---------------------

    def row_count(self, table: str, where: str = "", params: list | None = None) -> int:
        """Rows of one of the schema's tables (optionally those matching ``where``)."""
        if table not in _schema_columns():
            raise ValueError(f"{table!r} is not a table of the schema")
        with self.connect() as con:
            sql = f"SELECT count(*) FROM {table}" + (f" WHERE {where}" if where else "")
            return int(con.execute(sql, params or []).fetchone()[0])

    def status(self) -> dict[str, int]:
        with self.connect() as con:
            if not _has_table(con, "records"):
                return {k: 0 for k in (
                    "records", "embedded", "files", "duplicate_files", "pending_files",
                    "quarantined_files", "rejected_records", "parked_units", "waiting_files",
                    "superseded_files", "scan_problems")}
            one = lambda q: int(con.execute(q).fetchone()[0])  # noqa: E731
            return {
                "records": one("SELECT count(*) FROM records"),
                "embedded": one("SELECT count(DISTINCT record_id) FROM embeddings"),
                "files": one("SELECT count(*) FROM files"),
                "duplicate_files": one("SELECT count(*) FROM file_paths WHERE duplicate"),
                "pending_files": one("SELECT count(*) FROM files WHERE status IN ('pending','batched')"),
                "quarantined_files": one("SELECT count(*) FROM files WHERE status = 'quarantined'"),
                "rejected_records": one("SELECT count(*) FROM rejects"),
                "parked_units": one("SELECT count(*) FROM parked_units"),
                "waiting_files": one("SELECT count(*) FROM files WHERE status = 'waiting'"),
                "superseded_files": one("SELECT count(*) FROM files WHERE status = 'superseded'"),
                "scan_problems": one("SELECT count(*) FROM scan_problems"),
            }


def _has_table(con: duckdb.DuckDBPyConnection, name: str) -> bool:
    return bool(con.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [name]).fetchone()[0])
