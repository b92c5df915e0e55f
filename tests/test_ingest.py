"""raw/ -> DuckDB on a real DuckDB file: registry, batching, idempotency, quarantine."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from datetime import datetime, timezone

import duckdb

from stream_sentinel import ingest
from stream_sentinel.store import Store

from .conftest import drop, record


def _ingest_all(paths, store):
    ingest.scan(paths, store, debounce_s=1)
    outcomes = []
    for batch in ingest.plan_batches(store):
        outcomes += [ingest.process_file(paths, store, sha) for sha in batch.files]
    return outcomes


def _count(store, sql="SELECT count(*) FROM records"):
    with store.connect() as con:
        return con.execute(sql).fetchone()[0]


def test_valid_and_invalid_records_land_in_their_tables(paths, store):
    drop(paths.raw, "a.jsonl", [record(1), {"id": "x", "text": "t"}, record(2, label="spam", source="crm")])
    (out,) = _ingest_all(paths, store)
    assert (out.status, out.ingested, out.rejected) == ("processed", 2, 1)
    with store.connect() as con:
        rows = con.execute("SELECT id, vec_id, label, extra FROM records ORDER BY id").fetchall()
        rej = con.execute("SELECT file_path, position, record_id, rule FROM rejects").fetchall()
    assert [r[0] for r in rows] == ["r1", "r2"]
    assert len({r[1] for r in rows}) == 2  # stable, distinct int64 ids
    assert json.loads(rows[1][2]) == "spam" and json.loads(rows[1][3]) == {"source": "crm"}
    assert rej == [("a.jsonl", "line 2", "x", "missing_event_time")]


def test_same_content_under_another_name_is_a_duplicate_and_adds_nothing(paths, store):
    drop(paths.raw, "a.jsonl", [record(1), record(2)])
    drop(paths.raw, "sub/copy-of-a.jsonl", [record(1), record(2)])
    scan = ingest.scan(paths, store, debounce_s=1)
    assert len(scan.registered) == 1 and len(scan.duplicates) == 1
    for b in ingest.plan_batches(store):
        for sha in b.files:
            ingest.process_file(paths, store, sha)
    assert _count(store) == 2
    assert store.status()["duplicate_files"] == 1
    # a later scan neither re-registers nor re-batches anything
    assert ingest.scan(paths, store, debounce_s=1).registered == []
    assert ingest.plan_batches(store) == []


def test_files_still_being_written_wait_for_the_debounce_window(paths, store):
    drop(paths.raw, "fresh.jsonl", [record(1)], age=0)
    scan = ingest.scan(paths, store, debounce_s=5)
    assert scan.registered == [] and scan.unstable == ["fresh.jsonl"]
    old = time.time() - 10
    os.utime(paths.raw / "fresh.jsonl", (old, old))
    assert len(ingest.scan(paths, store, debounce_s=5).registered) == 1


def test_hidden_temp_files_and_symlinks_out_of_raw_are_ignored(paths, store, tmp_path):
    outside = drop(tmp_path / "elsewhere", "secret.jsonl", [record(9)])
    os.symlink(outside, paths.raw / "link.jsonl")
    os.symlink(tmp_path / "elsewhere", paths.raw / "linkdir")
    drop(paths.raw, ".upload.jsonl.tmp", [record(8)])
    drop(paths.raw, "notes.txt", "hello")
    inside = drop(paths.raw, "real.jsonl", [record(1)])
    os.symlink(inside, paths.raw / "alias.jsonl")  # inside raw/: same content -> duplicate
    scan = ingest.scan(paths, store, debounce_s=1)
    assert sorted(scan.skipped_links) == ["link.jsonl", "linkdir"]
    assert len(scan.registered) == 1
    assert len(scan.duplicates) == 1 and scan.duplicates[0] in ("real.jsonl", "alias.jsonl")
    with store.connect() as con:
        assert con.execute("SELECT count(*) FROM file_paths WHERE path LIKE '%secret%' OR path LIKE '.%'"
                           ).fetchone()[0] == 0


def test_reprocessing_a_file_is_idempotent(paths, store):
    drop(paths.raw, "a.jsonl", [record(1), record(2), {"id": "bad"}])
    (out,) = _ingest_all(paths, store)
    again = ingest.process_file(paths, store, out.sha256)
    assert (again.ingested, again.skipped, again.rejected) == (0, 2, 1)
    assert _count(store) == 2
    assert _count(store, "SELECT count(*) FROM rejects") == 1


def test_duplicate_id_with_other_content_is_rejected_and_identical_one_skipped(paths, store):
    drop(paths.raw, "a.jsonl", [record(1), record(2)])
    _ingest_all(paths, store)
    drop(paths.raw, "b.jsonl", [record(1), record(2, text="changed"), record(3), record(3, text="changed too")])
    (out,) = _ingest_all(paths, store)
    assert (out.ingested, out.skipped, out.rejected) == (1, 1, 2)
    with store.connect() as con:
        rules = con.execute("SELECT record_id, rule FROM rejects ORDER BY position").fetchall()
        text = con.execute("SELECT text FROM records WHERE id='r2'").fetchone()[0]
    assert rules == [("r2", "duplicate_id"), ("r3", "duplicate_id")]
    assert text == "record number 2"  # the first version stays


def test_unparseable_file_is_quarantined_with_a_readable_error(paths, store):
    drop(paths.raw, "good.jsonl", [record(1)])
    # cut short at the end, and older than the settle window: its writer is long gone
    drop(paths.raw, "sub/broken.json", '[{"id": "a", "text": "t", "event_time": "2024-01-01"},\n{"id": ',
         age=3600)
    outcomes = {o.path: o for o in _ingest_all(paths, store)}
    assert outcomes["good.jsonl"].status == "processed"
    bad = outcomes["sub/broken.json"]
    assert bad.status == "quarantined"
    assert not (paths.raw / "sub/broken.json").exists()
    (moved,) = [p for p in paths.failed.rglob("broken.json")]
    report = json.loads(moved.with_name("broken.json.error.json").read_text())
    assert report["file"] == "sub/broken.json" and report["rule"] == "invalid_json" and report["line"] == 2
    assert moved.read_text().startswith('[{"id": "a"')  # the input is kept byte for byte
    assert moved.parent.name == datetime.now(timezone.utc).date().isoformat()
    assert store.status()["quarantined_files"] == 1
    assert _count(store) == 1  # nothing from the broken file, the good one is in


def test_crash_between_quarantine_move_and_database_update_recovers(paths, store):
    drop(paths.raw, "broken.json", "{nope")
    ingest.scan(paths, store, debounce_s=1)
    (batch,) = ingest.plan_batches(store)
    sha = batch.files[0]
    from stream_sentinel.records import FileUnparseable

    # do the file moves of a quarantine, then "crash" before the database update
    ingest._quarantine(paths, paths.raw / "broken.json", "broken.json", sha,
                       FileUnparseable("invalid_json", "x", 1), ingest.utcnow())
    assert _count(store, "SELECT count(*) FROM files WHERE status='quarantined'") == 0
    out = ingest.process_file(paths, store, sha)
    assert out.status == "quarantined"
    assert store.status()["quarantined_files"] == 1


def test_batches_respect_file_and_record_caps_and_have_stable_run_keys(paths, store):
    for i in range(7):
        drop(paths.raw, f"f{i}.jsonl", [record(f"{i}-{j}") for j in range(10)])
    ingest.scan(paths, store, debounce_s=1)
    batches = ingest.plan_batches(store, max_files=3, max_records=1000)
    assert [len(b.files) for b in batches] == [3, 3, 1]
    assert len({b.run_key for b in batches}) == 3
    assert all(b.run_key.startswith(f"raw:{b.partition_key}:") for b in batches)
    assert ingest.batches_after(store, batches[0].seq) == batches[1:]
    # record cap: ~10 records per file, cap 25 -> 2 files per batch
    drop(paths.raw, "g1.jsonl", [record(f"g1-{j}") for j in range(10)])
    drop(paths.raw, "g2.jsonl", [record(f"g2-{j}") for j in range(10)])
    drop(paths.raw, "g3.jsonl", [record(f"g3-{j}") for j in range(10)])
    ingest.scan(paths, store, debounce_s=1)
    assert [len(b.files) for b in ingest.plan_batches(store, max_files=100, max_records=25)] == [2, 1]



def unplanned(store) -> int:
    with store.connect() as con:
        return con.execute("SELECT count(*) FROM files WHERE status = 'pending'").fetchone()[0]


def test_under_a_backlog_the_sensor_plans_only_full_batches(paths, store):
    """The partial tail of a backlog waits to grow (the sensor plans again once the full
    batches have started), unless it is all there is or an older partition's remainder."""
    day1, day2 = datetime(2025, 3, 4, 12, tzinfo=timezone.utc), datetime(2025, 3, 5, 12, tzinfo=timezone.utc)
    for i in range(4):
        drop(paths.raw, f"a{i}.jsonl", [record(f"a{i}-{j}") for j in range(10)])
    ingest.scan(paths, store, debounce_s=1, now=day1)
    for i in range(7):
        drop(paths.raw, f"b{i}.jsonl", [record(f"b{i}-{j}") for j in range(10)])
    ingest.scan(paths, store, debounce_s=1, now=day2)
    planned = ingest.plan_batches(store, max_files=3, max_records=1000, tail_waits=True)
    # day 1: 3 + its remainder 1 (no later file can join an older day); day 2: 3 + 3, tail of 1 waits
    assert [(b.partition_key, len(b.files)) for b in planned] == [
        ("2025-03-04", 3), ("2025-03-04", 1), ("2025-03-05", 3), ("2025-03-05", 3)]
    assert unplanned(store) == 1
    drop(paths.raw, "b7.jsonl", [record(f"b7-{j}") for j in range(10)])
    ingest.scan(paths, store, debounce_s=1, now=day2)
    (grown,) = ingest.plan_batches(store, max_files=3, max_records=1000, tail_waits=True)
    assert (grown.partition_key, len(grown.files)) == ("2025-03-05", 2)  # the tail alone is planned
    assert unplanned(store) == 0

