"""The code location as the UI shows it: the daily partitions' start, the catalog's metadata
(column schemas, table names, owners, code versions), descriptions, and no Dagster warnings
when it loads."""

from __future__ import annotations

import subprocess
import sys
from datetime import date, datetime, timezone

import dagster as dg
import pytest

from stream_sentinel.config import Paths, Settings
from stream_sentinel.definitions import build_definitions

DAILY = ("raw_records", "embeddings", "drift_report")


def _graph(settings: Settings, home) -> dg.AssetGraph:
    return build_definitions(settings, home=str(home)).resolve_asset_graph()


def _start(graph, asset: str) -> str:
    return graph.get(dg.AssetKey(asset)).partitions_def.start.strftime("%Y-%m-%d")


def test_a_new_data_root_starts_its_partitions_on_its_first_day(tmp_path):
    """Not 2024-01-01: a new user's first day is the only partition, not day 1000 of 1000."""
    home = tmp_path / "new"
    today = datetime.now(timezone.utc).date().isoformat()
    graph = _graph(Settings(), home)  # loading creates nothing
    assert not home.exists() and {_start(graph, a) for a in DAILY} == {today}
    paths = Paths.at(home).ensure()  # `up` / the resource make the root and record its day
    assert paths.first_day_file.read_text().strip() == today
    paths.first_day_file.write_text("2026-11-20\n")  # ... a root made some days ago keeps its day
    graph = _graph(Settings(), home)
    assert {_start(graph, a) for a in DAILY} == {"2026-11-20"}
    job = build_definitions(home=str(home)).resolve_job_def("ingest_job")
    assert job.partitions_def.get_first_partition_key() == "2026-11-20"
    # the schedule skips days before the first partition instead of requesting them
    schedule = build_definitions(home=str(home)).resolve_schedule_def("daily_drift_report")
    early = schedule.evaluate_tick(dg.build_schedule_context(
        scheduled_execution_time=datetime(2026, 11, 20, 0, 30, tzinfo=timezone.utc)))
    assert early.skip_message and "before the first partition (2026-11-20)" in early.skip_message


def test_the_start_is_a_setting_and_a_bad_one_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAM_SENTINEL_PARTITIONS_START", "2025-06-01")
    graph = _graph(Settings.from_env(), tmp_path / "home")
    assert {_start(graph, a) for a in DAILY} == {"2025-06-01"}
    with pytest.raises(ValueError, match="STREAM_SENTINEL_PARTITIONS_START='June'"):
        build_definitions(Settings(partitions_start="June"), home=str(tmp_path / "home"))


def test_a_root_made_before_its_day_was_recorded_keeps_the_old_calendar(tmp_path):
    paths = Paths.at(tmp_path / "old")
    paths.home.mkdir()
    paths.db.write_bytes(b"")  # has data: its partitions since 2024-01-01 stay partitions
    assert paths.first_day(today=date(2026, 12, 1)) == "2024-01-01"
    assert paths.ensure().first_day_file.read_text().strip() == "2024-01-01"


def test_the_catalog_shows_tables_columns_owners_and_code_versions(tmp_path):
    graph = _graph(Settings(partitions_start="2026-01-01"), tmp_path / "home")
    tables = {"raw_records": "records", "embeddings": "embeddings", "feedback": "feedback_events",
              "labels": "labels", "training_set": "training_set_rows", "predictions": "predictions"}
    for asset, table in tables.items():
        node = graph.get(dg.AssetKey(asset))
        schema = node.metadata["dagster/column_schema"]
        assert isinstance(schema, dg.TableSchema), asset
        assert node.metadata["dagster/table_name"] == f"metrics.main.{table}"
        assert node.tags["table"] == table
    records = {c.name: c for c in graph.get(dg.AssetKey("raw_records")).metadata["dagster/column_schema"].columns}
    assert records["id"].type == "VARCHAR" and not records["id"].constraints.nullable
    assert records["vec_id"].description == "stable int64 id used by the FAISS index"
    assert "arrival_date" in records
    for key in graph.get_all_asset_keys():
        assert graph.get(key).owners == ["team:stream-sentinel"], key
    assert graph.get(dg.AssetKey("labels")).code_version and graph.get(dg.AssetKey("training_set")).code_version


def test_descriptions_keep_their_placeholders_in_markdown(tmp_path):
    """The UI renders descriptions as markdown: a bare <day> is an HTML tag and disappears."""
    import re

    graph = _graph(Settings(partitions_start="2026-01-01"), tmp_path / "home")
    assert "`reports/<day>.html`" in graph.get(dg.AssetKey("drift_report")).description
    for key in graph.get_all_asset_keys():
        text = re.sub(r"`[^`]*`", "", graph.get(key).description or "")
        assert not re.search(r"<[a-z]", text), f"{key.to_user_string()}: a placeholder outside backticks"


def test_loading_the_code_location_warns_about_nothing():
    """No beta or deprecation warning from Dagster when the definitions load (the drift
    report's backfill_policy printed a BetaWarning in every process that loaded them)."""
    code = ("import warnings\nwarnings.simplefilter('always')\n"
            "with warnings.catch_warnings(record=True) as seen:\n"
            "    import stream_sentinel.definitions as d\n    d.defs().resolve_asset_graph()\n"
            "print([f'{w.category.__name__}: {w.message}' for w in seen if 'dagster' in w.filename\n"
            "       or 'stream_sentinel' in w.filename or 'Beta' in w.category.__name__\n"
            "       or 'Deprecat' in w.category.__name__ or 'Preview' in w.category.__name__])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_files_registered_on_a_past_day_make_that_day_a_partition(tmp_path):
    """A backfill demo (or a test) registers files with a fixed, past arrival time: the
    calendar then starts on that day, not on the day the root was made."""
    from stream_sentinel import ingest
    from stream_sentinel.store import Store

    paths = Paths.at(tmp_path / "home").ensure()
    (paths.raw / "a.jsonl").write_text('{"id": "a", "text": "t", "event_time": "2024-01-01T00:00:00Z"}\n')
    ingest.scan(paths, Store(paths.db).init(), debounce_s=0, now=datetime(2025, 3, 4, 12, tzinfo=timezone.utc))
    assert _start(_graph(Settings(), paths.home), "raw_records") == "2025-03-04"
    ingest.scan(paths, Store(paths.db), debounce_s=0, now=datetime(2025, 5, 1, 12, tzinfo=timezone.utc))
    assert paths.first_day() == "2025-03-04"  # a later day moves nothing
