"""The code location: what `workspace.yaml` loads and what `stream-sentinel` runs.

The Dagster layer is ``stream_sentinel.assets``, ``.sensors`` and ``.resources`` (the
checkout's top-level ``assets/``, ``sensors/``, ``resources/`` folders, installed under
this package). This module and the CLI are the only other parts of the package that import
Dagster; the rest of ``stream_sentinel`` is a plain library. Nothing heavy (torch, faiss)
is imported here, so the code location loads fast.
"""

from __future__ import annotations

import os

import dagster as dg

from stream_sentinel.assets import all_assets, all_checks, all_jobs, all_schedules, catalog, daily_arrivals
from stream_sentinel.config import Paths, Settings
from stream_sentinel.resources import EmbedderResource, KafkaResource, StreamSentinelResource
from stream_sentinel.sensors import (build_drift_retrain_sensor, build_feedback_sensors, build_raw_files_sensor,
                                     build_recent_drift_sensor, build_retrain_sensor, build_run_liveness_sensor)


def kafka_resource() -> KafkaResource:
    """Kafka settings by reference: the UI shows the variable names, values stay in the environment."""
    refs = {field: dg.EnvVar(var) for field, var in (
        ("bootstrap_servers", "KAFKA_BOOTSTRAP_SERVERS"), ("security_protocol", "KAFKA_SECURITY_PROTOCOL"),
        ("sasl_mechanism", "KAFKA_SASL_MECHANISM"), ("sasl_username", "KAFKA_SASL_USERNAME"),
        ("sasl_password", "KAFKA_SASL_PASSWORD"), ("ssl_ca_location", "KAFKA_SSL_CA_LOCATION"))
        if os.environ.get(var)}
    return KafkaResource(**refs)


def build_definitions(settings: Settings | None = None, home: str | None = None) -> dg.Definitions:
    settings = settings or Settings.from_env()
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
                 # declarative automation for the middle of the graph (vector_index after an
                 # embeddings backfill, labels when late records land), on out of the box
                 dg.AutomationConditionSensorDefinition(
                     "automation_sensor", target=dg.AssetSelection.all(), minimum_interval_seconds=15,
                     default_status=dg.DefaultSensorStatus.RUNNING)],
        resources={
            "sentinel": StreamSentinelResource(home=home),
            "embedder": EmbedderResource(),
            "kafka": kafka_resource(),
        },
        # micro-batches are small: one process per run, not one per step
        executor=dg.in_process_executor,
    )


defs = build_definitions()
