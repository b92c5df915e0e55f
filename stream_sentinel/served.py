"""The prediction log: every answer the API gave, appended to files, loaded into DuckDB.

The API never writes DuckDB on a request (a run may hold it for minutes). It appends one
JSON line per answer (the served one and the other model's shadow answer) to
``served/<day>/<process>.jsonl`` in the data root; ``served_predictions_sensor`` starts a
run that loads the lines no run has loaded into ``served_predictions``. So A/B arms, live
accuracy and drift see real traffic, and feedback sent later for an id joins by that id.

Exactly once: each file's cursor (bytes loaded) is stored in the same transaction as its
rows, and only whole lines (up to the last newline) are read, so a line being written, a
killed run or two runs at once never load a line twice or lose one. A line that is not a
valid answer is kept byte for byte in ``served_rejects`` with the rule it broke. A tail
without its newline that has not grown for ``TORN_AFTER_S`` is what a killed or failed
write left (a live API writes whole lines in one call): it is kept there too, rule
``torn_line``, and loading goes on past it.

Durability: lines reach the kernel with one ``write`` per request (a killed API loses none
of them) and disk with an ``fsync`` by the API's background thread every ``SYNC_EVERY_S`` (a
machine that loses power can lose the last seconds of the log, never a line in part). Not
more often: while an fsync runs, the kernel holds appends to the file, so each one stalls
every request (at 0.5 s, a quarter of the API's busy time at concurrency 32 was requests
waiting for it, sampled by py-spy).
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from .atomic import fsync_path
from .records import is_utf8
from .store import Store

SERVED_DIR = "served"
MAX_READ_BYTES = 32 << 20  # per file and run: a long backlog loads over several runs
SYNC_EVERY_S = 2.0  # the log's fsync interval (see the module's docstring)
TORN_AFTER_S = 120.0  # an unterminated tail this old is a torn write, not one in progress
FIELDS = {"request_id": str, "record_id": str, "routing_key": str, "model_version": str, "role": str,
          "served": bool, "probability": float, "label": str, "input": str, "served_at": str, "i": int}
ROLES = ("champion", "challenger")


def folder(root: Path) -> Path:
    return Path(root) / SERVED_DIR


class PredictionLog:
    """Append-only JSONL of one API process: a new file per day and per process start."""

    def __init__(self, root: Path):
        self.folder = folder(root)
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._day: str | None = None
        self._dirty = False
        self._next_sync = 0.0
        self._tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.lines = 0

    def _open(self, day: str) -> int:
        # detached first: whatever fails below, no stale descriptor number is kept (the next
        # append would fsync and close, or write into, whatever file got that number since)
        old, self._fd, self._day = self._fd, None, None
        if old is not None:
            try:
                os.fsync(old)
            finally:
                os.close(old)
        path = self.folder / day / f"{self._tag}.jsonl"
        if not path.parent.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fsync_path(path.parent.parent)  # the day's folder survives a power cut ...
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        fsync_path(path.parent)  # ... and the file's name in it, not only its bytes
        self._day = day
        return self._fd

    def append(self, rows: list[dict]) -> None:
        if not rows:
            return
        data = "".join(json.dumps(r, separators=(",", ":"), allow_nan=False) + "\n" for r in rows).encode()
        day = datetime.now(timezone.utc).strftime("%Y-%m-%d")
        with self._lock:
            fd = self._fd if day == self._day and self._fd is not None else self._open(day)
            view = memoryview(data)
            try:
                while view:  # a regular file takes it in one write; loop for the rare short write
                    view = view[os.write(fd, view):]
            except OSError:  # a full disk: no fragment left to merge with the next request's line
                if len(view) < len(data):
                    os.ftruncate(fd, os.fstat(fd).st_size - (len(data) - len(view)))
                raise
            self._dirty = True
            self.lines += len(rows)

    def sync(self, force: bool = False) -> None:
        """fsync, at most every ``SYNC_EVERY_S`` unless ``force``; outside the lock, on a
        duplicate of the descriptor, so a day's switch or ``close`` may happen meanwhile."""
        with self._lock:
            if self._fd is None or not self._dirty or (not force and time.monotonic() < self._next_sync):
                return
            fd = os.dup(self._fd)
            self._dirty = False
            self._next_sync = time.monotonic() + SYNC_EVERY_S
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.fsync(self._fd)
                os.close(self._fd)
                self._fd = None


# ------------------------------------------------------------------ loading
def files(root: Path) -> list[Path]:
    base = folder(root)
    return sorted(p for p in base.glob("*/*.jsonl") if p.is_file()) if base.exists() else []


def _cursors(root: Path, store: Store) -> dict[str, tuple[int, int]]:
    """(bytes loaded, size) of each file (relative path) that has bytes not loaded yet."""
    found = {str(p.relative_to(folder(root))): p.stat().st_size for p in files(root)}
    if not found:
        return {}
    with store.connect() as con:
        done = dict(con.execute("SELECT path, bytes_done FROM served_files").fetchall())
    return {f: (done.get(f, 0), size) for f, size in found.items() if size > done.get(f, 0)}


