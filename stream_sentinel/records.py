"""The public record contract and a streaming reader for record files.

A record is a JSON object with ``id`` (non-empty string), ``text`` (non-empty string),
``event_time`` (ISO-8601; a time without an offset is taken as UTC), optional
``features`` (object of number/string/null values), optional ``label`` (a scalar) and
any other top-level keys, which are kept in ``extra``.

A file holds one object, an array of objects, or JSON Lines (``.json``, ``.jsonl``,
``.ndjson`` and their ``.gz``). Files are streamed, never loaded whole, so a
multi-gigabyte drop costs constant memory.

Two kinds of failure, because they need different handling downstream:

* a *record* that breaks the contract becomes a :class:`Reject` (the rest of the file is
  still ingested);
* a *file* that cannot be read as JSON at all raises :class:`FileUnparseable`, which says
  where (line, byte) and which rule was broken, so the file can be quarantined whole.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import json
import math
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, Iterator

RECORD_SUFFIXES = (".json", ".jsonl", ".ndjson", ".json.gz", ".jsonl.gz", ".ndjson.gz")
_CHUNK = 1 << 20
MAX_RECORD_BYTES = 64 << 20
_KNOWN_KEYS = {"id", "text", "event_time", "features", "label"}


def is_record_file(name: str) -> bool:
    lower = name.lower()
    return lower.endswith(RECORD_SUFFIXES) and not lower.startswith(".")


def is_json_lines(name: str) -> bool:
    lower = name.lower().removesuffix(".gz")
    return lower.endswith((".jsonl", ".ndjson"))


@dataclass(frozen=True)
class Record:
    id: str
    text: str
    event_time: datetime
    features: dict[str, Any] | None
    label: Any
    extra: dict[str, Any]
    content_hash: str
    position: str


@dataclass(frozen=True)
class Reject:
    position: str
    rule: str
    message: str
    record_id: str | None = None
    raw: str = ""


@dataclass
class FileUnparseable(Exception):
    """The file as a whole cannot be read; carries what a person needs to fix it."""

    rule: str
    message: str
    line: int | None = None
    byte: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        where = []
        if self.line is not None:
            where.append(f"line {self.line}")
        if self.byte is not None:
            where.append(f"byte {self.byte}")
        loc = f" at {', '.join(where)}" if where else ""
        return f"{self.rule}{loc}: {self.message}"


def content_hash(obj: dict[str, Any]) -> str:
    canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def parse_event_time(value: Any) -> datetime:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("event_time must be an ISO-8601 string")
    try:
        ts = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(f"event_time {value[:40]!r} is not ISO-8601") from None
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=timezone.utc)
    return ts.astimezone(timezone.utc)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def validate(obj: Any, position: str) -> Record | Reject:
    """Check one decoded JSON value against the record contract."""

    def reject(rule: str, message: str, rid: str | None = None) -> Reject:
        try:
            raw = json.dumps(obj, ensure_ascii=False, allow_nan=True)
        except (TypeError, ValueError):
            raw = repr(obj)
        return Reject(position, rule, message, rid, raw)

    if not isinstance(obj, dict):
        return reject("not_an_object", f"a record must be a JSON object, got {type(obj).__name__}")
    rid = obj.get("id")
    if "id" not in obj or rid is None:
        return reject("missing_id", "required key 'id' is missing")
    if not isinstance(rid, str):
        return reject("bad_id", f"'id' must be a string, got {type(rid).__name__}")
    if not rid.strip():
        return reject("bad_id", "'id' must not be empty")
    text = obj.get("text")
    if "text" not in obj or text is None:
        return reject("missing_text", "required key 'text' is missing", rid)
    if not isinstance(text, str):
        return reject("bad_text", f"'text' must be a string, got {type(text).__name__}", rid)
    if not text.strip():
        return reject("empty_text", "'text' is empty; an empty text has no meaningful embedding", rid)
    if "event_time" not in obj:
        return reject("missing_event_time", "required key 'event_time' is missing", rid)
    try:
        event_time = parse_event_time(obj["event_time"])
    except ValueError as exc:
        return reject("bad_event_time", str(exc), rid)
    features = obj.get("features")
    if features is not None:
        if not isinstance(features, dict):
            return reject("bad_features", "'features' must be an object of number/string values", rid)
        for key, value in features.items():
            if value is None or isinstance(value, str):
                continue
            if not _is_number(value):
                return reject(
                    "bad_feature_value",
                    f"feature {key!r} must be a number or string, got {type(value).__name__}",
                    rid,
                )
            if not math.isfinite(value):
                return reject("bad_feature_value", f"feature {key!r} is not finite ({value})", rid)
    label = obj.get("label")
    if isinstance(label, (dict, list)):
        return reject("bad_label", "'label' must be a string, number or boolean", rid)
    if isinstance(label, float) and not math.isfinite(label):
        return reject("bad_label", f"'label' is not finite ({label})", rid)
    extra = {k: v for k, v in obj.items() if k not in _KNOWN_KEYS}
    return Record(rid, text, event_time, features, label, extra, content_hash(obj), position)


def _open_binary(path: Path) -> BinaryIO:
    raw = open(path, "rb")
    if path.name.lower().endswith(".gz"):
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    return raw


def _no_constants(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


_decoder = json.JSONDecoder(parse_constant=_no_constants)


def read_records(path: str | Path) -> Iterator[Record | Reject]:
    """Stream the records of one file; raises :class:`FileUnparseable` for a broken file."""
    path = Path(path)
    try:
        if is_json_lines(path.name):
            yield from _read_json_lines(path)
        else:
            yield from _read_json_document(path)
    except (OSError, EOFError, zlib.error) as exc:
        # gzip raises BadGzipFile (an OSError) or EOFError for a truncated stream
        if isinstance(exc, FileNotFoundError):
            raise
        raise FileUnparseable("unreadable_compressed_data", str(exc) or type(exc).__name__) from None


def _read_json_lines(path: Path) -> Iterator[Record | Reject]:
    good = 0
    first_error: FileUnparseable | None = None
    offset = 0
    with _open_binary(path) as fh:
        for lineno, line in enumerate(fh, start=1):
            start = offset
            offset += len(line)
            stripped = line.strip()
            if not stripped:
                continue
            pos = f"line {lineno}"
            try:
                text = stripped.decode("utf-8")
            except UnicodeDecodeError as exc:
                first_error = first_error or FileUnparseable(
                    "not_utf8", f"invalid UTF-8 byte {stripped[exc.start]:#04x}", lineno, start + exc.start
                )
                yield Reject(pos, "not_utf8", f"line is not valid UTF-8 (byte {start + exc.start})",
                             None, stripped.decode("utf-8", "replace"))
                continue
            try:
                obj = _decoder.decode(text)
            except ValueError as exc:
                first_error = first_error or FileUnparseable("invalid_json", str(exc), lineno, start)
                yield Reject(pos, "invalid_json", f"line is not valid JSON: {exc}", None, text)
                continue
            good += 1
            yield validate(obj, pos)
    if good == 0 and first_error is not None:
        # Not one line was JSON: this is not a JSON Lines file at all.
        raise first_error


class _TextStream:
    """Incrementally decoded UTF-8 text with line/byte bookkeeping for error messages."""

    def __init__(self, fh: BinaryIO):
        self.fh = fh
        self.decoder = codecs.getincrementaldecoder("utf-8")("strict")
        self.buf = ""
        self.pos = 0  # index into buf
        self.eof = False
        self.bytes_read = 0
        self.consumed_lines = 0  # newlines before buf[0]
        self._lc_pos = 0  # line_at() cache: buf index and the line number there
        self._lc_line = 1

    def fill(self) -> bool:
        if self.eof:
            return False
        chunk = self.fh.read(_CHUNK)
        try:
            text = self.decoder.decode(chunk, final=not chunk)
        except UnicodeDecodeError as exc:
            raise FileUnparseable(
                "not_utf8", f"invalid UTF-8 byte {chunk[exc.start]:#04x}" if chunk else "truncated UTF-8 sequence",
                None, self.bytes_read + exc.start,
            ) from None
        self.bytes_read += len(chunk)
        if not chunk:
            self.eof = True
        # drop what is consumed so memory stays bounded
        self.consumed_lines += self.buf.count("\n", 0, self.pos)
        self.buf = self.buf[self.pos:] + text
        self.pos = 0
        self._lc_pos, self._lc_line = 0, self.consumed_lines + 1
        return bool(chunk) or bool(text)

    def line_at(self, pos: int) -> int:
        if pos < self._lc_pos:
            self._lc_pos, self._lc_line = 0, self.consumed_lines + 1
        self._lc_line += self.buf.count("\n", self._lc_pos, pos)
        self._lc_pos = pos
        return self._lc_line

    def skip_ws(self) -> str | None:
        """Advance past whitespace; return the next char or None at the end."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in " \t\r\n":
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self.fill():
                return None

    def decode_value(self) -> Any:
        while True:
            try:
                obj, end = _decoder.raw_decode(self.buf, self.pos)
            except ValueError as exc:
                if not self.eof and len(self.buf) - self.pos < MAX_RECORD_BYTES:
                    self.fill()
                    continue
                err_pos = getattr(exc, "pos", self.pos)
                if not self.eof:
                    raise FileUnparseable(
                        "record_too_large", f"a single value is larger than {MAX_RECORD_BYTES >> 20} MiB",
                        self.line_at(self.pos),
                    ) from None
                raise FileUnparseable("invalid_json", getattr(exc, "msg", str(exc)), self.line_at(err_pos)) from None
            # A number at the very end of the buffer may continue in the next chunk.
            if end == len(self.buf) and not self.eof and not isinstance(obj, (dict, list, str)):
                self.fill()
                continue
            self.pos = end
            return obj


