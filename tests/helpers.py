"""Helpers shared by several test modules (no test module imports another test module).

Models: records through the product's file path, labels, candidates on real LightGBM.
Feedback: votes, Kafka producing, ticks of the real feedback_kafka_sensor, feedback runs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import dagster as dg
import httpx
import pandas as pd

from stream_sentinel import feedback as fb
from stream_sentinel import ingest, pipeline
from stream_sentinel.learning import loop as learning
from stream_sentinel.definitions import build_definitions
from stream_sentinel.devtools.kafka_broker import free_port
from stream_sentinel.learning.models import TrainParams, load_training_set
from stream_sentinel.resources import KafkaResource, StreamSentinelResource

from .conftest import drop

# ------------------------------------------------------------------ models

WINDOW = slice(1000, 1500)  # a stretch of the demo stream with both spam and ham


def ingest_with_labels(paths, store, embedder, demo_records, labels, part: slice, name: str):
    recs = demo_records[part]
    ingest_records(paths, store, embedder, recs, name)
    if labels is not None:
        label_records(store, recs, labels, name)


def ingest_records(paths, store, embedder, recs: list[dict], name: str) -> None:
    """Records through the product's file path (scan, batches, files), then embedded."""
    drop(paths.raw, f"{name}.jsonl", recs)
    ingest.scan(paths, store, debounce_s=1)
    for b in ingest.plan_batches(store):
        for sha in b.files:
            ingest.process_file(paths, store, sha)
    pipeline.embed_partition(store, embedder, None)


def label_records(store, recs, labels, name: str, when: str = "2024-01-01"):
    events = [fb.Event(fb.Position(f"test-{name}", 0, i), r["id"], labels[r["id"]], "oracle", 1.0,
                       pd.Timestamp(when, tz="UTC").to_pydatetime()) for i, r in enumerate(recs)]
    fb.write(store, events, [], "file")
    fb.resolve_labels(store, fb.ConsensusConfig())


def candidate(registry, store, embedder, full=False, params: TrainParams | None = None):
    ts = load_training_set(store, embedder.model_id, "spam")
    learning.persist_training_set(store, ts, embedder.model_id)
    ts = learning.training_set_for_version(store, ts.data_version, embedder.model_id)
    return learning.train_candidate(registry, store, ts, embedder.model_id, params or TrainParams(), full=full)


# ------------------------------------------------------------------ feedback


def vote(rid, label="spam", source="alice", confidence=1.0, ts="2024-05-01T12:00:00Z"):
    return {"record_id": rid, "label": label, "source": source, "confidence": confidence, "ts": ts}


def tick(paths, instance, cursor=None):
    """One tick of the deployed feedback_kafka_sensor (the definition from ``build_definitions``),
    on ``instance``, with the resources a code location gives it."""
    defs = build_definitions(home=str(paths.home))
    sensor = defs.resolve_sensor_def("feedback_kafka_sensor")
    with dg.build_sensor_context(
        instance=instance, cursor=cursor, definitions=defs,
        resources={"sentinel": StreamSentinelResource.from_env(home=str(paths.home)), "kafka": KafkaResource.from_env()},
    ) as ctx:
        return sensor.evaluate_tick(ctx)


def flush_tick(paths):
    """What `stream-sentinel run --once` asks for: every pending range, whatever the batch policy.

    The sensor has no flush: `run --once` calls the function the sensor calls, ``evaluate_kafka``,
    with ``flush=True`` (no cursor, no instance), as here. The result has the shape of a tick."""
    from stream_sentinel.sensors.feedback import evaluate_kafka

    with dg.build_resources({"sentinel": StreamSentinelResource.from_env(home=str(paths.home)),
                             "kafka": KafkaResource.from_env()}) as res:
        out = evaluate_kafka(res.sentinel, res.kafka, None, flush=True)
    if isinstance(out, dg.SkipReason):
        return SimpleNamespace(run_requests=[], skip_message=out.skip_message, cursor=None)
    return SimpleNamespace(run_requests=out.run_requests, skip_message=None, cursor=out.cursor)


def execute(paths, instance, request):
    job = build_definitions(home=str(paths.home)).resolve_job_def("feedback_job")
    result = job.execute_in_process(run_config=request.run_config, instance=instance, raise_on_error=False,
                                    tags={"dagster/run_key": request.run_key})
    assert result.success
    return result


# a feedback run in a subprocess, to be killed at a pause point
KILLED_RUN = textwrap.dedent("""
    import sys
    from stream_sentinel import feedback_sources as fs
    from stream_sentinel.kafka import KafkaSettings
    from stream_sentinel.store import Store
    fs.ingest_range(Store(sys.argv[1]), KafkaSettings(sys.argv[2]),
                    fs.OffsetRange(sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])),
                    frozenset({"spam", "ham"}))
""")


# ------------------------------------------------------------------ the HTTP API


class Api(httpx.Client):
    """A client of a `stream-sentinel serve` process started by :func:`serve`."""

    log_path: Path

    def server_log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def serve(paths, token: str | None = None, env: dict[str, str] | None = None, port: int | None = None,
          timeout_s: float = 60):
    """A real `stream-sentinel serve` process for the data root ``paths`` on ``port`` (default: a free one)."""
    port = port or free_port()
    environ = {**os.environ, "STREAM_SENTINEL_HOME": str(paths.home), **(env or {})}
    environ.pop("STREAM_SENTINEL_API_TOKEN", None)
    if token:
        environ["STREAM_SENTINEL_API_TOKEN"] = token
    log_path = paths.home.parent / f"api-{port}.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "stream_sentinel.cli", "serve", "--port", str(port)],
                                env=environ, stdout=out, stderr=subprocess.STDOUT)
    api = Api(base_url=f"http://127.0.0.1:{port}", timeout=30)
    api.log_path = log_path
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"serve exited with {proc.returncode}:\n{api.server_log()}")
            try:
                if api.get("/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"serve did not answer /healthz in {timeout_s} s:\n{api.server_log()}")
            time.sleep(0.1)
        yield api
    finally:
        api.close()
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------ processes


def start_embed_server(paths, compile_: bool = False, env_extra: dict | None = None) -> subprocess.Popen:
    """`stream-sentinel embed-server` for the data root ``paths``, once its socket is there
    (eager by default: the same vectors as in-process, bit for bit)."""
    env = {**os.environ, "STREAM_SENTINEL_HOME": str(paths.home), "STREAM_SENTINEL_EMBED_COMPILE": str(int(compile_)),
           **(env_extra or {})}
    proc = subprocess.Popen([sys.executable, "-m", "stream_sentinel.cli", "embed-server"], env=env,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not paths.embed_socket.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "the embedding server did not come up"
        time.sleep(0.2)
    return proc


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
