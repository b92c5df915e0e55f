"""Right to erasure, proven from outside: after `stream-sentinel erase`, a byte scan of the whole
data root finds neither the record's id nor a marker from its text; no index version holds its
vector; the champion was not trained on it; the audit row counts what went; and the record is
refused if it comes back. The same with the erasing process SIGKILLed half way and run again."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from stream_sentinel import cli, drift, ingest, pipeline, served
from stream_sentinel.erasure.keys import IdHasher
from stream_sentinel.index import IndexStore
from stream_sentinel.learning import loop as learning
from stream_sentinel.learning.registry import ModelRegistry, TaintedVersion
from stream_sentinel.store import Store

from .conftest import drop, kill_when_paused
from .helpers import candidate, ingest_records, label_records, serve

MARK = "zqx-erasure-marker-7f3a"  # in the erased record's text and key, nowhere else
TARGET = "erase-me-5c1d9e"
WINDOWS = """
windows:
  - {name: domain_msgs_1d, key: features.sender_domain, kind: sliding, size: 1d, agg: count}
"""


def _build_root(paths, store, emb, demo_records, demo_labels) -> dict:
    """A data root where the record is everywhere: two raw files (one holding only it), a
    quarantined file, DuckDB rows of every kind, a trained champion, two index versions, window
    state, a served answer and a drift report."""
    base = demo_records[1000:1240]
    target = {"id": TARGET, "text": f"Subject: {MARK} please forget me\n\n" + base[0]["text"][:400],
              "event_time": base[5]["event_time"], "features": {"sender_domain": f"{MARK}.example"}}
    keep = {"id": "keep-1", "text": "Subject: keep me\n\n" + base[1]["text"][:300],
            "event_time": base[6]["event_time"], "features": {"sender_domain": "keep.example"}}
    (paths.home / "windows.yaml").write_text(WINDOWS)
    drop(paths.raw, "mixed.jsonl", [target, keep])
    drop(paths.raw, "alone.json", target)  # the same record again: skipped, but it holds the id
    drop(paths.raw, "broken.json", "[" + json.dumps(target) + ', {"id" "x"}]\n')  # quarantined whole
    ingest_records(paths, store, emb, base, "base")
    from stream_sentinel.windows import spec, state

    state.update(store, spec.load(paths.home))
    labels = {**demo_labels, TARGET: "spam", "keep-1": "ham"}
    label_records(store, [*base, target, keep], labels, "votes")
    registry = ModelRegistry(paths.models, store)
    first = candidate(registry, store, emb, full=True).version
    registry.promote(first.version, None, "test")
    pipeline.update_index(store, IndexStore(paths.index), emb.model_id, emb.dim)
    ingest_records(paths, store, emb, demo_records[1240:1300], "more")
    state.update(store, spec.load(paths.home))
    pipeline.update_index(store, IndexStore(paths.index), emb.model_id, emb.dim)
    learning.score_new_records(registry, store, emb.model_id)
    # an answer the API served for it, loaded from the prediction log
    day = datetime.now(timezone.utc).date().isoformat()
    log = served.folder(paths.home) / day / "1-test.jsonl"
    log.parent.mkdir(parents=True, exist_ok=True)
    line = {"request_id": "q1", "i": 0, "record_id": TARGET, "routing_key": TARGET, "model_version": first.version,
            "role": "champion", "served": True, "probability": 0.9, "label": "spam", "input": "text",
            "served_at": datetime.now(timezone.utc).isoformat()}
    other = {**line, "i": 1, "record_id": "keep-1", "routing_key": "keep-1"}
    log.write_text(json.dumps(line) + "\n" + json.dumps(other) + "\n")
    served.ingest(paths.home, store)
    drift.run_partition(store, registry, paths.reports, emb.model_id, day, drift.DriftConfig())
    with store.connect() as con:
        vec_id = con.execute("SELECT vec_id FROM records WHERE id = ?", [TARGET]).fetchone()[0]
        assert con.execute("SELECT count(*) FROM served_predictions WHERE record_id = ?", [TARGET]).fetchone()[0]
        assert con.execute("SELECT count(*) FROM window_events WHERE record_id = ?", [TARGET]).fetchone()[0]
    versions = IndexStore(paths.index).versions()
    assert len(versions) >= 2 and all(_holds(paths, v, vec_id) for v in versions)
    return {"vec_id": vec_id, "first": first.version, "registry": registry}


def _holds(paths, version: str, vec_id: int) -> bool:
    return vec_id in pq.read_table(paths.index / version / "ids.parquet").column("vec_id").to_pylist()


def _scan(root: Path, needles: list[bytes]) -> list[str]:
    """Every file under the data root holding one of the byte strings (gzip files unpacked)."""
    import gzip

    hits = []
    for p in root.rglob("*"):
        if not p.is_file() or p.is_symlink():
            continue
        data = p.read_bytes()
        if p.name.endswith(".gz"):
            try:
                data += gzip.decompress(data)
            except OSError:
                pass
        hits += [f"{p.relative_to(root)}: {n!r}" for n in needles if n in data]
    return hits


def _pg_tables(store, request) -> Path:
    """The folder of the store's database on the test server (after a checkpoint: on disk)."""
    with store.connect() as con:
        con.execute("CHECKPOINT")
        oid = con.execute("SELECT oid FROM pg_database WHERE datname = current_database()").fetchone()[0]
    return request.getfixturevalue("postgres_server").pgdata / "base" / str(oid)


