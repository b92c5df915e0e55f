"""Liveness: a dead run never blocks the queue, a failed unit is retried then parked in
sight (never dropped), and Kafka lag counts what is not recorded."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import dagster as dg

from stream_sentinel import feedback_sources as fs
from stream_sentinel import ingest, procs, retry
from stream_sentinel.config import Settings
from stream_sentinel.definitions import build_definitions
from stream_sentinel.resources import KafkaResource, StreamSentinelResource
from stream_sentinel.sensors.feedback import build_feedback_sensors
from stream_sentinel.sensors.liveness import WORKER_TAG, reap_orphaned_runs
from stream_sentinel.sensors.raw_files import build_raw_files_sensor

from .conftest import create_topic, drop, record


def test_retry_policy_backs_off_then_parks():
    policy = retry.RetryPolicy(max_attempts=3, base_delay_s=10, max_delay_s=30, parked_retry_s=100)
    h = lambda failed, end=1000.0, active=0: retry.UnitHistory(failed, active, end)  # noqa: E731
    assert retry.decide("u", h(0), policy, 2000).action == "wait"  # requested, no run yet
    assert retry.decide("u", h(1, active=1), policy, 2000).action == "wait"  # in flight
    assert retry.decide("u", h(1), policy, 1005).action == "wait"  # backoff 10 s
    first = retry.decide("u", h(1), policy, 1010)
    assert (first.action, first.run_key, first.parked) == ("retry", "u#2", False)
    assert retry.decide("u", h(2), policy, 1019).action == "wait"  # backoff doubled: 20 s
    assert retry.decide("u", h(2), policy, 1020).run_key == "u#3"
    parked = retry.decide("u", h(3), policy, 1050)
    assert parked.action == "wait" and parked.parked  # parked: retried every 100 s only
    slow = retry.decide("u", h(3), policy, 1100)
    assert (slow.action, slow.run_key, slow.parked) == ("retry", "u#4", True)


@dg.op
def _boom():
    raise RuntimeError("worker crashed")


@dg.job
def failing_job():
    _boom()


def _fail_run(instance, unit_key: str) -> None:
    """A real run of the unit that ended FAILURE (what a SIGKILLed or crashing run leaves)."""
    failing_job.execute_in_process(instance=instance, tags={retry.UNIT_TAG: unit_key}, raise_on_error=False)


def _raw_tick(paths, instance, cursor=None):
    defs = build_definitions(home=str(paths.home))
    with dg.build_sensor_context(instance=instance, cursor=cursor, definitions=defs,
                                 resources={"sentinel": StreamSentinelResource.from_env(home=str(paths.home))}) as ctx:
        return build_raw_files_sensor(Settings()).evaluate_tick(ctx)


def test_failed_batch_is_retried_with_backoff_then_parked_and_healed(paths, store, instance, monkeypatch):
    """Before: after Dagster's run retries a failed micro-batch was never requested again
    (the cursor had moved past it) and nothing said so."""
    monkeypatch.setenv("STREAM_SENTINEL_RETRY_BASE_SECONDS", "0")
    monkeypatch.setenv("STREAM_SENTINEL_RETRY_MAX_ATTEMPTS", "2")
    drop(paths.raw, "a.jsonl", [record(1), record(2)])
    first = _raw_tick(paths, instance)
    (req,) = first.run_requests
    unit = req.tags[retry.UNIT_TAG]
    assert unit == req.run_key
    # in flight: nothing new
    assert _raw_tick(paths, instance, first.cursor).run_requests == []
    _fail_run(instance, unit)
    again = _raw_tick(paths, instance, first.cursor)
    assert [r.run_key for r in again.run_requests] == [f"{unit}#2"]
    assert again.run_requests[0].run_config == req.run_config  # the same files
    _fail_run(instance, unit)
    monkeypatch.setenv("STREAM_SENTINEL_RETRY_PARKED_SECONDS", "3600")
    parked = _raw_tick(paths, instance, again.cursor)
    assert parked.run_requests == [] and "parked" in parked.skip_message
    (row,) = retry.parked(store)
    assert (row["unit_key"], row["kind"], row["attempts"]) == (unit, "raw_batch", 2)
    assert "worker crashed" in row["last_error"]
    assert store.status()["parked_units"] == 1
    # the fault heals (here: someone runs the batch); the unit leaves the parked list
    ingest.process_files(paths, store, list(req.run_config["ops"]["raw_records"]["config"]["files"]))
    _raw_tick(paths, instance, again.cursor)
    assert retry.parked(store) == [] and store.status()["parked_units"] == 0


def test_failed_feedback_file_is_retried(paths, store, instance, monkeypatch):
    monkeypatch.setenv("STREAM_SENTINEL_RETRY_BASE_SECONDS", "0")
    drop(paths.feedback, "f.jsonl", "".join(json.dumps(
        {"record_id": f"r{i}", "label": "spam", "source": "a", "ts": "2024-05-01T00:00:00Z"}) + "\n" for i in range(3)))
    files_sensor = build_feedback_sensors(Settings())[1]

    def tick(cursor):
        with dg.build_sensor_context(instance=instance, cursor=cursor, resources={
                "sentinel": StreamSentinelResource.from_env(home=str(paths.home))}) as ctx:
            return files_sensor.evaluate_tick(ctx)

    first = tick(None)
    (req,) = first.run_requests
    _fail_run(instance, req.tags[retry.UNIT_TAG])
    again = tick(first.cursor)
    assert [r.run_key for r in again.run_requests] == [f"{req.run_key}#2"]
    assert again.run_requests[0].run_config == req.run_config


def test_kafka_lag_counts_unrecorded_ranges_and_failed_ranges_are_retried(paths, store, instance, kafka_broker,
                                                                          monkeypatch):
    """Before: a range whose run failed was behind the cursor, never retried, and the lag
    (high watermark minus cursor) said 0 for its partition."""
    monkeypatch.setenv("STREAM_SENTINEL_RETRY_BASE_SECONDS", "0")
    topic = create_topic(kafka_broker.state().bootstrap, f"lag-{time.time_ns()}", partitions=2)
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", kafka_broker.state().bootstrap)
    monkeypatch.setenv("STREAM_SENTINEL_FEEDBACK_TOPIC", topic)
    from stream_sentinel import kafka as kf

    prod = kf.producer(kf.KafkaSettings(kafka_broker.state().bootstrap))
    for i in range(12):
        kf.produce_json(prod, topic, f"r{i}", {"record_id": f"r{i}", "label": "spam", "source": "a",
                                                "ts": "2024-05-01T00:00:00Z"})
    prod.flush(30)
    kafka_sensor = build_feedback_sensors(Settings())[0]

    def tick(cursor):
        with dg.build_sensor_context(instance=instance, cursor=cursor, resources={
                "sentinel": StreamSentinelResource.from_env(home=str(paths.home)), "kafka": KafkaResource.from_env()}) as ctx:
            return kafka_sensor.evaluate_tick(ctx)

    # every partition is listed, the one with nothing to read too
    with store.connect() as con:
        con.execute("DELETE FROM kafka_lag")
    monkeypatch.setenv("STREAM_SENTINEL_FEEDBACK_BATCH", "1")
    first = tick(None)
    assert first.run_requests, "the sensor requests the ranges"
    with store.connect() as con:
        lag = dict(con.execute('SELECT "partition", lag FROM kafka_lag WHERE topic = ?', [topic]).fetchall())
    assert set(lag) == {0, 1} and sum(lag.values()) == 12  # requested is not read
    victim = first.run_requests[0]
    _fail_run(instance, victim.tags[retry.UNIT_TAG])
    for other in first.run_requests[1:]:  # the others succeed
        cfg = other.run_config["ops"]["feedback"]["config"]
        fs.ingest_range(store, kf.KafkaSettings(kafka_broker.state().bootstrap),
                        fs.OffsetRange(cfg["topic"], cfg["partition"], cfg["start_offset"], cfg["end_offset"]), None)
    second = tick(first.cursor)
    assert [r.run_key for r in second.run_requests] == [f"{victim.run_key}#2"]
    cfg = victim.run_config["ops"]["feedback"]["config"]
    with store.connect() as con:
        lag = dict(con.execute('SELECT "partition", lag FROM kafka_lag WHERE topic = ?', [topic]).fetchall())
    assert lag[cfg["partition"]] == cfg["end_offset"] - cfg["start_offset"] + 1  # the failed range is lag
    assert sum(lag.values()) == lag[cfg["partition"]]


_SLEEPER = textwrap.dedent("""
    import sys, time
    import dagster as dg
    from stream_sentinel.resources import StreamSentinelResource

    @dg.op
    def nap(sentinel: StreamSentinelResource):
        open(sys.argv[1], "w").close()
        time.sleep(600)

    @dg.job(resource_defs={"sentinel": StreamSentinelResource()})
    def nap_job():
        nap()

    with dg.DagsterInstance.get() as instance:
        nap_job.execute_in_process(instance=instance)
