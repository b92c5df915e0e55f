"""The record contract and the streaming reader, file format by file format."""

from __future__ import annotations

import gzip
import json
import tracemalloc
from datetime import date, datetime, timezone

import pandas as pd
import pytest

from stream_sentinel import records as rec
from stream_sentinel.records import FileUnparseable, Record, Reject, read_records

from .conftest import drop, record


def _read(path):
    items = list(read_records(path))
    return [i for i in items if isinstance(i, Record)], [i for i in items if isinstance(i, Reject)]


@pytest.mark.parametrize("name,content", [
    ("one.json", record(1)),
    ("arr.json", [record(1), record(2)]),
    ("lines.jsonl", [record(1), record(2)]),
    ("lines.jsonl.gz", [record(1), record(2)]),
    ("arr.json.gz", [record(1), record(2)]),
    ("concat.json", json.dumps(record(1)) + "\n" + json.dumps(record(2)) + "\n"),
])
def test_every_supported_layout_reads(tmp_path, name, content):
    good, bad = _read(drop(tmp_path, name, content))
    expected = 1 if isinstance(content, dict) else 2
    assert [r.id for r in good] == [f"r{i}" for i in range(1, expected + 1)]
    assert bad == []


def test_unknown_keys_are_kept_in_extra_and_values_normalised(tmp_path):
    r = record(1, features={"n": 3, "lang": "en", "gap": None}, label="spam", source="crm", nested={"a": 1})
    r["event_time"] = "2024-05-01T14:00:00+02:00"
    (good,), _ = _read(drop(tmp_path, "a.json", r))
    assert good.extra == {"source": "crm", "nested": {"a": 1}}
    assert good.features == {"n": 3, "lang": "en", "gap": None}
    assert good.label == "spam"
    assert good.event_time.isoformat() == "2024-05-01T12:00:00+00:00"


@pytest.mark.parametrize("obj,rule", [
    ({"text": "x", "event_time": "2024-01-01"}, "missing_id"),
    ({"id": 7, "text": "x", "event_time": "2024-01-01"}, "bad_id"),
    ({"id": "", "text": "x", "event_time": "2024-01-01"}, "bad_id"),
    ({"id": "a" * 1025, "text": "x", "event_time": "2024-01-01"}, "id_too_long"),
    ({"id": "a", "event_time": "2024-01-01"}, "missing_text"),
    ({"id": "a", "text": 5, "event_time": "2024-01-01"}, "bad_text"),
    ({"id": "a", "text": "   ", "event_time": "2024-01-01"}, "empty_text"),
    ({"id": "a", "text": "x"}, "missing_event_time"),
    ({"id": "a", "text": "x", "event_time": "yesterday"}, "bad_event_time"),
    ({"id": "a", "text": "x", "event_time": 1714560000}, "bad_event_time"),
    ({"id": "a", "text": "x", "event_time": "2024-01-01", "features": [1, 2]}, "bad_features"),
    ({"id": "a", "text": "x", "event_time": "2024-01-01", "features": {"f": [1]}}, "bad_feature_value"),
    ({"id": "a", "text": "x", "event_time": "2024-01-01", "features": {"f": True}}, "bad_feature_value"),
    ({"id": "a", "text": "x", "event_time": "2024-01-01", "label": {"x": 1}}, "bad_label"),
    ([1, 2], "not_an_object"),
])
def test_invalid_records_are_rejected_with_the_rule_and_the_rest_survive(tmp_path, obj, rule):
    path = drop(tmp_path, "mixed.jsonl", [record(1), obj, record(2)])
    good, bad = _read(path)
    assert [r.id for r in good] == ["r1", "r2"]
    assert len(bad) == 1
    assert bad[0].rule == rule
    assert bad[0].position == "line 2"
    assert bad[0].raw  # the rejected input is kept, not lost


