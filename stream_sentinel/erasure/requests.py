"""Erasure requests: JSON Lines files in ``<data root>/erasures/``, one request per line
(``{"record_id": ..., "reason": ..., "requested_at": ...}``).

The CLI (``stream-sentinel erase``) and the API (``DELETE /v1/records/{id}``) write a file here
(temp name, fsync, rename); ``erasure_sensor`` starts an ``erasure_job`` run per file, naming
the file (never an id) in the run's config. The file is deleted once every request in it is
complete, so an id stays on disk no longer than its erasure takes; a crash before that leaves
the file for the run that retries it.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from ..atomic import write_bytes_atomic

FOLDER = "erasures"


@dataclass(frozen=True)
class Request:
    record_id: str
    reason: str
    requested_at: datetime


class BadRequest(ValueError):
    pass


def folder(home: Path) -> Path:
    return Path(home) / FOLDER


def write(home: Path, record_ids: list[str], reason: str | list[str] = "", prefix: str = "erase") -> Path:
    """One request file for ``record_ids`` (one reason for all, or one each); returns its path."""
    if not record_ids:
        raise BadRequest("no record id to erase")
    for rid in record_ids:
        if not isinstance(rid, str) or not rid.strip():
            raise BadRequest(f"a record id must be a non-empty string, got {rid!r}")
    reasons = reason if isinstance(reason, list) else [reason] * len(record_ids)
    now = datetime.now(timezone.utc).isoformat()
    body = "".join(json.dumps({"record_id": r, "reason": why, "requested_at": now}, ensure_ascii=False) + "\n"
                   for r, why in zip(record_ids, reasons))
    path = folder(home) / f"{prefix}-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, body.encode("utf-8", "surrogatepass"))
    return path


def pending(home: Path) -> list[tuple[str, str]]:
    """(file name, sha256) of every request file, oldest name first."""
    base = folder(home)
    if not base.is_dir():
        return []
    out = []
    for p in sorted(base.iterdir()):
        if p.is_file() and p.suffix == ".jsonl" and not p.name.startswith("."):
            out.append((p.name, hashlib.sha256(p.read_bytes()).hexdigest()))
    return out


def read(path: Path) -> list[Request]:
    """The requests of a file; BadRequest names the line and the rule."""
    out = []
    for n, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise BadRequest(f"{path.name} line {n}: not JSON ({exc})") from None
        rid = obj.get("record_id") if isinstance(obj, dict) else None
        if not isinstance(rid, str) or not rid.strip():
            raise BadRequest(f"{path.name} line {n}: record_id must be a non-empty string")
        reason = obj.get("reason") or ""
        try:
            at = datetime.fromisoformat(obj.get("requested_at") or "")
        except (TypeError, ValueError):
            at = datetime.fromtimestamp(os.stat(path).st_mtime, timezone.utc)
        out.append(Request(rid, str(reason)[:500], at if at.tzinfo else at.replace(tzinfo=timezone.utc)))
    return out