def test_arrival_date_is_the_partition(paths, store):
    drop(paths.raw, "old.jsonl", [record(1)])
    ingest.scan(paths, store, debounce_s=1, now=datetime(2025, 3, 4, 23, 59, tzinfo=timezone.utc))
    (batch,) = ingest.plan_batches(store)
    assert batch.partition_key == "2025-03-04"
    assert ingest.files_for_partition(store, "2025-03-04") == list(batch.files)
    ingest.process_file(paths, store, batch.files[0])
    assert ingest.partition_record_count(store, "2025-03-04") == 1


def _hold_lock(db, ready, release):
    con = duckdb.connect(db)
    ready.set()
    release.wait(30)
    time.sleep(0.5)
    con.close()


def test_store_waits_for_another_process_holding_the_database(paths, store):
    ctx = mp.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold_lock, args=(str(paths.db), ready, release))
    proc.start()
    try:
        assert ready.wait(30)
        release.set()  # the holder lets go ~0.5 s later; connect() must wait, not fail
        with Store(paths.db, lock_timeout_s=30).connect() as con:
            assert con.execute("SELECT 1").fetchone() == (1,)
    finally:
        proc.join(30)


def test_schema_is_created_once_when_threads_race(tmp_path):
    import threading

    db = tmp_path / "fresh.duckdb"
    errors = []

    def init():
        try:
            Store(db).init()
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=init) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert _count(Store(db)) == 0