def _read_json_document(path: Path) -> Iterator[Record | Reject]:
    with _open_binary(path) as fh:
        ts = _TextStream(fh)
        first = ts.skip_ws()
        if first is None:
            raise FileUnparseable("empty_file", "the file holds no JSON value")
        if first == "[":
            ts.pos += 1
            index = 0
            nxt = ts.skip_ws()
            if nxt == "]":
                ts.pos += 1
            else:
                while True:
                    if nxt is None:
                        raise FileUnparseable("invalid_json", "unterminated array", ts.line_at(ts.pos))
                    line = ts.line_at(ts.pos)
                    obj = ts.decode_value()
                    yield validate(obj, f"item {index} (line {line})")
                    index += 1
                    nxt = ts.skip_ws()
                    if nxt == ",":
                        ts.pos += 1
                        nxt = ts.skip_ws()
                        continue
                    if nxt == "]":
                        ts.pos += 1
                        break
                    if nxt is None:
                        raise FileUnparseable("invalid_json", "unterminated array: the file ends before ']'",
                                              ts.line_at(len(ts.buf)), ts.bytes_read)
                    raise FileUnparseable("invalid_json", "expected ',' or ']' after an array item",
                                          ts.line_at(ts.pos))
            if ts.skip_ws() is not None:
                raise FileUnparseable("trailing_data", "data after the closing ']'", ts.line_at(ts.pos))
            return
        # One object, or several concatenated / one per line.
        index = 0
        while first is not None:
            line = ts.line_at(ts.pos)
            obj = ts.decode_value()
            if index == 0 and not isinstance(obj, dict):
                raise FileUnparseable(
                    "not_records",
                    f"top-level value must be an object, an array of objects or JSON Lines; got {type(obj).__name__}",
                    line,
                )
            yield validate(obj, f"line {line}" if index else "object")
            index += 1
            first = ts.skip_ws()
