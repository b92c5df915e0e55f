"""Poison input never crashes ingest: property-based fuzzing of both parsers, plus the
plain regression tests of each poison value it is about (issue 11).

A poison value used to escape as an exception (OverflowError, UnicodeEncodeError,
RecursionError, pandas' OutOfBoundsDatetime when the batch was inserted) and fail the whole
run, stranding the valid records of the same batch. The property, for records and for
feedback alike: every input is either accepted, and then survives what storage does with it,
or rejected with a known rule and a message, with every field storable as UTF-8.

The fuzz tests are derandomized (the same examples on every run, so CI is reproducible) and
sized to add up to at least 10,000 examples per parser while the whole file stays well under
a minute on a 2-core machine. Two kinds:

* *seeded* tests (5,000 examples each, two per parser): hypothesis draws one integer and a
  plain ``random.Random`` seeded with it builds the input from the same pools of poison.
  Hypothesis' own strategies cost ~13 ms an example here (20,000 would take over four
  minutes); a single draw costs under 1 ms. A failure names the seed and ``note``s the input;
  ``_Gen(seed)`` rebuilds it.
* *strategy* tests (a few hundred examples): the same inputs from hypothesis strategies
  (``st.recursive`` JSON values, record- and vote-shaped dicts), which shrink a failure to a
  minimal input.

Deep nesting is built as plain strings (or iteratively built lists), never through
hypothesis' recursion, which could not reach 100,000 levels.
"""

from __future__ import annotations

import itertools
import json
import random
import re
import struct
import tempfile
from datetime import date, datetime, timezone
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from stream_sentinel import feedback as fb
from stream_sentinel import feedback_sources, ingest
from stream_sentinel import records as rec
from stream_sentinel.config import Paths
from stream_sentinel.store import Store

from .conftest import drop, record
from .strategies import (EXTREME_NUMBERS, EXTREME_TIMES, ODD_CHARS, _iso, any_object, clean_chars, clean_texts,
                         good_times, json_values, record_shaped, texts, vote_shaped)

RECORD_RULES = {
    "not_an_object", "missing_id", "bad_id", "missing_text", "bad_text", "empty_text", "missing_event_time",
    "bad_event_time", "event_time_out_of_range", "bad_features", "bad_feature_value", "bad_label",
    "bad_extra_value", "invalid_unicode", "too_deeply_nested", "number_too_large", "unsupported_value",
    "invalid_json", "not_utf8",
}
FEEDBACK_RULES = {
    "not_utf8", "invalid_json", "too_deeply_nested", "number_too_large", "not_an_object", "bad_record_id",
    "invalid_unicode", "key_mismatch", "bad_label", "unknown_label", "bad_source", "bad_confidence",
    "confidence_out_of_range", "bad_ts", "ts_out_of_range",
}

# examples per seeded fuzz test; two per parser, so 2 x 5,000 >= 10,000 each
N_FUZZ = 5_000
N_STRATEGY = 200  # per strategy-driven test (one per parser), on top
N_STEP = 25  # whole ingest steps (a DuckDB file each), per side

FUZZ = settings(max_examples=N_FUZZ, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much, HealthCheck.large_base_example])
STRATEGY = settings(FUZZ, max_examples=N_STRATEGY)
STEP = settings(FUZZ, max_examples=N_STEP)
seeds = st.integers(0, 2**64 - 1)

# ------------------------------------------------------------------ strategies


deep = st.builds(lambda n, kind: ("[" * n + "]" * n) if kind == "list" else ('{"a":' * n + "1" + "}" * n),
                 st.sampled_from([101, 5_000, 100_000]), st.sampled_from(["list", "dict"]))
DECORATIONS = ["plain", "plain", "plain", "bom", "truncate", "deep_value", "deep_field", "bigint_field",
               "bigint_4300", "float_overflow_field", "nan_literal", "infinity_text", "garbage", "surrogate_escape"]


def _encode(obj, ensure_ascii: bool) -> str:
    try:
        return json.dumps(obj, ensure_ascii=ensure_ascii)  # NaN / Infinity come out as bare literals
    except ValueError:  # an int of more than 4300 digits has no text
        return '{"id": "x", "text": "t", "event_time": "2024-01-01", "x": ' + "9" * 5000 + "}"
    except RecursionError:  # a generated deep value: the text it would have
        return "[" * 5000 + "]" * 5000


