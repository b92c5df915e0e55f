"""Odd entries in raw/ and feedback/ (FIFOs, symlink loops, broken links, unreadable files)
never stop a scan: they are skipped without being opened, reported with a reason in
ScanResult.problems and scan_problems, and everything else is registered. Copies of
quarantined content are quarantined too."""

from __future__ import annotations

import json
import os
import threading

import pytest

from stream_sentinel import feedback_sources as fs
from stream_sentinel import ingest

from .conftest import drop, record


def _in_thread(fn, timeout_s: float = 30.0):
    """Run ``fn`` in a daemon thread: a scan that blocks on a FIFO fails the test instead of
    hanging it."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test below
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout_s)
    assert not t.is_alive(), "the scan hung (it opened a FIFO?)"
    if "error" in box:
        raise box["error"]
    return box["value"]


def _problems(store, area: str) -> dict[str, str]:
    with store.connect() as con:
        return dict(con.execute("SELECT path, reason FROM scan_problems WHERE area = ?", [area]).fetchall())


def _deny(monkeypatch, *denied):
    """Act as if these files had mode 000 (the tests run as root, who may read anything)."""
    real_open = os.open
    denied = {os.fspath(p) for p in denied}

    def fake_open(path, flags, *args, **kwargs):
        if os.fspath(path) in denied:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)
    return lambda: monkeypatch.setattr(os, "open", real_open)


def test_fifos_links_and_unreadable_files_in_raw_are_reported_and_the_rest_lands(paths, store, monkeypatch):
    drop(paths.raw, "good.jsonl", [record(1), record(2)])
    drop(paths.raw, "sub/also-good.json", [record(3)])
    os.mkfifo(paths.raw / "pipe.jsonl")
    os.mkfifo(paths.raw / "sub" / "pipe.json")
    os.mkfifo(paths.raw / "not-a-record-name")  # ignored like any other non-record file
    os.symlink("self.jsonl", paths.raw / "self.jsonl")  # a loop
    os.symlink("b.jsonl", paths.raw / "a.jsonl")  # a loop of two
    os.symlink("a.jsonl", paths.raw / "b.jsonl")
    os.symlink("..", paths.raw / "sub" / "up")  # a folder link inside raw/: never walked
    os.symlink("nowhere.jsonl", paths.raw / "gone.jsonl")  # broken
    locked = drop(paths.raw, "locked.jsonl", [record(4)])
    undeny = _deny(monkeypatch, locked)

    scan = _in_thread(lambda: ingest.scan(paths, store, debounce_s=1))

    assert len(scan.registered) == 2
    problems = dict(scan.problems)
    assert set(problems) == {"pipe.jsonl", "sub/pipe.json", "self.jsonl", "a.jsonl", "b.jsonl", "gone.jsonl",
                             "locked.jsonl"}
    assert "FIFO" in problems["pipe.jsonl"] and "not a regular file" in problems["sub/pipe.json"]
    assert problems["self.jsonl"] == problems["a.jsonl"] == "symlink loop"
    assert "broken symlink" in problems["gone.jsonl"] and "nowhere.jsonl" in problems["gone.jsonl"]
    assert problems["locked.jsonl"] == "cannot be read: permission denied"
    assert _problems(store, "raw") == problems
    assert store.status()["scan_problems"] == 7
    # the readable files go all the way
    outcomes = [o for b in ingest.plan_batches(store) for o in ingest.process_files(paths, store, list(b.files))]
    assert [o.status for o in outcomes] == ["processed", "processed"]
    assert store.status()["records"] == 3

    # problems are upserted while they last (first_seen kept) and leave once the path scans fine
    with store.connect() as con:
        first = dict(con.execute("SELECT path, first_seen FROM scan_problems").fetchall())
    undeny()  # the file is readable again
    os.unlink(paths.raw / "pipe.jsonl")
    os.unlink(paths.raw / "gone.jsonl")
    again = _in_thread(lambda: ingest.scan(paths, store, debounce_s=1))
    assert len(again.registered) == 1  # locked.jsonl, now readable
    assert set(_problems(store, "raw")) == {"sub/pipe.json", "self.jsonl", "a.jsonl", "b.jsonl"}
    with store.connect() as con:
        rows = con.execute("SELECT path, first_seen, last_seen FROM scan_problems").fetchall()
    assert all(seen0 == first[p] and seen1 >= seen0 for p, seen0, seen1 in rows)


def test_a_fifo_put_in_place_of_a_file_after_the_walk_does_not_block_the_hash(paths):
    os.mkfifo(paths.raw / "late.jsonl")
    with pytest.raises(ingest.NotRegularFile) as err:
        _in_thread(lambda: ingest.hash_file(paths.raw / "late.jsonl"))
    assert "FIFO" in ingest.read_problem(err.value)


def test_unreadable_folder_is_a_problem_not_a_crash(paths, store, monkeypatch):
    drop(paths.raw, "good.jsonl", [record(1)])
    drop(paths.raw, "private/secret.jsonl", [record(2)])
    real_scandir = os.scandir

    def fake_scandir(path="."):
        if os.fspath(path).endswith("private"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", fake_scandir)
    scan = ingest.scan(paths, store, debounce_s=1)
    assert len(scan.registered) == 1
    assert scan.problems == [("private", "folder cannot be listed: Permission denied")]


def test_feedback_scan_skips_fifos_loops_and_unreadable_files(paths, store, monkeypatch):
    vote = {"record_id": "r1", "label": "spam", "source": "alice", "ts": "2024-05-02T00:00:00Z"}
    drop(paths.feedback, "votes.jsonl", json.dumps(vote) + "\n")
    os.mkfifo(paths.feedback / "pipe.jsonl")
    os.symlink("loop.jsonl", paths.feedback / "loop.jsonl")
    os.symlink("votes.jsonl", paths.feedback / "alias.jsonl")  # a valid link: ignored, as ever
    locked = drop(paths.feedback, "locked.jsonl", json.dumps({**vote, "source": "bob"}) + "\n")
    undeny = _deny(monkeypatch, locked)

    pending = _in_thread(lambda: fs.scan_files(paths, store, debounce_s=1))

    assert len(pending) == 1
    problems = _problems(store, "feedback")
    assert set(problems) == {"pipe.jsonl", "loop.jsonl", "locked.jsonl"}
    assert "FIFO" in problems["pipe.jsonl"] and problems["loop.jsonl"] == "symlink loop"
    assert store.status()["scan_problems"] == 3
    assert fs.ingest_file(paths, store, pending[0], None)["status"] == "processed"
    undeny()
    os.unlink(paths.feedback / "pipe.jsonl")
    assert len(fs.scan_files(paths, store, debounce_s=1)) == 1  # locked.jsonl, readable now
    assert set(_problems(store, "feedback")) == {"loop.jsonl"}


def test_a_copy_of_quarantined_content_is_quarantined_too(paths, store):
    drop(paths.raw, "empty.json", "", age=3600)
    drop(paths.raw, "sub/also-empty.json", "", age=3600)  # registered as a duplicate in the same scan
    ingest.scan(paths, store, debounce_s=1)
    (out,) = [o for b in ingest.plan_batches(store) for o in ingest.process_files(paths, store, list(b.files))]
    assert out.status == "quarantined"
    first = out.path
    twin = "sub/also-empty.json" if first == "empty.json" else "empty.json"
    assert (paths.raw / twin).exists()  # it was a duplicate: nothing processed it
    scan = ingest.scan(paths, store, debounce_s=1)
    assert scan.quarantined == [twin]
    # and one dropped later
    drop(paths.raw, "later/empty.json", "", age=3600)
    assert ingest.scan(paths, store, debounce_s=1).quarantined == ["later/empty.json"]
    assert not [p for p in paths.raw.rglob("*") if p.is_file()]
    reports = [json.loads(p.read_text()) for p in paths.failed.rglob("*.error.json")]
    copies = sorted((r["file"], r["copy_of"], r["rule"]) for r in reports if "copy_of" in r)
    assert copies == sorted([(twin, first, "copy_of_quarantined"), ("later/empty.json", first, "copy_of_quarantined")])
    assert all("empty_file" in r["message"] for r in reports if "copy_of" in r)
    # every one kept byte for byte, each beside its own report
    moved = sorted(p for p in paths.failed.rglob("*") if p.is_file() and not p.name.endswith(".error.json"))
    assert len(moved) == 3 and all(p.read_bytes() == b"" for p in moved)
    assert all(p.with_name(p.name + ".error.json").exists() for p in moved)
    assert ingest.scan(paths, store, debounce_s=1).quarantined == []


def test_status_counts_quarantined_feedback_files_and_shows_scan_problems(paths, store):
    from stream_sentinel.status import collect_status

    drop(paths.feedback, "garbage.jsonl", "not json\nstill not\n")
    drop(paths.feedback, "copy.jsonl", "not json\nstill not\n", age=0)  # same bytes, dropped later
    os.mkfifo(paths.feedback / "pipe.jsonl")
    (sha,) = fs.scan_files(paths, store, debounce_s=1)
    assert fs.ingest_file(paths, store, sha, None)["status"] == "quarantined"
    old = os.path.getmtime(paths.feedback / "copy.jsonl") - 30
    os.utime(paths.feedback / "copy.jsonl", (old, old))
    assert fs.scan_files(paths, store, debounce_s=1) == []
    assert not (paths.feedback / "copy.jsonl").exists()  # quarantined as a copy
    report = json.loads(next(paths.failed.glob("feedback/*/copy.jsonl.error.json")).read_text())
    assert report["copy_of"] == "feedback/garbage.jsonl" and "invalid_json" in report["message"]
    status = collect_status(paths)
    assert status["quarantined_feedback_files"] == 1  # one content; its copy was moved beside it
    assert status["scan_problems"] == 1
    assert "FIFO" in status["scan_problem_paths"]["feedback/pipe.jsonl"]
