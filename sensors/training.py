"""retrain_sensor: the micro-batch policy that turns new labels into a training run.

A run starts when the resolved labels not yet in the newest training set reach N and a
share G of the labels trained on, or some are and that set is older than T
(``learning.retrain_due``). The run key names the label set, so the same
labels never train twice however often the sensor ticks.
"""

import dagster as dg

from stream_sentinel.assets.models import training_job
from stream_sentinel.config import Settings
from stream_sentinel.learning import loop as learning
from stream_sentinel.resources import StreamSentinelResource

from .units import run_waiting, skip_while_busy


@skip_while_busy
def evaluate_retrain(sentinel: StreamSentinelResource, flush: bool = False,
                     instance: dg.DagsterInstance | None = None) -> dg.RunRequest | dg.SkipReason:
    s = sentinel.settings
    if run_waiting(instance, training_job.name):
        return dg.SkipReason("a training run is queued; it reads every label there is when it starts")
    store = sentinel.store(lock_timeout_s=20)
    backlog = learning.label_backlog(store)
    digest = learning.resolved_labels_digest(store)
    due, why = learning.retrain_due(backlog, s.retrain_min_labels, s.retrain_growth, s.retrain_max_wait_s, flush)
    if not due:
        return dg.SkipReason(why)
    return dg.RunRequest(run_key=f"train:{digest}", tags={
        "stream_sentinel/new_labels": str(backlog.new),
        # a run whose worker died (run_liveness_sensor fails it) is retried; a candidate
        # rejected by its gate is a verdict, not a crash, and is not
        "dagster/max_retries": "2", "dagster/retry_on_asset_or_op_failure": "false"})


def build_retrain_sensor(settings: Settings) -> dg.SensorDefinition:
    @dg.sensor(name="retrain_sensor", job=training_job, minimum_interval_seconds=max(15, settings.sensor_interval_s),
               default_status=dg.DefaultSensorStatus.RUNNING,
               description="New resolved labels (>= N and >= G x those trained on, or any after T seconds) "
                           "-> training_job.")
    def retrain_sensor(context: dg.SensorEvaluationContext, sentinel: StreamSentinelResource):
        return evaluate_retrain(sentinel, instance=context.instance)

    return retrain_sensor
