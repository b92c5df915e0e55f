"""DuckDB storage: the file registry, records, rejects, embeddings and index history.

DuckDB lets one process hold a read-write handle at a time. The sensor (in the
daemon), the run workers and the CLI are separate processes, so every caller opens a
short-lived connection through :meth:`Store.connect`, which waits (with backoff) while
another process holds the lock instead of failing. Keep work that does not need the
database (embedding, parsing) outside the ``with`` block.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from pathlib import Path
from typing import Iterator

import duckdb

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
CREATE OR REPLACE VIEW current_predictions AS
    SELECT p.* FROM predictions p JOIN model_versions m ON m.version = p.model_version
    WHERE m.status = 'champion';

-- drift: one row per report (a daily partition or an ad-hoc window), one per tested column
CREATE TABLE IF NOT EXISTS drift_reports (
    window_key VARCHAR PRIMARY KEY,      -- the partition date, or <time_field>:<from>..<to>
    kind VARCHAR NOT NULL,               -- partition | adhoc
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
"""


def vectors_from_arrow(column, n: int):
    """A DuckDB FLOAT[] column (Arrow list) as an (n, dim) float32 array, without a Python loop."""
    import numpy as np

    if n == 0:
        return np.zeros((0, 0), dtype=np.float32)
    flat = column.combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(flat, dtype=np.float32).reshape(n, -1)


# database files whose schema this process already created: sensors and assets make a new
# Store per tick or run, and the DDL need not run again each time
_SCHEMA_DONE: set[str] = set()
# two sensor threads creating the schema at once conflict in DuckDB's catalog (seen at daemon start)
_SCHEMA_LOCK = threading.Lock()


_SESSIONS = threading.local()


def _held() -> dict:
    """This thread's open session connections, by database path (shared by every Store on it)."""
    if not hasattr(_SESSIONS, "held"):
        _SESSIONS.held = {}
    return _SESSIONS.held


class StoreBusy(RuntimeError):
    """Another process held the DuckDB file for longer than we were willing to wait."""


def _is_lock_error(exc: BaseException) -> bool:
    msg = str(exc).lower()
    return "lock" in msg and ("conflicting" in msg or "could not set" in msg)


class Store:
    def __init__(self, path: str | Path, lock_timeout_s: float = 120.0):
        self.path = Path(path)
        self.lock_timeout_s = lock_timeout_s
        self._schema_ready = str(self.path.absolute()) in _SCHEMA_DONE

    @contextlib.contextmanager
    def session(self, timeout_s: float | None = None) -> Iterator["Store"]:
        """Hold one connection for a block of work in this thread (a learning step opens the file
        dozens of times, at ~10 ms each); ``connect`` inside the block hands out cursors of it.
        Other processes wait for the block, so keep it to one run's step."""
        key = str(self.path.absolute())
        held = _held()
        if key in held:
            yield self
            return
        with self.connect(timeout_s=timeout_s) as con:
            held[key] = con
            try:
                yield self
            finally:
                held.pop(key, None)

    @contextlib.contextmanager
    def connect(self, read_only: bool = False, timeout_s: float | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
        """A short-lived connection; waits while another process holds the file."""
        held = _held().get(str(self.path.absolute()))
        if held is not None:
            cur = held.cursor()
            try:
                yield cur
            finally:
                cur.close()
            return
        deadline = time.monotonic() + (self.lock_timeout_s if timeout_s is None else timeout_s)
        delay = 0.02
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Always open read-write: DuckDB refuses a read-only and a read-write handle on the same
        # file inside one process (sensor threads, in-process runs), and across processes the
        # lock wait below serializes access anyway. `read_only` documents intent for callers.
        read_only = False
        while True:
            try:
                con = duckdb.connect(str(self.path), read_only=read_only)
                break
            except (duckdb.IOException, duckdb.ConnectionException) as exc:
                if not _is_lock_error(exc):
                    raise
                if time.monotonic() >= deadline:
                    raise StoreBusy(f"{self.path} is locked by another process") from exc
                time.sleep(delay * (1 + random.random()))
                delay = min(delay * 2, 0.5)
        try:
            if not read_only and not self._schema_ready:
                with _SCHEMA_LOCK:
                    if str(self.path.absolute()) not in _SCHEMA_DONE:
                        con.execute(SCHEMA)
                        _SCHEMA_DONE.add(str(self.path.absolute()))
                self._schema_ready = True
            yield con
        finally:
            con.close()

    @contextlib.contextmanager
    def transaction(self, timeout_s: float | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
        with self.connect(timeout_s=timeout_s) as con:
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

    def status(self) -> dict[str, int]:
        with self.connect(read_only=True) as con:
            if not _has_table(con, "records"):
                return {k: 0 for k in (
                    "records", "embedded", "files", "duplicate_files", "pending_files",
                    "quarantined_files", "rejected_records")}
            one = lambda q: int(con.execute(q).fetchone()[0])  # noqa: E731
            return {
                "records": one("SELECT count(*) FROM records"),
                "embedded": one("SELECT count(DISTINCT record_id) FROM embeddings"),
                "files": one("SELECT count(*) FROM files"),
                "duplicate_files": one("SELECT count(*) FROM file_paths WHERE duplicate"),
                "pending_files": one("SELECT count(*) FROM files WHERE status IN ('pending','batched')"),
                "quarantined_files": one("SELECT count(*) FROM files WHERE status = 'quarantined'"),
                "rejected_records": one("SELECT count(*) FROM rejects"),
            }


def _has_table(con: duckdb.DuckDBPyConnection, name: str) -> bool:
    return bool(con.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [name]).fetchone()[0])