def test_bad_lines_in_json_lines_are_rejects_not_a_lost_file(tmp_path):
    body = (json.dumps(record(1)) + "\n{not json\n").encode() + b'{"id": "\xff"}\n' + (json.dumps(record(2)) + "\n").encode()
    good, bad = _read(drop(tmp_path, "x.jsonl", body))
    assert [r.id for r in good] == ["r1", "r2"]
    assert [(b.position, b.rule) for b in bad] == [("line 2", "invalid_json"), ("line 3", "not_utf8")]


def test_nan_is_not_json(tmp_path):
    good, bad = _read(drop(tmp_path, "x.jsonl", '{"id":"a","text":"t","event_time":"2024-01-01","features":{"f":NaN}}\n'
                                                + json.dumps(record(1)) + "\n"))
    assert [b.rule for b in bad] == ["invalid_json"] and len(good) == 1


@pytest.mark.parametrize("name,content,rule,line", [
    ("broken.json", '[{"id": "a", "text": "t", "event_time": "2024-01-01"},\n {"id": "b", "te', "invalid_json", 2),
    ("trailing.json", '[{"id": "a", "text": "t", "event_time": "2024-01-01"}]\n]', "trailing_data", 2),
    ("scalar.json", '"just a string"', "not_records", 1),
    ("empty.json", "   \n", "empty_file", None),
    ("garbage.jsonl", "this is not json\nnor this\n", "invalid_json", 1),
    ("latin1.json", b'{"id": "a", "text": "caf\xe9", "event_time": "2024-01-01"}', "not_utf8", None),
])
def test_unparseable_files_raise_with_location_and_rule(tmp_path, name, content, rule, line):
    with pytest.raises(FileUnparseable) as info:
        list(read_records(drop(tmp_path, name, content)))
    assert info.value.rule == rule
    assert info.value.line == line
    assert rule in str(info.value)


def test_truncated_gzip_is_unparseable(tmp_path):
    data = gzip.compress(("\n".join(json.dumps(record(i)) for i in range(2000))).encode())
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(FileUnparseable) as info:
        list(read_records(path))
    assert info.value.rule == "unreadable_compressed_data"


def test_array_items_split_across_read_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(rec, "_CHUNK", 7)  # force every value to straddle chunk boundaries
    items = [record(i, text="é" * (i % 5 + 1), features={"x": 12345.678 + i}) for i in range(50)]
    good, bad = _read(drop(tmp_path, "arr.json", json.dumps(items, ensure_ascii=False, indent=1)))
    assert [r.id for r in good] == [f"r{i}" for i in range(50)]
    assert good[3].features == {"x": 12345.678 + 3}
    assert bad == []


def test_huge_array_file_is_streamed_not_loaded(tmp_path):
    path = tmp_path / "huge.json"
    with open(path, "w") as fh:
        fh.write("[")
        for i in range(60_000):
            fh.write(("," if i else "") + json.dumps(record(i, text="lorem ipsum dolor sit amet " * 5)))
        fh.write("]")
    size = path.stat().st_size
    assert size > 10_000_000
    tracemalloc.start()
    count = sum(1 for item in read_records(path) if isinstance(item, Record))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert count == 60_000
    assert peak < size / 2, f"peak {peak} bytes for a {size}-byte file: the reader is not streaming"


# ------------------------------------------------------------------ poison values (issue 11)
# Each of these used to escape as an exception (OverflowError, UnicodeEncodeError,
# RecursionError, pandas' OutOfBoundsDatetime at insert time) and fail the whole run, which
# stranded the valid records of the same batch. Now each is a reject with a rule.

