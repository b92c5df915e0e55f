"""End to end with the real dagster-daemon: drop files, wait until they are searchable.

This is what a user's deployment does unattended: the sensor ticks in the daemon, the
queued run coordinator launches ingest_job in its own process, and the CLI searches the
index that run published.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import dagster as dg
import pytest

from stream_sentinel import dagster_home as dagster_home_files
from stream_sentinel.index import IndexStore
from stream_sentinel.store import STORE_URL_ENV, Store

from .conftest import REPO, drop
from .helpers import start_embed_server, stop_process

pytestmark = pytest.mark.daemon
WAIT_S = 420


@pytest.fixture(params=["sqlite", "postgres"])
def daemon(paths, tmp_path, request):
    """The daemon on the embedded default (SQLite files in DAGSTER_HOME, metrics.duckdb), and with
    both on a real PostgreSQL server: the instance's runs, event logs and schedules
    (STREAM_SENTINEL_DAGSTER_PG_URL) and the metrics store (STREAM_SENTINEL_STORE_URL), as a
    user selects them."""
    pg = {}
    if request.param == "postgres":  # Dagster's storage and the metrics store, each in its own database
        from stream_sentinel.devtools import postgres_server as pgs

        server = request.getfixturevalue("postgres_server")
        pg = {dagster_home_files.PG_URL_ENV: request.getfixturevalue("pg_database"),
              STORE_URL_ENV: pgs.create_database(server, f"m_{uuid.uuid4().hex[:12]}")}
    # the instance folder as `stream-sentinel up` prepares it: the packaged dagster.yaml and workspace.yaml,
    # and the embedding server `up` starts beside it (eager): each run embeds through it instead of
    # importing torch and loading the model itself (about 10 s per run on two cores)
    embed_server = start_embed_server(paths)
    dagster_home = dagster_home_files.prepare(tmp_path / "dagster_home", {**os.environ, **pg})
    env = {**os.environ, **pg, "DAGSTER_HOME": str(dagster_home), "STREAM_SENTINEL_HOME": str(paths.home),
           "STREAM_SENTINEL_SENSOR_INTERVAL": "1", "STREAM_SENTINEL_DEBOUNCE_SECONDS": "0.5"}
    log = open(tmp_path / "daemon.log", "w")
    dagster_daemon = Path(sys.executable).parent / "dagster-daemon"
    proc = subprocess.Popen([str(dagster_daemon), "run", "-w", str(dagster_home / "workspace.yaml")], cwd=dagster_home,
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield dagster_home, tmp_path / "daemon.log", pg
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        stop_process(embed_server)


def _wait_for(predicate, what: str, log: Path):
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1)
    tail = log.read_text()[-4000:]
    raise AssertionError(f"timed out waiting for {what}; daemon log tail:\n{tail}")


def _ntotal(paths):
    meta = IndexStore(paths.index).read_meta()
    return meta.ntotal if meta else 0


def test_dropped_files_become_searchable_through_the_daemon(paths, daemon, demo_records, monkeypatch):
    dagster_home, log, pg = daemon
    for k, v in pg.items():  # this process reads the same stores (the instance file names the variable)
        monkeypatch.setenv(k, v)
    first, second = demo_records[:60], demo_records[60:90]
    drop(paths.raw, "drop-1.jsonl", first, age=0)
    drop(paths.raw, "drop-2.json", [{"id": "x"}], age=0)  # one rejected record: pipeline carries on
    _wait_for(lambda: _ntotal(paths) == 60, "the first 60 records in the index", log)

    drop(paths.raw, "later/drop-3.jsonl", second, age=0)
    drop(paths.raw, "copy-of-1.jsonl", first, age=0)  # same bytes: recorded as duplicate only
    _wait_for(lambda: _ntotal(paths) == 90, "90 records in the index", log)

    out = subprocess.run([sys.executable, "-m", "stream_sentinel.cli", "search", second[5]["text"][:200],
                          "-k", "1", "--json"], capture_output=True, text=True, cwd=REPO, timeout=300,
                         env={**os.environ, **pg, "STREAM_SENTINEL_HOME": str(paths.home)})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["results"][0]["id"] == second[5]["id"]

    status = Store.of(paths).status()
    if pg:  # everything went to PostgreSQL: no run, sensor or command made the DuckDB file
        assert not paths.db.exists()
    assert (status["records"], status["rejected_records"], status["duplicate_files"]) == (90, 1, 1)

    # feedback through the drop folder: one vote for a record that has not arrived yet
    votes = [{"record_id": r["id"], "label": "spam", "source": "alice", "ts": "2024-01-01T00:00:00Z"}
             for r in first[:3]] + [{"record_id": "late-1", "label": "ham", "source": "alice",
                                     "ts": "2024-01-01T00:00:00Z"}]
    drop(paths.feedback, "votes.jsonl", "".join(json.dumps(v) + "\n" for v in votes), age=0)

    def label_status():
        with Store.of(paths).connect() as con:
            return dict(con.execute("SELECT record_id, status FROM labels").fetchall())

    _wait_for(lambda: label_status().get("late-1") == "pending", "labels with late-1 pending", log)
    assert sum(v == "resolved" for v in label_status().values()) == 3
    # the record lands later; declarative automation re-resolves labels after raw_records
    drop(paths.raw, "late.jsonl", [{"id": "late-1", "text": "arrived after its label",
                                    "event_time": "2024-01-01T00:00:00Z"}], age=0)
    _wait_for(lambda: label_status().get("late-1") == "resolved", "late-1 resolved by automation", log)
    # Dagster's own record of it: sensor-launched runs with our run keys, all successful
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        assert type(instance.run_storage).__name__ == ("PostgresRunStorage" if pg else "SqliteRunStorage")
        runs = _wait_for(lambda: [r for r in instance.get_runs() if r.is_finished] or None, "finished runs", log)
        assert runs and all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
        ingest_runs = [r for r in runs if r.job_name == "ingest_job"]
        assert len(ingest_runs) >= 2  # files that arrive while a run is queued join the next batch
        assert all(r.tags.get("dagster/run_key", "").startswith("raw:") for r in ingest_runs)
        assert all(r.tags.get("dagster/sensor_name") == "raw_files_sensor" for r in ingest_runs)
        feedback_runs = [r for r in runs if r.job_name == "feedback_job"]
        assert [r.tags.get("dagster/sensor_name") for r in feedback_runs] == ["feedback_files_sensor"]
