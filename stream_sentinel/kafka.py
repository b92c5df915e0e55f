"""Kafka with confluent-kafka, shaped for exactly-once ingestion driven by Dagster.

Offsets are never auto-committed and never the source of truth: the sensor decides
which offset range a run reads, the run reads exactly that range with an explicitly
assigned partition, and DuckDB's ``(topic, partition, offset)`` key makes the write
idempotent. Offsets are committed to a consumer group afterwards only so that lag
dashboards work. Every broker call has a timeout, so a sensor tick never hangs.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Iterator

log = logging.getLogger(__name__)

DEFAULT_TOPIC = "stream-sentinel.feedback"
GROUP_ID = "stream-sentinel-feedback"
SECRET_KEYS = {"sasl.password", "ssl.key.password", "ssl.keystore.password"}


@dataclass(frozen=True)
class KafkaSettings:
    bootstrap_servers: str
    security_protocol: str | None = None
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = field(default=None, repr=False)  # never printed
    ssl_ca_location: str | None = None

    @classmethod
    def from_env(cls) -> "KafkaSettings | None":
        servers = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
        if not servers:
            return None
        return cls(servers, os.environ.get("KAFKA_SECURITY_PROTOCOL"), os.environ.get("KAFKA_SASL_MECHANISM"),
                   os.environ.get("KAFKA_SASL_USERNAME"), os.environ.get("KAFKA_SASL_PASSWORD"),
                   os.environ.get("KAFKA_SSL_CA_LOCATION"))

    def client_config(self) -> dict:
        cfg = {"bootstrap.servers": self.bootstrap_servers, "socket.timeout.ms": 10000,
               "log.connection.close": False}
        for key, value in (("security.protocol", self.security_protocol), ("sasl.mechanism", self.sasl_mechanism),
                           ("sasl.username", self.sasl_username), ("sasl.password", self.sasl_password),
                           ("ssl.ca.location", self.ssl_ca_location)):
            if value:
                cfg[key] = value
        return cfg


def redacted(cfg: dict) -> dict:
    return {k: ("***" if k in SECRET_KEYS else v) for k, v in cfg.items()}


def _quiet_logger() -> logging.Logger:
    lg = logging.getLogger("stream_sentinel.librdkafka")
    lg.setLevel(logging.ERROR)
    return lg


def consumer(settings: KafkaSettings, **extra):
    from confluent_kafka import Consumer

    cfg = {**settings.client_config(), "group.id": GROUP_ID, "enable.auto.commit": False,
           "enable.auto.offset.store": False, "auto.offset.reset": "earliest",
           "enable.partition.eof": True, "fetch.min.bytes": 1, "fetch.wait.max.ms": 50,
           "queued.min.messages": 200_000, "max.partition.fetch.bytes": 8 << 20, **extra}
    return Consumer(cfg, logger=_quiet_logger())


def producer(settings: KafkaSettings, **extra):
    from confluent_kafka import Producer

    cfg = {**settings.client_config(), "enable.idempotence": True, "linger.ms": 5, **extra}
    return Producer(cfg, logger=_quiet_logger())


@dataclass(frozen=True)
class PartitionState:
    partition: int
    low: int
    high: int  # next offset to be written (exclusive end)


def partitions(cons, topic: str, timeout_s: float = 5.0) -> list[int]:
    md = cons.list_topics(topic, timeout=timeout_s)
    t = md.topics.get(topic)
    if t is None or t.error is not None:
        return []
    return sorted(t.partitions)


def watermarks(cons, topic: str, timeout_s: float = 5.0) -> list[PartitionState]:
    from confluent_kafka import TopicPartition

    out = []
    for p in partitions(cons, topic, timeout_s):
        low, high = cons.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout_s, cached=False)
        out.append(PartitionState(p, low, high))
    return out


def message_timestamp(cons, topic: str, partition: int, offset: int, timeout_s: float = 3.0) -> float | None:
    """Broker/producer timestamp (seconds) of the message at ``offset``, or None."""
    for msg in read_range(cons, topic, partition, offset, offset, timeout_s):
        ts_type, ts = msg.timestamp()
        return ts / 1000.0 if ts_type and ts > 0 else None
    return None


def read_range(cons, topic: str, partition: int, start: int, end: int, timeout_s: float = 60.0,
               batch: int = 10000) -> Iterator:
    """Yield the messages with offsets ``start..end`` (inclusive) of one partition.

    Offsets missing because of compaction or transaction markers are skipped; a range
    that cannot be read completely within ``timeout_s`` raises (the run fails and is
    retried, nothing is half-recorded).
    """
    from confluent_kafka import KafkaError, KafkaException, TopicPartition

    cons.assign([TopicPartition(topic, partition, start)])
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError(f"could not read {topic}[{partition}] {start}-{end} within {timeout_s:.0f}s")
            msgs = cons.consume(num_messages=batch, timeout=0.5)
            for msg in msgs:
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        if msg.offset() > end:
                            return
                        continue
                    if err.retriable() or err.code() in (KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN):
                        log.warning("kafka: %s (retrying)", err.str())
                        continue
                    raise KafkaException(err)
                off = msg.offset()
                if off < start:
                    continue
                if off > end:
                    return
                yield msg
                if off == end:
                    return
    finally:
        cons.unassign()


def commit_for_lag(cons, topic: str, partition: int, next_offset: int) -> None:
    """Record progress in the consumer group, for lag dashboards only (best effort)."""
    from confluent_kafka import TopicPartition

    try:
        cons.commit(offsets=[TopicPartition(topic, partition, next_offset)], asynchronous=False)
    except Exception as exc:  # the source of truth is DuckDB; a failed commit loses nothing
        log.warning("kafka: could not commit lag offsets: %s", exc)


def send_dlq(prod, dlq_topic: str, rejected: list, source_topic: str) -> None:
    """Dead-letter the rejected messages with the reason in headers; waits for delivery."""
    errors: list[str] = []

    def delivered(err, msg):
        if err is not None:
            errors.append(str(err))

    for r in rejected:
        prod.produce(dlq_topic, value=r.raw.encode("utf-8"), key=(r.key or "").encode("utf-8") or None,
                     headers=[("error", r.error.encode()), ("rule", r.rule.encode()),
                              ("source_topic", source_topic.encode()),
                              ("source_partition", str(r.pos.partition).encode()),
                              ("source_offset", str(r.pos.offset).encode())],
                     on_delivery=delivered)
        prod.poll(0)
    remaining = prod.flush(30)
    if remaining or errors:
        raise RuntimeError(f"dead-letter delivery to {dlq_topic} failed: {errors[:3] or f'{remaining} undelivered'}")


def produce_json(prod, topic: str, key: str, value: dict) -> None:
    prod.produce(topic, key=key.encode(), value=json.dumps(value).encode())
    prod.poll(0)
