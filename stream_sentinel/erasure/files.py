"""Removing one record from files, each write crash-safe.

* **Record files** (``raw/``, quarantined copies in ``failed/``): rewritten without the record
  (temp name, fsync, rename; a ``.gz`` stays gzip, a JSON document stays a document), or
  removed when it held nothing else. A file that cannot be parsed (quarantined because of
  that) loses every line holding the id instead.
* **Logs read by byte offset** (the feedback drop folder, the API's prediction log): the
  record's lines are overwritten with spaces in place, so the file keeps its size and every
  offset a cursor or a tombstone points at stays valid; a blank line is skipped by its reader.

Files are found by the id's bytes first (a scan at disk speed), then parsed.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Callable

from ..atomic import fsync_path, write_bytes_atomic
from ..records import is_json_lines, is_record_file


def needles(record_id: str) -> list[bytes]:
    """Byte strings one of which any JSON text holding the id contains (unless escaped oddly)."""
    raw = record_id.encode("utf-8", "surrogatepass")
    inner = json.dumps(record_id)[1:-1].encode()
    return list(dict.fromkeys([raw, inner]))


def _read(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if path.name.lower().endswith(".gz") else data


def holds(path: Path, record_id: str) -> bool:
    try:
        data = _read(path)
    except (OSError, EOFError, gzip.BadGzipFile):
        data = path.read_bytes()
    return any(n in data for n in needles(record_id))


def _is_it(obj, record_id: str) -> bool:
    return isinstance(obj, dict) and obj.get("id") == record_id


def without_record(path: Path, record_id: str) -> tuple[int, str]:
    """Rewrite a record file without ``record_id``: (records removed, "rewritten" | "removed" |
    "unchanged")."""
    data = _read(path)
    gz = path.name.lower().endswith(".gz")
    removed = 0
    try:
        if is_json_lines(path.name):
            keep = []
            for line in data.splitlines(keepends=True):
                try:
                    obj = json.loads(line.lstrip(b"\xef\xbb\xbf")) if line.strip() else None
                except ValueError:
                    obj = None
                if _is_it(obj, record_id):
                    removed += 1
                else:
                    keep.append(line)
            body = b"".join(keep)
            empty = not body.strip()
        else:
            doc = json.loads(data.decode("utf-8-sig"))
            if isinstance(doc, list):
                kept = [o for o in doc if not _is_it(o, record_id)]
                removed = len(doc) - len(kept)
                body, empty = json.dumps(kept, ensure_ascii=False).encode(), not kept
            else:
                removed = int(_is_it(doc, record_id))
                body, empty = data, bool(removed)
    except ValueError:  # not parseable as a whole (why it was quarantined): lines holding the id go
        return blank_lines(path, lambda line: any(n in line for n in needles(record_id))), "blanked"
    if not removed:
        return 0, "unchanged"
    if empty:
        path.unlink()
        fsync_path(path.parent)
        return removed, "removed"
    write_bytes_atomic(path, gzip.compress(body, mtime=0) if gz else body)
    return removed, "rewritten"


def blank_lines(path: Path, match: Callable[[bytes], bool]) -> int:
    """Overwrite the lines ``match`` picks with spaces, in place (same size, same offsets)."""
    if path.name.lower().endswith(".gz"):  # no in-place edit of a compressed stream: rewrite it
        data = _read(path)
        lines = data.splitlines(keepends=True)
        hits = [i for i, line in enumerate(lines) if match(line)]
        if hits:
            for i in hits:
                lines[i] = b" " * len(lines[i].rstrip(b"\r\n")) + lines[i][len(lines[i].rstrip(b"\r\n")):]
            write_bytes_atomic(path, gzip.compress(b"".join(lines), mtime=0))
        return len(hits)
    n = 0
    fd = os.open(path, os.O_RDWR)
    try:
        with os.fdopen(os.dup(fd), "rb") as fh:
            at = 0
            spots = []
            for line in fh:
                body = line.rstrip(b"\r\n")
                if body.strip() and match(line):
                    spots.append((at, len(body)))
                at += len(line)
        for off, size in spots:
            os.pwrite(fd, b" " * size, off)
            n += 1
        if n:
            os.fsync(fd)
    finally:
        os.close(fd)
    return n


def record_files(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink() and is_record_file(p.name)]


def other_files(root: Path) -> list[Path]:
    """Every regular file under ``root`` that is not a record file (quarantine reports...)."""
    if not root.is_dir():
        return []
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink() and not is_record_file(p.name)]