_OK = '"text": "t", "event_time": "2024-01-01T00:00:00Z"'
_DEEP_LIST = "[" * 100_000 + "]" * 100_000
_DEEP_DICT = '{"a":' * 100_000 + "1" + "}" * 100_000
POISON_LINES = [
    ('{"id": "p", "text": "t", "event_time": "0001-01-01T00:00:00+01:00"}', "event_time_out_of_range"),
    ('{"id": "p", "text": "t", "event_time": "1500-06-01T00:00:00Z"}', "event_time_out_of_range"),
    ('{"id": "p", "text": "t", "event_time": "9999-12-31T23:59:59-23:59"}', "event_time_out_of_range"),
    ('{"id": "p", "text": "t", "event_time": "9999-01-01"}', "event_time_out_of_range"),
    ('{"id": "p", "text": "t", "event_time": "1677-12-31T23:59:59.999999Z"}', "event_time_out_of_range"),
    ('{"id": "p", "text": "t", "event_time": "2262-01-01T00:00:00Z"}', "event_time_out_of_range"),
    ('{"id": "p", %s, "features": {"f": %s}}' % (_OK, "9" * 400), "bad_feature_value"),
    ('{"id": "p", %s, "features": {"f": -%s}}' % (_OK, "9" * 400), "bad_feature_value"),
    ('{"id": "p", %s, "label": %s}' % (_OK, "9" * 400), "bad_label"),
    ('{"id": "p", %s, "label": %d}' % (_OK, 2**63), "bad_label"),
    ('{"id": "p", %s, "x": %s}' % (_OK, "7" * 5000), "number_too_large"),
    ('{"id": "p", %s, "x": 1e400}' % _OK, "bad_extra_value"),
    ('{"id": "p\\ud800", %s}' % _OK, "invalid_unicode"),
    ('{"id": "p", "text": "t\\ud800", "event_time": "2024-01-01"}', "invalid_unicode"),
    ('{"id": "p", %s, "features": {"k\\udfff": 1}}' % _OK, "invalid_unicode"),
    ('{"id": "p", %s, "features": {"k": "\\ud800"}}' % _OK, "invalid_unicode"),
    ('{"id": "p", %s, "x\\ud800": 1}' % _OK, "invalid_unicode"),
    ('{"id": "p", %s, "x": ["ok", {"y": "\\udc00"}]}' % _OK, "invalid_unicode"),
    ('{"id": "p", %s, "label": "\\ud800"}' % _OK, "invalid_unicode"),
    ('{"id": "p", %s, "x": %s}' % (_OK, _DEEP_LIST), "too_deeply_nested"),
    ('{"id": "p", %s, "x": %s}' % (_OK, "[" * 150 + "]" * 150), "too_deeply_nested"),  # parses, but > MAX_DEPTH
    (_DEEP_LIST, "too_deeply_nested"),
    (_DEEP_DICT, "too_deeply_nested"),
]
_POISON_IDS = [f"{rule}-{i}" for i, (_, rule) in enumerate(POISON_LINES)]


def _assert_storable(reject: Reject) -> None:
    """Rejects go to DuckDB VARCHAR columns, which take only valid UTF-8."""
    for value in (reject.position, reject.rule, reject.message, reject.raw, reject.record_id or ""):
        value.encode("utf-8")
    assert reject.rule and reject.message


@pytest.mark.parametrize("line,rule", POISON_LINES, ids=_POISON_IDS)
def test_poison_in_json_lines_is_a_reject_and_the_rest_of_the_file_survives(tmp_path, line, rule):
    body = json.dumps(record(1)) + "\n" + line + "\n" + json.dumps(record(2)) + "\n"
    good, bad = _read(drop(tmp_path, "p.jsonl", body))
    assert [r.id for r in good] == ["r1", "r2"]
    assert [(b.position, b.rule) for b in bad] == [("line 2", rule)], bad[0].message if bad else None
    _assert_storable(bad[0])
    assert bad[0].raw