@st.composite
def json_texts(draw, base=None):
    """The text of a JSON message, decorated with the things real files do wrong (``base``:
    the values to encode, records by default; not a default argument, whose repr hypothesis
    would build)."""
    text = _encode(draw(any_object if base is None else base), draw(st.booleans()))
    how = draw(st.sampled_from(DECORATIONS))
    if how == "bom":
        text = "\ufeff" + text
    elif how == "truncate":
        text = text[: draw(st.integers(0, max(0, len(text) - 1)))]
    elif how == "deep_value":
        text = draw(deep)
    elif how == "deep_field" and text.endswith("}") and len(text) > 2:
        text = text[:-1] + ', "deep": ' + draw(deep) + "}"
    elif how == "bigint_field" and text.endswith("}") and len(text) > 2:
        text = text[:-1] + ', "big": ' + "9" * draw(st.sampled_from([400, 4300])) + "}"
    elif how == "bigint_4300":
        text = "9" * 4301
    elif how == "float_overflow_field" and text.endswith("}") and len(text) > 2:
        text = text[:-1] + ', "huge": 1e400}'
    elif how == "nan_literal":
        text = text.replace("1", "NaN", 1) if "1" in text else "NaN"
    elif how == "infinity_text":
        text = text.replace('"', '"Infinity -0.0 1e-320 ', 1)
    elif how == "garbage":
        text = text + draw(texts)
    elif how == "surrogate_escape":
        text = text.replace('"', '"\\ud800', 2)
    return text


def _brief(x) -> str:
    """The input, shortened, for hypothesis' failure report (computed for every example, so cheap)."""
    if isinstance(x, tuple):
        return "(" + ", ".join(_brief(i) for i in x) + ")"
    if isinstance(x, (str, bytes)) and len(x) > 1000:
        return f"{x[:500]!r} ... {x[-200:]!r} ({len(x)} long)"
    return rec.show(x, 3000)


def _to_bytes(text: str) -> bytes:
    # a lone surrogate has no UTF-8; surrogatepass makes the invalid bytes a producer would send
    return text.encode("utf-8", "surrogatepass")


# ------------------------------------------------------------------ properties

_PARSED = ingest._Parsed(ingest.FileOutcome("0" * 64, "fuzz.jsonl", "processed"), date(2024, 1, 1), [], [])
_NOW = datetime(2024, 1, 2, tzinfo=timezone.utc)


def _storable(*values: str | None) -> None:
    for v in values:
        if v is not None:
            assert isinstance(v, str)
            v.encode("utf-8")  # DuckDB VARCHAR takes only valid UTF-8


def assert_record_outcome(item, seen: "Seen | None" = None) -> None:
    """Accepted: inside the time range, standard JSON in the JSON columns, UTF-8 text.
    Rejected: a known rule, a message, every field storable. ``seen`` collects accepted
    records for :meth:`Seen.check_storage`, which runs ingest's frame building on them."""
    if isinstance(item, rec.Record):
        assert rec.EVENT_TIME_MIN <= item.event_time < rec.EVENT_TIME_MAX
        pd.Timestamp(item.event_time)  # what overflowed: pandas' nanosecond range
        for column in ("features", "label", "extra"):
            value = getattr(item, column)
            dumped = json.dumps(value, ensure_ascii=False, allow_nan=False)  # standard JSON only
            dumped.encode("utf-8")
        _storable(item.id, item.text, item.position, item.content_hash)
        assert item.id.strip() and item.text.strip()
    else:
        assert isinstance(item, rec.Reject), type(item)
        assert item.rule in RECORD_RULES, item.rule
        assert item.message
        _storable(item.position, item.rule, item.message, item.raw, item.record_id)
    if seen is not None:
        seen.add(item)


def assert_feedback_outcome(item, seen: "Seen | None" = None) -> None:
    if isinstance(item, fb.Event):
        _storable(item.record_id, item.label, item.source)
        assert 0.0 <= item.confidence <= 1.0
        assert rec.EVENT_TIME_MIN <= item.ts < rec.EVENT_TIME_MAX
        pd.Timestamp(item.ts)
    else:
        assert isinstance(item, fb.Rejected), type(item)
        assert item.rule in FEEDBACK_RULES, item.rule
        assert item.error
        _storable(item.key, item.raw, item.rule, item.error)
    if seen is not None:
        seen.add(item)


class Seen:
    """What a fuzz run produced: accepted items (for one storage check at the end: building
    ingest's frame costs 6 ms a call, too much for each of 10,000 examples) and rule counts
    (to show the generator reaches every poison path, not just the first check)."""

    def __init__(self) -> None:
        self.accepted: list = []
        self.rules: dict[str, int] = {}

    def add(self, item) -> None:
        if isinstance(item, (rec.Record, fb.Event)):
            self.accepted.append(item)
        else:
            self.rules[item.rule] = self.rules.get(item.rule, 0) + 1

    def check_records_storage(self) -> None:
        """ingest._record_rows takes every accepted record; on failure, name the record."""
        try:
            frame = ingest._record_rows([(r, _PARSED) for r in self.accepted], _NOW)
        except Exception:
            for r in self.accepted:
                try:
                    ingest._record_rows([(r, _PARSED)], _NOW)
                except Exception as exc:
                    raise AssertionError(f"accepted record does not survive storage: {r!r}") from exc
            raise
        assert len(frame) == len(self.accepted) and not frame["event_time"].isna().any()

    def check_feedback_storage(self) -> None:
        """What feedback.write does with the events' ts and confidence."""
        ts = pd.to_datetime([e.ts for e in self.accepted], utc=True)
        assert not ts.isna().any()
        assert all(0.0 <= e.confidence <= 1.0 for e in self.accepted)

    def assert_reaches(self, rules: set[str], min_accepted: int) -> None:
        missing = rules - set(self.rules)
        assert not missing, f"the generator never produced {sorted(missing)}; rules seen: {self.rules}"
        assert len(self.accepted) >= min_accepted, f"only {len(self.accepted)} inputs accepted"


