"""The feedback dead-letter queue against a real broker and a real DuckDB: exact bytes, a
reference for what cannot fit, and a DLQ failure that never blocks the valid messages."""

from __future__ import annotations

import hashlib
import json
import random
import sys
import time
import uuid

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource, NewTopic

from stream_sentinel import feedback_sources as fs
from stream_sentinel import kafka as kf
from stream_sentinel.store import Store

from .conftest import kill_when_paused
from .helpers import KILLED_RUN, execute, flush_tick, vote

BIG = 1_040_000  # above the producer's default message.max.bytes (1,000,000): cannot be copied to the DLQ


def make_topic(bootstrap: str, name: str, partitions: int = 1, **config: str) -> str:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for fut in admin.create_topics([NewTopic(name, partitions, 1, config=config)]).values():
        fut.result(30)
    return name


def set_topic_config(bootstrap: str, name: str, **config: str) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    res = ConfigResource(ConfigResource.Type.TOPIC, name, incremental_configs=[
        ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET) for k, v in config.items()])
    for fut in admin.incremental_alter_configs([res]).values():
        fut.result(30)


def produce_raw(bootstrap: str, topic: str, messages: list[tuple]) -> None:
    """(value, key[, headers]) each, to partition 0, in order."""
    prod = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "message.max.bytes": 2_000_000})
    for value, key, *headers in messages:
        prod.produce(topic, value=value, key=key, partition=0, headers=headers[0] if headers else None)
        prod.poll(0)
    assert prod.flush(60) == 0


def high_watermarks(bootstrap: str, topic: str) -> int:
    cons = Consumer({"bootstrap.servers": bootstrap, "group.id": "dlq-watermarks"})
    try:
        parts = cons.list_topics(topic, timeout=10).topics[topic].partitions
        return sum(cons.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts)
    finally:
        cons.close()


def read_dlq(bootstrap: str, topic: str, expected: int, timeout_s: float = 60) -> dict[int, object]:
    """Every message of the DLQ topic, by its source_offset header (asserts no duplicates)."""
    cons = Consumer({"bootstrap.servers": bootstrap, "group.id": f"dlq-reader-{uuid.uuid4().hex[:6]}",
                     "auto.offset.reset": "earliest", "enable.auto.commit": False})
    parts = cons.list_topics(topic, timeout=10).topics[topic].partitions
    cons.assign([TopicPartition(topic, p, 0) for p in parts])
    got: list = []
    deadline = time.monotonic() + timeout_s
    while len(got) < expected and time.monotonic() < deadline:
        msg = cons.poll(1.0)
        if msg is not None and msg.error() is None:
            got.append(msg)
    cons.close()
    assert len(got) == expected
    by_offset = {int(dict(m.headers())["source_offset"]): m for m in got}
    assert len(by_offset) == expected
    return by_offset


def rejects_table(db) -> dict[int, tuple]:
    with Store(db).connect() as con:
        return {r[0]: r[1:] for r in con.execute(
            """SELECT "offset", raw_bytes, key_bytes, dlq_status, rule, msg_key FROM feedback_rejects""").fetchall()}


@pytest.fixture
def bootstrap(kafka_broker, monkeypatch) -> str:
    address = kafka_broker.state().bootstrap
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", address)
    return address


