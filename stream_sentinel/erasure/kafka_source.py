"""Erasure requests from a Kafka topic (``STREAM_SENTINEL_ERASURE_TOPIC``), into request files.

Each message is ``{"record_id": "...", "reason": "..."}`` (JSON, UTF-8). The messages read are
written as one request file (temp name, fsync, rename) and only then are their offsets
committed to the consumer group ``stream-sentinel-erasures``: a crash in between reads them
again, and erasing a record twice is the same as once (an erasure is idempotent, and the
second finds it already erased). So at-least-once delivery is exactly-once in effect, without
the offset ranges feedback needs. A message that is not a request is kept byte for byte in
``failed/erasures/`` beside the rule it breaks; the others go on.

The topic keeps the ids for its retention time, outside the data root: set a short retention
(or compaction with tombstones) on it.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..atomic import write_bytes_atomic, write_json_atomic
from ..kafka import KafkaSettings, consumer, watermarks
from . import requests

GROUP_ID = "stream-sentinel-erasures"


def pull(settings: KafkaSettings, topic: str, home: Path, failed: Path, max_messages: int = 10_000,
         deadline_s: float = 20.0) -> dict:
    """Read what the group has not committed, up to ``max_messages``; returns counts.

    Reads each partition up to its end offset as it was when the pull began (so "nothing came
    within a second" on a slow first fetch is never taken for "nothing to read"), with
    ``deadline_s`` as the backstop; what is left is read by the next pull."""
    import time

    from confluent_kafka import KafkaError, TopicPartition

    cons = consumer(settings, **{"group.id": GROUP_ID})
    try:
        marks = {w.partition: w for w in watermarks(cons, topic)}
        if not marks:
            return {"requests": 0, "invalid": 0, "topic": topic, "missing": True}
        committed = cons.committed([TopicPartition(topic, p) for p in marks], timeout=10)
        start = {tp.partition: tp.offset if tp.offset >= 0 else marks[tp.partition].low for tp in committed}
        todo = {p: marks[p].high for p, o in start.items() if marks[p].high > max(o, marks[p].low)}
        if not todo:
            return {"requests": 0, "invalid": 0, "topic": topic}
        cons.assign([TopicPartition(topic, p, max(start[p], marks[p].low)) for p in todo])
        ids, reasons, bad, nxt, done = [], [], 0, {}, set()
        deadline = time.monotonic() + deadline_s
        while len(ids) + bad < max_messages and len(done) < len(todo) and time.monotonic() < deadline:
            msg = cons.poll(0.5)
            if msg is None:
                continue
            if msg.error():
                if msg.error().code() == KafkaError._PARTITION_EOF:
                    done.add(msg.partition())
                    continue
                raise RuntimeError(f"erasure topic {topic}: {msg.error()}")
            nxt[msg.partition()] = msg.offset() + 1
            if msg.offset() + 1 >= todo[msg.partition()]:
                done.add(msg.partition())
            raw = msg.value() or b""
            try:
                obj = json.loads(raw)
                rid = obj.get("record_id") if isinstance(obj, dict) else None
                if not isinstance(rid, str) or not rid.strip():
                    raise ValueError("record_id must be a non-empty string")
                why = obj.get("reason") or ""
                ids.append(rid)
                reasons.append(why if isinstance(why, str) else json.dumps(why))
            except (ValueError, UnicodeDecodeError) as exc:
                where = failed / "erasures" / f"kafka-{topic}-{msg.partition()}-{msg.offset()}.bin"
                where.parent.mkdir(parents=True, exist_ok=True)
                write_bytes_atomic(where, raw)
                write_json_atomic(where.with_name(where.name + ".error.json"),
                                  {"topic": topic, "partition": msg.partition(), "offset": msg.offset(),
                                   "rule": "not_an_erasure_request", "error": str(exc)[:300]})
                bad += 1
        if ids:
            requests.write(home, ids, reasons, prefix="kafka")
        if nxt:  # after the request file is durable
            cons.commit(offsets=[TopicPartition(topic, p, o) for p, o in nxt.items()], asynchronous=False)
        return {"requests": len(ids), "invalid": bad, "topic": topic}
    finally:
        cons.close()
