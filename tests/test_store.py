"""The DuckDB connection model: one database instance per file and process, a cursor per
thread, the file released as soon as the last user leaves."""

from __future__ import annotations

import subprocess
import sys
import threading

from stream_sentinel.store import Store


def _hammer(store: Store, n: int, errors: list, worker: int) -> None:
    try:
        for i in range(n):
            with store.connect(timeout_s=30) as con:
                con.execute("SELECT count(*) FROM files").fetchone()
            with store.transaction(timeout_s=30) as con:
                con.execute("INSERT INTO kafka_lag VALUES (?, ?, 1, 1, 0, now()) ON CONFLICT DO NOTHING",
                            [f"t{worker}", i])
    except Exception as exc:  # noqa: BLE001 - collected and asserted below
        errors.append(repr(exc))


def test_threads_share_one_instance_without_handle_conflicts(paths):
    """Sensor ticks run in the daemon's threads. Opening the same file from several threads at
    once failed at random with `Unique file handle conflict: Cannot attach "metrics"`."""
    store = Store(paths.db)
    errors: list[str] = []
    threads = [threading.Thread(target=_hammer, args=(store, 40, errors, w)) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with store.connect() as con:
        assert con.execute("SELECT count(*) FROM kafka_lag").fetchone()[0] == 6 * 40


def test_file_is_released_after_the_last_user(paths):
    """Another process (a run worker, the CLI) can open the file once this process is done
    with it: the shared instance must not stay open."""
    store = Store(paths.db).init()
    with store.session():
        with store.connect() as con:
            con.execute("SELECT 1").fetchone()
    probe = (
        "import duckdb, sys; con = duckdb.connect(sys.argv[1]); "
        "print(con.execute('SELECT count(*) FROM files').fetchone()[0])")
    out = subprocess.run([sys.executable, "-c", probe, str(paths.db)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0"


def test_session_spans_threads(paths):
    """Inside a session every thread of the process gets a cursor of the held instance (no
    second open), so a learning step's helper threads never wait on their own process."""
    store = Store(paths.db).init()
    seen = []
    with store.session():
        def worker():
            with store.connect(timeout_s=5) as con:
                seen.append(con.execute("SELECT count(*) FROM records").fetchone()[0])
        t = threading.Thread(target=worker)
        t.start()
        t.join()
    assert seen == [0]


def test_the_stamp_changes_with_every_write_and_never_with_a_read(paths):
    """A poller (the API's background thread) opens the file only after a write (store.ChangeWatch):
    an open and close cost ~40 ms of CPU, taken from the model at every poll."""
    from stream_sentinel.store import ChangeWatch

    store = Store(paths.db).init()
    before = store.stamp()
    for _ in range(3):
        with store.connect() as con:
            con.execute("SELECT count(*) FROM files").fetchone()
    assert store.stamp() == before
    watch = ChangeWatch(max_age_s=3600)
    assert watch.changed(before)  # never read
    watch.read(before)
    assert not watch.changed(store.stamp())
    # a write by another process, which commits to the write-ahead log or the file
    probe = ("import duckdb, sys; con = duckdb.connect(sys.argv[1]); "
             "con.execute(\"INSERT INTO kafka_lag VALUES ('t', 0, 1, 1, 0, now())\"); con.close()")
    out = subprocess.run([sys.executable, "-c", probe, str(paths.db)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert watch.changed(store.stamp())
    # and after max_age_s a read is due anyway
    watch = ChangeWatch(max_age_s=0.0)
    watch.read(store.stamp())
    assert watch.changed(store.stamp())
    assert Store("postgresql+psycopg2://u@h/db").stamp() is None  # no stamp: every poll reads
