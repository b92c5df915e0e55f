"""Kafka feedback -> DuckDB throughput on the exactly-once path.

Produces N feedback messages (default 200,000) over 3 partitions of a fresh topic on a
local broker (started here from the Maven Central jars unless --bootstrap is given),
then times what a feedback_job run does for each planned range: assign + seek, read,
validate, write to DuckDB keyed by (topic, partition, offset), commit lag offsets.
The library path is timed (not Dagster's run launch, which is the same for any run).

    python bench/kafka_feedback.py [--messages N] [--quick] [--bootstrap HOST:PORT]

Prints its figures and ends with one JSON line; also writes bench/results/kafka_feedback.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import common  # noqa: E402

from confluent_kafka import Producer  # noqa: E402
from confluent_kafka.admin import AdminClient, NewTopic  # noqa: E402

from stream_sentinel import feedback_sources as fs  # noqa: E402
from stream_sentinel.kafka import KafkaSettings, consumer  # noqa: E402
from stream_sentinel.devtools.kafka_broker import KafkaBroker  # noqa: E402
from stream_sentinel.store import Store  # noqa: E402


def produce(bootstrap: str, topic: str, n: int) -> float:
    prod = Producer({"bootstrap.servers": bootstrap, "linger.ms": 50, "batch.num.messages": 10000,
                     "compression.type": "lz4", "enable.idempotence": True})
    t = time.perf_counter()
    for i in range(n):
        rid = f"rec-{i % 50_000}"
        value = json.dumps({"record_id": rid, "label": "spam" if i % 3 else "ham", "source": f"rev-{i % 11}",
                            "confidence": 0.9, "ts": "2024-05-01T12:00:00+00:00"})
        while True:
            try:
                prod.produce(topic, key=rid, value=value)
                break
            except BufferError:
                prod.poll(0.05)
        if i % 10_000 == 0:
            prod.poll(0)
    prod.flush(120)
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=200_000)
    ap.add_argument("--quick", action="store_true", help="20,000 messages")
    ap.add_argument("--bootstrap", default=None)
    args = ap.parse_args()
    n = 20_000 if args.quick else args.messages
    broker = None
    with tempfile.TemporaryDirectory() as tmp:
        if args.bootstrap:
            bootstrap = args.bootstrap
        else:
            broker = KafkaBroker(Path(tmp) / "kafka")
            bootstrap = broker.start()
        try:
            topic = f"bench-{uuid.uuid4().hex[:8]}"
            admin = AdminClient({"bootstrap.servers": bootstrap})
            for fut in admin.create_topics([NewTopic(topic, 3, 1)]).values():
                fut.result(30)
            produce_s = produce(bootstrap, topic, n)
            store = Store(Path(tmp) / "metrics.duckdb").init()
            settings = KafkaSettings(bootstrap)
            cons = consumer(settings)
            t0 = time.perf_counter()
            plan = fs.plan_ranges(store, cons, topic, {}, fs.Policy(), flush=True)
            cons.close()
            plan_s = time.perf_counter() - t0
            t1 = time.perf_counter()
            [fs.ingest_range(store, settings, r, frozenset({"spam", "ham"})) for r in plan.to_request]
            ingest_s = time.perf_counter() - t1
            with store.connect() as con:
                rows = con.execute("SELECT count(*) FROM feedback_events").fetchall()[0][0]
            t2 = time.perf_counter()
            again = [fs.ingest_range(store, settings, r, frozenset({"spam", "ham"})) for r in plan.to_request]
            replay_s = time.perf_counter() - t2
        finally:
            if broker:
                broker.stop()
    figures = {
        "bench": "kafka_feedback",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "messages": n,
        "ranges": len(plan.to_request),
        "rows": rows,
        "exactly_once": rows == n and sum(r.events_new for r in again) == 0,
        "produce_msg_per_s": round(n / produce_s),
        "plan_s": round(plan_s, 3),
        "consume_to_duckdb_s": round(ingest_s, 3),
        "consume_to_duckdb_msg_per_s": round(n / ingest_s),
        "replay_msg_per_s": round(n / replay_s),
        "goal_msg_per_s": 50_000,
    }
    print(f"produced {n} messages at {figures['produce_msg_per_s']} msg/s")
    print(f"consume -> validate -> DuckDB (exactly once): {figures['consume_to_duckdb_msg_per_s']} msg/s "
          f"over {len(plan.to_request)} ranges; rows {rows} (expected {n}); "
          f"replaying the same ranges: {figures['replay_msg_per_s']} msg/s, 0 new rows = {figures['exactly_once']}")
    common.save(figures)
    return 0 if figures["exactly_once"] else 1


if __name__ == "__main__":
    sys.exit(main())
