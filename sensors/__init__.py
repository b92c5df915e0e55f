"""Sensors: only where outside events arrive (files in raw/, Kafka feedback, feedback files)."""

from .feedback import build_feedback_sensors
from .raw_files import build_raw_files_sensor

__all__ = ["build_feedback_sensors", "build_raw_files_sensor"]
