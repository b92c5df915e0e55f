"""feedback -> labels: exactly-once label events and their consensus."""

import time

import dagster as dg
from pydantic import Field

from stream_sentinel import feedback as fb
from stream_sentinel import feedback_sources as fs
from stream_sentinel.resources import KafkaResource, StreamSentinelResource

from .ingest import raw_records


class FeedbackConfig(dg.Config):
    topic: str = Field("", description="Kafka topic of the range (set by feedback_kafka_sensor)")
    partition: int = Field(-1, description="Kafka partition of the range")
    start_offset: int = Field(-1, description="first offset of the range")
    end_offset: int = Field(-1, description="last offset of the range (inclusive)")
    files: list[str] = Field(default_factory=list, description="sha256 of feedback/ files (set by "
                             "feedback_files_sensor); with no range and no files, every pending file is read")


@dg.asset(
    group_name="feedback",
    kinds={"kafka", "duckdb"},
    description="Label feedback events, exactly once per (topic, partition, offset): a Kafka offset range "
    "chosen by feedback_kafka_sensor, or JSONL files from feedback/. Invalid messages go to "
    "`feedback_rejects` and to the `<topic>.dlq` dead-letter topic.",
)
def feedback(context: dg.AssetExecutionContext, config: FeedbackConfig, sentinel: StreamSentinelResource,
             kafka: KafkaResource) -> dg.MaterializeResult:
    started = time.perf_counter()
    store = sentinel.store()
    allowed = sentinel.settings.allowed_labels
    if config.topic:
        rng = fs.OffsetRange(config.topic, config.partition, config.start_offset, config.end_offset)
        res = fs.ingest_range(store, kafka.settings, rng, allowed)
        context.log.info(f"{rng.run_key}: read {res.read}, {res.events_new} new events, "
                         f"{res.rejects_new} new rejects ({res.dlq_sent} dead-lettered), lag {res.lag}")
        if res.dlq_failed:
            context.log.warning(f"{rng.run_key}: {res.dlq_failed} reject(s) could not be dead-lettered to "
                                f"{rng.topic}.dlq ({res.dlq_error}); recorded with dlq_status 'failed', re-sent by "
                                "the next attempt of this range")
        meta = {"source_kind": "kafka", "range": rng.run_key, "messages_read": res.read,
                "events_new": res.events_new, "rejects_new": res.rejects_new, "dlq_sent": res.dlq_sent,
                "dlq_references": res.dlq_references, "dlq_failed": res.dlq_failed,
                "dlq_topic": f"{rng.topic}.dlq", "kafka_lag": res.lag,
                "msg_per_s": round(res.read / res.seconds, 1) if res.seconds else 0.0}
    else:
        shas = list(config.files) or fs.scan_files(sentinel.paths, store, sentinel.settings.debounce_s)
        results = [fs.ingest_file(sentinel.paths, store, sha, allowed) for sha in shas]
        for r in results:
            if r["status"] != "processed":
                context.log.warning(f"feedback/{r['file']}: {r['status']}")
        meta = {"source_kind": "file", "files": len(results),
                "files_quarantined": sum(r["status"] == "quarantined" for r in results),
                "events_new": sum(r["events"] for r in results), "rejects_new": sum(r["rejects"] for r in results)}
    with store.connect() as con:
        total_events, total_rejects = con.execute(
            "SELECT (SELECT count(*) FROM feedback_events), (SELECT count(*) FROM feedback_rejects)").fetchone()
    meta.update({"feedback_events": total_events, "feedback_rejects": total_rejects, "dagster/row_count": total_events,
                 "duration_s": round(time.perf_counter() - started, 3)})
    return dg.MaterializeResult(metadata=meta, data_version=dg.DataVersion(f"{total_events}:{total_rejects}"))


@dg.asset(
    deps=[feedback, raw_records],
    group_name="feedback",
    kinds={"duckdb"},
    automation_condition=dg.AutomationCondition.eager().without(~dg.AutomationCondition.any_deps_missing()),
    description="Consensus label per record: weighted vote (reviewer reliability x confidence x temporal "
    "decay). Low-margin records are flagged `conflict` and held out of training; feedback for records "
    "not ingested yet stays `pending` and resolves when they land.",
)
def labels(context: dg.AssetExecutionContext, sentinel: StreamSentinelResource) -> dg.MaterializeResult:
    counts = fb.resolve_labels(sentinel.store(), sentinel.settings.consensus_config())
    version = counts.pop("data_version")
    context.log.info(f"labels: {counts}")
    return dg.MaterializeResult(metadata={**counts, "dagster/row_count": sentinel.store().row_count("labels")},
                                data_version=dg.DataVersion(version))


feedback_job = dg.define_asset_job(
    "feedback_job", selection=dg.AssetSelection.assets(feedback, labels) | dg.AssetSelection.assets("live_accuracy"),
    description="One feedback micro-batch: a Kafka offset range or drop-folder files -> feedback -> labels.")
