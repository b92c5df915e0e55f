"""The scale-out backends together: Dagster's instance and the metrics store on one real
PostgreSQL server, and ingest runs that overlap instead of waiting for one run slot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid

import pytest

from stream_sentinel import dagster_home as dh
from stream_sentinel import ingest
from stream_sentinel.index import IndexStore
from stream_sentinel.store import STORE_URL_ENV, Store

from .conftest import drop
from .helpers import start_embed_server, stop_process


# one ingest_job run in its own process, as a run worker launched by the run coordinator
RUN = textwrap.dedent("""
    import json, sys
    import dagster as dg
    from stream_sentinel.definitions import build_definitions
    batch = json.loads(sys.argv[1])
    job = build_definitions().resolve_job_def("ingest_job")
    with dg.DagsterInstance.get() as instance:
        result = job.execute_in_process(
            run_config={"ops": {"raw_records": {"config": {"files": batch["files"]}}}},
            partition_key=batch["partition_key"], instance=instance, raise_on_error=False,
            tags={"dagster/run_key": batch["run_key"]})
    sys.exit(0 if result.success else 1)
""")


def test_duckdb_statements_are_rewritten_for_postgresql_only_where_they_differ():
    from stream_sentinel import pgstore
    from stream_sentinel.store import _translator

    t = _translator()
    assert t("INSERT OR REPLACE INTO run_facts VALUES (?, ?, ?)") == (
        'INSERT INTO run_facts VALUES (%s, %s, %s) ON CONFLICT ("run_id", "fact") DO UPDATE SET "value" = excluded."value"')
    assert t("INSERT OR IGNORE INTO labels SELECT * FROM lab") == "INSERT INTO labels SELECT * FROM lab ON CONFLICT DO NOTHING"
    # quoted text is left alone; a literal % is doubled for psycopg2; types renamed outside quotes
    assert t("SELECT '?', \"a?\", x LIKE 'a%' FROM t WHERE y = ? AND CAST(z AS DOUBLE) > 0") == (
        "SELECT '?', \"a?\", x LIKE 'a%' FROM t WHERE y = %s AND CAST(z AS DOUBLE PRECISION) > 0")
    assert t("DELETE FROM t WHERE id IN (SELECT unnest(?))") == "DELETE FROM t WHERE id IN (SELECT unnest(CAST(%s AS TEXT[])))"
    assert t("BEGIN TRANSACTION") == "BEGIN"
    ddl = "\n".join(pgstore.schema_statements("CREATE TABLE a (x DOUBLE, v FLOAT[], b BLOB, j JSON); -- c;"))
    assert "x DOUBLE PRECISION, v BYTEA, b BYTEA, j TEXT" in ddl
    assert pgstore.redacted("postgresql+psycopg2://u:s3cret@h/db") == "postgresql+psycopg2://u:***@h/db"


@pytest.mark.parametrize("sql,params", [
    ("SELECT json_merge_patch(?, ?)", ['{"a": 1, "win_x": 3}', '{"win_x": null, "win_y": 2}']),
    ("SELECT json_merge_patch(NULL, ?)", ['{"win_y": 2.5}']),
    ("SELECT json_extract_string(?, '$.run_key')", ['{"run_key": "raw:1", "n": 2}']),
    ("SELECT json_extract_string(?, '$.missing')", ['{"run_key": "raw:1"}']),
    ("SELECT CAST(regexp_extract(?, '[.][.]([0-9]+)$', 1) AS BIGINT)", ["event_time:1..42"]),
    ("SELECT epoch_us(CAST(? AS TIMESTAMPTZ))", ["2024-03-01T12:00:00.123456+00:00"]),
    ("SELECT (array_agg(x ORDER BY y DESC))[1] FROM (VALUES ('a', 1), ('b', 2)) t(x, y)", []),
    ("SELECT count(*) FROM (SELECT unnest(?)) u", [[]]),
])
def test_the_duckdb_functions_the_library_uses_answer_the_same_on_postgresql(sql, params, pg_database):
    """Each DuckDB function the shared statements call, defined on PostgreSQL by pgstore: the
    same inputs give the same answers on both engines (JSON compared as values)."""
    import duckdb

    duck = duckdb.connect().execute(sql, params).fetchone()[0]
    with Store(pg_database).connect() as con:
        pg = con.execute(sql, params).fetchone()[0]
    if isinstance(duck, str) and duck.startswith("{"):
        duck, pg = json.loads(duck), json.loads(pg)
    assert pg == duck


def test_a_write_statement_answers_its_row_count_on_both_engines(pg_database, tmp_path):
    """``execute(INSERT ...)`` answers the rows it wrote, on PostgreSQL as on DuckDB: a row that
    was there already (``ON CONFLICT DO NOTHING``) is not counted (feedback counts new events so)."""
    answers = {}
    for name, location in (("duckdb", tmp_path / "m.duckdb"), ("postgres", pg_database)):
        with Store(location).transaction() as con:
            got = [con.execute("INSERT INTO run_facts VALUES ('r', 'a', '1'), ('r', 'b', '2')").fetchall()[0][0],
                   con.execute("INSERT INTO run_facts VALUES ('r', 'a', '1'), ('r', 'c', '3') "
                               "ON CONFLICT DO NOTHING").fetchone()[0],
                   con.execute("UPDATE run_facts SET value = 'x' WHERE fact <> 'a'").fetchone()[0],
                   con.execute("DELETE FROM run_facts WHERE run_id = 'r'").fetchone()[0]]
        answers[name] = got
    assert answers["postgres"] == answers["duckdb"] == [2, 1, 2, 3]


def test_vectors_travel_in_binary_exactly_and_sql_can_read_them_as_real_arrays(pg_database):
    """Vectors are stored as PostgreSQL's own binary float4 (BYTEA): what the embedder gave
    comes back bit for bit through the library's read path (the index build, training), and
    ``vector_real``/``vector_bytes`` turn them into ``real[]`` and back in SQL, including
    negative zero, subnormals and the extremes of float32."""
    import numpy as np
    import pandas as pd

    from stream_sentinel import pgstore
    from stream_sentinel.store import vectors_from_arrow

    rng = np.random.default_rng(7)
    vecs = rng.normal(size=(50, 384)).astype(np.float32)
    edge = np.array([0.0, -0.0, 1e-45, -1e-40, np.finfo(np.float32).tiny, np.finfo(np.float32).max,
                     np.finfo(np.float32).min, 1.0, -1.5, 3.1415927], dtype=np.float32)
    vecs[0, :len(edge)] = edge
    store = Store(pg_database)
    with store.transaction() as con:
        con.register("v", pd.DataFrame({"record_id": [f"r{i}" for i in range(50)], "model_id": "m",
                                        "vec_id": np.arange(50, dtype=np.int64), "dim": 384,
                                        "vector": list(vecs), "created_at": pd.Timestamp.now(tz="UTC")}))
        con.execute("INSERT INTO embeddings SELECT record_id, model_id, vec_id, dim, CAST(vector AS FLOAT[]), "
                    "created_at FROM v")
        con.unregister("v")
    with store.connect() as con:
        table = con.sql("SELECT vector FROM embeddings ORDER BY vec_id").to_arrow_table()
        back = vectors_from_arrow(table.column("vector"), 50)
        assert back.dtype == np.float32 and back.tobytes() == vecs.tobytes()  # -0.0 and subnormals too
        assert con.execute("SELECT octet_length(vector) FROM embeddings LIMIT 1").fetchone()[0] == 384 * 4
        as_real = con.execute("SELECT vector_real(vector) FROM embeddings WHERE vec_id = 0").fetchone()[0]
        assert np.array(as_real, dtype=np.float32).tobytes() == vecs[0].tobytes()
        assert con.execute("SELECT count(*) FROM embeddings WHERE vector_bytes(vector_real(vector)) <> vector"
                           ).fetchone()[0] == 0
    assert pgstore.VECTOR_DTYPE.byteorder == ">"  # float4send's order, which vector_real decodes


def test_a_store_whose_vectors_are_real_arrays_is_migrated_in_place(postgres_server):
    """A database written before vectors travelled in binary (``real[]``) is converted when
    the store opens it, values unchanged, and then reads and writes as a new one does."""
    import numpy as np
    import psycopg2

    from stream_sentinel import pgstore, store as store_mod
    from stream_sentinel.devtools import postgres_server as pgs
    from stream_sentinel.pipeline import _fetch_vectors

    url = pgs.create_database(postgres_server, f"t_{uuid.uuid4().hex[:12]}")
    vecs = np.random.default_rng(3).normal(size=(5, 8)).astype(np.float32)
    raw = psycopg2.connect(pgstore.dsn(url))
    raw.autocommit = True
    with raw.cursor() as cur:  # the table as the earlier version made it
        cur.execute("""CREATE TABLE embeddings (record_id TEXT NOT NULL, model_id TEXT NOT NULL,
                       vec_id BIGINT NOT NULL, dim INTEGER NOT NULL, vector REAL[] NOT NULL,
                       created_at TIMESTAMPTZ NOT NULL, PRIMARY KEY (record_id, model_id))""")
        for i, v in enumerate(vecs):
            cur.execute("INSERT INTO embeddings VALUES (%s, 'm', %s, 8, %s, now())", [f"r{i}", i, v.tolist()])
    raw.close()
    store_mod._SCHEMA_DONE.discard(Store(url)._key)
    _, ids, back = _fetch_vectors(Store(url), "m", 8)
    assert ids == [f"r{i}" for i in range(5)] and back.tobytes() == vecs.tobytes()
    with Store(url).connect() as con:
        assert con.execute("""SELECT data_type FROM information_schema.columns
                              WHERE table_name = 'embeddings' AND column_name = 'vector'""").fetchone()[0] == "bytea"


@pytest.mark.slow
def test_four_ingest_runs_and_three_feedback_ranges_at_once_on_postgresql_land_everything_once(
        paths, demo_records, tmp_path, pg_database, postgres_server, kafka_broker):
    """Four micro-batches ingested by four run processes and three Kafka feedback ranges read by
    three more, all seven at the same time: each ingest run embeds (through the shared embedding
    server) and publishes the index. The store holds every record once with one vector, the index
    exactly the embedded rows, every feedback offset once with lag 0, and Dagster's PostgreSQL
    instance the four successful runs with their run keys."""
    from stream_sentinel.devtools import postgres_server as pgs

    dagster_url = pgs.create_database(postgres_server, f"d_{uuid.uuid4().hex[:12]}")  # Dagster's own database
    env = {**os.environ, STORE_URL_ENV: pg_database, dh.PG_URL_ENV: dagster_url,
           "STREAM_SENTINEL_HOME": str(paths.home)}
    env["DAGSTER_HOME"] = str(dh.prepare(tmp_path / "dagster_home", env))
    store = Store(pg_database)
    recs = demo_records[:240]
    for i in range(4):
        drop(paths.raw, f"part-{i}.jsonl", recs[i * 60:(i + 1) * 60])
    drop(paths.raw, "again.jsonl", recs[:60])  # the same bytes as part-0: a duplicate, ingested never
    ingest.scan(paths, store, debounce_s=0)
    batches = ingest.plan_batches(store, max_files=1)
    assert len(batches) == 4
    # their labels on Kafka, three reviewers each, cut into one range per partition
    from stream_sentinel import feedback as fb
    from stream_sentinel import feedback_sources as fs
    from stream_sentinel.kafka import KafkaSettings, consumer

    from .conftest import create_topic
    from .helpers import KILLED_RUN, vote
    from .test_feedback_kafka import produce

    bootstrap = kafka_broker.state().bootstrap
    topic = create_topic(bootstrap, f"pg-{uuid.uuid4().hex[:8]}")
    produce(bootstrap, topic, [vote(r["id"], "spam" if i % 2 else "ham", f"rev{k}")
                               for i, r in enumerate(recs) for k in range(3)])
    cons = consumer(KafkaSettings(bootstrap))
    ranges = fs.plan_ranges(store, cons, topic, {}, fs.Policy(max_range=10**9), flush=True).to_request
    cons.close()
    assert len(ranges) == 3
    server = start_embed_server(paths)
    try:
        procs = [subprocess.Popen([sys.executable, "-c", RUN, json.dumps(
            {"files": list(b.files), "partition_key": b.partition_key, "run_key": b.run_key})],
            env=env, stderr=subprocess.PIPE, text=True) for b in batches]
        procs += [subprocess.Popen([sys.executable, "-c", KILLED_RUN, pg_database, bootstrap, r.topic,
                                    str(r.partition), str(r.start), str(r.end)], env=env, stderr=subprocess.PIPE,
                                   text=True) for r in ranges]
        for p in procs:
            _, err = p.communicate(timeout=600)
            assert p.returncode == 0, err[-4000:]
    finally:
        stop_process(server)
    status = store.status()
    assert (status["records"], status["embedded"], status["duplicate_files"]) == (240, 240, 1)
    with store.connect() as con:
        assert con.execute("SELECT count(DISTINCT vec_id) FROM records").fetchone()[0] == 240
        assert con.execute("SELECT count(*) FROM files WHERE status = 'processed'").fetchone()[0] == 4
    meta = IndexStore(paths.index).read_meta()
    assert meta.ntotal == 240  # index ntotal = embedded rows
    with store.connect() as con:
        assert con.execute('SELECT count(*) FROM (SELECT DISTINCT "partition", "offset" FROM feedback_events '
                           'WHERE topic = ?) d', [topic]).fetchone()[0] == 720
        assert con.execute("SELECT count(*) FROM feedback_events WHERE topic = ?", [topic]).fetchone()[0] == 720
        assert con.execute("SELECT sum(lag) FROM kafka_lag WHERE topic = ?", [topic]).fetchone()[0] == 0
    assert fb.resolve_labels(store, fb.ConsensusConfig())["resolved"] == 240
    assert not paths.db.exists() or Store(paths.db).row_count("records") == 0

    import dagster as dg

    os.environ[dh.PG_URL_ENV] = dagster_url
    try:
        with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
            runs = instance.get_runs(dg.RunsFilter(job_name="ingest_job"))
    finally:
        del os.environ[dh.PG_URL_ENV]
    assert sorted(r.tags["dagster/run_key"] for r in runs) == sorted(b.run_key for b in batches)
    assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)


def test_with_both_stores_on_postgresql_runs_overlap_and_each_pool_has_one_writer(tmp_path, pg_database, monkeypatch):
    """The scale-out instance: several runs at once (STREAM_SENTINEL_MAX_CONCURRENT_RUNS), every
    concurrency pool limited to one step, and the single writers (the index, the model registry,
    erasure) in pools; without the PostgreSQL metrics store the run queue stays at one."""
    import dagster as dg

    from stream_sentinel.config import SettingError
    from stream_sentinel.definitions import build_definitions

    both = {dh.PG_URL_ENV: pg_database, STORE_URL_ENV: pg_database, dh.MAX_RUNS_ENV: "3"}
    home = dh.prepare(tmp_path / "scale", both)
    monkeypatch.setenv(dh.PG_URL_ENV, pg_database)
    with dg.DagsterInstance.from_config(str(home)) as inst:
        cfg = inst.get_concurrency_config()
        assert (cfg.run_queue_config.max_concurrent_runs, cfg.pool_config.default_pool_limit) == (3, 1)
        # the slot of a run killed mid-step is given back once the run is failed, or its pool stops
        assert inst.run_monitoring_settings["free_slots_after_run_end_seconds"] == dh.FREE_SLOTS_AFTER_S
    with dg.DagsterInstance.from_config(str(dh.prepare(tmp_path / "instance-only", {dh.PG_URL_ENV: pg_database}))) as inst:
        assert inst.get_concurrency_config().run_queue_config.max_concurrent_runs == 1
    with pytest.raises(SettingError, match=dh.MAX_RUNS_ENV):
        dh.prepare(tmp_path / "bad", {**both, dh.MAX_RUNS_ENV: "many"})
    graph = build_definitions(home=str(tmp_path / "root")).resolve_asset_graph()
    pools = {k: graph.get(dg.AssetKey(k)).pools for k in ("vector_index", "erasures", "model", "champion", "embeddings")}
    assert pools["vector_index"] == pools["erasures"] == {"stream_sentinel_index"}
    assert pools["model"] == pools["champion"] == {"stream_sentinel_registry"}
    assert not pools["embeddings"]  # embedding runs overlap (up to the run limit)


def test_any_string_reads_back_exactly_from_postgresql_nul_included(pg_database):
    """PostgreSQL's text cannot hold U+0000, DuckDB's can: strings go through pgstore's escape and
    come back exactly, in a plain column, in a DataFrame registered as a table, and as a key."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    store = Store(pg_database).init()
    chars = st.text(alphabet=st.sampled_from(["\x00", "\U0010ffff", "0", "a", "é", "\\"]) | st.characters(
        blacklist_categories=("Cs",)), max_size=12)

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(key=chars, value=chars)
    def roundtrip(key, value):
        import pandas as pd

        with store.transaction() as con:
            con.execute("DELETE FROM run_facts")
            con.execute("INSERT OR REPLACE INTO run_facts VALUES (?, ?, ?)", [key, "f", value])
            con.register("frame", pd.DataFrame({"run_id": [key + "x"], "fact": ["g"], "value": [value]}))
            con.execute("INSERT INTO run_facts SELECT * FROM frame")
        with store.connect() as con:
            assert con.execute("SELECT value FROM run_facts WHERE run_id = ?", [key]).fetchone() == (value,)
            assert con.execute("SELECT run_id, value FROM run_facts ORDER BY fact").df().values.tolist() == [
                [key, value], [key + "x", value]]

    roundtrip()


