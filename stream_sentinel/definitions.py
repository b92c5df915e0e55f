"""The code location: what `workspace.yaml` loads and what `stream-sentinel` runs.

The Dagster layer is ``stream_sentinel.assets``, ``.sensors`` and ``.resources`` (the
checkout's top-level ``assets/``, ``sensors/``, ``resources/`` folders, installed under
this package). This module and the CLI are the only other parts of the package that import
Dagster; the rest of ``stream_sentinel`` is a plain library. Nothing heavy (torch, faiss)
is imported here, so the code location loads fast.
"""

from __future__ import annotations

import dagster as dg

from stream_sentinel.assets import all_assets, all_checks, all_jobs, all_schedules, catalog, daily_arrivals
from stream_sentinel.config import Paths, Settings
from stream_sentinel.drift import DriftConfig
from stream_sentinel.resources import EmbedderResource, KafkaResource, StreamSentinelResource
from stream_sentinel.sensors import (build_drift_retrain_sensor, build_erasure_retrain_sensor, build_erasure_sensor,
                                     build_feedback_sensors, build_raw_files_sensor,
                                     build_recent_drift_sensor, build_retrain_sensor, build_run_liveness_sensor,
                                     build_served_sensor)


def build_definitions(settings: Settings | None = None, home: str | None = None,
                      drift_config: DriftConfig | None = None) -> dg.Definitions:
    """The code location. Settings come from the environment unless given, read here (when the
    code location loads), checked (a bad value fails the load with the variable's name) and
    shown as the resources' field defaults; sensor intervals and the partition calendar are
    fixed at load, every other field can be set per run."""
    settings = settings or Settings.from_env()
    drift_config = drift_config or DriftConfig.from_env()
    # the daily calendar starts on the configured day or the data root's first day (read,
    # not created, here: `up` and the resource create the data root)
    start = settings.partitions_start_for(Paths.at(home) if home else Paths.from_env())
    return dg.Definitions(
        assets=catalog(all_assets, start),
        asset_checks=all_checks,
        jobs=all_jobs,
        schedules=all_schedules(daily_arrivals(start)),
        sensors=[build_raw_files_sensor(settings), *build_feedback_sensors(settings), build_retrain_sensor(settings),
                 build_drift_retrain_sensor(settings), build_recent_drift_sensor(settings), build_run_liveness_sensor(),
                 build_served_sensor(settings), build_erasure_sensor(settings), build_erasure_retrain_sensor(settings),
                 # declarative automation for the middle of the graph (vector_index after an
                 # embeddings backfill, labels when late records land), on out of the box
                 dg.AutomationConditionSensorDefinition(
                     "automation_sensor", target=dg.AssetSelection.all(), minimum_interval_seconds=15,
                     default_status=dg.DefaultSensorStatus.RUNNING)],
        resources={
            "sentinel": StreamSentinelResource.from_settings(settings, drift_config, home),
            "embedder": EmbedderResource.from_settings(settings, home),
            "kafka": KafkaResource.from_env(),
        },
        # micro-batches are small: one process per run, not one per step
        executor=dg.in_process_executor,
    )


@dg.definitions
def defs() -> dg.Definitions:
    """Loaded by Dagster when the code location loads (not at import)."""
    return build_definitions()