# --- the seeded generator: the same pools as the strategies above, at plain-random speed

_ODD_NO_SURROGATE = [c for c in ODD_CHARS if not "\ud800" <= c <= "\udfff"]


class _Gen:
    """Poison-biased inputs from one seed (see the module docstring for why not strategies)."""

    def __init__(self, seed: int):
        self.r = random.Random(seed)

    def char(self, surrogates: bool = True) -> str:
        r = self.r.random()
        if r < 0.35:
            return self.r.choice(ODD_CHARS if surrogates else _ODD_NO_SURROGATE)
        if r < 0.7:
            return chr(self.r.randint(32, 126))
        cp = self.r.randint(0, 0x10FFFF)
        if not surrogates and 0xD800 <= cp <= 0xDFFF:
            cp = 0xE000
        return chr(cp)

    def text(self, surrogates: bool = True, min_size: int = 0, max_size: int = 10) -> str:
        return "".join(self.char(surrogates) for _ in range(self.r.randint(min_size, max_size)))

    def number(self):
        k = self.r.randrange(5)
        if k == 0:
            return self.r.choice(EXTREME_NUMBERS)
        if k == 1:
            return self.r.randint(-(2**70), 2**70)
        if k == 2:
            return struct.unpack("<d", self.r.getrandbits(64).to_bytes(8, "little"))[0]  # any double, NaN too
        if k == 3:
            return self.r.uniform(-1e6, 1e6)
        return self.r.randint(-3, 3)

    def scalar(self):
        k = self.r.randrange(6)
        return [None, self.r.random() < 0.5][k] if k < 2 else self.number() if k < 4 else self.text()

    def value(self, depth: int = 0):
        k = self.r.random()
        if depth >= 3 or k < 0.55:
            return self.scalar()
        if k < 0.75:
            return [self.value(depth + 1) for _ in range(self.r.randint(0, 4))]
        if k < 0.97:
            return {self.text(): self.value(depth + 1) for _ in range(self.r.randint(0, 4))}
        v: object = self.scalar()  # deep, built without recursion
        for _ in range(self.r.choice([101, 150])):  # deeper ones: as text, in json_text
            v = [v] if self.r.random() < 0.5 else {"a": v}
        return v

    def time(self) -> object:
        k = self.r.randrange(5)
        if k == 0:
            return self.r.choice(EXTREME_TIMES)
        if k == 1:
            off = self.r.choice([None, self.r.randint(-1440, 1440)])
            return _iso(self.r.randint(1, 9999), self.r.randint(1, 12), self.r.randint(1, 31), self.r.randint(0, 24),
                        self.r.randint(0, 59), self.r.randint(0, 61),
                        self.r.choice(["", ".5", ".999999", ".1234567"]), off)
        return self.good_time() if k < 4 else self.value()

    def good_time(self) -> str:
        return _iso(self.r.randint(1679, 2260), self.r.randint(1, 12), self.r.randint(1, 28), self.r.randint(0, 23),
                    self.r.randint(0, 59), self.r.randint(0, 59), self.r.choice(["", ".5", ".999999"]),
                    self.r.choice([None, self.r.randint(-1439, 1439)]))

    def mostly(self, good, poison):
        return good() if self.r.random() < 0.75 else poison()

    def record(self) -> dict:
        obj = {self.text(): self.value() for _ in range(self.r.randrange(3))}
        obj.update({
            "id": self.mostly(lambda: "r" + self.text(False, 0, 8), self.value),
            "text": self.mostly(lambda: "t" + self.text(False, 0, 20), self.value),
            "event_time": self.mostly(self.good_time, self.time),
        })
        if self.r.random() < 0.6:
            obj["features"] = self.mostly(
                lambda: {self.text(False): self.r.choice([None, self.number(), self.text(False)])
                         for _ in range(self.r.randrange(4))},
                self.value)
        if self.r.random() < 0.5:
            obj["label"] = self.mostly(lambda: self.r.choice(["spam", "ham", 0, 1, True, 2.5]), self.value)
        for key in [k for k in ("id", "text", "event_time") if self.r.random() < 0.05]:
            del obj[key]
        return obj

    def vote(self) -> dict:
        obj = {self.text(): self.value() for _ in range(self.r.randrange(2))}
        obj["record_id"] = self.mostly(lambda: "r" + self.text(False, 0, 8), self.value)
        for key, good in (("label", lambda: self.r.choice(["spam", "ham", 0, 1])),
                          ("source", lambda: self.r.choice(["alice", "bob"])),
                          ("confidence", self.r.random), ("ts", self.good_time)):
            if self.r.random() < 0.95:
                poison = self.time if key == "ts" else self.value
                if key == "confidence" and self.r.random() < 0.5:
                    poison = self.number
                obj[key] = self.mostly(good, poison)
        return obj

    def any_object(self, shaped) -> object:
        return shaped() if self.r.random() < 0.8 else self.value()

    def json_text(self, shaped) -> str:
        text = _encode(self.any_object(shaped), self.r.random() < 0.5)
        how = "plain" if self.r.random() < 0.4 else self.r.choice(DECORATIONS)
        if how == "bom":
            text = "\ufeff" + text
        elif how == "truncate":
            text = text[: self.r.randrange(max(1, len(text)))]
        elif how in ("deep_value", "deep_field"):
            n = self.r.choice([101, 5_000, 100_000])
            deep_text = "[" * n + "]" * n if self.r.random() < 0.5 else '{"a":' * n + "1" + "}" * n
            if how == "deep_value" or not (text.endswith("}") and len(text) > 2):
                text = deep_text
            else:
                text = text[:-1] + ', "deep": ' + deep_text + "}"
        elif how == "bigint_field" and text.endswith("}") and len(text) > 2:
            text = text[:-1] + ', "big": ' + "9" * self.r.choice([400, 4300]) + "}"
        elif how == "bigint_4300":
            text = "9" * 4301
        elif how == "float_overflow_field" and text.endswith("}") and len(text) > 2:
            text = text[:-1] + ', "huge": 1e400}'  # json reads it as inf
        elif how == "nan_literal":
            text = text.replace("1", "NaN", 1) if "1" in text else "NaN"
        elif how == "infinity_text":
            text = text.replace('"', '"Infinity -0.0 1e-320 ', 1)
        elif how == "garbage":
            text = text + self.text()
        elif how == "surrogate_escape":
            text = text.replace('"', '"\\ud800', 2)
        return text

    def key(self) -> bytes | str | None:
        if self.r.random() < 0.5:
            return None
        k = self.r.randrange(6)
        return [None, "", "r1", b"r1"][k] if k < 4 else self.text() if k == 4 else self.r.randbytes(self.r.randrange(8))

    def labels(self) -> frozenset[str] | None:
        return self.r.choice([None, frozenset({"spam", "ham"}), frozenset({"0", "1", "spam"})])