def test_a_registered_frame_reaches_postgresql_exactly_whatever_its_values(pg_database):
    """``register`` sends a DataFrame by COPY (text format): every value arrives as it left,
    strings with tabs, newlines, backslashes, NUL and the escape character, empty strings
    apart from NULL, floats bit for bit (NaN is NULL, as before), bytes, booleans, timestamps
    and whole floats in a column of ints."""
    import math

    import numpy as np
    import pandas as pd
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    store = Store(pg_database).init()
    text = st.text(alphabet=st.sampled_from(["\x00", "\U0010ffff", "\\", "\t", "\n", "\r", "N", "a", "é", ","])
                   | st.characters(blacklist_categories=("Cs",)), max_size=10)
    row = st.tuples(st.none() | text, st.floats(allow_nan=True, allow_infinity=True, width=64),
                    st.integers(-2**63, 2**63 - 1), st.booleans(), st.none() | st.binary(max_size=12),
                    st.datetimes(min_value=pd.Timestamp("1700-01-01").to_pydatetime(),
                                 max_value=pd.Timestamp("2200-01-01").to_pydatetime()))

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(rows=st.lists(row, min_size=1, max_size=6), whole=st.integers(-2**50, 2**50))
    def roundtrip(rows, whole):
        t, f, i, b, by, ts = map(list, zip(*rows))
        frame = pd.DataFrame({"t": t, "f": np.array(f, dtype=np.float64), "i": np.array(i, dtype=np.int64),
                              "b": b, "by": by, "ts": pd.to_datetime(ts).tz_localize("UTC"),
                              "w": pd.Series([whole] + [None] * (len(rows) - 1), dtype=object)})
        if len(rows) > 1:
            frame.loc[1, "w"] = float(whole)
        with store.connect() as con:
            con.register("frame", frame)
            back = con.execute("SELECT t, f, i, b, by, ts, w FROM frame").fetchall()
            con.unregister("frame")
        for k, got in enumerate(back):
            assert got[0] == t[k]
            assert (got[1] is None and math.isnan(f[k])) or (got[1] == f[k] and math.copysign(1, got[1]) == math.copysign(1, f[k]))
            assert got[2:5] == (i[k], b[k], by[k])
            assert pd.Timestamp(got[5]) == pd.Timestamp(ts[k]).tz_localize("UTC")
        assert [r[6] for r in back] == [whole] + ([whole] if len(rows) > 1 else []) + [None] * (len(rows) - 2)

    roundtrip()


