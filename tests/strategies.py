"""Hypothesis strategies shared by the fuzz tests (the parsers' and the HTTP API's): JSON
values with the odd characters and extreme numbers that broke parsers before, and record-
and vote-shaped dicts whose fields are usually valid, so whole inputs get accepted too."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

# the HTTP fuzz tests: reproducible, no example database, no health check on slow examples
FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


JSON = {"Content-Type": "application/json"}  # what a POST with a raw body says it is


def json_body(obj) -> bytes:
    """``obj`` as a request body, lone surrogates and all."""
    try:
        return json.dumps(obj).encode("utf-8", "surrogatepass")
    except ValueError:  # an integer too long to write: send what Python prints instead
        return repr(obj).encode("utf-8", "surrogatepass")

ODD_CHARS = ["\ud800", "\udbff", "\udc00", "\udfff", "\x00", "\x1f", "\u202e", "\u200f", "\U0001F600",
             "\ufeff", "\u2028", "\uffff", "\ufffe", "\U0010FFFF", "é", "\n", '"', "\\", "{", "]"]
chars = st.one_of(st.sampled_from(ODD_CHARS), st.characters(codec="utf-8"), st.characters(categories=["Cs"]))
texts = st.text(chars, max_size=10)
clean_chars = st.one_of(st.sampled_from([c for c in ODD_CHARS if not "\ud800" <= c <= "\udfff"]),
                        st.characters(codec="utf-8"))
clean_texts = st.text(clean_chars, max_size=10)

EXTREME_NUMBERS = [10**400, -(10**400), 10**4000, -0.0, 0.0, 1e-320, 5e-324, -5e-324, 1.7976931348623157e308,
                   float("nan"), float("inf"), float("-inf"), 2**63, 2**63 - 1, -(2**63), -(2**63) - 1, 2**64, 1.0]
numbers = st.one_of(st.integers(), st.floats(), st.sampled_from(EXTREME_NUMBERS))
scalars = st.one_of(st.none(), st.booleans(), numbers, texts)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4), max_leaves=12)


def _iso(y: int, mo: int, d: int, h: int, mi: int, s: int, frac: str, off: int | None) -> str:
    if off is None or off == 0:
        tz = "" if off is None else "Z"
    else:
        tz = f"{'+' if off > 0 else '-'}{abs(off) // 60:02d}:{abs(off) % 60:02d}"
    return f"{y:04d}-{mo:02d}-{d:02d}T{h:02d}:{mi:02d}:{s:02d}{frac}{tz}"


EXTREME_TIMES = [
    "0001-01-01T00:00:00+01:00", "0001-01-01", "1500-06-01T12:00:00Z", "9999-12-31T23:59:59.999999-23:59",
    "9999-12-31", "1677-09-21T00:12:43Z", "1677-12-31T23:59:59.999999Z", "1678-01-01T00:00:00Z",
    "2261-12-31T23:59:59.999999Z", "2262-01-01T00:00:00Z", "2262-04-11T23:47:16Z", "2016-12-31T23:59:60Z",
    "2024-02-30", "2024-01-01T00:00:00+24:00", "2024-01-01T00:00:00+23:59", "2024-01-01T00:00:00-23:59",
    "2024-01-01T00:00:00+23:59:59.999999", "", " ", "yesterday", "NaN", "0000-01-01", "2024-01-01\x00",
    "2024-01-01T00:00:00\ud800", "\ufeff2024-01-01", "2024-01-01T00:00:00Z" * 3,
]
times = st.one_of(
    st.sampled_from(EXTREME_TIMES),
    st.builds(_iso, st.integers(1, 9999), st.integers(1, 12), st.integers(1, 31), st.integers(0, 24),
              st.integers(0, 59), st.integers(0, 61), st.sampled_from(["", ".5", ".999999", ".1234567"]),
              st.none() | st.integers(-1440, 1440)),
    texts, numbers, st.none(),
)
good_times = st.builds(_iso, st.integers(1679, 2260), st.integers(1, 12), st.integers(1, 28), st.integers(0, 23),
                       st.integers(0, 59), st.integers(0, 59), st.sampled_from(["", ".5", ".999999"]),
                       st.none() | st.integers(-1439, 1439))


def _mostly(good, poison):
    """A field that is usually valid, so that whole records get accepted too."""
    return st.one_of(good, good, good, poison)


feature_values = st.one_of(st.none(), numbers, clean_texts)
record_shaped = st.builds(
    lambda base, more: {**more, **base},
    st.fixed_dictionaries(
        {"id": _mostly(st.text(clean_chars, min_size=1, max_size=8).map(lambda s: "r" + s), json_values),
         "text": _mostly(st.text(clean_chars, min_size=1, max_size=20).map(lambda s: "t" + s), json_values),
         "event_time": _mostly(good_times, times)},
        optional={"features": _mostly(st.dictionaries(clean_texts, feature_values, max_size=4),
                                      st.dictionaries(texts, feature_values, max_size=4) | json_values),
                  "label": _mostly(st.sampled_from(["spam", "ham", 0, 1, True, 2.5]), json_values)}),
    st.dictionaries(texts, json_values, max_size=3),
)
any_object = st.one_of(record_shaped, record_shaped, json_values)


vote_shaped = st.builds(
    lambda base, more: {**more, **base},
    st.fixed_dictionaries(
        {"record_id": _mostly(st.text(clean_chars, min_size=1, max_size=8).map(lambda s: "r" + s), json_values)},
        optional={"label": _mostly(st.sampled_from(["spam", "ham", 0, 1]), json_values),
                  "source": _mostly(st.sampled_from(["alice", "bob"]), json_values),
                  "confidence": _mostly(st.floats(0, 1), numbers | json_values),
                  "ts": _mostly(good_times, times)}),
    st.dictionaries(texts, json_values, max_size=2),
)


def predict_shaped(known_ids: list[str]):
    """A /v1/predict record: a known id (no text: its stored vector), an unknown one, or any
    value; an optional text, features and routing key, usually valid."""
    ids = st.one_of(st.sampled_from(known_ids), st.sampled_from(known_ids),
                    st.text(clean_chars, min_size=1, max_size=8).map(lambda s: "r" + s), json_values)
    return st.builds(
        lambda base, more: {**more, **base},
        st.fixed_dictionaries({"id": ids}, optional={
            "text": _mostly(st.text(clean_chars, min_size=0, max_size=60), json_values),
            "features": _mostly(st.dictionaries(clean_texts, feature_values, max_size=4), json_values),
            "routing_key": _mostly(st.text(clean_chars, min_size=1, max_size=8), json_values)}),
        st.dictionaries(texts, json_values, max_size=2),
    )