def test_fuzz_record_validator_seeded():
    """records.validate on generated JSON values, mostly record-shaped with poison in each field."""
    seen = Seen()

    @FUZZ
    @given(seeds)
    def run(seed):
        g = _Gen(seed)
        obj = g.any_object(g.record)
        note(_brief(obj))
        assert_record_outcome(rec.validate(obj, "item 0 (line 1)"), seen)

    run()
    seen.assert_reaches({"invalid_unicode", "too_deeply_nested", "event_time_out_of_range", "bad_event_time",
                         "bad_feature_value", "bad_label", "bad_extra_value", "not_an_object"}, min_accepted=500)
    seen.check_records_storage()


def test_fuzz_record_json_lines_path_seeded():
    """One JSON Lines line as bytes: BOM, truncation, deep nesting, huge numbers, NaN
    literals, surrogates escaped and raw (raw ones make invalid UTF-8 bytes)."""
    seen = Seen()

    @FUZZ
    @given(seeds)
    def run(seed):
        g = _Gen(seed)
        text = g.json_text(g.record)
        line = _to_bytes(text) if g.r.random() < 0.3 else text.encode("utf-8", "backslashreplace")
        note(_brief(line))
        assert_record_outcome(rec.parse_json_line(line.strip(), "line 1"), seen)

    run()
    seen.assert_reaches({"invalid_json", "not_utf8", "too_deeply_nested", "number_too_large", "invalid_unicode",
                         "event_time_out_of_range", "bad_extra_value"}, min_accepted=300)
    seen.check_records_storage()


FEEDBACK_POISON_RULES = {"invalid_json", "too_deeply_nested", "number_too_large", "invalid_unicode", "bad_ts",
                         "ts_out_of_range", "bad_confidence", "confidence_out_of_range", "bad_label",
                         "bad_record_id", "key_mismatch", "unknown_label", "not_an_object"}


