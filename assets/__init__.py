"""Dagster assets, checks and jobs: thin wrappers over the stream_sentinel library."""

import dagster as dg

from .checks import checks_job, index_checks, no_parked_units
from .catalog import catalog
from .erasure import erasure_job, erasures
from .drift import build_daily_drift_schedule, drift_job, drift_report, recent_drift_job, recent_drift_report
from .feedback import feedback, feedback_job, labels
from .ingest import embeddings, ingest_job, raw_records, vector_index
from .models import (champion, learning_alerts, live_accuracy, model, predictions, training_job, training_set,
                     weekly_full_retrain)
from .partitions import daily_arrivals, declared_daily_arrivals
from .served import served_job, served_predictions
from .windows import window_features

all_assets = [raw_records, window_features, embeddings, vector_index, feedback, labels, training_set, model, champion, predictions, live_accuracy,
              drift_report, recent_drift_report, served_predictions, erasures]
all_checks = [*index_checks, no_parked_units, learning_alerts]
all_jobs = [ingest_job, checks_job, feedback_job, training_job, drift_job, recent_drift_job, served_job, erasure_job]


def all_schedules(partitions_def: dg.DailyPartitionsDefinition = declared_daily_arrivals) -> list[dg.ScheduleDefinition]:
    """The schedules, for the daily calendar the code location loaded with."""
    return [weekly_full_retrain, build_daily_drift_schedule(partitions_def)]


__all__ = ["all_assets", "all_checks", "all_jobs", "all_schedules", "catalog", "daily_arrivals", "drift_job", "erasure_job",
           "feedback_job", "ingest_job", "served_job", "training_job"]