def _erase_cli(*args: str) -> dict:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(["erase", *args, "--json"])
    assert code == 0, out.getvalue()
    return json.loads(out.getvalue())


@pytest.mark.slow
@pytest.mark.parametrize("kill_at,backend", [
    (None, "duckdb"), (None, "postgres"), ("erasure.after_models", "duckdb"), ("erasure.after_files", "postgres"),
    ("erasure.before_compact", "duckdb")], indirect=["backend"])
def test_an_erased_record_is_nowhere_and_the_champion_never_saw_it(backend, paths, store, demo_embedder, demo_records,
                                                                   demo_labels, kill_at, tmp_path, instance, request):
    """The whole loop on the data root (and, on PostgreSQL, the metrics store's table files):
    after the erasure neither the id nor the marker is anywhere."""
    root = _build_root(paths, store, demo_embedder, demo_records, demo_labels)
    needles = [MARK.encode(), TARGET.encode()]
    before = _scan(paths.home, needles)
    # the scan can see it: raw, failed, the database, the logs
    assert any(h.startswith("raw/") for h in before) and any(h.startswith("failed/") for h in before), before
    if backend == "postgres":  # ... and the table files of this test's database on the server, the
        with store.connect() as con:  # statistics' sampled values included (autovacuum runs ANALYZE too)
            con.execute("ANALYZE")
        assert _scan(_pg_tables(store, request), needles)
    if kill_at:
        kill_when_paused([sys.executable, "-m", "stream_sentinel.cli", "erase", "--record-id", TARGET,
                          "--reason", "subject request"],
                         kill_at, tmp_path / "paused")
        with Store.of(paths).connect() as con:
            assert con.execute("SELECT status FROM erasures").fetchall() == [
                ("completed" if kill_at == "erasure.before_compact" else "running",)]
    api_ctx = serve(paths) if kill_at is None else contextlib.nullcontext()
    with api_ctx as api:
        if api is not None:  # the API holds the record in memory: its text (BM25), vector and features
            deadline = time.monotonic() + 60
            while TARGET not in _api_hits(api):
                assert time.monotonic() < deadline, "the API never found the record before the erasure"
                time.sleep(0.2)
        out = _erase_cli("--record-id", TARGET, "--reason", "subject request")
        if api is not None:  # ... and forgets it once the new index version is served
            deadline = time.monotonic() + 30
            while TARGET in _api_hits(api):
                assert time.monotonic() < deadline, "the API still finds the erased record"
                time.sleep(0.2)
            gone = api.post("/v1/predict", json={"records": [{"id": TARGET}]})
            assert gone.status_code in (404, 503), gone.text  # unknown id (503: no champion is serving)
            assert "Traceback" not in api.server_log()
    if kill_at == "erasure.before_compact":  # it had completed; the rerun rewrites the file and tidies up
        assert (out["completed"], out["already_erased"]) == (0, 1)
    else:
        assert (out["completed"], out["already_erased"]) == (1, 0)
        assert out["withdrawn_champion"] == root["first"] and out["retrain_needed"] is True

    # nowhere: no file of the data root holds the id or the marker (DuckDB after its rewrite), nor
    # (PostgreSQL) a table file of the server after VACUUM FULL; its write-ahead log keeps the bytes
    # until its segments are recycled (see the README)
    assert _scan(paths.home, needles) == []
    if backend == "postgres":
        assert _scan(_pg_tables(store, request), needles) == []
        assert not paths.db.exists()  # every step, the API and the CLI used the PostgreSQL store
    for v in IndexStore(paths.index).versions():
        assert not _holds(paths, v, root["vec_id"]), v
    found = json.loads(_capture(["search", f"{MARK} please forget me", "-k", "5", "--json"]))
    assert TARGET not in {r["id"] for r in found["results"]}

    # the champion was trained on it: withdrawn, marked, never promoted again; a retrain is owed
    registry = ModelRegistry(paths.models, Store.of(paths))
    assert registry.champion_version() is None
    assert registry.get(root["first"]).tainted_by is not None
    with pytest.raises((TaintedVersion, KeyError)):
        registry.promote(root["first"], None, "again")
    assert not (paths.models / root["first"]).exists()  # default policy: tainted files deleted

    # the audit row: a keyed hash, never the id; what went, counted once
    h = IdHasher.for_root(paths.home)(TARGET)
    with Store.of(paths).connect() as con:
        rows = con.execute("SELECT id_hash, reason, status, counts, plan, retrain_needed FROM erasures").fetchall()
        assert con.execute("SELECT count(*) FROM records WHERE id = 'keep-1'").fetchone()[0] == 1
        tomb = con.execute("SELECT count(*) FROM feedback_events WHERE record_id = ''").fetchone()[0]
    assert len(rows) == 1 and rows[0][0] == h and rows[0][1:3] == ("subject request", "completed")
    assert rows[0][4] is None and rows[0][5] is True
    counts = json.loads(rows[0][3])
    assert counts["records"] == 1 and counts["embeddings"] == 1 and counts["labels"] == 1
    assert counts["training_set_rows"] >= 1 and counts["predictions"] >= 1 and counts["served_predictions"] == 1
    assert counts["window_events"] == 1 and counts["window_features"] == 1 and counts["feedback_events"] == 1
    assert counts["raw_files"] == 2 and counts["quarantined_files"] == 1 and counts["served_logs"] == 1
    assert counts["index_versions_deleted"] >= 1 and counts["model_versions_tainted"] == 1
    assert counts["champion_withdrawn"] == 1 and counts["model_folders_deleted"] == 1
    assert tomb == 1  # the vote's offset stays: its range is still done

    # the retrain: erasure_retrain_sensor asks for a full retrain once, caused by the erasure
    import dagster as dg

    from stream_sentinel.config import Settings
    from stream_sentinel.resources import KafkaResource, StreamSentinelResource
    from stream_sentinel.sensors.erasure import build_erasure_retrain_sensor, build_erasure_sensor

    sentinel = StreamSentinelResource.from_env(home=str(paths.home))
    req = build_erasure_retrain_sensor(Settings())(dg.build_sensor_context(resources={"sentinel": sentinel}))
    assert isinstance(build_erasure_sensor(Settings())(dg.build_sensor_context(
        resources={"sentinel": sentinel, "kafka": KafkaResource()}, instance=instance)),
        dg.SkipReason)  # its request file is gone with it
    assert req.run_key == f"erasure-retrain:{h[:16]}" and req.tags["stream_sentinel/erasure"] == h[:16]

    # it comes back: refused by the rule `erased`, keeping neither id nor text
    drop(paths.raw, "again.jsonl", [{"id": TARGET, "text": "hello again", "event_time": "2024-05-03T00:00:00Z"}])
    ingest.scan(paths, Store.of(paths), debounce_s=1)
    for b in ingest.plan_batches(Store.of(paths)):
        for sha in b.files:
            ingest.process_file(paths, Store.of(paths), sha)
    with Store.of(paths).connect() as con:
        assert con.execute("SELECT count(*) FROM records WHERE id = ?", [TARGET]).fetchone()[0] == 0
        (rule, rid, raw, msg), = con.execute("SELECT rule, record_id, raw, message FROM rejects "
                                              "WHERE rule = 'erased'").fetchall()
    assert rid is None and not raw and h[:16] in msg and TARGET not in msg
    # an answer about it that an API logged after the erasure (a client still sends its id) is
    # not loaded back: a blank reject at its offset, the other answers of the file load
    day = datetime.now(timezone.utc).date().isoformat()
    answer = {"request_id": "q2", "i": 0, "record_id": TARGET, "routing_key": TARGET, "model_version": "m000001",
              "role": "champion", "served": True, "probability": 0.9, "label": "spam", "input": "stored",
              "served_at": datetime.now(timezone.utc).isoformat()}
    late = served.folder(paths.home) / day / "2-test.jsonl"
    late.parent.mkdir(parents=True, exist_ok=True)
    late.write_text(json.dumps(answer) + "\n" + json.dumps({**answer, "i": 1, "record_id": "keep-1",
                                                             "routing_key": "keep-1"}) + "\n")
    assert served.ingest(paths.home, Store.of(paths)) == {"files": 1, "loaded": 1, "rejected": 1}
    with Store.of(paths).connect() as con:
        assert con.execute("SELECT count(*) FROM served_predictions WHERE record_id = ?", [TARGET]).fetchone()[0] == 0
        assert con.execute("SELECT rule, raw FROM served_rejects WHERE file LIKE '%2-test.jsonl'").fetchall() == \
            [("erased", b"")]
    # erasing it again does nothing twice
    again = _erase_cli("--record-id", TARGET)
    assert again["completed"] == 0 and again["already_erased"] == 1
    # lifted: the user lets the id in again, and it is
    assert json.loads(_capture(["erase", "--lift", "--record-id", TARGET, "--json"]))["lifted"] == 1
    drop(paths.raw, "back.jsonl", [{"id": TARGET, "text": "hello once more", "event_time": "2024-05-04T00:00:00Z"}])
    ingest.scan(paths, Store.of(paths), debounce_s=1)
    for b in ingest.plan_batches(Store.of(paths)):
        for sha in b.files:
            ingest.process_file(paths, Store.of(paths), sha)
    with Store.of(paths).connect() as con:
        assert con.execute("SELECT count(*) FROM records WHERE id = ?", [TARGET]).fetchone()[0] == 1