def test_dlq_keeps_exact_bytes_and_references_a_message_too_large_for_it(paths, instance, bootstrap, monkeypatch):
    # the source topic accepts ~2 MB; the DLQ topic is auto-created with the broker's defaults
    topic = make_topic(bootstrap, f"dlq-{uuid.uuid4().hex[:8]}", **{"max.message.bytes": "2000000"})
    monkeypatch.setenv("STREAM_SENTINEL_FEEDBACK_TOPIC", topic)
    big = random.Random(7).randbytes(BIG)
    original_headers = [("trace", b"\x00\x01\xff"), ("trace", b"again"), ("empty", None)]
    messages = [
        (json.dumps(vote("a1")).encode(), b"a1"),                   # 0 valid
        (big, b"big-key"),                                          # 1 too large for the DLQ
        (json.dumps(vote("a2", label="ham")).encode(), b"a2"),      # 2 valid
        (b"\xff\xfe\x00\x80binary", b"\x00\xff\xc3\x28key"),         # 3 binary value and key
        (None, b"\xc3\x28tombstone"),                                # 4 null value (tombstone)
        (b"{oops", None, original_headers),                          # 5 null key, with headers
        (None, None),                                                # 6 null value, null key
        (json.dumps(vote("a3")).encode(), None),                    # 7 valid, null key
        (json.dumps(vote("a4")).encode(), b"a4"),                   # 8 valid
    ]
    produce_raw(bootstrap, topic, messages)
    runs = flush_tick(paths).run_requests
    assert [r.run_key for r in runs] == [f"{topic}:0:0-8"]
    execute(paths, instance, runs[0])  # the run succeeds

    with Store(paths.db).connect() as con:
        assert sorted(r[0] for r in con.execute("SELECT record_id FROM feedback_events").fetchall()) == [
            "a1", "a2", "a3", "a4"]
    table = rejects_table(paths.db)
    assert sorted(table) == [1, 3, 4, 5, 6]
    for off in table:
        raw_bytes, key_bytes, status, _, _ = table[off]
        assert raw_bytes == messages[off][0] and key_bytes == messages[off][1], off  # byte for byte, NULLs kept
        assert status == ("reference" if off == 1 else "sent"), (off, status)
    assert len(table[1][0]) == BIG and hashlib.sha256(table[1][0]).digest() == hashlib.sha256(big).digest()

    dlq = read_dlq(bootstrap, f"{topic}.dlq", 5)
    for off in (3, 4, 5, 6):
        msg = dlq[off]
        assert msg.value() == messages[off][0] and msg.key() == messages[off][1], off
        h = dict(msg.headers())
        assert h["source_topic"] == topic.encode() and h["source_partition"] == b"0"
        assert h["rule"] == table[off][3].encode() and h["error"] and int(h["source_timestamp"]) > 0
        assert "too_large" not in h
    assert dlq[5].headers()[:3] == original_headers  # the original headers, in order, then ours
    ref = dlq[1]
    body = json.loads(ref.value())
    assert body["too_large"] is True and body["size"] == BIG
    assert body["sha256"] == hashlib.sha256(big).hexdigest()
    assert body["source"] == {"topic": topic, "partition": 0, "offset": 1}
    assert body["stored_in"] == "feedback_rejects.raw_bytes"
    assert ref.key() == b"big-key" and dict(ref.headers())["too_large"] == b"true"

    # a re-executed range adds no row and dead-letters nothing again
    execute(paths, instance, runs[0])
    assert rejects_table(paths.db) == table
    time.sleep(1)
    assert high_watermarks(bootstrap, f"{topic}.dlq") == 5


def test_the_broker_refusing_a_message_too_large_for_the_dlq_topic_gets_a_reference(bootstrap):
    """The producer would send it, the DLQ topic's max.message.bytes refuses it (MSG_SIZE_TOO_LARGE
    in the delivery report): a reference instead."""
    from stream_sentinel import feedback as fb

    dlq = make_topic(bootstrap, f"dlq-small-{uuid.uuid4().hex[:8]}", **{"max.message.bytes": "20000"})
    pos = fb.Position("src", 0, 41)
    items = [fb.Rejected(pos, "k", "x", "invalid_json", "value is not JSON", b"\x01" * 50_000, b"k"),
             fb.Rejected(fb.Position("src", 0, 42), None, "y", "invalid_json", "value is not JSON", b"\xff", None)]
    statuses = kf.send_dlq(kf.dlq_producer(kf.KafkaSettings(bootstrap), 10), dlq, items, "src", 10)
    assert statuses == ["reference", "sent"]
    got = read_dlq(bootstrap, dlq, 2)
    assert json.loads(got[41].value())["size"] == 50_000 and got[42].value() == b"\xff" and got[42].key() is None


class _RaisingProducer:
    """A producer whose every produce() raises, as librdkafka does for a fatal producer error."""

    def produce(self, *args, **kwargs):
        from confluent_kafka import KafkaError, KafkaException

        raise KafkaException(KafkaError(KafkaError._FATAL, "simulated fatal producer error"))

    def poll(self, *args):
        return 0

    def flush(self, *args):
        return 0


