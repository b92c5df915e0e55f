"""Sensors: only where outside events arrive (files in raw/; later, Kafka)."""

from .raw_files import build_raw_files_sensor

__all__ = ["build_raw_files_sensor"]
