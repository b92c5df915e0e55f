"""``GET /metrics``: the API and the loop, in the Prometheus text format (prometheus-client).

Request counts and latency histograms per endpoint come from an ASGI middleware, labelled by
the route's path template (``/v1/models/{version}``), never by the raw path, which would make
one series per model version or report name. The loop's state (champion, index size, Kafka
lag, drift flags) is read when Prometheus scrapes: the champion and the index from the
process's own view of them, lag and drift from a snapshot the refresh thread takes from
DuckDB (a scrape must not wait for a run's database lock).
"""

from __future__ import annotations

import time
from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

# request latency buckets: from a cached read (sub-ms) to a first search that loads the model
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})  # others count as OTHER
VERSIONS_KEPT = 20  # model versions with a predictions series: a loop that learns all day makes many


class ApiMetrics:
    """One registry per app (tests start several apps in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("stream_sentinel_api_requests", "HTTP requests, by route template, method "
                                "and status", ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram("stream_sentinel_api_request_seconds", "HTTP request latency, by route "
                                 "template and method", ["route", "method"], buckets=BUCKETS,
                                 registry=self.registry)
        self.predictions = Counter("stream_sentinel_api_predictions", "Predictions served, by model version "
                                   "and route (champion | challenger)", ["model_version", "served_by"],
                                   registry=self.registry)
        self._versions: dict[str, None] = {}  # versions with a predictions series, least recent first

    def predicted(self, version: str, served_by: str, n: int = 1) -> None:
        """Count ``n`` predictions; only the ``VERSIONS_KEPT`` versions that served last keep a
        series (one series per version for the life of the process grew without end)."""
        seen = self._versions
        seen.pop(version, None)
        seen[version] = None
        while len(seen) > VERSIONS_KEPT:
            old = next(iter(seen))
            del seen[old]
            for role in ("champion", "challenger"):
                try:
                    self.predictions.remove(old, role)
                except KeyError:
                    pass
        self.predictions.labels(version, served_by).inc(n)

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class LoopCollector:
    """Gauges read at scrape time from ``state()`` (a dict the app keeps current)."""

    def __init__(self, state: Callable[[], dict[str, Any]]):
        self.state = state

    def describe(self):
        return []  # read at collect time; nothing to declare up front

    def collect(self):
        s = self.state()
        info = InfoMetricFamily("stream_sentinel_champion", "The model version that serves")
        info.add_metric([], {"version": s.get("champion") or ""})
        yield info
        size = GaugeMetricFamily("stream_sentinel_index_vectors", "Vectors in the served index version",
                                 labels=["version"])
        if s.get("index_version") is not None:
            size.add_metric([s["index_version"]], s.get("index_size", 0))
        yield size
        lexical = GaugeMetricFamily("stream_sentinel_search_lexical_records", "Records in the BM25 side of search")
        lexical.add_metric([], s.get("lexical_records", 0))
        yield lexical
        lag = GaugeMetricFamily("stream_sentinel_kafka_lag", "Feedback messages not yet read, per partition "
                                "(as last recorded by a feedback run or sensor tick)", labels=["topic", "partition"])
        for (topic, partition), value in sorted(s.get("kafka_lag", {}).items()):
            lag.add_metric([topic, str(partition)], value)
        yield lag
        drift = GaugeMetricFamily("stream_sentinel_drift_detected", "1 when the newest drift report of a kind "
                                  "found drift, 0 when it did not (no series: no report yet)",
                                  labels=["kind", "window"])
        for kind, (window, drifted) in sorted(s.get("drift", {}).items()):
            drift.add_metric([kind, window], 1.0 if drifted else 0.0)
        yield drift
        age = GaugeMetricFamily("stream_sentinel_loop_snapshot_age_seconds", "Seconds since lag and drift were "
                                "last read from DuckDB")
        if s.get("snapshot_at"):
            age.add_metric([], time.time() - s["snapshot_at"])
        yield age


class RequestMetrics:
    """ASGI middleware: count and time every HTTP request by its route template."""

    def __init__(self, app, metrics: ApiMetrics, templates: dict[Any, str]):
        self.app, self.metrics, self.templates = app, metrics, templates

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        started = time.perf_counter()
        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = self.templates.get(scope.get("endpoint"), "unmatched")
            method = scope["method"] if scope["method"] in METHODS else "OTHER"
            self.metrics.latency.labels(route, method).observe(time.perf_counter() - started)
            self.metrics.requests.labels(route, method, str(status["code"])).inc()