def test_embedding_overlaps_writes_and_a_failed_chunk_loses_nothing(paths, store, embedder, monkeypatch):
    """The model runs in a worker thread while the previous chunk is written: each stored vector
    must still belong to its own record, and a failure part-way keeps what was written."""
    import numpy as np

    from stream_sentinel import pipeline

    drop(paths.raw, "a.jsonl", [record(i, text=f"message number {i} about {'spam' if i % 2 else 'linux'}")
                                for i in range(11)])
    _ingest_all(paths, store)
    monkeypatch.setattr(pipeline, "EMBED_CHUNK", 3)

    class FailsOnThirdChunk:
        model_id, dim = embedder.model_id, embedder.dim

        def __init__(self):
            self.calls = 0

        def embed(self, texts):
            self.calls += 1
            if self.calls == 3:
                raise RuntimeError("the model crashed")
            return embedder.embed(texts)

    try:
        pipeline.embed_partition(store, FailsOnThirdChunk(), None)
    except RuntimeError as exc:
        assert "crashed" in str(exc)
    else:
        raise AssertionError("the failure was swallowed")
    assert _count(store, "SELECT count(*) FROM embeddings") == 6  # chunks 1 and 2 are kept
    result = pipeline.embed_partition(store, embedder, None)
    assert (result.embedded, result.already) == (5, 6)
    with store.connect() as con:
        rows = con.execute("""SELECT r.text, e.vector FROM embeddings e JOIN records r ON r.id = e.record_id
                              ORDER BY r.id""").fetchall()
    assert len(rows) == 11
    stored = np.array([v for _, v in rows], dtype=np.float32)
    direct = embedder.embed([t for t, _ in rows])
    assert np.sum(stored * direct, axis=1).min() > 0.999  # every vector is its own record's