def test_fuzz_feedback_validator_seeded_str_values():
    """feedback.validate with the value as str (lone surrogates included, as Python holds them)."""
    seen = Seen()

    @FUZZ
    @given(seeds)
    def run(seed):
        g = _Gen(seed)
        text, key, labels = g.json_text(g.vote), g.key(), g.labels()
        note(_brief((text, key, labels)))
        assert_feedback_outcome(fb.validate(fb.Position("t", 0, 1), text, key, labels), seen)

    run()
    seen.assert_reaches(FEEDBACK_POISON_RULES, min_accepted=300)
    seen.check_feedback_storage()


def test_fuzz_feedback_validator_seeded_bytes_values():
    """feedback.validate with the value as bytes, as Kafka and the drop folder deliver it
    (a tombstone's None too)."""
    seen = Seen()

    @FUZZ
    @given(seeds)
    def run(seed):
        g = _Gen(seed)
        text, key, labels = g.json_text(g.vote), g.key(), g.labels()
        value = None if g.r.random() < 0.01 else _to_bytes(text) if g.r.random() < 0.3 \
            else text.encode("utf-8", "backslashreplace")
        note(_brief((value, key, labels)))
        assert_feedback_outcome(fb.validate(fb.Position("t", 0, 1), value, key, labels), seen)

    run()
    seen.assert_reaches(FEEDBACK_POISON_RULES | {"not_utf8"}, min_accepted=300)
    seen.check_feedback_storage()


# --- strategy-driven (shrinking) variants


@STRATEGY
@given(any_object)
def test_fuzz_record_validator_strategies(obj):
    """records.validate on st.recursive JSON values and record-shaped dicts."""
    _check_one_record(rec.validate(obj, "item 0 (line 1)"))


@STRATEGY
@given(json_texts(), st.booleans())
def test_fuzz_record_json_lines_path_strategies(text, as_valid_utf8):
    line = text.encode("utf-8", "backslashreplace") if as_valid_utf8 else _to_bytes(text)
    _check_one_record(rec.parse_json_line(line.strip(), "line 1"))


def _check_one_record(item) -> None:
    assert_record_outcome(item)
    if isinstance(item, rec.Record):  # few examples here: the full frame each time
        ingest._record_rows([(item, _PARSED)], _NOW)


keys = st.one_of(st.none(), st.just(""), texts, st.binary(max_size=8), st.just(b"r1"), st.just("r1"))
allowed = st.sampled_from([None, frozenset({"spam", "ham"}), frozenset({"0", "1", "spam"})])


@STRATEGY
@given(json_texts(st.one_of(vote_shaped, vote_shaped, json_values)), keys, allowed, st.booleans())
def test_fuzz_feedback_validator_strategies(text, key, labels, as_bytes):
    value = _to_bytes(text) if as_bytes else text
    assert_feedback_outcome(fb.validate(fb.Position("t", 0, 1), value, key, labels))


@settings(FUZZ, max_examples=80)
@given(st.lists(st.one_of(record_shaped, json_values), max_size=6), st.integers(1, 64), st.booleans())
def test_fuzz_json_array_read_in_tiny_chunks_matches_json_loads(items, chunk, indent):
    """The streaming .json reader, whose buffer ends anywhere (a cut number, string, escape
    or literal), reads exactly what json.loads reads: 'read more' only when the error is
    the buffer's end, never a misreport."""
    text = json.dumps(items, indent=1 if indent else None, ensure_ascii=True, allow_nan=False) \
        if _finite(items) else "[]"
    expected = json.loads(text)
    old = rec._CHUNK
    rec._CHUNK = chunk
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "a.json"
            path.write_text(text)
            got = list(rec.read_records(path))
    finally:
        rec._CHUNK = old
    assert len(got) == len(expected)
    for item, obj in zip(got, expected):
        assert_record_outcome(item)
        assert item == rec.validate(obj, item.position)


def _finite(v) -> bool:
    try:
        json.dumps(v, allow_nan=False)
    except ValueError:
        return False
    return True


# ------------------------------------------------------------------ whole ingest steps

