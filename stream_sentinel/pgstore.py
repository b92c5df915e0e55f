"""The metrics store on PostgreSQL: the same schema and the same SQL as DuckDB, one copy.

Why a connection that speaks DuckDB's Python API instead of a query builder: the library's
~300 statements are written once, in the SQL that DuckDB and PostgreSQL share (standard
joins, window functions, ``ON CONFLICT``, sequences, ``information_schema``), and call the
few DuckDB Python methods they need (``execute(sql, params)`` then ``fetchone/fetchall/df``,
``executemany``, ``register`` of a DataFrame as a table). :class:`PgConnection` provides those
methods on psycopg2 and rewrites the handful of DuckDB spellings on the way (``?``
parameters, ``INSERT OR REPLACE``/``OR IGNORE``, ``DOUBLE``, ``FLOAT[]``, ``BLOB``); a
statement that has no shared spelling asks :func:`dialect` and keeps both forms side by side
(one line each, not a second module of queries). SQLAlchemy Core would have meant rewriting
every statement and DataFrame insert for both engines; ADBC's PostgreSQL driver reads Arrow
fast but is not needed for the row counts of the metrics tables. Vectors, the one bulky
column, travel in binary (see :data:`VECTOR_DTYPE`): a float array as PostgreSQL text is ten
times the bytes and parsed one float at a time on both ends (``bench/scale_out.py --quick``:
826 vectors/s stored as text arrays, 10,122/s in binary). DataFrames registered as tables go
by ``COPY`` (Kafka feedback: 13,306 -> 26,140 msg/s).

Concurrency: several run workers write at once. Every read-modify-write the library does
(plan a range after the last one, take a record unless its id is known, resolve labels from all
votes) must stay correct without serializable retries, so each ``BEGIN`` takes transaction-
scoped advisory locks (``pg_advisory_xact_lock``): by default the store's one write lock,
exclusively, so such a transaction runs alone, as on DuckDB. The three write paths that
overlapping runs keep busy name a *scope* instead (:data:`SCOPES`: ingest of records, feedback,
stored vectors): they take the write lock shared plus their scope's lock, so a feedback range
commits while a micro-batch of records is being written, and two micro-batches still take turns.
A scope covers its own tables only; what reads across them (erasure, consensus, the registry)
stays exclusive and waits for them. Reads and everything outside transactions (embedding,
training, reading Kafka) run in parallel; no lock is held across a run.
"""

from __future__ import annotations

import io
import re
import threading
from typing import Any, Iterable

import numpy as np
import pandas as pd

SCHEMES = ("postgresql+psycopg2://", "postgresql://", "postgres://")
# Embedding vectors (DuckDB ``FLOAT[]``) are ``BYTEA`` here: the float32 values big-endian,
# which is PostgreSQL's own binary form of ``real`` (``float4send``), so SQL can turn them back
# into ``real[]`` (the ``vector_real`` function) and a ``real[]`` column migrates in place.
VECTOR_DTYPE = np.dtype(">f4")

# one advisory lock key for the store's write transactions ("stream-s" as a big-endian int64)
WRITE_LOCK = int.from_bytes(b"stream-s", "big")
_DDL_LOCK = WRITE_LOCK + 1
# write paths that may commit beside one another (see the module's docstring), and the tables
# each may write (a statement outside them is refused: the scope would no longer protect it)
SCOPES = {
    "records": ("files", "file_paths", "file_progress", "records", "rejects", "scan_problems", "batches"),
    "feedback": ("feedback_events", "feedback_rejects", "feedback_ranges", "feedback_files",
                 "feedback_file_batches", "kafka_lag"),
    "vectors": ("embeddings",),
}
_WRITE = re.compile(r"\s*(?:INSERT\s+(?:OR\s+\w+\s+)?INTO|UPDATE|DELETE\s+FROM)\s+\"?(\w+)", re.I)
# False: every transaction takes the one write lock (bench/scale_out.py compares the two)
SCOPED_LOCKS = True


def scope_lock(scope: str) -> int:
    """The advisory lock key of a write scope."""
    return WRITE_LOCK + 2 + list(SCOPES).index(scope)


