"""Every sensor skips a tick, with one clear reason, while another process holds metrics.duckdb.

The lock is real (a second process has the file open read-write, as a running step does);
only the wait for it is shortened, so the test does not sit out the sensors' 20 s timeouts.
"""

from __future__ import annotations

import subprocess
import sys

import dagster as dg
import pytest

from stream_sentinel.resources import StreamSentinelResource
from stream_sentinel.sensors.drift import evaluate_drift_retrain, evaluate_recent_drift
from stream_sentinel.sensors.feedback import evaluate_files
from stream_sentinel.sensors.raw_files import evaluate
from stream_sentinel.sensors.training import evaluate_retrain
from stream_sentinel.store import Store

from .conftest import drop, record


@pytest.fixture
def held(paths):
    Store(paths.db).init()
    proc = subprocess.Popen([sys.executable, "-c", "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); "
                             "print('held', flush=True); time.sleep(120)", str(paths.db)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield proc
    proc.kill()
    proc.wait()


def test_every_sensor_skips_while_the_store_is_held(paths, instance, monkeypatch, held):
    wait = Store._acquire
    monkeypatch.setattr(Store, "_acquire", lambda self, timeout_s=None: wait(self, 0.5))
    drop(paths.raw, "a.jsonl", [record(1)])
    drop(paths.feedback, "f.jsonl", [{"record_id": "r1", "label": "spam"}])
    with dg.build_resources({"sentinel": StreamSentinelResource.from_env(home=str(paths.home))}) as res:
        sentinel = res.sentinel
        # the recent-drift sensor asks for a champion first; make it see one without the store
        monkeypatch.setattr(type(sentinel.registry()), "champion_version", lambda self: "m000001")
        ticks = {"raw_files": evaluate(sentinel, None, instance),
                 "retrain": evaluate_retrain(sentinel, instance=instance),
                 "drift_retrain": evaluate_drift_retrain(sentinel),
                 "recent_drift": evaluate_recent_drift(sentinel, instance=instance),
                 "feedback_files": evaluate_files(sentinel, None, instance)}
    for name, tick in ticks.items():
        assert isinstance(tick, dg.SkipReason), (name, tick)
        assert "metrics.duckdb is held by a running step" in tick.skip_message, (name, tick.skip_message)
    assert held.poll() is None  # the holder was never disturbed
