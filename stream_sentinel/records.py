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

Poison values never escape as exceptions: whatever a record holds, :func:`validate` returns a
:class:`Record` that storage can take as it is, or a :class:`Reject` whose fields are valid
UTF-8 (rejects are stored in DuckDB too). The limits behind that are explicit:

* ``event_time`` must lie in ``[EVENT_TIME_MIN, EVENT_TIME_MAX)`` (1678-01-01 .. 2262-01-01
  UTC), the span of pandas' nanosecond timestamps with a margin (``event_time_out_of_range``);
* strings (keys included) must be encodable as UTF-8: a lone surrogate such as the JSON
  escape ``"\\ud800"`` is ``invalid_unicode``;
* a value may nest at most ``MAX_DEPTH`` levels (``too_deeply_nested``), and an integer
  literal may have at most 4300 digits, Python's int parsing limit (``number_too_large``);
* a UTF-8 byte order mark at the start of a file (or of a JSON Lines line) is ignored.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import json
import math
import re
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, Iterator

RECORD_SUFFIXES = (".json", ".jsonl", ".ndjson", ".json.gz", ".jsonl.gz", ".ndjson.gz")
_CHUNK = 1 << 20
MAX_RECORD_BYTES = 64 << 20
_KNOWN_KEYS = {"id", "text", "event_time", "features", "label"}

# The accepted event time span, [min, max) in UTC. pandas stores timestamps as int64
# nanoseconds (1677-09-21 .. 2262-04-11); outside that, ingest's pd.to_datetime raises
# OutOfBoundsDatetime and the whole batch fails. Used for record event_time and feedback ts.
EVENT_TIME_MIN = datetime(1678, 1, 1, tzinfo=timezone.utc)
EVENT_TIME_MAX = datetime(2262, 1, 1, tzinfo=timezone.utc)
# Deepest nesting a record (or feedback message) may have; deeper input is rejected as
# too_deeply_nested instead of exhausting Python's recursion limit in json.
MAX_DEPTH = 100
MAX_ID_CHARS = 1024  # an id is a key everywhere (tables, Kafka, the prediction log, URLs): bounded
# A label that is an integer must fit a signed 64-bit integer (it is a class name, not a number).
_INT64 = (-(1 << 63), (1 << 63) - 1)
BOM = "\ufeff"


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
    """sha256 of the canonical JSON text. Raises ValueError for NaN / infinity (standard JSON
    has neither), UnicodeEncodeError for a lone surrogate."""
    canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


# ------------------------------------------------------------------ safe text for storage


def is_utf8(s: str) -> bool:
    """True when ``s`` can be encoded as UTF-8 (no lone surrogate), which DuckDB requires."""
    if s.isascii():
        return True
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def safe_text(s: str) -> str:
    """``s`` itself when it is valid UTF-8, else with each lone surrogate written as ``\\udXXX``:
    for the fields of a reject, which must be storable whatever the input held."""
    return s if is_utf8(s) else s.encode("utf-8", "backslashreplace").decode("utf-8")


def show(value: Any, limit: int = 60) -> str:
    """A short, storable repr of a value for a message (never raises: a 5000-digit int or a
    100k-deep list have no usable repr)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10 ** 30:
        return f"<integer of {len(str(abs(value))) if value.bit_length() < 14000 else 'over 4300'} digits>"
    try:
        text = repr(value)
    except (ValueError, RecursionError, TypeError):
        return f"<{type(value).__name__}>"
    return safe_text(text if len(text) <= limit else text[: limit - 3] + "...")


def safe_dump(obj: Any) -> str:
    """The JSON text of a (possibly poisoned) value for a reject's ``raw``; always storable."""
    for ensure_ascii in (False, True):
        try:
            text = json.dumps(obj, ensure_ascii=ensure_ascii, allow_nan=True)
        except (TypeError, ValueError, RecursionError):
            break
        if is_utf8(text):
            return text
    return show(obj, 2000)


def _unicode_problem(obj: Any) -> str | None:
    """Where in ``obj`` a string (or key) holds a lone surrogate, as a message; None if nowhere."""
    found = value_problem(obj, numbers=False)
    return None if found is None else found[1]