def is_url(location: Any) -> bool:
    return isinstance(location, str) and location.startswith(SCHEMES)


def dsn(url: str) -> str:
    """A libpq URI from a SQLAlchemy-style URL (``postgresql+psycopg2://`` -> ``postgresql://``)."""
    return re.sub(r"^postgres(ql)?(\+\w+)?://", "postgresql://", url)


def redacted(url: str) -> str:
    """The URL without its password, for messages and logs."""
    return re.sub(r"(://[^:/@]*):[^@]*@", r"\1:***@", url)


def dialect(con: Any) -> str:
    """``duckdb`` or ``postgres``: for the few statements that have no shared spelling."""
    return "postgres" if isinstance(con, PgConnection) else "duckdb"


# ------------------------------------------------------------------------------ schema

# DuckDB-only views, in PostgreSQL's spelling (same columns, same rows)
_VIEWS = {
    "current_predictions": """CREATE OR REPLACE VIEW current_predictions AS
        SELECT record_id, model_version, role, probability, label, served, scored_at FROM (
            SELECT p.*, row_number() OVER (PARTITION BY p.record_id ORDER BY (m.status = 'champion') DESC,
                                           p.scored_at DESC, p.model_version DESC) AS rank_
            FROM predictions p JOIN model_versions m ON m.version = p.model_version
            WHERE m.status = 'champion' OR p.role = 'champion') ranked
        WHERE rank_ = 1""",
    "records_w": """CREATE OR REPLACE VIEW records_w AS
        SELECT r.id, r.vec_id, r.text, r.event_time,
               CASE WHEN w.record_id IS NULL THEN r.features
                    ELSE json_merge_patch(coalesce(r.features, '{}'), w."values") END AS features,
               r.label, r.extra, r.content_hash, r.file_sha256, r.position, r.arrival_date, r.ingested_at
        FROM records r LEFT JOIN window_features w ON w.record_id = r.id""",
}


# DuckDB functions the library's shared statements call, defined on PostgreSQL
_FUNCTIONS = [
    # a deterministic 64-bit hash (DuckDB's hash() differs; values are only compared within a backend)
    """CREATE OR REPLACE FUNCTION hash(v anyelement) RETURNS numeric
       AS $$ SELECT hashtextextended(v::text, 0)::numeric $$ LANGUAGE sql IMMUTABLE""",
    """CREATE OR REPLACE FUNCTION hash(a text, b text) RETURNS numeric
       AS $$ SELECT hashtextextended(a || chr(31) || b, 0)::numeric $$ LANGUAGE sql IMMUTABLE""",
    """CREATE OR REPLACE FUNCTION epoch_us(t timestamptz) RETURNS bigint
       AS $$ SELECT (extract(epoch FROM t) * 1000000)::bigint $$ LANGUAGE sql IMMUTABLE""",
    # '$.a.b' paths only, which is all the library asks for
    """CREATE OR REPLACE FUNCTION json_extract_string(j text, path text) RETURNS text
       AS $$ SELECT (j::jsonb) #>> string_to_array(substr(path, 3), '.') $$ LANGUAGE sql IMMUTABLE""",
    # a stored vector as real[] and back (for SQL users and the migration of real[] columns)
    # (float4recv cannot be called from SQL: each value is decoded from its IEEE 754 bits)
    """CREATE OR REPLACE FUNCTION vector_real(b bytea) RETURNS real[]
       AS $$ SELECT coalesce(array_agg((CASE WHEN e = 255 THEN CASE WHEN m = 0 THEN 'Infinity'::float8 ELSE 'NaN' END
                                             WHEN e = 0 THEN m * 2::float8 ^ -149
                                             ELSE (1 + m / 8388608.0::float8) * 2::float8 ^ (e - 127) END
                                        * (1 - 2 * sign))::real ORDER BY i), '{}')
             FROM (SELECT i, bits >> 31 AS sign, (bits >> 23) & 255 AS e, bits & 8388607 AS m
                   FROM (SELECT i, (get_byte(b, 4 * i)::bigint << 24) | (get_byte(b, 4 * i + 1) << 16)
                                   | (get_byte(b, 4 * i + 2) << 8) | get_byte(b, 4 * i + 3) AS bits
                         FROM generate_series(0, length(b) / 4 - 1) i) words) parts $$ LANGUAGE sql IMMUTABLE""",
    """CREATE OR REPLACE FUNCTION vector_bytes(a real[]) RETURNS bytea
       AS $$ SELECT coalesce(string_agg(float4send(x), ''::bytea ORDER BY i), ''::bytea)
             FROM unnest(a) WITH ORDINALITY u(x, i) $$ LANGUAGE sql IMMUTABLE""",
    """CREATE OR REPLACE FUNCTION regexp_extract(s text, pattern text, grp integer) RETURNS text
       AS $$ SELECT coalesce((regexp_match(s, pattern))[grp], '') $$ LANGUAGE sql IMMUTABLE""",
    # json_merge_patch of two flat objects (the records_w view): keys of b win, null in b removes
    """CREATE OR REPLACE FUNCTION json_merge_patch(a text, b text) RETURNS text
       AS $$ SELECT ((coalesce(a, '{}')::jsonb - ARRAY(SELECT k FROM jsonb_each(b::jsonb) e(k, v)
                                                       WHERE v = 'null'::jsonb))
                     || jsonb_strip_nulls(b::jsonb))::text $$ LANGUAGE sql IMMUTABLE""",
]


