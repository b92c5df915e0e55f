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

from stream_sentinel import feedback_sources as fs
from stream_sentinel import retry
from stream_sentinel.assets.feedback import FeedbackConfig, feedback_job
from stream_sentinel.config import Settings
from stream_sentinel.resources import KafkaResource, StreamSentinelResource

from .units import retry_requests, run_waiting, skip_while_busy


def range_run_request(rng: fs.OffsetRange, run_key: str | None = None) -> dg.RunRequest:
    """The run of one offset range; ``run_key`` names a retry (``<range key>#<attempt>``)."""
    return dg.RunRequest(
        run_key=run_key or rng.run_key,
        run_config=dg.RunConfig(ops={"feedback": FeedbackConfig(
            topic=rng.topic, partition=rng.partition, start_offset=rng.start, end_offset=rng.end)}),
        tags={retry.UNIT_TAG: rng.run_key, "stream_sentinel/kafka_range": rng.run_key,
              "stream_sentinel/messages": str(rng.size)},
    )


def file_run_request(batch: fs.FileBatch, run_key: str | None = None) -> dg.RunRequest:
    """The run of one batch of drop-folder files; ``run_key`` names a retry."""
    return dg.RunRequest(run_key=run_key or batch.run_key,
                         run_config=dg.RunConfig(ops={"feedback": FeedbackConfig(files=list(batch.files))}),
                         tags={retry.UNIT_TAG: batch.run_key, "stream_sentinel/files": str(len(batch.files))})


@skip_while_busy
def evaluate_kafka(sentinel: StreamSentinelResource, kafka: KafkaResource, cursor: str | None,
                   flush: bool = False, instance: dg.DagsterInstance | None = None,
                   ) -> dg.SensorResult | dg.SkipReason:
    if not kafka.configured:
        return dg.SkipReason("Kafka is not configured (KAFKA_BOOTSTRAP_SERVERS); feedback_files_sensor reads "
                             "the feedback/ drop folder instead")
    s = sentinel.settings
    policy = fs.Policy(s.feedback_min_batch, s.feedback_max_wait_s, s.feedback_max_range)
    state = {str(k): int(v) for k, v in json.loads(cursor).items()} if cursor else {}
    from stream_sentinel import kafka as kf

    store = sentinel.store(lock_timeout_s=20)
    held = run_waiting(instance, feedback_job.name)
    cons = kf.consumer(kafka.settings)
    try:
        plan = fs.plan_ranges(store, cons, s.feedback_topic, state, policy, flush, plan_new=not held)
        retries, notes = retry_requests(instance, store, "kafka_range", plan.unfinished, lambda r: r.run_key,
                                        range_run_request, s.retry_policy())
    except KafkaException as exc:  # broker down or unreachable: every call above has a timeout
        return dg.SkipReason(f"Kafka unreachable at {kafka.settings.bootstrap_servers}: {exc}")
    finally:
        cons.close()
    notes = plan.notes + notes + (["new messages wait for the queued feedback run to start"] if held else [])
    if not plan.to_request and not retries:
        lag = sum(plan.lag.values())
        return dg.SkipReason(f"no range due (lag {lag})" + (f": {'; '.join(notes)}" if notes else ""))
    return dg.SensorResult(run_requests=[range_run_request(r) for r in plan.to_request] + retries,
                           cursor=json.dumps(plan.cursor, sort_keys=True))


@skip_while_busy
def evaluate_files(sentinel: StreamSentinelResource, cursor: str | None,
                   instance: dg.DagsterInstance | None = None) -> dg.SensorResult | dg.SkipReason:
    """Register stable files, cut the new ones into batches (durable, like raw batches) unless a
    feedback run is still queued, request the batches the cursor has not, and retry batches
    whose runs ended with a file still pending. The cursor is the last batch requested."""
    store = sentinel.store(lock_timeout_s=20)
    last = int(json.loads(cursor).get("batch_seq", 0)) if cursor and cursor.startswith("{") else 0
    fs.scan_files(sentinel.paths, store, sentinel.settings.debounce_s)
    held = run_waiting(instance, feedback_job.name)
    if not held:
        fs.plan_file_batches(store, sentinel.settings.batch_max_files)
    batches = fs.file_batches(store, after_seq=last)
    stale = [b for b in fs.file_batches(store) if b.seq <= last]
    retries, notes = retry_requests(instance, store, "feedback_file", stale, lambda b: b.run_key,
                                    file_run_request, sentinel.settings.retry_policy())
    if held:
        notes.append("new files wait for the queued feedback run to start")
    if not batches and not retries:
        return dg.SkipReason("no new feedback files" + (f" ({'; '.join(notes)})" if notes else ""))
    return dg.SensorResult(run_requests=[file_run_request(b) for b in batches] + retries,
                           cursor=json.dumps({"batch_seq": max([last] + [b.seq for b in batches])}))


def build_feedback_sensors(settings: Settings) -> list[dg.SensorDefinition]:
    @dg.sensor(name="feedback_kafka_sensor", job=feedback_job, minimum_interval_seconds=settings.sensor_interval_s,
               default_status=dg.DefaultSensorStatus.RUNNING,
               description="Kafka feedback topic -> one feedback_job run per offset range (exactly once).")
    def feedback_kafka_sensor(context: dg.SensorEvaluationContext, sentinel: StreamSentinelResource,
                              kafka: KafkaResource):
        return evaluate_kafka(sentinel, kafka, context.cursor, instance=context.instance)

    @dg.sensor(name="feedback_files_sensor", job=feedback_job, minimum_interval_seconds=settings.sensor_interval_s,
               default_status=dg.DefaultSensorStatus.RUNNING,
               description="JSONL files in feedback/ (the drop folder used without Kafka) -> feedback_job.")
    def feedback_files_sensor(context: dg.SensorEvaluationContext, sentinel: StreamSentinelResource):
        return evaluate_files(sentinel, context.cursor, context.instance)

    return [feedback_kafka_sensor, feedback_files_sensor]
