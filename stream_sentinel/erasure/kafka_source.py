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
from ..kafka import KafkaSettings, consumer, partitions
from . import requests

GROUP_ID = "stream-sentinel-erasures"


def pull(settings: KafkaSettings, topic: str, home: Path, failed: Path, max_messages: int = 10_000,
         idle_s: float = 1.0) -> dict:
    """Read what the group has not committed, up to ``max_messages``; returns counts."""
    from confluent_kafka import OFFSET_BEGINNING, KafkaError, TopicPartition

    cons = consumer(settings, **{"group.id": GROUP_ID})
    try:
        parts = partitions(cons, topic)
        if not parts:
            return {"requests": 0, "invalid": 0, "topic": topic, "missing": True}
        committed = cons.committed([TopicPartition(topic, p) for p in parts], timeout=10)
        cons.assign([TopicPartition(topic, tp.partition, tp.offset if tp.offset >= 0 else OFFSET_BEGINNING)
                     for tp in committed])
        ids, reasons, bad, nxt, at_end = [], [], 0, {}, set()
        while len(ids) + bad < max_messages and len(at_end) < len(parts):
            msg = cons.poll(idle_s)
            if msg is None:
                break
            if msg.error():
                if msg.error().code() == KafkaError._PARTITION_EOF:
                    at_end.add(msg.partition())
                    continue
                raise RuntimeError(f"erasure topic {topic}: {msg.error()}")
            at_end.discard(msg.partition())
            nxt[msg.partition()] = msg.offset() + 1
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