_OK = '"text": "t", "event_time": "2024-01-01T00:00:00Z"'
_DEEP_LIST = "[" * 100_000 + "]" * 100_000
# (template with {id}, expected rule, also valid in a .json array)
RECORD_POISONS = [
    ('{{"id": "{id}", "text": "t", "event_time": "0001-01-01T00:00:00+01:00"}}', "event_time_out_of_range", True),
    ('{{"id": "{id}", "text": "t", "event_time": "1500-01-01"}}', "event_time_out_of_range", True),
    ('{{"id": "{id}", "text": "t", "event_time": "9999-12-31T23:59:59-23:59"}}', "event_time_out_of_range", True),
    ('{{"id": "{id}", ' + _OK + ', "features": {{"f": ' + "9" * 400 + "}}}}", "bad_feature_value", True),
    ('{{"id": "{id}", ' + _OK + ', "label": ' + "9" * 400 + "}}", "bad_label", True),
    ('{{"id": "{id}\\ud800", ' + _OK + "}}", "invalid_unicode", True),
    ('{{"id": "{id}", "text": "\\ud800", "event_time": "2024-01-01"}}', "invalid_unicode", True),
    ('{{"id": "{id}", ' + _OK + ', "features": {{"\\ud800": 1}}}}', "invalid_unicode", True),
    ('{{"id": "{id}", ' + _OK + ', "features": {{"f": "\\udfff"}}}}', "invalid_unicode", True),
    ('{{"id": "{id}", ' + _OK + ', "\\ud800": 1}}', "invalid_unicode", True),
    ('{{"id": "{id}", ' + _OK + ', "x": "\\ud800"}}', "invalid_unicode", True),
    ('{{"id": "{id}", ' + _OK + ', "label": "\\ud800"}}', "invalid_unicode", True),
    ('{{"id": "{id}", ' + _OK + ', "x": ' + _DEEP_LIST + "}}", "too_deeply_nested", True),
    ('{{"id": "{id}", ' + _OK + ', "x": ' + '{{"a":' * 100_000 + "1" + "}}" * 100_000 + "}}",
     "too_deeply_nested", True),
    ('{{"id": "{id}", ' + _OK + ', "x": ' + "[" * 200 + "]" * 200 + "}}", "too_deeply_nested", True),
    ('{{"id": "{id}", ' + _OK + ', "x": ' + "7" * 5000 + "}}", "number_too_large", True),
    ('{{"id": "{id}", ' + _OK + ', "x": 1e400}}', "bad_extra_value", True),
    ('{{"id": "{id}", ' + _OK + ', "f": NaN}}', "invalid_json", False),  # a .json file with NaN is unparseable
]
good_records = st.builds(
    lambda text, t, feats, label: {"text": text, "event_time": t, "features": feats, "label": label},
    st.text(clean_chars, min_size=1, max_size=30).map(lambda s: "t" + s), good_times,
    st.dictionaries(clean_texts, st.none() | st.floats(allow_nan=False, allow_infinity=False) | clean_texts
                    | st.integers(-(2**63), 2**63 - 1), max_size=3),
    st.none() | st.sampled_from(["spam", "ham", 1]))


_example = itertools.count()


@pytest.fixture(scope="module")
def shared_root(tmp_path_factory) -> tuple[Paths, Store]:
    """One data root and DuckDB file for all examples of a whole-step test (a new file costs
    about a second); each example writes its own uniquely named, unique-content file and
    checks only that file's rows."""
    paths = Paths.at(tmp_path_factory.mktemp("fuzz-steps") / "home").ensure()
    return paths, Store(paths.db).init()


@STEP
@given(items=st.lists(st.one_of(good_records, st.integers(0, len(RECORD_POISONS) - 1)), min_size=1, max_size=10),
       suffix=st.sampled_from([".jsonl", ".json", ".jsonl.gz", ".json.gz"]), bom=st.booleans())
def test_fuzz_whole_ingest_step_keeps_valid_records_and_rejects_poison(shared_root, items, suffix, bom):
    """scan + plan_batches + process_files on a real DuckDB file: no exception, every valid
    record in ``records`` with its exact text, every poison one in ``rejects`` with its rule."""
    paths, store = shared_root
    n = next(_example)
    lines_mode = ".jsonl" in suffix
    expected_good: dict[str, str] = {}
    expected_bad: dict[int, str] = {}
    texts_out = []
    for i, item in enumerate(items):
        rid = f"e{n}-r{i}"
        if isinstance(item, int):
            template, rule, in_arrays = RECORD_POISONS[item]
            if not (lines_mode or in_arrays):
                template, rule = RECORD_POISONS[0][:2]
            texts_out.append(template.format(id=rid))
            expected_bad[i] = rule
        else:
            texts_out.append(json.dumps({"id": rid, **item}))
            expected_good[rid] = item["text"]
    body = "\n".join(texts_out) + "\n" if lines_mode else "[\n" + ",\n".join(texts_out) + "\n]"
    with store.session():
        drop(paths.raw, f"fuzz-{n}{suffix}", (("\ufeff" if bom else "") + body).encode("utf-8"))
        (sha,) = ingest.scan(paths, store, debounce_s=0).registered
        outcomes = [o for b in ingest.plan_batches(store) for o in ingest.process_files(paths, store, list(b.files))]
        assert [(o.sha256, o.status) for o in outcomes] == [(sha, "processed")]
        with store.connect() as con:
            stored = dict(con.execute("SELECT id, text FROM records WHERE file_sha256 = ?", [sha]).fetchall())
            rejects = con.execute("SELECT position, rule, message FROM rejects WHERE file_sha256 = ?",
                                  [sha]).fetchall()
    assert stored == expected_good
    found = {int(re.match(r"(?:line|item) (\d+)", pos).group(1)) - (1 if lines_mode else 0): rule
             for pos, rule, _ in rejects}
    assert found == expected_bad
    assert all(message for _, _, message in rejects)


