"""drift_retrain_sensor: a drifting day requests a full retrain, once per drift episode.

The sensor writes nothing: the request itself is the bookmark (the cursor, which Dagster
saves with the run request; a tick replayed after a crash asks for the same run key and
Dagster drops the copy). The retrain run records the ``drift_retrain`` event in
learning_events when it starts training and carries the drift report's day in its tags;
the model asset copies them into the candidate's metadata, so the lineage shows which
report caused which version.
"""

from datetime import datetime, timezone

import dagster as dg

from stream_sentinel import drift
from stream_sentinel.assets.drift import RecentDriftConfig, recent_drift_job
from stream_sentinel.assets.models import DRIFT_TAG, DRIFT_TRIGGER_TAG, training_job, training_run_config
from stream_sentinel.config import Settings
from stream_sentinel.resources import StreamSentinelResource

from .units import run_waiting, skip_while_busy


@skip_while_busy
def evaluate_drift_retrain(sentinel: StreamSentinelResource, cursor: str | None = None,
                           ) -> dg.SensorResult | dg.SkipReason:
    cfg = sentinel.drift_config
    requested = drift.RetrainTrigger.from_json(cursor) if cursor else None
    trigger = drift.retrain_due(sentinel.store(lock_timeout_s=20), cfg.cooldown_s, requested=requested)
    if trigger is None:
        return dg.SkipReason("no new drift episode")
    trigger = drift.RetrainTrigger(**{**trigger.__dict__, "requested_at": datetime.now(timezone.utc).isoformat()})
    request = dg.RunRequest(
        run_key=trigger.run_key,
        run_config=training_run_config(full=True),
        tags={DRIFT_TAG: trigger.window_key, DRIFT_TRIGGER_TAG: trigger.to_json(), "stream_sentinel/trigger": "drift",
              "stream_sentinel/share_drifted": f"{trigger.share_drifted}",
              "stream_sentinel/embedding_drift": f"{trigger.embedding_drift}"})
    return dg.SensorResult(run_requests=[request], cursor=trigger.to_json())


def build_drift_retrain_sensor(settings: Settings) -> dg.SensorDefinition:
    @dg.sensor(name="drift_retrain_sensor", job=training_job, minimum_interval_seconds=max(30, settings.sensor_interval_s),
               default_status=dg.DefaultSensorStatus.RUNNING,
               description="A drift report over the threshold -> a full retrain (training_job with full: true), "
               "once per drift episode (cooldown STREAM_SENTINEL_DRIFT_COOLDOWN_SECONDS).")
    def drift_retrain_sensor(context: dg.SensorEvaluationContext, sentinel: StreamSentinelResource):
        return evaluate_drift_retrain(sentinel, context.cursor)

    return drift_retrain_sensor


@skip_while_busy
def evaluate_recent_drift(sentinel: StreamSentinelResource, instance: dg.DagsterInstance | None = None,
                          ) -> dg.RunRequest | dg.SkipReason:
    """A rolling report once there are records for both sides, then every N new records."""
    cfg = sentinel.drift_config
    if run_waiting(instance, recent_drift_job.name):
        return dg.SkipReason("a rolling drift report is queued")
    if sentinel.registry().champion_version() is None:
        return dg.SkipReason("no champion yet: a drift report compares new records with its training set")
    upto = drift.recent_due(sentinel.store(lock_timeout_s=20), cfg)
    if upto is None:
        return dg.SkipReason(f"waiting for {cfg.recent_every} new records since the last rolling report")
    return dg.RunRequest(run_key=f"drift-recent:{upto}",
                         run_config=dg.RunConfig(ops={"recent_drift_report": RecentDriftConfig(upto_vec_id=upto)}))


def build_recent_drift_sensor(settings: Settings) -> dg.SensorDefinition:
    @dg.sensor(name="recent_drift_sensor", job=recent_drift_job,
               minimum_interval_seconds=max(60, settings.sensor_interval_s),
               default_status=dg.DefaultSensorStatus.RUNNING,
               description="The rolling drift report over the latest records: a first one as soon as there is a "
               "champion and records for both sides, then one per STREAM_SENTINEL_DRIFT_RECENT_EVERY new records.")
    def recent_drift_sensor(context: dg.SensorEvaluationContext, sentinel: StreamSentinelResource):
        return evaluate_recent_drift(sentinel, context.instance)

    return recent_drift_sensor