@pytest.mark.parametrize("line,rule", POISON_LINES, ids=_POISON_IDS)
def test_poison_in_a_json_array_is_a_reject_of_that_item_only(tmp_path, line, rule):
    """Even a value the decoder cannot take (100k deep, a 5000-digit integer) is stepped
    over and rejected alone: the items after it are still read."""
    body = "[\n" + json.dumps(record(1)) + ",\n" + line + ",\n" + json.dumps(record(2)) + "\n]"
    good, bad = _read(drop(tmp_path, "p.json", body))
    assert [r.id for r in good] == ["r1", "r2"]
    assert [(b.position, b.rule) for b in bad] == [("item 1 (line 3)", rule)]
    _assert_storable(bad[0])


def test_a_lone_surrogate_id_is_escaped_in_the_reject_so_it_can_be_stored(tmp_path):
    path = drop(tmp_path, "s.jsonl", '{"id": "a\\ud800", "text": "t", "event_time": "2024-01-01"}\n')
    (bad,) = list(read_records(path))
    assert bad.rule == "invalid_unicode"
    assert bad.record_id == "a\\ud800"  # the surrogate written out as text
    assert "\\ud800" in bad.message and "\\ud800" in bad.raw


def test_deep_value_is_stepped_over_across_read_chunks(tmp_path, monkeypatch):
    """The skip scanner matches brackets chunk by chunk; brackets and escaped quotes inside
    strings must not count."""
    monkeypatch.setattr(rec, "_CHUNK", 7)
    tricky = '{"id": "d", "s": "]]}\\"[[", "x": ' + "[" * 3000 + '"]\\\\"' + "]" * 3000 + "}"
    body = "[" + json.dumps(record(1)) + "," + tricky + "," + json.dumps(record(2)) + "]"
    good, bad = _read(drop(tmp_path, "p.json", body))
    assert [r.id for r in good] == ["r1", "r2"]
    assert [b.rule for b in bad] == ["too_deeply_nested"]


def test_a_single_deep_object_file_is_a_reject_not_a_crash(tmp_path):
    good, bad = _read(drop(tmp_path, "deep.json", _DEEP_DICT))
    assert good == [] and [(b.position, b.rule) for b in bad] == [("object", "too_deeply_nested")]


def test_event_time_range_is_explicit_and_its_edges_hold():
    """[1678-01-01, 2262-01-01) UTC: inside pandas' nanosecond span, so ingest's
    pd.to_datetime never meets a time it cannot hold."""
    assert rec.EVENT_TIME_MIN == datetime(1678, 1, 1, tzinfo=timezone.utc)
    assert rec.EVENT_TIME_MAX == datetime(2262, 1, 1, tzinfo=timezone.utc)
    assert rec.parse_event_time("1678-01-01T00:00:00Z") == rec.EVENT_TIME_MIN
    assert rec.parse_event_time("1678-01-01T01:00:00+01:00") == rec.EVENT_TIME_MIN
    last = rec.parse_event_time("2261-12-31T23:59:59.999999+00:00")
    assert pd.Timestamp(last) < pd.Timestamp.max.tz_localize("UTC")
    assert pd.Timestamp(rec.EVENT_TIME_MIN) > pd.Timestamp.min.tz_localize("UTC")
    for value in ("1677-12-31T23:59:59Z", "2262-01-01T00:00:00Z", "2261-12-31T23:00:00-01:00",
                  "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59.999999-23:59"):
        with pytest.raises(rec.TimeOutOfRange, match="outside the accepted range"):
            rec.parse_event_time(value)


def test_accepted_poison_neighbours_survive_storage():
    """What is accepted must go through ingest's frame building: -0.0, subnormals, 2**63-1,
    NUL, RTL marks, emoji and a BOM inside text are valid, storable values."""
    from stream_sentinel import ingest

    obj = {"id": "a\x00\u202e", "text": "\ufeff\U0001F600 \u2028", "event_time": "2261-12-31T23:59:59Z",
           "features": {"z": -0.0, "tiny": 1e-320, "big": 1.7e308, "i": 2**63 - 1}, "label": -(2**63),
           "x": 10**400}
    r = rec.validate(obj, "object")
    assert isinstance(r, Record), r
    parsed = ingest._Parsed(ingest.FileOutcome("s", "p", "processed"), date(2024, 1, 1), [r], [])
    frame = ingest._record_rows([(r, parsed)], datetime.now(timezone.utc))
    assert frame["event_time"][0] == pd.Timestamp("2261-12-31T23:59:59Z")


