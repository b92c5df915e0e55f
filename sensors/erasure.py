"""erasure_sensor: request files -> erasure_job runs; erasure_retrain_sensor: an erasure that
withdrew the champion -> a full retrain (cause ``erasure``).

Request files stay until their erasures are complete, so the erasure sensor needs no cursor: it
starts a run for the waiting files whenever no erasure_job run is in flight (a failed or killed
run's files are taken by the next). A retrain's run key is the erasure's hash: asked once.
"""

import dagster as dg

from stream_sentinel.assets.erasure import ErasureConfig, erasure_job
from stream_sentinel.assets.models import ERASURE_TAG, training_job, training_run_config
from stream_sentinel.config import Settings
from stream_sentinel.erasure import requests as erasure_requests
from stream_sentinel.erasure.kafka_source import pull
from stream_sentinel.resources import KafkaResource, StreamSentinelResource

from .served import IN_FLIGHT
from .units import skip_while_busy


def evaluate_erasures(sentinel: StreamSentinelResource, instance: dg.DagsterInstance | None = None,
                      kafka: KafkaResource | None = None) -> dg.RunRequest | dg.SkipReason:
    """Requests on the Kafka erasure topic (when Kafka is configured) become a request file
    first; then one run for every waiting request file, when none is queued or running: a run
    that failed (or was killed) leaves its files, and the next tick starts another."""
    note = ""
    if kafka is not None and kafka.configured:
        try:
            got = pull(kafka.settings, sentinel.settings.erasure_topic, sentinel.paths.home, sentinel.paths.failed)
        except Exception as exc:  # noqa: BLE001 -- a broker away: the files still run, the topic waits
            note = f" (Kafka erasure topic not read: {type(exc).__name__}: {exc})"
        else:
            if got["invalid"]:
                note = f" ({got['invalid']} message(s) of {got['topic']} were not requests: kept in failed/erasures/)"
    pending = erasure_requests.pending(sentinel.paths.home)
    if not pending:
        return dg.SkipReason("no erasure requests" + note)
    if instance is not None and instance.get_run_records(
            filters=dg.RunsFilter(job_name=erasure_job.name, statuses=IN_FLIGHT), limit=1):
        return dg.SkipReason(f"{len(pending)} erasure request file(s) wait for the erasure_job run in flight")
    return dg.RunRequest(run_config=dg.RunConfig(ops={"erasures": ErasureConfig(files=[n for n, _ in pending])}),
                         tags={"stream_sentinel/erasure_files": str(len(pending))})


def build_erasure_sensor(settings: Settings) -> dg.SensorDefinition:
    @dg.sensor(name="erasure_sensor", job=erasure_job, minimum_interval_seconds=settings.sensor_interval_s,
               default_status=dg.DefaultSensorStatus.RUNNING,
               description="Erasure requests (the Kafka erasure topic when Kafka is configured, request files in "
               "<data root>/erasures/) -> erasure_job (the files waiting, when no erasure_job run is in flight).")
    def erasure_sensor(context: dg.SensorEvaluationContext, sentinel: StreamSentinelResource,
                       kafka: KafkaResource):
        return evaluate_erasures(sentinel, context.instance, kafka)

    return erasure_sensor


@skip_while_busy
def evaluate_erasure_retrain(sentinel: StreamSentinelResource) -> dg.RunRequest | dg.SkipReason:
    with sentinel.store(lock_timeout_s=20).connect() as con:
        owed = [r[0] for r in con.execute("""SELECT id_hash FROM erasures WHERE status = 'completed'
                                             AND retrain_needed ORDER BY completed_at DESC LIMIT 1""").fetchall()]
    if not owed:
        return dg.SkipReason("no erasure withdrew a model")
    h = owed[0][:16]  # the newest: one retrain covers every erasure before it
    return dg.RunRequest(run_key=f"erasure-retrain:{h}", run_config=training_run_config(full=True),
                         tags={ERASURE_TAG: h, "stream_sentinel/trigger": "erasure"})


def build_erasure_retrain_sensor(settings: Settings) -> dg.SensorDefinition:
    @dg.sensor(name="erasure_retrain_sensor", job=training_job,
               minimum_interval_seconds=max(30, settings.sensor_interval_s),
               default_status=dg.DefaultSensorStatus.RUNNING,
               description="An erasure whose record a serving model was trained on -> a full retrain without it "
               "(training_job with full: true, cause erasure), gated as usual.")
    def erasure_retrain_sensor(context: dg.SensorEvaluationContext, sentinel: StreamSentinelResource):
        return evaluate_erasure_retrain(sentinel)

    return erasure_retrain_sensor