def _api_hits(api) -> set[str]:
    found = set()
    for mode in ("lexical", "hybrid"):
        resp = api.get("/v1/search", params={"q": f"{MARK} please forget me", "k": 5, "mode": mode})
        assert resp.status_code == 200, resp.text
        found |= {r["id"] for r in resp.json()["results"]}
    return found


def _capture(argv: list[str]) -> str:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(argv) == 0
    return out.getvalue()


def test_requests_name_the_file_line_and_rule_and_the_sensor_takes_every_waiting_file(paths, instance):
    import dagster as dg

    from stream_sentinel.config import Settings
    from stream_sentinel.erasure import requests
    from stream_sentinel.resources import KafkaResource, StreamSentinelResource
    from stream_sentinel.sensors.erasure import build_erasure_sensor

    bad = requests.folder(paths.home) / "bad.jsonl"
    bad.parent.mkdir(parents=True)
    bad.write_text('{"record_id": "a"}\n{"record_id": ""}\n')
    with pytest.raises(requests.BadRequest, match=r"bad.jsonl line 2: record_id must be a non-empty string"):
        requests.read(bad)
    path = requests.write(paths.home, ["x", "y"], "why")
    assert [r.record_id for r in requests.read(path)] == ["x", "y"] and os.stat(path).st_size > 0
    with pytest.raises(requests.BadRequest):
        requests.write(paths.home, [""])
    sensor = build_erasure_sensor(Settings())
    ctx = dg.build_sensor_context(resources={"sentinel": StreamSentinelResource.from_env(home=str(paths.home)),
                                             "kafka": KafkaResource()}, instance=instance)
    req = sensor(ctx)
    assert req.run_config["ops"]["erasures"]["config"]["files"] == sorted([bad.name, path.name])
    assert all("x" not in str(v) for v in req.tags.values())  # names and counts, never an id