""")


def test_run_whose_worker_was_killed_is_failed_so_the_queue_moves(paths, tmp_path, monkeypatch):
    """Before: a run whose worker died with the whole stack stayed STARTED forever, and with
    one run slot every queued run waited behind it."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    marker = tmp_path / "started"
    env = {**os.environ, "DAGSTER_HOME": str(home), "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([sys.executable, "-c", _SLEEPER, str(marker)], env=env)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the run never started"
            time.sleep(0.1)
        monkeypatch.setenv("DAGSTER_HOME", str(home))
        with dg.DagsterInstance.get() as instance:
            (rec,) = instance.get_run_records()
            run = rec.dagster_run
            assert run.status == dg.DagsterRunStatus.STARTED
            assert procs.alive(run.tags[WORKER_TAG]) is True
            assert reap_orphaned_runs(instance) == []  # alive: left alone
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            assert procs.alive(run.tags[WORKER_TAG]) is False
            assert reap_orphaned_runs(instance) == [run.run_id]
            assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.FAILURE
            assert reap_orphaned_runs(instance) == []
    finally:
        if proc.poll() is None:
            proc.kill()


def test_process_identity_is_not_fooled_by_pid_reuse():
    me = procs.identity()
    assert procs.alive(me) is True
    host, boot, pid, ticks = me.split("/")
    assert procs.alive(f"{host}/{boot}/{pid}/{int(ticks) + 1}") is False  # same pid, other process
    assert procs.alive(f"other-host/{boot}/{pid}/{ticks}") is None  # cannot tell from here