@pytest.mark.parametrize("fault", ["refused", "unreachable", "raises"])
def test_a_failing_dlq_still_records_the_range_and_a_retry_sends_the_pending_copies(paths, bootstrap, monkeypatch,
                                                                                   fault):
    """The DLQ cannot be written (the broker refuses the DLQ topic's writes; the DLQ producer
    cannot reach a broker and times out; produce() raises): the valid messages are recorded
    anyway, the rejects stay 'failed: ...', and the next attempt of the same range sends them
    once the DLQ works again, adding no row."""
    topic = make_topic(bootstrap, f"dlqfail-{uuid.uuid4().hex[:8]}")
    dlq = f"{topic}.dlq"
    if fault == "refused":  # even the reference is larger than this
        make_topic(bootstrap, dlq, **{"max.message.bytes": "64"})
    elif fault == "unreachable":
        monkeypatch.setattr(kf, "dlq_producer", lambda settings, timeout_s=30.0: kf.producer(
            kf.KafkaSettings("127.0.0.1:9"), **{"message.timeout.ms": int(timeout_s * 1000)}))
    else:
        monkeypatch.setattr(kf, "dlq_producer", lambda settings, timeout_s=30.0: _RaisingProducer())
    messages = [(json.dumps(vote("v1")).encode(), b"v1"), (b"\xff bad", b"\x80"), (None, b"gone"),
                (json.dumps(vote("v2")).encode(), b"v2")]
    produce_raw(bootstrap, topic, messages)
    store = Store(paths.db)
    rng = fs.OffsetRange(topic, 0, 0, 3)
    settings = kf.KafkaSettings(bootstrap)

    res = fs.ingest_range(store, settings, rng, frozenset({"spam", "ham"}), dlq_timeout_s=3)
    assert (res.events_new, res.rejects_new, res.dlq_sent, res.dlq_failed) == (2, 2, 0, 2)
    assert res.dlq_error.startswith("failed: ")
    with store.connect() as con:
        assert con.execute("SELECT count(*) FROM feedback_events").fetchone()[0] == 2
    table = rejects_table(paths.db)
    cause = {"refused": "MSG_SIZE_TOO_LARGE", "unreachable": "_MSG_TIMED_OUT", "raises": "_FATAL"}[fault]
    assert all(table[o][2].startswith(f"failed: {cause}") for o in (1, 2)), table
    assert table[1][:2] == (b"\xff bad", b"\x80") and table[2][:2] == (None, b"gone")
    # the range counts as recorded: the sensor plans nothing more for it
    cons = kf.consumer(settings)
    try:
        plan = fs.plan_ranges(store, cons, topic, {}, fs.Policy(min_batch=1), flush=True)
    finally:
        cons.close()
    assert plan.to_request == []

    # the DLQ works again: the next attempt of the same range sends the pending copies, once
    monkeypatch.undo()
    if fault == "refused":
        set_topic_config(bootstrap, dlq, **{"max.message.bytes": "1048588"})
    retry = fs.ingest_range(store, settings, rng, frozenset({"spam", "ham"}), dlq_timeout_s=20)
    assert (retry.events_new, retry.rejects_new, retry.dlq_sent, retry.dlq_failed) == (0, 0, 2, 0)
    after = rejects_table(paths.db)
    assert {o: after[o][2] for o in after} == {1: "sent", 2: "sent"}
    got = read_dlq(bootstrap, dlq, 2)
    assert (got[1].value(), got[1].key()) == (b"\xff bad", b"\x80")
    assert (got[2].value(), got[2].key()) == (None, b"gone")
    # nothing is pending any more: a third attempt sends nothing
    again = fs.ingest_range(store, settings, rng, frozenset({"spam", "ham"}), dlq_timeout_s=20)
    assert (again.events_new, again.rejects_new, again.dlq_sent) == (0, 0, 0)
    time.sleep(1)
    assert high_watermarks(bootstrap, dlq) == 2


@pytest.mark.parametrize("pause_at,copies", [("feedback_after_write", 1), ("feedback_after_dlq", 2)])
def test_a_crash_before_the_dlq_status_is_marked_is_resent_by_the_retry(paths, bootstrap, tmp_path, pause_at,
                                                                        copies):
    """Killed after recording (nothing dead-lettered yet) or after dead-lettering (not marked
    yet): the retry sends the copy, adds no row, marks it sent. The DLQ is at least once: in
    the second case the broker holds the copy twice."""
    topic = make_topic(bootstrap, f"dlqcrash-{uuid.uuid4().hex[:8]}")
    produce_raw(bootstrap, topic, [(json.dumps(vote("c1")).encode(), b"c1"), (b"\x00\xffnope", None)])
    kill_when_paused([sys.executable, "-c", KILLED_RUN, str(paths.db), bootstrap, topic, "0", "0", "1"],
                     pause_at, tmp_path / "paused")
    table = rejects_table(paths.db)
    assert table[1][:3] == (b"\x00\xffnope", None, "pending")  # recorded, not marked yet
    res = fs.ingest_range(Store(paths.db), kf.KafkaSettings(bootstrap), fs.OffsetRange(topic, 0, 0, 1),
                          frozenset({"spam", "ham"}))
    assert (res.events_new, res.rejects_new, res.dlq_sent) == (0, 0, 1)
    assert rejects_table(paths.db)[1][2] == "sent"
    with Store(paths.db).connect() as con:
        assert con.execute("SELECT count(*) FROM feedback_events").fetchone()[0] == 1
    time.sleep(1)
    assert high_watermarks(bootstrap, f"{topic}.dlq") == copies
