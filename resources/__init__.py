"""Dagster resources: typed, configurable handles on the Stream Sentinel library."""

from .sentinel import EmbedderResource, StreamSentinelResource

__all__ = ["EmbedderResource", "StreamSentinelResource"]