def test_write_scopes_commit_beside_each_other_and_unscoped_transactions_run_alone(pg_database):
    """A micro-batch of records being written does not hold up a feedback range or stored
    vectors (other scopes), but does hold up another micro-batch (its own scope) and an
    unscoped transaction (erasure, consensus, the registry: they read across scopes); the
    unscoped one, once running, holds up every scope. A scope may write only its tables."""
    import threading

    from stream_sentinel import pgstore
    from stream_sentinel.store import table_columns

    store = Store(pg_database).init()

    def holder(scope, opened, release):
        with store.transaction(scope=scope) as con:
            con.execute("SELECT 1").fetchall()
            opened.set()
            release.wait(30)

    def waits(scope, limit=1.5) -> bool:
        """Whether a transaction of ``scope`` waits (still blocked after ``limit`` s)."""
        done = threading.Event()

        def run():
            with store.transaction(scope=scope) as con:
                con.execute("SELECT 1").fetchall()
            done.set()
        threading.Thread(target=run, daemon=True).start()
        return not done.wait(limit), done

    opened, release = threading.Event(), threading.Event()
    t = threading.Thread(target=holder, args=("records", opened, release))
    t.start()
    assert opened.wait(10)
    blocked = {s: waits(s) for s in ("feedback", "vectors", "records", None)}
    assert not blocked["feedback"][0] and not blocked["vectors"][0]
    assert blocked["records"][0] and blocked[None][0]
    release.set()
    t.join(10)
    assert blocked["records"][1].wait(10) and blocked[None][1].wait(10)

    opened, release = threading.Event(), threading.Event()
    t = threading.Thread(target=holder, args=(None, opened, release))
    t.start()
    assert opened.wait(10)
    assert all(waits(s, 1.0)[0] for s in pgstore.SCOPES)
    release.set()
    t.join(10)

    for scope, tables in pgstore.SCOPES.items():
        assert all(table_columns(t) for t in tables), scope  # every table named exists
    with pytest.raises(RuntimeError, match="scope 'feedback' may not write 'records'"):
        with store.transaction(scope="feedback") as con:
            con.execute("DELETE FROM records WHERE id = ?", ["x"])
    with pytest.raises(ValueError, match="unknown write scope"):
        with store.transaction(scope="everything"):
            pass
    pgstore.SCOPED_LOCKS = False  # the single-lock mode bench/scale_out.py compares against
    try:
        opened, release = threading.Event(), threading.Event()
        t = threading.Thread(target=holder, args=("records", opened, release))
        t.start()
        assert opened.wait(10)
        assert waits("feedback")[0]
        release.set()
        t.join(10)
    finally:
        pgstore.SCOPED_LOCKS = True
