"""Dagster resources: typed, configurable handles on the Stream Sentinel library."""

from .kafka import KafkaResource
from .sentinel import EmbedderResource, StreamSentinelResource

__all__ = ["EmbedderResource", "KafkaResource", "StreamSentinelResource"]