def value_problem(obj: Any, numbers: bool = True) -> tuple[str, str] | None:
    """The first value in decoded JSON that no stored copy could hold, as (rule, message) naming
    where it is: a string or key with a lone surrogate (``invalid_unicode``: no UTF-8 form), or
    with ``numbers`` a float no double holds (``number_out_of_range``: 1e400 reads as infinity).
    None when there is none. Iterative: nesting is bounded by the decoder, not by this walk."""
    stack: list[tuple[Any, str]] = [(obj, "")]
    while stack:
        value, where = stack.pop()
        if isinstance(value, str):
            if not is_utf8(value):
                bad = next(c for c in value if "\ud800" <= c <= "\udfff")
                return "invalid_unicode", (f"{where or 'the value'} holds a lone surrogate U+{ord(bad):04X}, "
                                           "which is not valid Unicode")
        elif isinstance(value, float):
            if numbers and not math.isfinite(value):
                return "number_out_of_range", f"{where or 'the value'} is a number no double can hold (e.g. 1e400)"
        elif isinstance(value, dict):
            for key, item in value.items():
                if isinstance(key, str) and not is_utf8(key):
                    return "invalid_unicode", (f"a key of {where or 'the record'} ({show(key)}) holds a lone "
                                               "surrogate, which is not valid Unicode")
                stack.append((item, f"{where}[{show(key)}]" if where else f"{show(key)}"))
        elif isinstance(value, list):
            stack.extend((item, f"{where}[{i}]") for i, item in enumerate(value))
    return None


def _too_deep(value: dict | list, level: int) -> bool:
    """True when the container ``value``, at nesting ``level`` (the record is level 1), or a
    container inside it lies deeper than ``MAX_DEPTH``. The recursion stops at ``MAX_DEPTH``,
    so input of any depth is safe."""
    if level > MAX_DEPTH:
        return True
    for item in value.values() if isinstance(value, dict) else value:
        if isinstance(item, (dict, list)) and _too_deep(item, level + 1):
            return True
    return False


def _non_finite_where(extra: dict[str, Any]) -> str:
    for key, value in extra.items():
        try:
            json.dumps(value, allow_nan=False)
        except ValueError:
            return f"extra key {show(key)}"
    return "an extra key"


# ------------------------------------------------------------------ contract


class TimeOutOfRange(ValueError):
    """A valid ISO-8601 time outside ``[EVENT_TIME_MIN, EVENT_TIME_MAX)``."""