# changes to tables made by an earlier version, run after the schema (each a no-op once done)
_MIGRATIONS = [
    # vectors were real[] before they travelled in binary
    """DO $$ BEGIN
         IF EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema = current_schema()
                    AND table_name = 'embeddings' AND column_name = 'vector' AND data_type = 'ARRAY') THEN
           ALTER TABLE embeddings ALTER COLUMN vector TYPE BYTEA USING vector_bytes(vector);
         END IF;
       END $$""",
]


def _strip_comments(sql: str) -> str:
    return "\n".join(line.split("--", 1)[0] for line in sql.splitlines())


def _types(sql: str) -> str:
    sql = re.sub(r"\bDOUBLE\b(?!\s+PRECISION)", "DOUBLE PRECISION", sql)
    sql = re.sub(r"\bFLOAT\[\]", "BYTEA", sql)  # vectors: see VECTOR_DTYPE
    sql = re.sub(r"\bBLOB\b", "BYTEA", sql)
    # DuckDB hands JSON columns to Python as text; as TEXT here they read the same, and rows
    # inserted from a registered DataFrame (text columns) need no cast
    return re.sub(r"\bJSON\b", "TEXT", sql)


def schema_statements(schema: str) -> list[str]:
    """The DuckDB schema as PostgreSQL statements: types renamed, DuckDB-only views replaced by
    their PostgreSQL spelling (or left out when the library does not read them on this backend)."""
    out = list(_FUNCTIONS)
    for stmt in _strip_comments(schema).split(";"):
        stmt = stmt.strip()
        if not stmt:
            continue
        view = re.match(r"CREATE OR REPLACE VIEW (\w+)", stmt)
        if view:
            if view.group(1) in _VIEWS:
                out.append(_VIEWS[view.group(1)])
            continue
        out.append(_types(stmt))
    return out + _MIGRATIONS


# ------------------------------------------------------------------------------ statements

_QUOTED = re.compile(r"('(?:[^']|'')*'|\"(?:[^\"]|\"\")*\")")


def _outside_quotes(sql: str, fn) -> str:
    parts = _QUOTED.split(sql)
    return "".join(p if i % 2 else fn(p) for i, p in enumerate(parts))


def _statement(text: str) -> str:
    """The parts of a statement outside quotes: types, ``?`` -> ``%s`` (a literal ``%`` doubled),
    and ``unnest(?)`` of a Python list typed (PostgreSQL cannot type an empty array literal)."""
    text = re.sub(r"unnest\(\?\)", "unnest(CAST(? AS TEXT[]))", text)
    return _types(text.replace("%", "%%").replace("?", "%s"))


