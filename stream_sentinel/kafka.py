"""Kafka with confluent-kafka, shaped for exactly-once ingestion driven by Dagster.

Offsets are never auto-committed and never the source of truth: the sensor decides
which offset range a run reads, the run reads exactly that range with an explicitly
assigned partition, and DuckDB's ``(topic, partition, offset)`` key makes the write
idempotent. Offsets are committed to a consumer group afterwards only so that lag
dashboards work. Every broker call has a timeout, so a sensor tick never hangs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Iterator

log = logging.getLogger(__name__)

DEFAULT_TOPIC = "stream-sentinel.feedback"
GROUP_ID = "stream-sentinel-feedback"
# each connection setting and its variable (the resource references them with dg.EnvVar)
ENV_VARS = {"bootstrap_servers": "KAFKA_BOOTSTRAP_SERVERS", "security_protocol": "KAFKA_SECURITY_PROTOCOL",
            "sasl_mechanism": "KAFKA_SASL_MECHANISM", "sasl_username": "KAFKA_SASL_USERNAME",
            "sasl_password": "KAFKA_SASL_PASSWORD", "ssl_ca_location": "KAFKA_SSL_CA_LOCATION"}
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
        """None without ``KAFKA_BOOTSTRAP_SERVERS`` (feedback then comes from the drop folder)."""
        if not os.environ.get(ENV_VARS["bootstrap_servers"]):
            return None
        return cls(**{name: os.environ.get(var) or None for name, var in ENV_VARS.items()})

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
    """librdkafka's own log. Its connection errors (level ERROR, once a second per client
    while a broker is down) are not news: every call here has a timeout, and a broker that
    stays away shows as a sensor skip reason or a failed, retried run. Only CRITICAL passes."""
    lg = logging.getLogger("stream_sentinel.librdkafka")
    lg.setLevel(logging.CRITICAL)
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


# The dead-letter queue is at least once: a message is recorded in ``feedback_rejects``
# (dlq_status 'pending') before it is dead-lettered, and marked afterwards, so a crash in
# between re-sends it. The DLQ copy keeps the original value, key and headers byte for byte
# (a null value stays a tombstone, a null key stays null) and adds ours; a message too large
# for the DLQ is replaced by a small JSON reference, its bytes kept in DuckDB.
DLQ_MAX_BYTES = 1_000_000  # the producer's message.max.bytes (librdkafka's default), set explicitly
DLQ_STORED_IN = "feedback_rejects.raw_bytes"
_REFERENCE_KEEP_BYTES = 64 << 10  # a reference carries the original key/headers only up to this size


def dlq_producer(settings: KafkaSettings, timeout_s: float = 30.0, **extra):
    """A producer for the dead-letter topic whose every message gets a delivery report
    (success or failure) within ``timeout_s``."""
    return producer(settings, **{"message.max.bytes": DLQ_MAX_BYTES,
                                 "message.timeout.ms": max(1000, int(timeout_s * 1000)), **extra})


def dlq_headers(r, source_topic: str) -> list[tuple[str, bytes | None]]:
    """The original headers, in order, then ours (a reader building a dict sees ours)."""
    ours = [("error", r.error.encode("utf-8", "replace")), ("rule", r.rule.encode("utf-8", "replace")),
            ("source_topic", source_topic.encode()), ("source_partition", str(r.pos.partition).encode()),
            ("source_offset", str(r.pos.offset).encode())]
    if r.timestamp_ms is not None:
        ours.append(("source_timestamp", str(r.timestamp_ms).encode()))  # ms since the epoch
    return [*r.headers, *ours]


def dlq_reference(r, source_topic: str) -> tuple[bytes, bytes | None, list[tuple[str, bytes | None]]]:
    """(value, key, headers) of the small message sent instead of one too large for the DLQ."""
    value = r.raw_bytes if r.raw_bytes is not None else b""
    body = {"too_large": True, "size": len(value), "sha256": hashlib.sha256(value).hexdigest(),
            "source": {"topic": source_topic, "partition": r.pos.partition, "offset": r.pos.offset},
            "stored_in": DLQ_STORED_IN, "rule": r.rule, "error": r.error[:500]}
    key = r.key_bytes
    if key is not None:
        body["key_size"], body["key_sha256"] = len(key), hashlib.sha256(key).hexdigest()
        if len(key) > _REFERENCE_KEEP_BYTES:
            key = None
    headers = dlq_headers(r, source_topic)
    original = list(r.headers)
    if sum(len(k) + len(v or b"") for k, v in original) > _REFERENCE_KEEP_BYTES:
        body["headers_omitted"] = len(original)
        headers = headers[len(original):]
    return json.dumps(body).encode(), key, [*headers, ("too_large", b"true"), ("stored_in", DLQ_STORED_IN.encode())]


def send_dlq(prod, dlq_topic: str, rejected: list, source_topic: str, timeout_s: float = 30.0) -> list[str]:
    """Dead-letter ``rejected`` (items with ``raw_bytes``, ``key_bytes``, ``headers``, ...);
    never raises for a delivery problem. Returns one status per item, in order: ``sent``
    (exact copy), ``reference`` (too large for the DLQ: a JSON reference, the bytes stay in
    DuckDB) or ``failed: <reason>``."""
    from confluent_kafka import KafkaError, KafkaException

    status: list[str | None] = [None] * len(rejected)
    refused_locally: set[int] = set()  # this round's produce() refusals (e.g. over message.max.bytes)

    def attempt(indices: list[int], build) -> dict[int, object]:
        """Produce one message per index and wait; the error (None = delivered) per index."""
        errors: dict[int, object] = {}
        for i in indices:
            value, key, headers = build(rejected[i])
            for _ in range(100):  # a full local queue drains while we poll
                try:
                    prod.produce(dlq_topic, value=value, key=key, headers=headers,
                                 on_delivery=lambda err, msg, i=i: errors.__setitem__(i, err))
                    break
                except BufferError:
                    prod.poll(0.1)
                except KafkaException as exc:
                    errors[i] = exc.args[0] if exc.args else exc
                    refused_locally.add(i)
                    break
                except Exception as exc:  # noqa: BLE001 - a bad argument fails this message only
                    errors[i] = exc
                    break
            else:
                errors[i] = "local producer queue stayed full"
            prod.poll(0)
        if prod.flush(timeout_s + 5) > 0:  # message.timeout.ms should have reported them all
            prod.purge()
            prod.flush(1)
        return {i: errors.get(i, f"no delivery report within {timeout_s:.0f}s") for i in indices}

    def reason(err) -> str:
        if isinstance(err, KafkaError):
            return f"{err.name()}: {err.str()}"[:300]
        return (str(err) or type(err).__name__)[:300]

    def too_large(err) -> bool:
        return isinstance(err, KafkaError) and err.code() == KafkaError.MSG_SIZE_TOO_LARGE

    def deliver(indices: list[int], build) -> dict[int, object]:
        refused_locally.clear()
        errors = attempt(indices, build)
        if len(indices) > 1:  # the broker refuses a whole batch as too large: retry its messages alone
            for i in [i for i in indices if too_large(errors[i]) and i not in refused_locally]:
                errors.update(attempt([i], build))
        return errors

    first = deliver(list(range(len(rejected))), lambda r: (r.raw_bytes, r.key_bytes, dlq_headers(r, source_topic)))
    refs = [i for i, err in first.items() if too_large(err)]
    for i, err in first.items():
        if i not in refs:
            status[i] = "sent" if err is None else f"failed: {reason(err)}"
    if refs:
        for i, err in deliver(refs, lambda r: dlq_reference(r, source_topic)).items():
            status[i] = "reference" if err is None else f"failed: {reason(err)}"
    failed = sum(s.startswith("failed") for s in status)
    if failed:
        log.warning("kafka: %d of %d dead-letter message(s) to %s failed, e.g. %s", failed, len(status),
                    dlq_topic, next(s for s in status if s.startswith("failed")))
    return status  # type: ignore[return-value]


def produce_json(prod, topic: str, key: str, value: dict) -> None:
    prod.produce(topic, key=key.encode(), value=json.dumps(value).encode())
    prod.poll(0)