def test_a_group_of_files_lands_exactly_as_file_by_file(tmp_path, monkeypatch):
    """process_files (one transaction per group) against process_file (one per file) on twin
    data roots: same rows, vec_id order, rejects, statuses and quarantines; large and broken
    files inside the group keep their place in the order."""
    from stream_sentinel.config import Paths

    monkeypatch.setattr(ingest, "CHUNK_RECORDS", 4)  # "large" = over 4 records
    day = datetime(2025, 3, 4, 12, tzinfo=timezone.utc)

    def world(name):
        paths = Paths.at(tmp_path / name)
        drop(paths.raw, "a.jsonl", [record(1), {"id": "x", "text": "no time"}, record(2)])
        drop(paths.raw, "b.jsonl", [record(2), record(3)])  # r2 again, same content: skipped
        drop(paths.raw, "c.jsonl", [record(i) for i in range(10, 16)])  # large: streamed alone
        drop(paths.raw, "d.jsonl", "{not json\n{nor this\n")  # unparseable: quarantined
        drop(paths.raw, "e.jsonl", [record(3, text="other words"), record(11, text="changed")])  # conflicts
        drop(paths.raw, "f.json", [record(20)])
        store = Store(paths.home / "metrics.duckdb")
        ingest.scan(paths, store, debounce_s=1, now=day)
        with store.connect() as con:
            shas = [r[0] for r in con.execute("SELECT sha256 FROM files ORDER BY path").fetchall()]
        return paths, store, shas

    p1, s1, shas = world("one_by_one")
    p2, s2, shas2 = world("grouped")
    assert shas == shas2
    singles = [ingest.process_file(p1, s1, sha) for sha in shas]
    grouped = ingest.process_files(p2, s2, shas)
    assert [(o.path, o.status, o.ingested, o.skipped, o.rejected) for o in grouped] == \
           [(o.path, o.status, o.ingested, o.skipped, o.rejected) for o in singles]
    assert [o.status for o in grouped] == ["processed"] * 3 + ["quarantined"] + ["processed"] * 2

    def tables(store):
        with store.connect() as con:
            return (con.execute("SELECT id, vec_id, text, file_sha256, position FROM records ORDER BY vec_id").fetchall(),
                    con.execute("SELECT file_sha256, position, record_id, rule FROM rejects ORDER BY ALL").fetchall(),
                    con.execute("SELECT sha256, status, records_ingested, records_rejected, records_skipped "
                                "FROM files ORDER BY sha256").fetchall())

    assert tables(s2) == tables(s1)
    records, rejects, _ = tables(s2)
    assert {r[3] for r in rejects} == {"missing_event_time", "duplicate_id"}
    assert len(records) == 2 + 1 + 6 + 1
    assert sorted(p.name for p in p2.failed.rglob("*") if p.is_file()) == ["d.jsonl", "d.jsonl.error.json"]
    # replaying the group adds nothing
    again = ingest.process_files(p2, s2, shas)
    assert sum(o.ingested for o in again) == 0 and tables(s2)[0] == records


def test_a_large_file_is_committed_chunk_by_chunk_and_a_crash_resumes_exactly_once(paths, store, monkeypatch):
    """Killed between two chunk commits, twice, then run to the end: every record and every
    reject exactly once, with the file's counts as if nothing had happened."""
    import subprocess
    import sys

    from .conftest import kill_when_paused

    items = []
    for i in range(23):
        items.append(record(i) if i % 5 else {"id": f"bad{i}", "text": "no time"})  # 5 rejects, 18 records
    drop(paths.raw, "big.jsonl", items)
    ingest.scan(paths, store, debounce_s=1)
    (batch,) = ingest.plan_batches(store)
    (sha,) = batch.files
    child = [sys.executable, "-c",
             "import sys; from stream_sentinel import ingest; from stream_sentinel.config import Paths; "
             "from stream_sentinel.store import Store; ingest.CHUNK_RECORDS = 4; p = Paths.from_env(); "
             f"ingest.process_file(p, Store(p.db), {sha!r})"]

    def progress():
        with store.connect() as con:
            return (con.execute("SELECT items_done FROM file_progress").fetchall(),
                    con.execute("SELECT count(*) FROM records").fetchone()[0],
                    con.execute("SELECT count(*) FROM rejects").fetchone()[0])

    kill_when_paused(child, "ingest_between_chunks", paths.home / "paused-1")
    assert progress() == ([(4,)], 3, 1)  # one chunk of 4 items committed, with its resume point
    kill_when_paused(child, "ingest_between_chunks", paths.home / "paused-2")
    assert progress() == ([(8,)], 6, 2)  # resumed after it, killed after the next one
    monkeypatch.setattr(ingest, "CHUNK_RECORDS", 4)
    out = ingest.process_file(paths, store, sha)
    assert (out.status, out.ingested, out.skipped, out.rejected) == ("processed", 18, 0, 5)
    assert progress() == ([], 18, 5)
    with store.connect() as con:
        assert con.execute("SELECT count(DISTINCT id) FROM records").fetchone()[0] == 18
        assert con.execute("SELECT records_ingested, records_rejected, records_skipped FROM files").fetchone() == \
            (18, 5, 0)
    again = ingest.process_file(paths, store, sha)  # a replay of the whole file adds nothing
    assert (again.ingested, again.skipped, again.rejected) == (0, 18, 5)
    assert progress() == ([], 18, 5)
    assert subprocess.run(child, capture_output=True).returncode == 0  # and neither does a new process