def parse_event_time(value: Any, name: str = "event_time") -> datetime:
    """ISO-8601 text as an aware UTC datetime inside the accepted range.

    Raises :class:`TimeOutOfRange` (a ValueError) for a real time outside the range, and
    ValueError for anything that is not an ISO-8601 time; ``name`` is the field in messages."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be an ISO-8601 string")
    try:
        ts = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(f"{name} {show(value[:40])} is not ISO-8601") from None
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=timezone.utc)
    try:
        ts = ts.astimezone(timezone.utc)  # 0001-01-01T00:00:00+01:00 overflows here
    except OverflowError:
        ts = None
    if ts is None or not EVENT_TIME_MIN <= ts < EVENT_TIME_MAX:
        raise TimeOutOfRange(
            f"{name} {show(value[:40])} is outside the accepted range {EVENT_TIME_MIN:%Y-%m-%d} "
            f"(inclusive) to {EVENT_TIME_MAX:%Y-%m-%d} (exclusive) UTC")
    return ts


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _finite_double(v: int | float) -> bool:
    """True when ``v`` is a finite float, or an int a double can hold (a 400-digit integer
    cannot: ``math.isfinite`` raises OverflowError on it)."""
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def validate(obj: Any, position: str) -> Record | Reject:
    """Check one decoded JSON value against the record contract.

    Never raises: a value storage could not take (a time pandas cannot hold, a lone
    surrogate DuckDB cannot store, a number no double can hold, nesting deeper than
    ``MAX_DEPTH``) is a :class:`Reject` with its rule, like any other broken record."""

    def reject(rule: str, message: str, rid: str | None = None) -> Reject:
        return Reject(position, rule, safe_text(message), None if rid is None else safe_text(rid), safe_dump(obj))

    if not isinstance(obj, dict):
        return reject("not_an_object", f"a record must be a JSON object, got {type(obj).__name__}")
    rid = obj.get("id")
    if "id" not in obj or rid is None:
        return reject("missing_id", "required key 'id' is missing")
    if not isinstance(rid, str):
        return reject("bad_id", f"'id' must be a string, got {type(rid).__name__}")
    if not rid.strip():
        return reject("bad_id", "'id' must not be empty")
    if len(rid) > MAX_ID_CHARS:
        return reject("id_too_long", f"'id' is {len(rid)} characters; at most {MAX_ID_CHARS}", rid[:MAX_ID_CHARS])
    if not is_utf8(rid):
        return reject("invalid_unicode", f"'id' {show(rid)} holds a lone surrogate, which is not valid Unicode", rid)
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
    except TimeOutOfRange as exc:
        return reject("event_time_out_of_range", str(exc), rid)
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
                    f"feature {show(key)} must be a number or string, got {type(value).__name__}",
                    rid,
                )
            if not _finite_double(value):
                return reject("bad_feature_value",
                              f"feature {show(key)} is not a finite double ({show(value)})", rid)
    label = obj.get("label")
    if label is not None and not isinstance(label, (str, int, float)):  # bool is an int
        return reject("bad_label", "'label' must be a string, number or boolean", rid)
    if isinstance(label, float) and not math.isfinite(label):
        return reject("bad_label", f"'label' is not finite ({label})", rid)
    if isinstance(label, int) and not _INT64[0] <= label <= _INT64[1]:
        return reject("bad_label", f"'label' {show(label)} is an integer outside the signed 64-bit range", rid)
    extra = {k: v for k, v in obj.items() if k not in _KNOWN_KEYS}
    for key, value in extra.items():
        if not isinstance(key, str):
            return reject("unsupported_value", f"key {show(key)} is not a string", rid)
        if isinstance(value, (dict, list)) and _too_deep(value, 2):
            return reject("too_deeply_nested", f"extra key {show(key)} is nested more than {MAX_DEPTH} levels deep",
                          rid)
    try:  # the canonical dump also finds what the checks above leave to it
        digest = content_hash(obj)
    except UnicodeEncodeError:
        return reject("invalid_unicode", _unicode_problem(obj) or "the record holds a lone surrogate", rid)
    except RecursionError:
        return reject("too_deeply_nested", f"the record is nested more than {MAX_DEPTH} levels deep", rid)
    except ValueError as exc:
        if "float" in str(exc):  # 1e400 is read as inf; JSON columns take finite numbers only
            return reject("bad_extra_value", f"{_non_finite_where(extra)} holds a number outside the range of "
                          "a double (e.g. 1e400, which reads as infinity)", rid)
        # an int over 4300 digits has no decimal text
        return reject("number_too_large", f"the record holds a number that cannot be written as JSON: {exc}", rid)
    except TypeError as exc:  # not from a JSON parser: a tuple key, a set, bytes ...
        return reject("unsupported_value", f"the record holds a value JSON does not have: {exc}", rid)
    return Record(rid, text, event_time, features, label, extra, digest, position)


def _open_binary(path: Path) -> BinaryIO:
    raw = open(path, "rb")
    if path.name.lower().endswith(".gz"):
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    return raw


def _no_constants(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


_decoder = json.JSONDecoder(parse_constant=_no_constants)
_lenient_decoder = json.JSONDecoder()  # json.loads' own: NaN / Infinity read as floats


class JSONProblem(ValueError):
    """Text that does not decode to a usable JSON value: ``rule`` is ``invalid_json``,
    ``too_deeply_nested`` or ``number_too_large``; ``pos`` is the index of a syntax error."""

    def __init__(self, rule: str, message: str, pos: int | None = None):
        super().__init__(message)
        self.rule = rule
        self.message = message
        self.pos = pos


def _int_too_long(exc: ValueError) -> bool:
    # Python refuses to parse an int literal of more than 4300 digits (CVE-2020-10735)
    return not isinstance(exc, json.JSONDecodeError) and "integer string conversion" in str(exc)


_TOO_DEEP = f"the value is nested more than {MAX_DEPTH} levels deep"
_TOO_LONG = "an integer literal has more than 4300 digits, more than Python parses"


def loads(text: str, constants: bool = False) -> Any:
    """Decode one JSON text (a JSON Lines line, a feedback message); a leading byte order
    mark is ignored. Raises :class:`JSONProblem`, never RecursionError or a bare ValueError.
    ``constants`` accepts NaN / Infinity as json.loads does (feedback's historic contract)."""
    try:
        return (_lenient_decoder if constants else _decoder).decode(text.removeprefix(BOM))
    except RecursionError:
        raise JSONProblem("too_deeply_nested", _TOO_DEEP) from None
    except json.JSONDecodeError as exc:
        raise JSONProblem("invalid_json", str(exc), exc.pos) from None
    except ValueError as exc:
        if _int_too_long(exc):
            raise JSONProblem("number_too_large", _TOO_LONG) from None
        raise JSONProblem("invalid_json", str(exc)) from None


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


def parse_json_line(line: bytes, position: str, offset: int = 0) -> Record | Reject:
    """One JSON Lines line (stripped, without its newline) as a Record or a Reject; never
    raises. ``offset`` is the line's byte offset in the file, for messages."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Reject(position, "not_utf8", f"line is not valid UTF-8 (byte {offset + exc.start})",
                      None, line.decode("utf-8", "replace"))
    try:
        obj = loads(text)
    except JSONProblem as exc:
        message = f"line is not valid JSON: {exc.message}" if exc.rule == "invalid_json" else exc.message
        return Reject(position, exc.rule, message, None, text)
    return validate(obj, position)


_BOM_BYTES = BOM.encode("utf-8")


def _read_json_lines(path: Path) -> Iterator[Record | Reject]:
    good = 0
    first_error: FileUnparseable | None = None
    offset = 0
    with _open_binary(path) as fh:
        for lineno, line in enumerate(fh, start=1):
            start = offset
            offset += len(line)
            stripped = line.strip()
            if stripped.startswith(_BOM_BYTES):  # at the start of the file (or of one cat'ed to it)
                stripped = stripped[len(_BOM_BYTES):].lstrip()
            if not stripped:
                continue
            item = parse_json_line(stripped, f"line {lineno}", start)
            if isinstance(item, Reject) and item.rule in ("not_utf8", "invalid_json"):
                if first_error is None and item.rule == "not_utf8":
                    bad = _first_bad_utf8(stripped)
                    first_error = FileUnparseable("not_utf8", f"invalid UTF-8 byte {stripped[bad]:#04x}",
                                                  lineno, start + bad)
                elif first_error is None:
                    first_error = FileUnparseable("invalid_json", item.message.removeprefix("line is not valid JSON: "),
                                                  lineno, start)
            else:
                good += 1  # a record, or a reject of a line that is JSON
            yield item
    if good == 0 and first_error is not None:
        # Not one line was JSON: this is not a JSON Lines file at all.
        raise first_error


def _first_bad_utf8(data: bytes) -> int:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start
    return 0


_STRUCTURE = re.compile(r'["\[\]{}]')
_STRING_REST = re.compile(r'[^"\\]*(?:\\.[^"\\]*)*"', re.S)  # after an opening quote, to the closing one
_SCALAR_END = re.compile(r'[\s,\]}:]')
_NUMBER_TAIL = re.compile(r'[0-9.eE+-]*')
# A decode error this close to the end of the buffer may only mean the value goes on in the
# next chunk (a cut "tru", "1e", "\u12" or missing ',' / value); read on and try again.
_NEAR_END = 16


class _SkippedValue(Exception):
    """A value was stepped over without decoding it; it becomes a Reject with this rule."""

    def __init__(self, rule: str, message: str, raw: str):
        super().__init__(message)
        self.rule = rule
        self.message = message
        self.raw = raw


class _TextStream:
    """Incrementally decoded UTF-8 text with line/byte bookkeeping for error messages."""

    def __init__(self, fh: BinaryIO):
        self.fh = fh
        # utf-8-sig: a byte order mark at the start of the file is dropped, anywhere else kept
        self.decoder = codecs.getincrementaldecoder("utf-8-sig")("strict")
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

    def _too_large(self) -> FileUnparseable:
        return FileUnparseable("record_too_large", f"a single value is larger than {MAX_RECORD_BYTES >> 20} MiB",
                               self.line_at(self.pos))

    def _more(self, i: int, end_ok: bool = False) -> int | None:
        """Read the next chunk while stepping over a value that starts at ``self.pos``;
        returns index ``i`` rebased onto the new buffer, or None at the end of the file
        when ``end_ok`` (a bare number may end there; an array, object or string may not)."""
        if len(self.buf) - self.pos >= MAX_RECORD_BYTES:
            raise self._too_large()
        shift = self.pos
        if not self.fill():
            if end_ok:
                return None
            raise FileUnparseable("invalid_json", "the file ends inside a value", self.line_at(self.pos),
                                  self.bytes_read)
        return i - shift

    def skip_value(self, rule: str, message: str) -> _SkippedValue:
        """Step over the value at ``pos`` without decoding it: the brackets are matched
        (strings respected) without recursion, so any depth is fine. For a value the decoder
        cannot take although its structure is sound: too deep, an over-long integer."""
        head = self.buf[self.pos:self.pos + 200]
        i = self.pos
        if self.buf[i] not in '[{"':  # a bare scalar: up to the next delimiter or the end of the file
            while (m := _SCALAR_END.search(self.buf, i)) is None:
                if (j := self._more(len(self.buf), end_ok=True)) is None:
                    break
                i = j
            end = m.start() if m else len(self.buf)
        else:
            depth = 0
            while True:
                m = _STRUCTURE.search(self.buf, i)
                if m is None:
                    i = self._more(len(self.buf))
                    continue
                c = m.group()
                if c == '"':
                    s = _STRING_REST.match(self.buf, m.end())
                    if s is None:  # the string goes on in the next chunk: rescan it from its quote
                        i = self._more(m.start())
                        continue
                    i = s.end()
                    if depth == 0:
                        end = i
                        break
                elif c in "[{":
                    depth += 1
                    i = m.end()
                else:
                    depth -= 1
                    i = m.end()
                    if depth <= 0:
                        end = i
                        break
        raw = self.buf[self.pos:end]
        self.pos = end
        return _SkippedValue(rule, message, raw if len(raw) <= 200 else head + "...")

    def decode_value(self) -> Any:
        """Decode the value at ``pos``. Reads further chunks only while the value may go on
        past the buffer; a syntax error inside the buffer is reported at once, with its line.
        Raises :class:`_SkippedValue` (after stepping over it) for a value that is sound JSON
        but too deep or holds an over-long integer."""
        while True:
            try:
                obj, end = _decoder.raw_decode(self.buf, self.pos)
            except RecursionError:
                raise self.skip_value("too_deeply_nested", _TOO_DEEP) from None
            except ValueError as exc:
                if _int_too_long(exc):
                    raise self.skip_value("number_too_large", _TOO_LONG) from None
                err_pos = exc.pos if isinstance(exc, json.JSONDecodeError) else None
                cut = err_pos is not None and (err_pos >= len(self.buf) - _NEAR_END
                                               or exc.msg.startswith("Unterminated string"))
                if cut and not self.eof:
                    if len(self.buf) - self.pos >= MAX_RECORD_BYTES:
                        raise self._too_large() from None
                    self.fill()
                    continue
                if err_pos is None:  # e.g. NaN: the value is whole, the error is its own
                    raise FileUnparseable("invalid_json", str(exc), self.line_at(self.pos)) from None
                raise FileUnparseable("invalid_json", exc.msg, self.line_at(err_pos)) from None
            # A number at the end of the buffer may continue in the next chunk, even when the
            # decoder stopped short of the end ("0." or "1e+" is read as 0 or 1).
            if not self.eof and not isinstance(obj, (dict, list, str)) and _NUMBER_TAIL.fullmatch(self.buf, end):
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
                    pos = f"item {index} (line {line})"
                    try:
                        obj = ts.decode_value()
                    except _SkippedValue as skipped:
                        yield Reject(pos, skipped.rule, skipped.message, None, skipped.raw)
                    else:
                        yield validate(obj, pos)
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
            pos = f"line {line}" if index else "object"
            try:
                obj = ts.decode_value()
            except _SkippedValue as skipped:
                if index == 0 and first != "{":
                    raise FileUnparseable("not_records", "top-level value must be an object, an array of objects "
                                          "or JSON Lines", line) from None
                yield Reject(pos, skipped.rule, skipped.message, None, skipped.raw)
            else:
                if index == 0 and not isinstance(obj, dict):
                    raise FileUnparseable(
                        "not_records",
                        f"top-level value must be an object, an array of objects or JSON Lines; got {type(obj).__name__}",
                        line,
                    )
                yield validate(obj, pos)
            index += 1
            first = ts.skip_ws()
