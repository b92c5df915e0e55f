"""The record contract and the streaming reader, file format by file format."""

from __future__ import annotations

import gzip
import json
import tracemalloc

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