def _has_whole_line(path: Path, start: int) -> bool:
    with open(path, "rb") as fh:
        fh.seek(start)
        while chunk := fh.read(1 << 20):
            if b"\n" in chunk:
                return True
    return False


def _torn(path: Path, now: float | None = None) -> bool:
    """The file's unterminated tail has not grown for ``TORN_AFTER_S``: a torn write."""
    return path.stat().st_mtime < (time.time() if now is None else now) - TORN_AFTER_S


def unread(root: Path, store: Store) -> dict[str, int]:
    """Bytes not loaded yet, per file (relative path), for files with at least one whole line
    or a torn tail among them: a line in the middle of its write is not work yet (a sensor
    that counted it would start a run every tick that loads nothing)."""
    base = folder(root)
    return {f: size - start for f, (start, size) in _cursors(root, store).items()
            if _has_whole_line(base / f, start) or _torn(base / f)}


def check(obj) -> str | None:
    """The rule a logged answer breaks, or None."""
    if not isinstance(obj, dict):
        return "not_an_object"
    for name, kind in FIELDS.items():
        value = obj.get(name)
        if kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not 0.0 <= value <= 1.0:
                return f"bad_{name}"
        elif kind is int:
            if isinstance(value, bool) or not isinstance(value, int):
                return f"bad_{name}"
        elif not isinstance(value, kind):
            return f"bad_{name}"
        elif kind is str and not is_utf8(value):  # a lone surrogate: DuckDB would refuse the whole chunk
            return "invalid_unicode"
    if obj["role"] not in ROLES:
        return "bad_role"
    try:
        datetime.fromisoformat(obj["served_at"])
    except ValueError:
        return "bad_served_at"
    return None


def ingest(root: Path, store: Store) -> dict:
    """Load every whole line not loaded yet; returns counts."""
    from .ingest import _erased
    loaded = rejected = 0
    todo = _cursors(root, store)
    for rel, (start, _) in sorted(todo.items()):
        path = folder(root) / rel
        with open(path, "rb") as fh:
            fh.seek(start)
            chunk = fh.read(MAX_READ_BYTES)
        end = chunk.rfind(b"\n") + 1
        rows, rejects, at = [], [], start
        if end <= 0:
            if not _torn(path):
                continue  # a line still being written
            # what a killed write left: kept as it is, and the cursor moves past it
            end = len(chunk)
            rejects.append({"file": rel, "file_offset": start, "rule": "torn_line", "raw": chunk})
        for raw in chunk[:end].split(b"\n")[:-1]:
            offset, at = at, at + len(raw) + 1
            try:
                obj = json.loads(raw)
                rule = check(obj)
            except (ValueError, UnicodeDecodeError):
                obj, rule = None, "not_json"
            if rule is None:
                rows.append({**{k: obj[k] for k in FIELDS}, "file": rel, "file_offset": offset})
            else:
                rejects.append({"file": rel, "file_offset": offset, "rule": rule, "raw": raw})
        with store.transaction() as con:
            # the cursor moves in the same transaction as the rows: a replay finds them loaded
            now = con.execute("SELECT bytes_done FROM served_files WHERE path = ?", [rel]).fetchall()
            if (now[0][0] if now else 0) != start:
                continue  # another run loaded this part meanwhile
            erased = _erased(con)  # read in this transaction: an erasure since the read above counts
            if erased is not None:  # answers about an erased record: a blank reject at their offset
                hit = [erased(r["record_id"]) is not None for r in rows]  # one keyed hash per row
                rejects += [{"file": rel, "file_offset": r["file_offset"], "rule": "erased", "raw": b""}
                            for r, h in zip(rows, hit) if h]
                rows = [r for r, h in zip(rows, hit) if not h]
            if rows:
                frame = pd.DataFrame(rows)
                frame["served_at"] = pd.to_datetime(frame["served_at"], utc=True, format="ISO8601")
                con.register("served_rows", frame)
                con.execute("""INSERT INTO served_predictions (request_id, i, role, record_id, routing_key,
                               model_version, served, probability, label, input, served_at, file, file_offset,
                               loaded_at) SELECT request_id, i, role, record_id, routing_key, model_version, served,
                               probability, label, input, served_at, file, file_offset, now() FROM served_rows
                               ON CONFLICT DO NOTHING""")
            for r in rejects:
                con.execute("INSERT INTO served_rejects VALUES (?, ?, ?, ?, now()) ON CONFLICT DO NOTHING",
                            [r["file"], r["file_offset"], r["rule"], r["raw"]])
            con.execute("""INSERT INTO served_files VALUES (?, ?, now()) ON CONFLICT (path)
                           DO UPDATE SET bytes_done = excluded.bytes_done, updated_at = excluded.updated_at""",
                        [rel, start + end])
        loaded += len(rows)
        rejected += len(rejects)
    return {"files": len(todo), "loaded": loaded, "rejected": rejected}
