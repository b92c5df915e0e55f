"""Crash-safe file writes: write to a temp name, fsync, ``os.replace``, fsync the folder.

A reader then sees either the old file or the new one, never a torn mix, even if the
process is killed or the machine loses power mid-write.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def fsync_path(path: str | os.PathLike[str]) -> None:
    """fsync a file's data, or a folder's entries (so a rename in it survives a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fchmod(fh.fileno(), 0o644)  # mkstemp makes 0600; reports and models are for readers too
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_path(path.parent)


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def pause_point(name: str) -> None:
    """Fault-injection hook for crash tests: with STREAM_SENTINEL_PAUSE_AT=<name> the process
    announces itself in STREAM_SENTINEL_PAUSE_FILE and waits here to be killed."""
    if os.environ.get("STREAM_SENTINEL_PAUSE_AT") != name:
        return
    marker = os.environ.get("STREAM_SENTINEL_PAUSE_FILE")
    if marker:
        Path(marker).write_text(name)
    import time

    while True:
        time.sleep(1)
