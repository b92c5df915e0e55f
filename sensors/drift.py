"""drift_retrain_sensor: a drifting day requests a full retrain, once per drift episode.

The retrain is recorded in learning_events (the episode's bookmark and the audit trail)
and its run carries the drift report's day in its tags; the model asset copies them into
the candidate's metadata, so the lineage shows which report caused which version.
"""

import dagster as dg

from assets.models import training_job
from resources import StreamSentinelResource
from stream_sentinel import drift
from stream_sentinel.config import Settings
from stream_sentinel.store import StoreBusy

DRIFT_TAG = "stream_sentinel/drift_report"


def evaluate_drift_retrain(sentinel: StreamSentinelResource) -> dg.RunRequest | dg.SkipReason:
    cfg = drift.DriftConfig.from_env()
    try:
        store = sentinel.store(lock_timeout_s=20)
        trigger = drift.retrain_due(store, cfg.cooldown_s)
        if trigger is None:
            return dg.SkipReason("no new drift episode")
        drift.record_retrain(sentinel.registry(), trigger)
    except StoreBusy:
        return dg.SkipReason("metrics.duckdb is busy; will look again next tick")
    return dg.RunRequest(
        run_key=trigger.run_key,
        run_config={"ops": {"model": {"config": {"full": True}}}},
        tags={DRIFT_TAG: trigger.window_key, "stream_sentinel/trigger": "drift",
              "stream_sentinel/share_drifted": f"{trigger.share_drifted}",
              "stream_sentinel/embedding_drift": f"{trigger.embedding_drift}"})


def build_drift_retrain_sensor(settings: Settings) -> dg.SensorDefinition:
    @dg.sensor(name="drift_retrain_sensor", job=training_job, minimum_interval_seconds=max(30, settings.sensor_interval_s),
               default_status=dg.DefaultSensorStatus.RUNNING,
               description="A drift report over the threshold -> a full retrain (training_job with full: true), "
               "once per drift episode (cooldown STREAM_SENTINEL_DRIFT_COOLDOWN_SECONDS).")
    def drift_retrain_sensor(context: dg.SensorEvaluationContext, sentinel: StreamSentinelResource):
        return evaluate_drift_retrain(sentinel)

    return drift_retrain_sensor
