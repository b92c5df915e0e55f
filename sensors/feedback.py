"""Feedback sensors: Kafka offset ranges, and the feedback/ drop folder.

feedback_kafka_sensor keeps the cursor ``{partition: next_offset}`` (the next offset not
yet requested). Each run request covers one offset range of one partition with the run
key ``<topic>:<partition>:<start>-<end>``; ranges are stored in DuckDB before they are
requested, so a tick replayed after a crash requests identical keys and Dagster drops
the duplicates. The run config carries the range, never the payloads.
"""

import json

import dagster as dg
from confluent_kafka import KafkaException

from assets.feedback import FeedbackConfig, feedback_job
from resources import KafkaResource, StreamSentinelResource
from stream_sentinel import feedback_sources as fs
from stream_sentinel.config import Settings
from stream_sentinel.store import StoreBusy


def range_run_request(rng: fs.OffsetRange) -> dg.RunRequest:
    return dg.RunRequest(
        run_key=rng.run_key,
        run_config=dg.RunConfig(ops={"feedback": FeedbackConfig(
            topic=rng.topic, partition=rng.partition, start_offset=rng.start, end_offset=rng.end)}),
        tags={"stream_sentinel/kafka_range": rng.run_key, "stream_sentinel/messages": str(rng.size)},
    )


def evaluate_kafka(sentinel: StreamSentinelResource, kafka: KafkaResource, cursor: str | None,
                   flush: bool = False) -> dg.SensorResult | dg.SkipReason:
    if not kafka.configured:
        return dg.SkipReason("Kafka is not configured (KAFKA_BOOTSTRAP_SERVERS); feedback_files_sensor reads "
                             "the feedback/ drop folder instead")
    s = sentinel.settings
    policy = fs.Policy(s.feedback_min_batch, s.feedback_max_wait_s, s.feedback_max_range)
    state = {str(k): int(v) for k, v in json.loads(cursor).items()} if cursor else {}
    from stream_sentinel import kafka as kf

    cons = kf.consumer(kafka.settings)
    try:
        plan = fs.plan_ranges(sentinel.store(lock_timeout_s=20), cons, s.feedback_topic, state, policy, flush)
    except StoreBusy:
        return dg.SkipReason("metrics.duckdb is busy; will look again next tick")
    except KafkaException as exc:  # broker down or unreachable: every call above has a timeout
        return dg.SkipReason(f"Kafka unreachable at {kafka.settings.bootstrap_servers}: {exc}")
    finally:
        cons.close()
    if not plan.to_request:
        lag = sum(plan.lag.values())
        return dg.SkipReason(f"no range due (lag {lag})" + (f": {'; '.join(plan.notes)}" if plan.notes else ""))
    return dg.SensorResult(run_requests=[range_run_request(r) for r in plan.to_request],
                           cursor=json.dumps(plan.cursor, sort_keys=True))


def evaluate_files(sentinel: StreamSentinelResource, cursor: str | None) -> dg.SensorResult | dg.SkipReason:
    try:
        pending = fs.scan_files(sentinel.paths, sentinel.store(lock_timeout_s=20), sentinel.settings.debounce_s)
    except StoreBusy:
        return dg.SkipReason("metrics.duckdb is busy; will look again next tick")
    requested = set(json.loads(cursor)) if cursor else set()
    new = [sha for sha in pending if sha not in requested]
    if not new:
        return dg.SkipReason("no new feedback files")
    key = "feedback-files:" + ",".join(sorted(s[:12] for s in new))
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=key, run_config=dg.RunConfig(
            ops={"feedback": FeedbackConfig(files=new)}))],
        # only still-pending files need remembering: the durable record is DuckDB
        cursor=json.dumps(sorted(set(pending))),
    )


def build_feedback_sensors(settings: Settings) -> list[dg.SensorDefinition]:
    @dg.sensor(name="feedback_kafka_sensor", job=feedback_job, minimum_interval_seconds=settings.sensor_interval_s,
               default_status=dg.DefaultSensorStatus.RUNNING,
               description="Kafka feedback topic -> one feedback_job run per offset range (exactly once).")
    def feedback_kafka_sensor(context: dg.SensorEvaluationContext, sentinel: StreamSentinelResource,
                              kafka: KafkaResource):
        return evaluate_kafka(sentinel, kafka, context.cursor)

    @dg.sensor(name="feedback_files_sensor", job=feedback_job, minimum_interval_seconds=settings.sensor_interval_s,
               default_status=dg.DefaultSensorStatus.RUNNING,
               description="JSONL files in feedback/ (the drop folder used without Kafka) -> feedback_job.")
    def feedback_files_sensor(context: dg.SensorEvaluationContext, sentinel: StreamSentinelResource):
        return evaluate_files(sentinel, context.cursor)

    return [feedback_kafka_sensor, feedback_files_sensor]