vote_lines = st.builds(lambda rid, label, conf, t: {"record_id": rid, "label": label, "source": "alice",
                                                    "confidence": conf, "ts": t},
                       st.text(clean_chars, min_size=1, max_size=10).map(lambda s: "r" + s),
                       st.sampled_from(["spam", "ham"]), st.floats(0, 1), good_times)
_VOTE = '"label": "spam", "source": "s", "ts": "2024-01-01T00:00:00Z"'
FEEDBACK_POISONS = [
    ('{"record_id": "r", "label": "spam", "ts": "0001-01-01T00:00:00+01:00"}', "ts_out_of_range"),
    ('{"record_id": "r", "label": "spam", "ts": "9999-12-31"}', "ts_out_of_range"),
    ('{"record_id": "r", "label": "spam", "ts": "1500-01-01T00:00:00Z"}', "ts_out_of_range"),
    ('{"record_id": "r", "label": ' + "9" * 400 + ', "ts": "2024-01-01"}', "bad_label"),
    ('{"record_id": "r", "confidence": ' + "9" * 400 + ", " + _VOTE + "}", "confidence_out_of_range"),
    ('{"record_id": "r", "confidence": ' + "9" * 5000 + ", " + _VOTE + "}", "number_too_large"),
    ('{"record_id": "r\\ud800", ' + _VOTE + "}", "invalid_unicode"),
    ('{"record_id": "r", "label": "\\ud800", "ts": "2024-01-01"}', "invalid_unicode"),
    ('{"record_id": "r", "label": "spam", "source": "\\udc00", "ts": "2024-01-01"}', "invalid_unicode"),
    ("[" * 100_000 + "]" * 100_000, "too_deeply_nested"),
    ('{"a":' * 100_000 + "1" + "}" * 100_000, "too_deeply_nested"),
    ('{"record_id": "r", ' + _VOTE + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}", "too_deeply_nested"),
    ("{not json", "invalid_json"),
]


@STEP
@given(items=st.lists(st.one_of(vote_lines, st.integers(0, len(FEEDBACK_POISONS) - 1)), min_size=1, max_size=10),
       first_vote=vote_lines, bom=st.booleans())
def test_fuzz_whole_feedback_file_step(shared_root, items, first_vote, bom):
    """scan_files + ingest_file on a real DuckDB file: events + rejects = lines, each poison
    line rejected with its rule, each valid vote stored."""
    paths, store = shared_root
    n = next(_example)
    items = [first_vote, *items]  # one valid line: a file of only broken lines is quarantined
    lines = [json.dumps(i) if isinstance(i, dict) else FEEDBACK_POISONS[i][0] for i in items]
    lines.append(json.dumps({"example": n}))  # unique content: files are registered by sha256
    with store.session():
        drop(paths.feedback, f"votes-{n}.jsonl", (("\ufeff" if bom else "") + "\n".join(lines) + "\n").encode("utf-8"))
        (sha,) = feedback_sources.scan_files(paths, store, debounce_s=0)
        result = feedback_sources.ingest_file(paths, store, sha, None)
        with store.connect() as con:
            events = dict(con.execute('SELECT "offset", record_id FROM feedback_events WHERE topic = ?',
                                      [f"file:{sha}"]).fetchall())
            rejects = dict(con.execute('SELECT "offset", rule FROM feedback_rejects WHERE topic = ?',
                                       [f"file:{sha}"]).fetchall())
    assert result["status"] == "processed"
    assert len(events) + len(rejects) == len(lines)
    assert events == {k: i["record_id"] for k, i in enumerate(items, start=1) if isinstance(i, dict)}
    assert rejects == {**{k: FEEDBACK_POISONS[i][1] for k, i in enumerate(items, start=1) if isinstance(i, int)},
                       len(lines): "bad_record_id"}


# ------------------------------------------------------------------ plain regressions

