"""Writers that pause longer than the debounce window: a file that changes after it was
picked up is re-examined (superseded by its new content), never quarantined mid-write, and
an unfinished-looking end waits for the settle window instead of becoming a false reject."""

from __future__ import annotations

import json
import time

from stream_sentinel import ingest

from .conftest import drop, record

DEBOUNCE_S = 0.5


def _scan(paths, store):
    return ingest.scan(paths, store, debounce_s=DEBOUNCE_S)


def _run(paths, store):
    """What the sensor and a run do: plan the pending files, ingest each batch."""
    return [o for b in ingest.plan_batches(store) for o in ingest.process_files(paths, store, list(b.files))]


def _pause():
    time.sleep(DEBOUNCE_S + 0.3)  # longer than the debounce: the scan takes the half-written file


def _one(store, sql):
    with store.connect() as con:
        return con.execute(sql).fetchall()


def _failed(paths):
    return [p for p in paths.failed.rglob("*") if p.is_file()]


def test_json_writer_that_pauses_is_not_quarantined_and_its_bytes_stay_in_raw(paths, store):
    path = paths.raw / "slow.json"
    text = json.dumps([record(i) for i in range(6)])
    cut = text.index('{"id": "r3"') + 12  # in the middle of a record
    with open(path, "w") as writer:
        writer.write(text[:cut])
        writer.flush()
        _pause()
        assert len(_scan(paths, store).registered) == 1
        (out,) = _run(paths, store)
        assert out.status == "waiting" and "ends too early" in out.error
        assert path.exists() and _failed(paths) == []  # not moved away from under the writer
        assert store.status()["waiting_files"] == 1
        writer.write(text[cut:])  # the writer goes on; its bytes land in raw/
    assert json.loads(path.read_text()) == [record(i) for i in range(6)]
    _pause()
    scan = _scan(paths, store)
    assert scan.superseded == ["slow.json"] and len(scan.registered) == 1
    (out,) = _run(paths, store)
    assert (out.status, out.ingested, out.rejected) == ("processed", 6, 0)
    assert _one(store, "SELECT count(*), count(DISTINCT id) FROM records") == [(6, 6)]
    assert _one(store, "SELECT count(*) FROM rejects") == [(0,)]
    assert _one(store, "SELECT status FROM files ORDER BY arrived_at") == [("superseded",), ("processed",)]
    assert _failed(paths) == [] and store.status()["quarantined_files"] == 0


def test_a_file_that_changed_after_it_was_registered_is_superseded_not_quarantined(paths, store):
    path = paths.raw / "slow.json"
    text = json.dumps([record(i) for i in range(4)])
    with open(path, "w") as writer:
        writer.write(text[:30])
        writer.flush()
        _pause()
        assert len(_scan(paths, store).registered) == 1
        writer.write(text[30:-1])  # more bytes, still no closing bracket, before the run reads it
        writer.flush()
        (out,) = _run(paths, store)
        assert out.status == "superseded" and "changed after it was registered" in out.error
        assert path.exists() and _failed(paths) == []
        writer.write(text[-1:])
    _pause()
    assert len(_scan(paths, store).registered) == 1
    (out,) = _run(paths, store)
    assert (out.status, out.ingested) == ("processed", 4)
    assert store.status()["superseded_files"] == 1


def test_jsonl_writer_that_pauses_mid_line_leaves_no_false_reject_and_no_duplicate(paths, store):
    path = paths.raw / "slow.jsonl"
    lines = [json.dumps(record(i)) + "\n" for i in range(6)]
    with open(path, "w") as writer:
        writer.write("".join(lines[:3]) + lines[3][:20])
        writer.flush()
        _pause()
        assert len(_scan(paths, store).registered) == 1
        (first,) = _run(paths, store)
        assert (first.status, first.ingested, first.rejected) == ("waiting", 3, 0)
        assert "line 4 has no newline after it" in first.error
        assert _one(store, "SELECT count(*) FROM rejects") == [(0,)]
        writer.write(lines[3][20:] + "".join(lines[4:]))
    _pause()
    scan = _scan(paths, store)
    assert scan.superseded == ["slow.jsonl"] and len(scan.registered) == 1
    (done,) = _run(paths, store)
    # the first version's records are in once: the completed file skips them as identical
    assert (done.status, done.ingested, done.skipped, done.rejected) == ("processed", 3, 3, 0)
    assert _one(store, "SELECT count(*), count(DISTINCT id) FROM records") == [(6, 6)]
    assert _one(store, "SELECT count(*) FROM rejects") == [(0,)]


def test_an_unfinished_end_is_judged_as_usual_once_the_settle_window_has_passed(paths, store, monkeypatch):
    monkeypatch.setenv(ingest.SETTLE_ENV, "60")
    lines = "".join(json.dumps(record(i)) + "\n" for i in range(3)) + '{"id": "r9", "te'
    drop(paths.raw, "cut.jsonl", lines, age=2)
    drop(paths.raw, "cut.json", '[{"id": "a", "text": "t", "event_time": "2024-01-01"}, {"id": ', age=2)
    drop(paths.raw, "broken.json", '{"id": oops}', age=2)  # broken, not unfinished: no waiting
    ingest.scan(paths, store, debounce_s=DEBOUNCE_S)
    (batch,) = ingest.plan_batches(store)
    first = {o.path: o for o in ingest.process_files(paths, store, list(batch.files))}
    assert {p: o.status for p, o in first.items()} == {"cut.jsonl": "waiting", "cut.json": "waiting",
                                                       "broken.json": "quarantined"}
    assert sorted(_scan(paths, store).waiting) == ["cut.json", "cut.jsonl"]
    assert ingest.plan_batches(store) == []  # waiting files are not planned
    monkeypatch.setenv(ingest.SETTLE_ENV, "1")  # the window has passed; the files did not change
    assert _scan(paths, store).waiting == []
    (again,) = ingest.plan_batches(store)
    assert again.run_key != batch.run_key  # a new run key: Dagster would drop a repeated one
    second = {o.path: o for o in ingest.process_files(paths, store, list(again.files))}
    # counts are the file's: its first 3 records went in on the first pass, and only then
    assert (second["cut.jsonl"].status, second["cut.jsonl"].ingested, second["cut.jsonl"].skipped,
            second["cut.jsonl"].rejected) == ("processed", 3, 0, 1)
    assert second["cut.json"].status == "quarantined"
    assert _one(store, "SELECT position, rule FROM rejects") == [("line 4", "invalid_json")]
    assert _one(store, "SELECT count(*) FROM records") == [(3,)]
    assert _one(store, "SELECT count(*) FROM file_progress") == [(0,)]


def test_a_json_document_with_a_real_error_is_not_taken_for_an_unfinished_one():
    assert ingest._ends_mid_value('[{"id": "a"}, {"id": ')
    assert ingest._ends_mid_value('[{"id": "a"}, {"text": "half a sent')
    assert ingest._ends_mid_value('{"id": "a", "n": 12')
    assert ingest._ends_mid_value('{"id": "a", "ok": tr')
    assert ingest._ends_mid_value('{"a": 1}\n{"b": ')
    assert not ingest._ends_mid_value('{{{')
    assert not ingest._ends_mid_value('{"id": oops}')
    assert not ingest._ends_mid_value('[{"id": "a"}] trailing')
    assert not ingest._ends_mid_value('{"a": "line\nbreak')
