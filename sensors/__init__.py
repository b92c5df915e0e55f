"""Sensors: only where outside events arrive (files in raw/, Kafka feedback, feedback files, the API's prediction
log, erasure requests), the retrain policy, drift and erasures."""

from .drift import build_drift_retrain_sensor, build_recent_drift_sensor
from .erasure import build_erasure_retrain_sensor, build_erasure_sensor
from .feedback import build_feedback_sensors
from .liveness import build_run_liveness_sensor
from .raw_files import build_raw_files_sensor
from .served import build_served_sensor
from .training import build_retrain_sensor

__all__ = ["build_drift_retrain_sensor", "build_erasure_retrain_sensor", "build_erasure_sensor", "build_feedback_sensors", "build_raw_files_sensor", "build_recent_drift_sensor",
           "build_retrain_sensor", "build_run_liveness_sensor", "build_served_sensor"]
