"""Window declarations: what a user writes in ``<data root>/windows.yaml``.

    allowed_lateness: 1h          # optional, default 1h
    windows:
      - name: sender_msgs_1h
        key: features.sender_domain
        kind: sliding             # tumbling | hopping | sliding | session
        size: 1h                  # hop: for hopping; gap: for session
        agg: count                # count | sum | mean | min | max | distinct
        field: features.amount    # what sum/mean/min/max/distinct aggregate (count: optional)

A declaration is checked completely when it is read, and every broken rule names the file,
the window and the rule, so a typo fails the run that reads it rather than producing a
column of nulls. The parsed form is immutable and hashable (``digest``): the stored window
state remembers the digest it was computed with, and a changed declaration is recomputed
from the records rather than mixed with values computed under the old one.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

KINDS = ("tumbling", "hopping", "sliding", "session")
AGGS = ("count", "sum", "mean", "min", "max", "distinct")
DEFAULT_LATENESS = "1h"
FILE_NAME = "windows.yaml"
_NAME = re.compile(r"[a-z][a-z0-9_]{0,62}")
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_UNIT_US = {"ms": 1_000, "s": 1_000_000, "m": 60_000_000, "h": 3_600_000_000, "d": 86_400_000_000,
            "w": 604_800_000_000}


class WindowSpecError(ValueError):
    """A declaration that breaks a rule; the message names where and which rule."""


def duration_us(text: str | int | float, where: str) -> int:
    """``90s``, ``30m``, ``1h30m``, ``7d`` (or a number of seconds) in microseconds, > 0."""
    if isinstance(text, bool):
        raise WindowSpecError(f"{where}: {text!r} is not a duration such as 30m, 1h or 7d")
    if isinstance(text, (int, float)):
        us = int(round(float(text) * 1_000_000))
    else:
        s = str(text).strip().lower().replace(" ", "")
        pos, us = 0, 0
        for m in _PART.finditer(s):
            if m.start() != pos:
                break
            us += int(round(float(m.group(1)) * _UNIT_US[m.group(2)]))
            pos = m.end()
        if not s or pos != len(s):
            raise WindowSpecError(f"{where}: {text!r} is not a duration such as 30m, 1h or 7d")
    if us <= 0:
        raise WindowSpecError(f"{where}: {text!r} must be longer than 0")
    return us


def fmt_duration(us: int) -> str:
    """The largest whole unit: 3600000000 -> 1h, 90000000 -> 90s (parsed back by duration_us)."""
    for unit in ("w", "d", "h", "m", "s", "ms"):
        if us % _UNIT_US[unit] == 0:
            return f"{us // _UNIT_US[unit]}{unit}"
    return f"{us / 1_000_000}s"


def _path(value, where: str) -> tuple[str, ...]:
    if not isinstance(value, str) or not value.strip():
        raise WindowSpecError(f"{where}: must be a path such as features.sender_domain")
    parts = tuple(value.strip().split("."))
    if parts[0] not in ("features", "extra") or len(parts) < 2 or not all(parts):
        raise WindowSpecError(f"{where}: {value!r} must be a path into features or extra, "
                              "such as features.sender_domain")
    return parts


@dataclass(frozen=True)
class Window:
    """One declared window. Times are microseconds of event time."""

    name: str
    key: tuple[str, ...]
    kind: str
    size_us: int  # tumbling/hopping/sliding: the window's length; session: the gap
    agg: str
    field: tuple[str, ...] | None = None
    hop_us: int = 0  # hopping only

    @property
    def column(self) -> str:
        """The feature name the model sees."""
        return f"win_{self.name}"

    @property
    def reach_us(self) -> int | None:
        """How far after a record its arrival can change other records' values (None: a session
        chain, unbounded in principle)."""
        return None if self.kind == "session" else self.size_us

    def describe(self) -> dict:
        d = {"name": self.name, "key": ".".join(self.key), "kind": self.kind, "agg": self.agg}
        if self.field:
            d["field"] = ".".join(self.field)
        d["gap" if self.kind == "session" else "size"] = fmt_duration(self.size_us)
        if self.kind == "hopping":
            d["hop"] = fmt_duration(self.hop_us)
        return d

    @cached_property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class WindowSet:
    windows: tuple[Window, ...] = ()
    lateness_us: int = 3_600_000_000
    source: str = ""  # where it was read from (shown in run metadata)

    def __bool__(self) -> bool:
        return bool(self.windows)

    @cached_property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(sorted(w.digest for w in self.windows) + [self.lateness_us]).encode()
                              ).hexdigest()[:16]

    @property
    def columns(self) -> list[str]:
        return [w.column for w in self.windows]

    def describe(self) -> dict:
        return {"allowed_lateness": fmt_duration(self.lateness_us), "windows": [w.describe() for w in self.windows]}


def parse_window(raw, where: str) -> Window:
    if not isinstance(raw, dict):
        raise WindowSpecError(f"{where}: a window is a mapping with name, key, kind, agg and size or gap")
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise WindowSpecError(f"{where}: name {name!r} must be lower-case letters, digits and _ "
                              "(it becomes the feature win_<name>)")
    where = f"{where} ({name})"
    allowed = {"name", "key", "kind", "size", "hop", "gap", "agg", "field"}
    if unknown := sorted(set(raw) - allowed):
        raise WindowSpecError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(allowed)}")
    kind = raw.get("kind")
    if kind not in KINDS:
        raise WindowSpecError(f"{where}: kind {kind!r} must be one of {', '.join(KINDS)}")
    agg = raw.get("agg", "count")
    if agg not in AGGS:
        raise WindowSpecError(f"{where}: agg {agg!r} must be one of {', '.join(AGGS)}")
    key = _path(raw.get("key"), f"{where}: key")
    field = _path(raw["field"], f"{where}: field") if raw.get("field") is not None else None
    if agg != "count" and field is None:
        raise WindowSpecError(f"{where}: agg {agg} needs a field to aggregate")
    if kind == "session":
        if "size" in raw or "hop" in raw:
            raise WindowSpecError(f"{where}: a session window takes gap, not size or hop")
        if "gap" not in raw:
            raise WindowSpecError(f"{where}: a session window needs gap (e.g. 30m)")
        size = duration_us(raw["gap"], f"{where}: gap")
        hop = 0
    else:
        if "gap" in raw:
            raise WindowSpecError(f"{where}: gap is for session windows; a {kind} window takes size")
        if "size" not in raw:
            raise WindowSpecError(f"{where}: a {kind} window needs size (e.g. 1h)")
        size = duration_us(raw["size"], f"{where}: size")
        hop = 0
        if kind == "hopping":
            if "hop" not in raw:
                raise WindowSpecError(f"{where}: a hopping window needs hop (e.g. 15m)")
            hop = duration_us(raw["hop"], f"{where}: hop")
            if hop > size:
                raise WindowSpecError(f"{where}: hop {raw['hop']} is longer than size {raw['size']}")
        elif "hop" in raw:
            raise WindowSpecError(f"{where}: hop is for hopping windows")
    return Window(name, key, kind, size, agg, field, hop)


def parse(doc, source: str = "<config>") -> WindowSet:
    """The window set a YAML document (already loaded) declares."""
    if doc is None:
        return WindowSet(source=source)
    if not isinstance(doc, dict):
        raise WindowSpecError(f"{source}: expected a mapping with a windows: list")
    if unknown := sorted(set(doc) - {"windows", "allowed_lateness"}):
        raise WindowSpecError(f"{source}: unknown field(s) {unknown}; allowed: allowed_lateness, windows")
    raw = doc.get("windows") or []
    if not isinstance(raw, list):
        raise WindowSpecError(f"{source}: windows must be a list")
    windows = tuple(parse_window(w, f"{source}: windows[{i}]") for i, w in enumerate(raw))
    names = [w.name for w in windows]
    if dup := sorted({n for n in names if names.count(n) > 1}):
        raise WindowSpecError(f"{source}: window name(s) {dup} declared twice")
    lateness = duration_us(doc.get("allowed_lateness", DEFAULT_LATENESS), f"{source}: allowed_lateness")
    return WindowSet(windows, lateness, source)


def parse_text(text: str, source: str) -> WindowSet:
    import yaml

    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise WindowSpecError(f"{source}: not valid YAML: {exc}") from None
    return parse(doc, source)


def load(home: Path) -> WindowSet:
    """The data root's declarations; no file declares none."""
    path = Path(home) / FILE_NAME
    if not path.exists():
        return WindowSet(source=str(path))
    return parse_text(path.read_text(encoding="utf-8"), str(path))


def lookup(obj: dict, path: tuple[str, ...]):
    """The value at a path into a record ({"features": ..., "extra": ...}); None when absent."""
    cur = obj
    for p in path:
        if not isinstance(cur, dict):
            return None
        cur = cur.get(p)
    return cur