def test_a_large_file_found_unparseable_after_some_chunks_adds_nothing(paths, store, monkeypatch):
    monkeypatch.setattr(ingest, "CHUNK_RECORDS", 3)
    body = json.dumps([record(i) for i in range(10)])[:-1] + ', {"id": oops}]'  # broken after 10 good items
    drop(paths.raw, "big.json", body, age=3600)
    ingest.scan(paths, store, debounce_s=1)
    (batch,) = ingest.plan_batches(store)
    (out,) = ingest.process_files(paths, store, list(batch.files))
    assert out.status == "quarantined"
    assert _count(store) == 0 and _count(store, "SELECT count(*) FROM file_progress") == 0
    assert (paths.failed / datetime.now(timezone.utc).date().isoformat() / "big.json").read_text() == body


def test_duckdb_out_of_memory_under_the_ingest_cap_lifts_the_cap_and_counts_stay_exact(paths, store, monkeypatch,
                                                                                    caplog):
    monkeypatch.setenv(ingest.DB_MEMORY_ENV, "1MB")  # far too small: DuckDB runs out at once
    monkeypatch.setattr(ingest, "CHUNK_RECORDS", 3)
    drop(paths.raw, "a.jsonl", [record(i) for i in range(8)] + [{"id": "bad"}])
    ingest.scan(paths, store, debounce_s=1)
    (batch,) = ingest.plan_batches(store)
    (out,) = ingest.process_files(paths, store, list(batch.files))
    assert "processing it again, from its last commit, without that cap" in caplog.text
    assert (out.status, out.ingested, out.skipped, out.rejected) == ("processed", 8, 0, 1)
    assert _count(store) == 8 and _count(store, "SELECT count(*) FROM rejects") == 1
    with store.connect() as con:
        assert con.execute("SELECT records_ingested, records_rejected FROM files").fetchone() == (8, 1)
        # and the limit is DuckDB's own again once the file is done
        assert con.execute("SELECT current_setting('memory_limit')").fetchone()[0] != "1.0 MiB"


def test_a_bad_memory_cap_setting_is_a_clear_error(paths, store, monkeypatch):
    import pytest

    monkeypatch.setenv(ingest.DB_MEMORY_ENV, "lots; DROP TABLE records")
    drop(paths.raw, "a.jsonl", [record(1)])
    ingest.scan(paths, store, debounce_s=1)
    (batch,) = ingest.plan_batches(store)
    with pytest.raises(ValueError, match="STREAM_SENTINEL_INGEST_DB_MEMORY"):
        ingest.process_file(paths, store, batch.files[0])
    assert _count(store, "SELECT count(*) FROM files WHERE status = 'batched'") == 1


def test_out_of_memory_in_the_middle_of_a_file_resumes_from_the_last_commit(paths, store, monkeypatch, caplog):
    import duckdb as ddb

    monkeypatch.setattr(ingest, "CHUNK_RECORDS", 3)
    drop(paths.raw, "a.jsonl", [record(i) for i in range(10)] + [{"id": "bad"}])
    ingest.scan(paths, store, debounce_s=1)
    (batch,) = ingest.plan_batches(store)
    real, calls = ingest._save_progress, []

    def second_chunk_runs_out(con, out, items_done):
        calls.append(items_done)
        if len(calls) == 2:
            raise ddb.OutOfMemoryException("Out of Memory Error: injected")
        real(con, out, items_done)

    monkeypatch.setattr(ingest, "_save_progress", second_chunk_runs_out)
    out = ingest.process_file(paths, store, batch.files[0])
    assert calls == [3, 6, 6, 9]  # the second chunk rolled back and was written again, once
    assert "without that cap" in caplog.text
    assert (out.status, out.ingested, out.skipped, out.rejected) == ("processed", 10, 0, 1)
    assert _count(store) == 10 and _count(store, "SELECT count(*) FROM rejects") == 1