class Translator:
    """DuckDB statement text -> psycopg2 statement text (cached per statement)."""

    def __init__(self, primary_keys: dict[str, list[str]], columns: dict[str, list[str]]):
        self.pk, self.columns = primary_keys, columns
        self._cache: dict[str, str] = {}
        self._lock = threading.Lock()

    def __call__(self, sql: str) -> str:
        hit = self._cache.get(sql)
        if hit is None:
            hit = self._translate(sql)
            with self._lock:
                self._cache[sql] = hit
        return hit

    def _translate(self, sql: str) -> str:
        head = sql.lstrip()
        if re.fullmatch(r"BEGIN( TRANSACTION)?;?\s*", head, re.I):
            return "BEGIN"
        replace = re.match(r"\s*INSERT\s+OR\s+REPLACE\s+INTO\s+(\w+)\s*(\(([^)]*)\))?", sql, re.I)
        ignore = re.match(r"\s*INSERT\s+OR\s+IGNORE\s+INTO\s+", sql, re.I)
        if replace:
            table = replace.group(1)
            cols = ([c.strip().strip('"') for c in replace.group(3).split(",")] if replace.group(3)
                    else self.columns[table])
            key = self.pk[table]
            sets = ", ".join(f'"{c}" = excluded."{c}"' for c in cols if c not in key)
            sql = re.sub(r"INSERT\s+OR\s+REPLACE\s+INTO", "INSERT INTO", sql, count=1, flags=re.I).rstrip().rstrip(";")
            keys = ", ".join(f'"{c}"' for c in key)
            sql += f" ON CONFLICT ({keys}) " + (f"DO UPDATE SET {sets}" if sets else "DO NOTHING")
        elif ignore:
            sql = re.sub(r"INSERT\s+OR\s+IGNORE\s+INTO", "INSERT INTO", sql, count=1, flags=re.I).rstrip().rstrip(";")
            sql += " ON CONFLICT DO NOTHING"
        return _outside_quotes(sql, _statement)


# ------------------------------------------------------------------------------ values

# PostgreSQL's text cannot hold U+0000, which DuckDB's VARCHAR (and JSON input) can: a record's
# text with a NUL in it must land on both stores alike. Strings are stored with NUL written as
# ESC + "0" and ESC itself as ESC + ESC, ESC being U+10FFFF (a noncharacter: no text carries it),
# and read back exactly. Only strings holding either character change.
_ESC = "\U0010ffff"
_UNESC = re.compile(_ESC + "([0" + _ESC + "])")


def _enc(s: str) -> str:
    if "\x00" in s or _ESC in s:
        return s.replace(_ESC, _ESC + _ESC).replace("\x00", _ESC + "0")
    return s


def _dec(v: Any) -> Any:
    if isinstance(v, memoryview):  # BYTEA
        return v.tobytes()
    if isinstance(v, str) and _ESC in v:
        return _UNESC.sub(lambda m: "\x00" if m.group(1) == "0" else _ESC, v)
    if isinstance(v, list):
        return [_dec(x) for x in v]
    return v


def _row(row: tuple | None) -> tuple | None:
    return None if row is None else tuple(_dec(v) for v in row)


def _py(v: Any) -> Any:
    """A Python value psycopg2 adapts: numpy scalars unboxed, NaN/NaT -> NULL, NUL escaped."""
    if v is None:
        return None
    if isinstance(v, str):
        return _enc(v)
    if isinstance(v, (np.generic,)):
        v = v.item()
    if isinstance(v, float) and v != v:
        return None
    if isinstance(v, pd.Timestamp):
        return None if pd.isna(v) else v.to_pydatetime()
    if v is pd.NaT:
        return None
    if isinstance(v, np.ndarray):
        if v.dtype.kind == "f":  # a vector
            return v.astype(VECTOR_DTYPE).tobytes()
        return [_py(x) for x in v.tolist()]
    if isinstance(v, (list, tuple)):
        return [_py(x) for x in v]
    if isinstance(v, memoryview):
        return bytes(v)
    return v


def _params(params: Iterable | None) -> list | None:
    return None if params is None else [_py(p) for p in params]


# COPY's text format: tab between fields, newline after a row, \N for NULL; these are escaped
_COPY_SPECIAL = re.compile("[\\\\\t\n\r\x00" + _ESC + "]")
_COPY_NULL = "\\N"


