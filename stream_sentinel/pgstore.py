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
fast but is not needed for the row counts of the metrics tables (vectors are read from the
FAISS files).

Concurrency: several run workers write at once. Each ``BEGIN`` also takes one transaction-
scoped advisory lock (``pg_advisory_xact_lock``), so write transactions run one at a time, as
they do on DuckDB, and every read-modify-write the library does (plan a range after the last
one, resolve labels from all votes) stays correct without serializable retries; reads and
everything outside transactions (embedding, training, reading Kafka) run in parallel. The
lock is held only for a transaction's statements, never across a run.
"""

from __future__ import annotations

import re
import threading
from typing import Any, Iterable

import numpy as np
import pandas as pd

SCHEMES = ("postgresql+psycopg2://", "postgresql://", "postgres://")
# one advisory lock key for the store's write transactions ("stream-s" as a big-endian int64)
WRITE_LOCK = int.from_bytes(b"stream-s", "big")
_DDL_LOCK = WRITE_LOCK + 1


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
    """CREATE OR REPLACE FUNCTION regexp_extract(s text, pattern text, grp integer) RETURNS text
       AS $$ SELECT coalesce((regexp_match(s, pattern))[grp], '') $$ LANGUAGE sql IMMUTABLE""",
    # json_merge_patch of two flat objects (the records_w view): keys of b win, null in b removes
    """CREATE OR REPLACE FUNCTION json_merge_patch(a text, b text) RETURNS text
       AS $$ SELECT ((coalesce(a, '{}')::jsonb - ARRAY(SELECT k FROM jsonb_each(b::jsonb) e(k, v)
                                                       WHERE v = 'null'::jsonb))
                     || jsonb_strip_nulls(b::jsonb))::text $$ LANGUAGE sql IMMUTABLE""",
]


def _strip_comments(sql: str) -> str:
    return "\n".join(line.split("--", 1)[0] for line in sql.splitlines())


def _types(sql: str) -> str:
    sql = re.sub(r"\bDOUBLE\b(?!\s+PRECISION)", "DOUBLE PRECISION", sql)
    sql = re.sub(r"\bFLOAT\[\]", "REAL[]", sql)
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
    return out


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
        return [_py(x) for x in v.tolist()]
    if isinstance(v, (list, tuple)):
        return [_py(x) for x in v]
    if isinstance(v, memoryview):
        return bytes(v)
    return v


def _params(params: Iterable | None) -> list | None:
    return None if params is None else [_py(p) for p in params]


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
        return "REAL[]"
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

    # -- statements
    def execute(self, sql: str, params: Iterable | None = None) -> "PgConnection":
        text = self.translate(sql)
        self._cur.execute(text, _params(params))
        if text == "BEGIN":  # write transactions run one at a time (see the module's docstring)
            self._cur.execute("SELECT pg_advisory_xact_lock(%s)", [WRITE_LOCK])
        return self

    def executemany(self, sql: str, rows: Iterable[Iterable]) -> "PgConnection":
        from psycopg2.extras import execute_batch

        execute_batch(self._cur, self.translate(sql), [_params(r) for r in rows], page_size=1000)
        return self

    @property
    def description(self):
        return self._cur.description

    def fetchone(self):
        return _row(self._cur.fetchone())

    def fetchall(self) -> list:
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
        connection's statements, column types from the frame's dtypes."""
        from psycopg2.extras import execute_values

        frame = obj.to_pandas() if hasattr(obj, "to_pandas") and not isinstance(obj, pd.DataFrame) else obj
        cols = ", ".join(f'"{c}" {_pg_type(frame[c])}' for c in frame.columns)
        self._cur.execute(f'DROP TABLE IF EXISTS "{name}"')
        self._cur.execute(f'CREATE TEMP TABLE "{name}" ({cols})')
        if len(frame):
            rows = [[_py(v) for v in row] for row in frame.itertuples(index=False, name=None)]
            execute_values(self._cur, f'INSERT INTO "{name}" VALUES %s', rows, page_size=2000)
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