def test_requests_on_the_kafka_erasure_topic_become_a_request_file_and_bad_messages_are_kept(
        paths, kafka_broker, monkeypatch, instance):
    """A real broker: two requests and a message that is not one; the sensor writes the requests
    as one file (then commits), keeps the bad message byte for byte, and reads nothing twice."""
    import uuid

    import dagster as dg
    from confluent_kafka import Producer

    from stream_sentinel.config import Settings
    from stream_sentinel.erasure import requests
    from stream_sentinel.resources import KafkaResource, StreamSentinelResource
    from stream_sentinel.sensors.erasure import build_erasure_sensor

    from .conftest import create_topic

    bootstrap = kafka_broker.state().bootstrap
    topic = create_topic(bootstrap, f"er-{uuid.uuid4().hex[:8]}", partitions=2)
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", bootstrap)
    monkeypatch.setenv("STREAM_SENTINEL_ERASURE_TOPIC", topic)
    prod = Producer({"bootstrap.servers": bootstrap})
    bad = b"\xff not a request"
    for value in (json.dumps({"record_id": "gone-1", "reason": "asked"}).encode(), bad,
                  json.dumps({"record_id": "gone-2"}).encode()):
        prod.produce(topic, value=value, partition=0)
    assert prod.flush(60) == 0  # all three on the broker before the first tick

    def tick():
        with dg.build_resources({"sentinel": StreamSentinelResource.from_env(home=str(paths.home)),
                                 "kafka": KafkaResource.from_env()}) as res:
            return build_erasure_sensor(Settings.from_env())(dg.build_sensor_context(
                resources={"sentinel": res.sentinel, "kafka": res.kafka}, instance=instance))

    first = tick()
    for _ in range(3):  # a broker still starting its group coordinator: the topic waits a tick
        if not (isinstance(first, dg.SkipReason) and "topic not read" in (first.skip_message or "")):
            break
        first = tick()
    assert isinstance(first, dg.RunRequest), first.skip_message
    (name,) = first.run_config["ops"]["erasures"]["config"]["files"]
    got = requests.read(requests.folder(paths.home) / name)
    assert [(r.record_id, r.reason) for r in got] == [("gone-1", "asked"), ("gone-2", "")]
    (kept,) = (paths.failed / "erasures").glob("kafka-*.bin")
    assert kept.read_bytes() == bad
    assert "not_an_erasure_request" in kept.with_name(kept.name + ".error.json").read_text()
    again = tick()  # committed: nothing read twice, the same file still waits for its run
    assert again.run_config["ops"]["erasures"]["config"]["files"] == [name]
    assert len(list(requests.folder(paths.home).iterdir())) == 1