def _copy_value(v: Any, pg_type: str = "TEXT") -> str:
    """One value as a field of ``COPY ... FROM STDIN`` (text format)."""
    if isinstance(v, str):
        if _COPY_SPECIAL.search(v):
            v = _enc(v).replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
        return v
    v = _py(v)
    if v is None:
        return _COPY_NULL
    if isinstance(v, str):
        return _copy_value(v)
    if isinstance(v, bool):
        return "t" if v else "f"
    if pg_type == "BYTEA" and isinstance(v, list):  # a vector
        v = np.asarray(v, dtype=VECTOR_DTYPE).tobytes()
    if isinstance(v, (bytes, bytearray)):
        return "\\\\x" + v.hex()  # bytea's hex input, its backslash escaped for COPY
    if isinstance(v, float) and pg_type == "BIGINT" and v.is_integer():
        return str(int(v))  # a whole number in a column of ints (as an INSERT would cast it)
    if isinstance(v, (int, float)):
        return repr(v)
    if hasattr(v, "isoformat"):
        return v.isoformat()
    raise TypeError(f"cannot send a {type(v).__name__} to PostgreSQL")


def _copy_column(series: pd.Series, pg_type: str) -> list[str]:
    """A column as COPY text fields: numbers and timestamps converted by numpy/pandas at once,
    other values one by one."""
    kind = series.dtype.kind
    if kind == "b":
        return np.where(series.to_numpy(), "t", "f").tolist()
    if kind in "iu":
        return series.astype(str).tolist()
    if kind in "fM":  # floats as float64: its text is the shortest that reads back exactly
        text = (series.astype(np.float64) if kind == "f" else series).astype(str).to_numpy(dtype=object)
        text[series.isna().to_numpy()] = _COPY_NULL
        return text.tolist()
    return [_copy_value(v, pg_type) for v in series.tolist()]


def _pg_type(series: pd.Series) -> str:
    kind = series.dtype.kind
    if kind == "b":
        return "BOOLEAN"
    if kind in "iu":
        return "BIGINT"
    if kind == "f":
        return "DOUBLE PRECISION"
    if kind == "M":
        return "TIMESTAMPTZ"
    sample = next((x for x in series if x is not None and not (isinstance(x, float) and x != x)), None)
    if isinstance(sample, (bytes, bytearray, memoryview)):
        return "BYTEA"
    if isinstance(sample, bool):
        return "BOOLEAN"
    if isinstance(sample, int):
        return "BIGINT"
    if isinstance(sample, float):
        return "DOUBLE PRECISION"
    if isinstance(sample, pd.Timestamp) or hasattr(sample, "tzinfo"):
        return "TIMESTAMPTZ"
    if isinstance(sample, (list, np.ndarray)):
        return "BYTEA"  # a vector, see VECTOR_DTYPE
    return "TEXT"


# ------------------------------------------------------------------------------ the connection

class _Relation:
    def __init__(self, columns: list[str], rows: list[tuple]):
        self.columns, self.rows = columns, rows

    def fetchall(self) -> list[tuple]:
        return self.rows

    def df(self) -> pd.DataFrame:
        return pd.DataFrame.from_records(self.rows, columns=self.columns)

    def to_arrow_table(self):
        import pyarrow as pa

        data = list(zip(*self.rows)) if self.rows else [[] for _ in self.columns]
        return pa.table({c: pa.array(list(v)) for c, v in zip(self.columns, data)})

    arrow = to_arrow_table