@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_poison_records_land_in_rejects_and_their_batch_mates_in_records(paths, store, suffix):
    """Through the real ingest step, every poison of RECORD_POISONS between valid records,
    plus a batch mate in another file: the run used to fail on each of them (OverflowError,
    UnicodeEncodeError, RecursionError, OutOfBoundsDatetime at insert), storing nothing."""
    poisons = [(t, r) for t, r, in_arrays in RECORD_POISONS if in_arrays or suffix == ".jsonl"]
    items = [json.dumps(record(0))]
    for i, (template, _) in enumerate(poisons, start=1):
        items += [template.format(id=f"p{i}"), json.dumps(record(i))]
    body = "\n".join(items) + "\n" if suffix == ".jsonl" else "[\n" + ",\n".join(items) + "\n]"
    drop(paths.raw, "a" + suffix, body)
    drop(paths.raw, "b.jsonl", [record("-mate")])  # a batch mate in another file of the same batch
    ingest.scan(paths, store, debounce_s=0)
    (batch,) = ingest.plan_batches(store)
    outcomes = ingest.process_files(paths, store, list(batch.files))
    assert {o.status for o in outcomes} == {"processed"}
    with store.connect() as con:
        ids = {r[0] for r in con.execute("SELECT id FROM records").fetchall()}
        rejects = con.execute("SELECT position, rule, record_id FROM rejects").fetchall()
    assert ids == {f"r{i}" for i in range(len(poisons) + 1)} | {"r-mate"}
    index = (lambda pos: int(pos.split()[1]) - 1) if suffix == ".jsonl" else (lambda pos: int(pos.split()[1]))
    assert {index(pos): rule for pos, rule, _ in rejects} == {2 * i - 1: rule for i, (_, rule) in enumerate(poisons, 1)}
    assert "p6\\ud800" in {rid for _, _, rid in rejects}  # a surrogate id, stored escaped


@pytest.mark.parametrize("line,rule", FEEDBACK_POISONS)
def test_poison_feedback_message_is_rejected_with_its_rule(line, rule):
    for value in (line, line.encode("utf-8")):
        item = fb.validate(fb.Position("t", 0, 7), value, None, None)
        assert isinstance(item, fb.Rejected) and item.rule == rule, item
        _storable(item.raw, item.error, item.key)


def test_feedback_key_with_a_lone_surrogate_is_stored_escaped():
    item = fb.validate(fb.Position("t", 0, 1), '{"record_id": "r1", "label": "spam", "ts": "2024-01-01"}',
                       "k\udc00", None)
    assert item.rule == "key_mismatch" and item.key == "k\\udc00"
    _storable(item.raw, item.error, item.key)


def test_feedback_value_with_a_raw_lone_surrogate_is_rejected_and_storable():
    value = '{"record_id": "r\ud800", "label": "spam", "ts": "2024-01-01"}'  # a str Python holds, no JSON escape
    item = fb.validate(fb.Position("t", 0, 1), value, None, None)
    assert item.rule == "invalid_unicode" and "\\ud800" in item.raw
    _storable(item.raw, item.error)


@pytest.mark.parametrize("value", ['\ufeff{"record_id": "r1", "label": "spam", "ts": "2024-01-01"}',
                                   b'\xef\xbb\xbf{"record_id": "r1", "label": "spam", "ts": "2024-01-01"}'])
def test_feedback_message_with_a_byte_order_mark_is_accepted(value):
    """It used to be rejected as invalid_json (Unexpected UTF-8 BOM)."""
    item = fb.validate(fb.Position("t", 0, 1), value, None, None)
    assert isinstance(item, fb.Event) and item.record_id == "r1"


def test_feedback_ts_range_matches_the_records_range():
    def vote(ts: str):
        return fb.validate(fb.Position("t", 0, 1), json.dumps({"record_id": "r", "label": "x", "ts": ts}), None, None)

    assert isinstance(vote("2261-12-31T23:59:59Z"), fb.Event)
    assert isinstance(vote("1678-01-01T00:00:00Z"), fb.Event)
    late = vote("2262-01-01T00:00:00Z")
    assert late.rule == "ts_out_of_range" and "2262-01-01" in late.error


def test_poison_feedback_file_lines_land_in_rejects_next_to_valid_votes(paths, store):
    """A drop-folder file with a BOM, valid votes and every poison line: processed, not failed."""
    lines = ['{"record_id": "r1", "label": "spam", "ts": "2024-01-01"}'] + [line for line, _ in FEEDBACK_POISONS] \
        + ['{"record_id": "r2", "label": "ham", "ts": "2024-01-01"}']
    drop(paths.feedback, "v.jsonl", ("\ufeff" + "\n".join(lines) + "\n").encode("utf-8"))
    (sha,) = feedback_sources.scan_files(paths, store, debounce_s=0)
    out = feedback_sources.ingest_file(paths, store, sha, None)
    assert (out["status"], out["events"], out["rejects"]) == ("processed", 2, len(FEEDBACK_POISONS))
    with store.connect() as con:
        rules = [r[0] for r in con.execute('SELECT rule FROM feedback_rejects ORDER BY "offset"').fetchall()]
    assert rules == [rule for _, rule in FEEDBACK_POISONS]


def test_fuzz_budget_adds_up():
    """The seeded fuzz tests alone give each parser at least 10,000 generated inputs."""
    assert 2 * N_FUZZ >= 10_000
    assert FUZZ.max_examples == N_FUZZ and FUZZ.derandomize
