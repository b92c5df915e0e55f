"""served_predictions_sensor: the API's prediction log -> served_job.

The log's cursor lives in DuckDB with the rows it loaded (``served.ingest``), so a run loads
whatever no run has loaded, however many ticks asked for it: the sensor only has to start
one when there are unread bytes and no served_job run is waiting or running. A failed run
leaves the bytes unread, and the next tick starts another: never stuck, never twice.
"""

import dagster as dg

from stream_sentinel import served
from stream_sentinel.assets.served import served_job
from stream_sentinel.config import Settings
from stream_sentinel.resources import StreamSentinelResource

from .units import skip_while_busy

IN_FLIGHT = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
             dg.DagsterRunStatus.STARTED]


@skip_while_busy
def evaluate_served(sentinel: StreamSentinelResource, instance: dg.DagsterInstance | None = None
                    ) -> dg.RunRequest | dg.SkipReason:
    todo = served.unread(sentinel.paths.home, sentinel.store(lock_timeout_s=20))
    if not todo:
        return dg.SkipReason("no new lines in the prediction log")
    if instance is not None and instance.get_run_records(
            filters=dg.RunsFilter(job_name=served_job.name, statuses=IN_FLIGHT), limit=1):
        return dg.SkipReason(f"{sum(todo.values())} new byte(s) in the prediction log wait for the served_job "
                             "run in flight")
    return dg.RunRequest(tags={"stream_sentinel/served_bytes": str(sum(todo.values())),
                               "stream_sentinel/served_files": str(len(todo))})


def build_served_sensor(settings: Settings) -> dg.SensorDefinition:
    @dg.sensor(name="served_predictions_sensor", job=served_job,
               minimum_interval_seconds=settings.sensor_interval_s, default_status=dg.DefaultSensorStatus.RUNNING,
               description="New lines in served/ (the API's prediction log) -> served_job.")
    def served_predictions_sensor(context: dg.SensorEvaluationContext, sentinel: StreamSentinelResource):
        return evaluate_served(sentinel, context.instance)

    return served_predictions_sensor
