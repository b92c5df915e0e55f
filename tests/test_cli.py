"""The `stream-sentinel` CLI as a user runs it (subprocesses, real files, real model)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

from stream_sentinel.devtools import demo
from stream_sentinel.embedding.embedder import default_model_path
from stream_sentinel.records import Record, validate
from stream_sentinel.store import Store

from .conftest import REPO


def cli(*args, env=None, check=True):
    proc = subprocess.run([sys.executable, "-m", "stream_sentinel.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_demo_records_follow_the_contract_and_keep_labels_aside(demo_records):
    assert len(demo_records) > 6000
    assert len({r["id"] for r in demo_records}) == len(demo_records)
    assert [r["event_time"] for r in demo_records] == sorted(r["event_time"] for r in demo_records)
    for r in demo_records[::97]:
        assert isinstance(validate(r, "x"), Record), r["id"]
        assert set(r["features"]) - {"sender_domain"} == {"length", "link_count", "uppercase_ratio", "has_html"}
        assert "label" not in r and "<html" not in r["text"].lower()
    # the demo windows' key: the From: address's domain, lower-case
    assert sum("sender_domain" in r["features"] for r in demo_records) > 0.99 * len(demo_records)
    assert [demo.sender_domain(h) for h in ('"Joe" <Joe@Example.COM>', "a@b.org (A)", "no address", "")] == [
        "example.com", "b.org", None, None]
    by_id = {r["id"]: r for r in demo_records}
    # mbox "From " line of spam-2/00001: "Tue Aug  6 11:51:02 2002"
    assert by_id["spam-2/00001"]["event_time"] == "2002-08-06T11:51:02+00:00"
    _, labels_path = demo.convert(quiet=True)
    labels = [json.loads(line) for line in labels_path.read_text().splitlines()]
    assert {lab["record_id"] for lab in labels} == set(by_id)
    assert {lab["label"] for lab in labels} == {"spam", "ham"}
    assert all(lab["label"] == ("spam" if lab["group"].startswith("spam") else "ham") for lab in labels)
    groups = {lab["group"] for lab in labels}
    assert groups == set(demo.GROUPS)


def test_replay_writes_whole_files_in_time_order(paths, demo_records):
    out = cli("demo-data", "replay", "--limit", "120", "--per-file", "50", "--quiet")
    assert "120 records" in out.stdout
    files = sorted((paths.raw / "demo").iterdir())
    assert [f.name for f in files] == ["demo-000000-000049.jsonl", "demo-000050-000099.jsonl",
                                       "demo-000100-000119.jsonl"]
    ids = [json.loads(line)["id"] for f in files for line in f.read_text().splitlines()]
    assert ids == [r["id"] for r in demo_records[:120]]
    # the demo's windows are declared, once: a root's own declaration is never overwritten
    from stream_sentinel.devtools import demo

    declared = paths.home / "windows.yaml"
    assert declared.read_text() == demo.DEMO_WINDOWS and "demo windows declared" in out.stderr
    declared.write_text("windows: []\n")
    cli("demo-data", "replay", "--limit", "1", "--start", "120", "--quiet")
    assert declared.read_text() == "windows: []\n"


@pytest.mark.slow
def test_run_once_status_search_check(paths, demo_records):
    cli("demo-data", "replay", "--limit", "100", "--quiet")
    (paths.raw / "broken.json").write_text('{"id": ')
    os.utime(paths.raw / "broken.json", (0, 0))
    for f in (paths.raw / "demo").iterdir():
        os.utime(f, (0, 0))
    # a file just written, as a cron or CI job does right before `run --once`: before, the run
    # said "still being written", did nothing with it and exited 0
    (paths.raw / "fresh.jsonl").write_text("".join(json.dumps(
        {"id": f"fresh-{i}", "text": f"fresh record {i}", "event_time": "2024-05-01T00:00:00Z"}) + "\n"
        for i in range(3)))
    run = cli("run", "--once", "--wait-seconds", "60", env={"STREAM_SENTINEL_DEBOUNCE_SECONDS": "8"})
    assert "waiting for 1 file(s) still being written" in run.stderr
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert {k: summary[k] for k in ("records", "embedded", "index_ntotal", "quarantined_files",
                                    "rejected_records")} == {"records": 103, "embedded": 103, "index_ntotal": 103,
                                                             "quarantined_files": 1, "rejected_records": 0}

    status = json.loads(cli("status", "--json").stdout)
    for key in ("records", "embedded", "index_ntotal", "quarantined_files", "rejected_records"):
        assert key in status
    assert status["records"] == status["embedded"] == status["index_ntotal"] == 103

    target = demo_records[42]
    found = json.loads(cli("search", target["text"][:300], "-k", "3", "--json").stdout)
    assert found["results"][0]["id"] == target["id"]
    assert set(found["results"][0]) == {"id", "score", "snippet"}
    assert found["results"][0]["snippet"] and len(found["results"]) == 3
    human = cli("search", "mortgage", "-k", "2").stdout
    assert human.count("\n") >= 2 and " 1. " in human

    assert "nothing to do" in cli("run", "--once").stdout
    checks = json.loads(cli("check", "--json").stdout)
    assert {c["check"] for c in checks} == {"index_matches_embeddings", "index_ids_unique",
                                            "index_dimension_matches_model", "no_parked_units"}
    assert all(c["passed"] for c in checks)
    with Store(paths.db).transaction() as con:
        con.execute("DELETE FROM embeddings WHERE record_id = ?", [target["id"]])
    failed = cli("check", check=False)
    assert failed.returncode == 1 and "FAIL" in failed.stdout


def test_run_once_exits_non_zero_when_a_run_fails(paths, demo_records, tmp_path):
    broken = tmp_path / "broken-model"
    shutil.copytree(default_model_path(), broken)
    (broken / "model.safetensors").write_bytes(b"not a model")
    cli("demo-data", "replay", "--limit", "10", "--quiet")
    for f in (paths.raw / "demo").iterdir():
        os.utime(f, (0, 0))
    out = cli("run", "--once", env={"STREAM_SENTINEL_MODEL_PATH": str(broken)}, check=False)
    assert out.returncode == 1
    assert "FAILED" in out.stderr
    # the records are in; only embedding failed, so the next healthy run finishes the job
    assert Store(paths.db).status()["records"] == 10
    healthy = cli("run", "--once")
    assert json.loads(healthy.stdout.strip().splitlines()[-1])["index_ntotal"] == 10


def test_search_without_an_index_explains_what_to_do(paths):
    out = cli("search", "anything", check=False)
    assert out.returncode == 1 and "no index yet" in out.stderr



def test_up_relays_dagster_output_without_the_run_queue_line(tmp_path):
    """`up` shows the Dagster stack's output but not the queue's once-a-second INFO line;
    errors, warnings and run events pass."""
    import io

    from stream_sentinel import cli

    queue = "2026-12-02 17:00:01 +0000 - dagster.daemon.QueuedRunCoordinatorDaemon - INFO - " \
            "1 runs are currently in progress. Maximum is 1, won't launch more."
    keep = ["dagster.daemon.SensorDaemon - INFO - Sensor raw_files_sensor requested run 1a2b",
            "Serving dagster-webserver on http://127.0.0.1:3000 in process 42",
            "dagster - ERROR - ingest_job - 1a2b - STEP_FAILURE - boom"]
    script = "import sys\n" + "".join(f"print({line!r}, flush=True)\n" for line in (queue, keep[0], queue, keep[1])) \
        + f"print({keep[2]!r}, file=sys.stderr)\nsys.exit(3)\n"
    out = io.StringIO()
    child = cli.Supervised([sys.executable, "-c", script], dict(os.environ), cwd=tmp_path, drop=cli.is_noise, out=out)
    assert child.tend() == "started"
    child.proc.wait(timeout=30)
    child.relay.join(timeout=10)
    assert out.getvalue().splitlines() == keep
    assert child.tend().startswith("exited with code 3")
    assert cli.is_noise(queue) and not any(cli.is_noise(line) for line in keep)


def test_a_server_that_is_alive_but_silent_is_started_again(tmp_path, monkeypatch):
    """`up` probes the API: stopped with SIGSTOP (alive, not answering), it fails the probe three
    times in a row, is stopped and started again, and answers again."""
    import signal

    from stream_sentinel import cli
    from stream_sentinel.devtools.kafka_broker import free_port

    monkeypatch.setattr(cli.Supervised, "PROBE_GRACE_S", 0.0)
    monkeypatch.setattr(cli.Supervised, "PROBE_EVERY_S", 0.2)
    (tmp_path / "healthz").write_text("ok")
    port = free_port()
    probe = cli._answers(f"http://127.0.0.1:{port}/healthz", timeout_s=0.5)
    child = cli.Supervised([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                           dict(os.environ), cwd=tmp_path, probe=probe)
    try:
        assert child.tend() == "started"
        deadline = time.monotonic() + 30
        while not probe():
            assert time.monotonic() < deadline and child.proc.poll() is None
            time.sleep(0.1)
        first = child.proc
        first.send_signal(signal.SIGSTOP)
        notes = []
        while child.proc is first:
            assert time.monotonic() < deadline + 30, notes
            notes.append(child.tend())
            time.sleep(0.1)
        assert any(n.startswith("alive but not answering (3 probes in a row)") for n in notes), notes
        assert first.poll() is not None  # stopped for good
        while child.tend() != "started again":
            assert time.monotonic() < deadline + 60
            time.sleep(0.2)
        while not probe():
            assert time.monotonic() < deadline + 90
            time.sleep(0.1)
    finally:
        if child.proc is not None:
            cli._stop_group(child.proc, grace_s=5)


def test_a_killed_up_takes_its_children_with_it(tmp_path):
    """`up` SIGKILLed: the children it supervises (each in its own session) get SIGTERM and
    exit, so the next `up` finds their ports free."""
    parent = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from stream_sentinel import cli
        child = cli.Supervised([sys.executable, "-c", "import time; time.sleep(120)"], {{}})
        child.tend()
        print(child.proc.pid, flush=True)
        time.sleep(120)
    """)
    up = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(up.stdout.readline())
        os.kill(pid, 0)  # running
        up.kill()
        up.wait(10)
        deadline = time.monotonic() + 10
        while _running(pid):
            assert time.monotonic() < deadline, "the child outlived its killed parent"
            time.sleep(0.1)
    finally:
        if up.poll() is None:
            up.kill()


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:  # a zombie (not reaped by init yet) has exited
            return fh.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_up_s_dagster_home_is_its_real_path(tmp_path):
    """`dagster dev` warns that "the dagster.yaml in the current folder will not be used" when
    its (real) working folder differs from DAGSTER_HOME, a symlink included: `up` gives it both
    as the resolved path."""
    from stream_sentinel import dagster_home as dh

    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert dh.prepare(tmp_path / "link" / "dagster") == (tmp_path / "real" / "dagster").resolve()