@pytest.mark.parametrize("name", ["bom.json", "bom.jsonl", "bom.json.gz", "bom.jsonl.gz", "bom-lines.json"])
def test_a_utf8_byte_order_mark_at_the_start_is_accepted(tmp_path, name):
    """Windows tools write a BOM; it used to be 'invalid_json ... Expecting value'."""
    if name == "bom.json" or name == "bom.json.gz":
        body = json.dumps([record(1), record(2)])
    else:
        body = json.dumps(record(1)) + "\n" + json.dumps(record(2)) + "\n"
    good, bad = _read(drop(tmp_path, name, ("\ufeff" + body).encode("utf-8")))
    assert [r.id for r in good] == ["r1", "r2"] and bad == []


def test_a_byte_order_mark_inside_a_json_document_is_still_an_error(tmp_path):
    with pytest.raises(FileUnparseable) as info:
        body = "[" + json.dumps(record(1)) + ",\ufeff" + json.dumps(record(2)) + "]"
        list(read_records(drop(tmp_path, "x.json", body)))
    assert info.value.rule == "invalid_json"


class _CountingReader:
    def __init__(self, fh):
        self.fh, self.read_bytes = fh, 0

    def read(self, n=-1):
        data = self.fh.read(n)
        self.read_bytes += len(data)
        return data

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()


def _big_array_with_broken_third_item(tmp_path):
    items = [json.dumps(record(i, text="lorem ipsum " * 10)) for i in range(20_000)]
    items[2] = '{"id": "r2", "text": "a" "b", "event_time": "2024-01-01"}'  # missing ','
    path = drop(tmp_path, "big.json", "[\n" + ",\n".join(items) + "\n]")
    assert path.stat().st_size > 2 << 20
    return path


def test_a_syntax_error_early_in_a_large_array_is_reported_at_once_with_its_line(tmp_path, monkeypatch):
    """It used to read on to the end of the file (or up to 64 MiB) before reporting; only an
    error caused by the end of the buffer means 'read more'."""
    path = _big_array_with_broken_third_item(tmp_path)
    readers = []
    real_open = rec._open_binary
    monkeypatch.setattr(rec, "_open_binary", lambda p: readers.append(_CountingReader(real_open(p))) or readers[-1])
    items = []
    with pytest.raises(FileUnparseable) as info:
        for item in read_records(path):
            items.append(item)
    assert (info.value.rule, info.value.line) == ("invalid_json", 4)
    assert "delimiter" in info.value.message
    assert len(items) == 2
    assert readers[0].read_bytes <= rec._CHUNK, "the reader went on past the broken item"


def test_a_syntax_error_is_not_called_record_too_large(tmp_path, monkeypatch):
    """With the file larger than the value limit, the old reader said record_too_large."""
    path = _big_array_with_broken_third_item(tmp_path)
    monkeypatch.setattr(rec, "MAX_RECORD_BYTES", 1 << 20)
    with pytest.raises(FileUnparseable) as info:
        list(read_records(path))
    assert (info.value.rule, info.value.line) == ("invalid_json", 4)


def test_a_truly_large_value_is_still_record_too_large(tmp_path, monkeypatch):
    monkeypatch.setattr(rec, "MAX_RECORD_BYTES", 1 << 20)
    monkeypatch.setattr(rec, "_CHUNK", 64 << 10)
    body = "[" + json.dumps(record(1, text="x" * (3 << 20))) + "]"
    with pytest.raises(FileUnparseable) as info:
        list(read_records(drop(tmp_path, "big.json", body)))
    assert info.value.rule == "record_too_large"