class PgConnection:
    """The subset of ``duckdb.DuckDBPyConnection`` the library uses, on a psycopg2 connection
    (autocommit; ``BEGIN``/``COMMIT`` are statements, as on DuckDB)."""

    def __init__(self, raw, translate: Translator, home=None):
        self.raw, self.translate, self.home = raw, translate, home
        self._cur = raw.cursor()
        self._registered: list[str] = []
        self._scope: str | None = None  # of the open transaction

    # -- statements
    def execute(self, sql: str, params: Iterable | None = None) -> "PgConnection":
        text = self.translate(sql)
        if text == "BEGIN":
            return self.begin()
        if self._scope is not None:
            self._check_scope(sql, text)
        self._cur.execute(text, _params(params))
        return self

    def _check_scope(self, sql: str, text: str) -> None:
        if text in ("COMMIT", "ROLLBACK"):
            self._scope = None
            return
        m = _WRITE.match(sql)
        if m and m.group(1) not in SCOPES[self._scope] and m.group(1) not in self._registered:
            raise RuntimeError(f"a transaction of write scope {self._scope!r} may not write {m.group(1)!r} "
                               f"(its tables: {', '.join(SCOPES[self._scope])})")

    def begin(self, scope: str | None = None) -> "PgConnection":
        """Start a write transaction: alone, or beside transactions of other scopes (see the
        module's docstring). Locks are always taken write lock first, so they cannot deadlock."""
        self._cur.execute("BEGIN")
        self._scope = scope
        if scope is None or not SCOPED_LOCKS:
            self._cur.execute("SELECT pg_advisory_xact_lock(%s)", [WRITE_LOCK])
        else:
            # two statements: the order is what prevents a deadlock, and a select list's order of
            # evaluation is not promised
            self._cur.execute("SELECT pg_advisory_xact_lock_shared(%s)", [WRITE_LOCK])
            self._cur.execute("SELECT pg_advisory_xact_lock(%s)", [scope_lock(scope)])
        return self

    def executemany(self, sql: str, rows: Iterable[Iterable]) -> "PgConnection":
        from psycopg2.extras import execute_batch

        text = self.translate(sql)
        if self._scope is not None:
            self._check_scope(sql, text)
        execute_batch(self._cur, text, [_params(r) for r in rows], page_size=1000)
        return self

    @property
    def description(self):
        return self._cur.description

    def fetchone(self):
        if self._cur.description is None:  # DML: its row count, as DuckDB answers
            return (self._cur.rowcount,)
        return _row(self._cur.fetchone())

    def fetchall(self) -> list:
        if self._cur.description is None:
            return [(self._cur.rowcount,)]
        return [_row(r) for r in self._cur.fetchall()]

    def df(self) -> pd.DataFrame:
        cols = [d.name for d in self._cur.description]
        return pd.DataFrame.from_records(self.fetchall(), columns=cols)

    fetchdf = df

    def arrow(self):
        cols = [d.name for d in self._cur.description]
        return _Relation(cols, self.fetchall()).to_arrow_table()

    fetch_arrow_table = arrow

    def sql(self, query: str, params: Iterable | None = None) -> "_Relation":
        """DuckDB's ``con.sql(query, params=...)``: a result read as Arrow, a DataFrame or rows."""
        self.execute(query, params)
        cols = [d.name for d in self._cur.description]
        return _Relation(cols, self.fetchall())

    def cursor(self) -> "PgConnection":
        return PgConnection(self.raw, self.translate, self.home)

    # -- DataFrames as tables
    def register(self, name: str, obj) -> "PgConnection":
        """``obj`` (a DataFrame or an Arrow table) as the temporary table ``name`` for this
        connection's statements, column types from the frame's dtypes, its rows sent by ``COPY``
        (one stream, parsed by the server's bulk loader: about twice the rows per second of
        multi-row ``INSERT``s, whose statement text psycopg2 builds value by value)."""
        frame = obj.to_pandas() if hasattr(obj, "to_pandas") and not isinstance(obj, pd.DataFrame) else obj
        types = [_pg_type(frame[c]) for c in frame.columns]
        cols = ", ".join(f'"{c}" {t}' for c, t in zip(frame.columns, types))
        self._cur.execute(f'DROP TABLE IF EXISTS "{name}"')
        self._cur.execute(f'CREATE TEMP TABLE "{name}" ({cols})')
        if len(frame):
            fields = [_copy_column(frame[c], t) for c, t in zip(frame.columns, types)]
            data = "".join("\t".join(row) + "\n" for row in zip(*fields))
            self._cur.copy_expert(f'COPY "{name}" FROM STDIN', io.StringIO(data))
        self._registered.append(name)
        return self

    def unregister(self, name: str) -> "PgConnection":
        self._cur.execute(f'DROP TABLE IF EXISTS "{name}"')
        if name in self._registered:
            self._registered.remove(name)
        return self

    def close(self) -> None:
        try:
            self._cur.close()
        except Exception:
            pass