def test_the_instance_moves_to_postgresql_when_its_url_is_set(tmp_path, pg_database):
    """STREAM_SENTINEL_DAGSTER_PG_URL puts runs, event logs and schedules on a real PostgreSQL
    server; the instance file names the variable, never the URL (its password); a bare
    postgresql:// URL is refused with the fix; unset, the next prepare is back on SQLite."""
    import dagster as dg
    import yaml

    from stream_sentinel import dagster_home as dh
    from stream_sentinel.config import SettingError

    env = {dh.PG_URL_ENV: pg_database}
    home = dh.prepare(tmp_path / "dagster", env)
    text = (home / dh.INSTANCE_FILE).read_text()
    assert yaml.safe_load(text)["storage"] == {"postgres": {"postgres_url": {"env": dh.PG_URL_ENV}}}
    assert pg_database not in text and "host=" not in text

    @dg.asset
    def probe() -> int:
        return 1

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(dh.PG_URL_ENV, pg_database)
        with dg.DagsterInstance.from_config(str(home)) as inst:
            assert type(inst.run_storage).__name__ == "PostgresRunStorage"
            assert type(inst.event_log_storage).__name__ == "PostgresEventLogStorage"
            assert dg.materialize([probe], instance=inst).success
            assert inst.get_latest_materialization_event(probe.key) is not None
        with dg.DagsterInstance.from_config(str(home)) as again:  # a second process sees the same runs
            assert len(again.get_runs()) == 1

    secret = "postgresql://user:s3cret@db.example/dagster"
    with pytest.raises(SettingError, match=r"postgresql\+psycopg2://") as err:
        dh.prepare(tmp_path / "other", {dh.PG_URL_ENV: secret})
    assert "s3cret" not in str(err.value)
    home = dh.prepare(tmp_path / "dagster", {})
    assert "storage" not in yaml.safe_load((home / dh.INSTANCE_FILE).read_text())
