"""Label feedback from a real Kafka broker: exactly once, whatever fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import dagster as dg
import pytest
from confluent_kafka import Consumer, Producer

from stream_sentinel import feedback as fb
from stream_sentinel.config import Settings
from stream_sentinel.sensors.feedback import build_feedback_sensors
from stream_sentinel import store as store_mod
from stream_sentinel.store import Store

from .conftest import create_topic, kill_when_paused, start_broker
from .helpers import KILLED_RUN, execute, flush_tick, tick, vote


def produce(bootstrap, topic, messages, keyed=True):
    prod = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "enable.idempotence": True})
    for m in messages:
        value = m if isinstance(m, (bytes, str)) else json.dumps(m)
        key = m["record_id"] if keyed and isinstance(m, dict) and "record_id" in m else None
        prod.produce(topic, value=value, key=key)
        prod.poll(0)
    assert prod.flush(60) == 0


@pytest.fixture
def topic(kafka_broker, monkeypatch):
    bootstrap = kafka_broker.state().bootstrap
    name = create_topic(bootstrap, f"fb-{uuid.uuid4().hex[:8]}")
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", bootstrap)
    monkeypatch.setenv("STREAM_SENTINEL_FEEDBACK_TOPIC", name)
    return name


def metrics(paths) -> Store:
    """The store the runs write to (the one STREAM_SENTINEL_STORE_URL selects)."""
    return Store.of(paths)


def count(paths, table="feedback_events"):
    with metrics(paths).connect() as con:
        return con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


@pytest.mark.parametrize("value,key,rule", [
    (b"{not json", None, "invalid_json"),
    (b"\xff\xfe", None, "not_utf8"),
    (json.dumps([1]), None, "not_an_object"),
    (json.dumps(vote("")), None, "bad_record_id"),
    (json.dumps(vote("r" * 1025)), None, "id_too_long"),
    (json.dumps(vote("r1")), "r2", "key_mismatch"),
    (json.dumps(vote("r1", label="maybe")), None, "unknown_label"),
    (json.dumps(vote("r1", label=True)), None, "bad_label"),
    (json.dumps(vote("r1", confidence=1.5)), None, "confidence_out_of_range"),
    (json.dumps(vote("r1", confidence="high")), None, "bad_confidence"),
    (json.dumps(vote("r1", ts="soon")), None, "bad_ts"),
])
def test_feedback_contract_rejects_with_the_rule(value, key, rule):
    item = fb.validate(fb.Position("t", 0, 5), value, key, frozenset({"spam", "ham"}))
    assert isinstance(item, fb.Rejected) and item.rule == rule and item.pos.offset == 5


def test_defaults_confidence_one():
    item = fb.validate(fb.Position("t", 0, 0), json.dumps({"record_id": "a", "label": "ham", "source": "s",
                                                          "ts": "2024-01-01T00:00:00Z"}), "a", None)
    assert isinstance(item, fb.Event) and item.confidence == 1.0


def test_ten_thousand_messages_over_three_partitions_land_exactly_once(paths, instance, topic, kafka_broker, backend):
    bootstrap = kafka_broker.state().bootstrap
    produce(bootstrap, topic, [vote(f"r{i}", "spam" if i % 2 else "ham", f"rev{i % 7}") for i in range(10_000)])
    first = tick(paths, instance)
    reqs = first.run_requests
    assert sorted(r.run_key.split(":")[1] for r in reqs) == ["0", "1", "2"]
    assert all(r.run_key.startswith(f"{topic}:") for r in reqs)
    assert sum(int(r.tags["stream_sentinel/messages"]) for r in reqs) == 10_000
    cursor = json.loads(first.cursor)
    assert set(cursor) == {"0", "1", "2"} and sum(cursor.values()) == 10_000
    # the run config carries the range, never payloads
    assert all("record_id" not in json.dumps(r.run_config) for r in reqs)

    # the daemon died before saving the cursor: the next tick asks for the very same runs
    replay = tick(paths, instance, cursor=None)
    assert [r.run_key for r in replay.run_requests] == [r.run_key for r in reqs]

    for r in reqs:
        execute(paths, instance, r)
    assert count(paths) == 10_000
    with metrics(paths).connect() as con:
        assert con.execute('SELECT count(*) FROM (SELECT DISTINCT topic, "partition", "offset" FROM feedback_events) d'
                           ).fetchone()[0] == 10_000
        lag = con.execute("SELECT sum(lag) FROM kafka_lag WHERE topic = ?", [topic]).fetchone()[0]
    assert lag == 0

    # re-executing every range (a retried run, a replayed range) adds nothing
    for r in reqs:
        result = execute(paths, instance, r)
        mat = result.asset_materializations_for_node("feedback")[0]
        assert mat.metadata["events_new"].value == 0
    assert count(paths) == 10_000
    # with everything done, even a lost cursor requests nothing
    assert tick(paths, instance, cursor=None).run_requests == []
    assert tick(paths, instance, cursor=first.cursor).run_requests == []
    if backend == "postgres":  # it all went to PostgreSQL: the DuckDB file holds no feedback
        assert not paths.db.exists() or Store(paths.db).row_count("feedback_events") == 0


def test_batch_policy_waits_for_size_or_age_and_flush_overrides(paths, instance, topic, kafka_broker, monkeypatch):
    bootstrap = kafka_broker.state().bootstrap
    monkeypatch.setenv("STREAM_SENTINEL_FEEDBACK_BATCH", "50")
    monkeypatch.setenv("STREAM_SENTINEL_FEEDBACK_TIMEOUT_SECONDS", "3600")
    produce(bootstrap, topic, [vote(f"r{i}") for i in range(5)])
    held = tick(paths, instance)
    assert held.run_requests == [] and "waiting for the batch policy" in held.skip_message
    flushed = flush_tick(paths)
    assert sum(int(r.tags["stream_sentinel/messages"]) for r in flushed.run_requests) == 5
    monkeypatch.setenv("STREAM_SENTINEL_FEEDBACK_TIMEOUT_SECONDS", "0")
    produce(bootstrap, topic, [vote("late")])
    aged = tick(paths, instance, cursor=flushed.cursor)
    assert [r.tags["stream_sentinel/messages"] for r in aged.run_requests] == ["1"]


@pytest.mark.parametrize("pause_at,backend", [("feedback_before_write", "duckdb"), ("feedback_after_write", "duckdb"),
                                              ("feedback_after_write", "postgres")], indirect=["backend"])
def test_run_killed_mid_range_then_retried_adds_nothing_twice(backend, paths, instance, topic, kafka_broker, tmp_path,
                                                              pause_at):
    bootstrap = kafka_broker.state().bootstrap
    produce(bootstrap, topic, [vote(f"r{i}") for i in range(300)] + [b"garbage"], keyed=False)
    plan = flush_tick(paths)  # unkeyed: a partition may hold fewer than the batch size
    (first, *rest) = plan.run_requests
    cfg = first.run_config["ops"]["feedback"]["config"]
    kill_when_paused([sys.executable, "-c", KILLED_RUN, str(store_mod.location(paths.db)), bootstrap, cfg["topic"],
                      str(cfg["partition"]), str(cfg["start_offset"]), str(cfg["end_offset"])],
                     pause_at, tmp_path / "paused")
    for r in plan.run_requests:  # the retry, then the other partitions
        execute(paths, instance, r)
    assert count(paths) == 300
    assert count(paths, "feedback_rejects") == 1


def test_malformed_messages_reach_the_dlq_and_the_rejects_table(paths, instance, topic, kafka_broker, backend):
    bootstrap = kafka_broker.state().bootstrap
    bad = [b"{oops", json.dumps(vote("r1", label="maybe")), json.dumps(vote("r2", confidence=7))]
    produce(bootstrap, topic, [vote("ok1"), *bad, vote("ok2", label="ham")], keyed=False)
    for r in flush_tick(paths).run_requests:
        execute(paths, instance, r)
    assert count(paths) == 2
    with metrics(paths).connect() as con:
        rules = sorted(r[0] for r in con.execute("SELECT rule FROM feedback_rejects").fetchall())
    assert rules == ["confidence_out_of_range", "invalid_json", "unknown_label"]
    cons = Consumer({"bootstrap.servers": bootstrap, "group.id": "dlq-reader", "auto.offset.reset": "earliest"})
    cons.subscribe([f"{topic}.dlq"])
    got = []
    deadline = time.monotonic() + 60
    while len(got) < 3 and time.monotonic() < deadline:
        msg = cons.poll(1.0)
        if msg is not None and msg.error() is None:
            got.append(msg)
    cons.close()
    assert len(got) == 3
    headers = [dict(m.headers()) for m in got]
    assert sorted(h["rule"].decode() for h in headers) == rules
    assert all(h["source_topic"].decode() == topic and h["error"] for h in headers)
    assert sorted(m.value() for m in got) == sorted(b if isinstance(b, bytes) else b.encode() for b in bad)


def test_broker_restart_mid_stream_loses_and_duplicates_nothing(paths, instance, tmp_path, monkeypatch):
    broker = start_broker(tmp_path / "kafka-restart")
    try:
        bootstrap = broker.state().bootstrap
        name = create_topic(bootstrap, "restart-topic")
        monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", bootstrap)
        monkeypatch.setenv("STREAM_SENTINEL_FEEDBACK_TOPIC", name)
        produce(bootstrap, name, [vote(f"a{i}") for i in range(1500)])
        first = tick(paths, instance)
        execute(paths, instance, first.run_requests[0])  # one partition done before the outage
        broker.kill()  # a crash, not a clean shutdown
        down = tick(paths, instance, cursor=first.cursor)
        assert down.run_requests == [] and "unreachable" in down.skip_message
        broker.start()
        for r in first.run_requests[1:]:
            execute(paths, instance, r)
        produce(bootstrap, name, [vote(f"b{i}") for i in range(1500)])
        after = tick(paths, instance, cursor=first.cursor)
        for r in after.run_requests:
            execute(paths, instance, r)
        assert count(paths) == 3000
        with Store(paths.db).connect() as con:
            assert con.execute("SELECT count(DISTINCT record_id) FROM feedback_events").fetchone()[0] == 3000
    finally:
        broker.kill()  # its data is this test's temp folder: a clean shutdown takes up to 30 s


def test_sensor_definitions_skip_cleanly_without_kafka(paths, instance, monkeypatch):
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)
    result = tick(paths, instance)
    assert "not configured" in result.skip_message
    names = {s.name for s in build_feedback_sensors(Settings())}
    assert names == {"feedback_kafka_sensor", "feedback_files_sensor"}


def test_cli_sends_to_kafka_and_run_once_flushes_it_into_status(paths, topic, kafka_broker, demo_records):
    env = {**os.environ, "STREAM_SENTINEL_HOME": str(paths.home)}

    def cli(*args):
        out = subprocess.run([sys.executable, "-m", "stream_sentinel.cli", *args], capture_output=True, text=True,
                             env=env, timeout=600)
        assert out.returncode == 0, out.stderr
        return out.stdout

    assert topic in cli("feedback", "send", "--record-id", demo_records[0]["id"], "--label", "spam",
                        "--source", "alice", "--confidence", "0.7")
    assert "40 feedback messages sent" in cli("demo-data", "feedback", "--limit", "20", "--reviewers", "2",
                                              "--quiet")
    summary = json.loads(cli("run", "--once").strip().splitlines()[-1])
    assert summary["feedback_events"] == 41 and summary["feedback_rejects"] == 0
    status = json.loads(cli("status", "--json"))
    assert status["feedback_events"] == 41
    assert status["labels"]["total"] == 20 and status["labels"]["pending"] == 20  # no records ingested yet
    assert set(status["kafka_lag"]) <= {f"{topic}:{p}" for p in range(3)} and sum(status["kafka_lag"].values()) == 0
    # offsets were committed to the consumer group, for lag dashboards
    from confluent_kafka import TopicPartition

    cons = Consumer({"bootstrap.servers": kafka_broker.state().bootstrap, "group.id": "stream-sentinel-feedback"})
    committed = cons.committed([TopicPartition(topic, p) for p in range(3)], timeout=10)
    cons.close()
    assert sum(max(tp.offset, 0) for tp in committed) == 41


def test_kafka_secrets_are_env_var_references_and_never_printed(monkeypatch):
    from stream_sentinel.kafka import KafkaSettings, redacted
    from stream_sentinel.resources.kafka import KafkaResource

    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:1")
    monkeypatch.setenv("KAFKA_SASL_PASSWORD", "hunter2-secret")
    res = KafkaResource.from_env()
    assert isinstance(res.sasl_password, dg.EnvVar) and res.sasl_password.env_var_name == "KAFKA_SASL_PASSWORD"
    assert "hunter2" not in repr(res)
    settings = KafkaSettings.from_env()
    assert "hunter2" not in repr(settings)
    assert redacted(settings.client_config())["sasl.password"] == "***"


def test_cluster_ids_never_start_with_a_dash(monkeypatch):
    """kafka-storage's parser reads an id starting with "-" as an option and refuses to
    format: one broker start in 64 failed that way."""
    import uuid

    from stream_sentinel.devtools import kafka_broker

    draws = iter([uuid.UUID(bytes=b"\xf8" + bytes(15)), uuid.UUID(bytes=b"\x01" * 16)])
    monkeypatch.setattr(kafka_broker.uuid, "uuid4", lambda: next(draws))
    cluster_id = kafka_broker.new_cluster_id()
    assert not cluster_id.startswith("-") and len(cluster_id) == 22
    assert cluster_id == "AQEBAQEBAQEBAQEBAQEBAQ"  # the second draw: the first began with "-"


def test_concurrent_runs_on_postgresql_land_each_offset_once(paths, topic, kafka_broker, pg_database, monkeypatch):
    """Several run workers writing one PostgreSQL store at once: three ranges, each read by two
    processes at the same time (a retry racing the run it retries), six writers in all. Every
    offset lands once, the labels resolve from all of them, and the lag is 0."""
    monkeypatch.setenv(store_mod.STORE_URL_ENV, pg_database)
    bootstrap = kafka_broker.state().bootstrap
    produce(bootstrap, topic, [vote(f"r{i}", "spam" if i % 3 else "ham", f"rev{i % 5}") for i in range(3000)])
    reqs = flush_tick(paths).run_requests
    assert len(reqs) == 3
    procs = []
    for r in reqs:
        cfg = r.run_config["ops"]["feedback"]["config"]
        for _ in range(2):
            procs.append(subprocess.Popen(
                [sys.executable, "-c", KILLED_RUN, pg_database, bootstrap, cfg["topic"], str(cfg["partition"]),
                 str(cfg["start_offset"]), str(cfg["end_offset"])], stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    assert count(paths) == 3000
    store = metrics(paths)
    with store.connect() as con:
        assert con.execute('SELECT count(*) FROM (SELECT DISTINCT "partition", "offset" FROM feedback_events) d'
                           ).fetchone()[0] == 3000
        assert con.execute("SELECT count(*) FROM feedback_ranges WHERE topic = ?", [topic]).fetchone()[0] == 3
        assert con.execute("SELECT sum(lag) FROM kafka_lag WHERE topic = ?", [topic]).fetchone()[0] == 0
    got = fb.resolve_labels(store, fb.ConsensusConfig())
    assert got["labels"] == 3000 and got["reviewers"] == 5
    assert flush_tick(paths).run_requests == []  # nothing left to read


def test_the_api_sends_feedback_to_kafka_and_a_broker_away_costs_each_request_its_deadline_only(
        paths, topic, kafka_broker, monkeypatch):
    """POST /v1/feedback with Kafka configured: each message confirmed on its own (key = record
    id) by the process's one producer; too large a message is refused before anything is sent;
    with the broker unreachable every request is answered 503 within STREAM_SENTINEL_API_TIMEOUT_SECONDS
    naming what was not delivered, and the other endpoints keep answering meanwhile."""
    from concurrent.futures import ThreadPoolExecutor

    from .helpers import serve

    bootstrap = kafka_broker.state().bootstrap
    with serve(paths, env={"STREAM_SENTINEL_API_TIMEOUT_SECONDS": "3"}) as api:
        for n in range(2):  # the second request reuses the producer
            sent = api.post("/v1/feedback", json={"feedback": [vote(f"k{n}-{i}", source=f"s{i}") for i in range(3)]})
            assert sent.status_code == 202, sent.text
            assert sent.json() == {"accepted": 3, "to": f"kafka topic {topic}"}
        big = api.post("/v1/feedback", json={"feedback": [vote("ok"), {**vote("huge"), "note": "x" * 1_000_000}]})
        assert big.status_code == 422 and [(e["index"], e["rule"]) for e in big.json()["error"]["feedback"]] == \
            [(1, "too_large")]
    cons = Consumer({"bootstrap.servers": bootstrap, "group.id": f"t-{uuid.uuid4().hex[:6]}",
                     "auto.offset.reset": "earliest", "enable.auto.commit": False})
    cons.subscribe([topic])
    got, deadline = [], time.monotonic() + 60
    while len(got) < 6 and time.monotonic() < deadline:
        msg = cons.poll(0.5)
        if msg is not None and msg.error() is None:
            got.append((msg.key().decode(), json.loads(msg.value())))
    extra = cons.poll(2.0)
    cons.close()
    assert sorted(k for k, _ in got) == sorted(f"k{n}-{i}" for n in range(2) for i in range(3))
    assert all(v["record_id"] == k and v["label"] == "spam" for k, v in got) and extra is None  # "ok" not sent
    # the broker away (nothing listens there): an answer within the deadline, the rest of the API unaffected
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:1")
    with serve(paths, env={"STREAM_SENTINEL_API_TIMEOUT_SECONDS": "2"}) as api:
        with ThreadPoolExecutor(8) as pool:
            started = time.monotonic()
            posts = [pool.submit(api.post, "/v1/feedback", json={"feedback": [vote(f"x{i}"), vote(f"y{i}")]})
                     for i in range(6)]
            time.sleep(0.3)
            for _ in range(5):  # each well within the 2 s a request behind the waiting feedback would take
                for path in ("/healthz", "/v1/models"):
                    t0 = time.monotonic()
                    assert api.get(path).status_code == 200
                    assert time.monotonic() - t0 < 1.5, path
            answers = [f.result() for f in posts]
            took = time.monotonic() - started
        codes = []
        for resp in answers:
            assert resp.status_code == 503, resp.text
            err = resp.json()["error"]
            codes.append(err["code"])
            if err["code"] == "feedback_not_delivered":
                assert err["delivered"] == 0 and err["failed"] == [0, 1]
            assert resp.headers["Retry-After"]
        # four wait for Kafka at once; more are refused at once rather than queued
        assert codes.count("feedback_not_delivered") >= 4 and set(codes) <= {"feedback_not_delivered", "overloaded"}
        assert took < 15, took
