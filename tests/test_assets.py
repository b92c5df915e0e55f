"""The ingest job on a real Dagster instance: metadata, data versions, idempotency,
backfills, model changes and the asset checks (a failing check fails the suite)."""

from __future__ import annotations

import shutil
from datetime import datetime, timezone

import pytest

from stream_sentinel import ingest
from stream_sentinel.definitions import build_definitions
from stream_sentinel.embedding.embedder import default_model_path
from stream_sentinel.index import IndexStore
from stream_sentinel.sensors.once import metadata_values
from stream_sentinel.store import Store

from .conftest import drop


def _defs(paths):
    return build_definitions(home=str(paths.home))


def _run(paths, instance, partition_key, files=()):
    job = _defs(paths).resolve_job_def("ingest_job")
    return job.execute_in_process(
        run_config={"ops": {"raw_records": {"config": {"files": list(files)}}}},
        partition_key=partition_key, instance=instance, raise_on_error=False)


def _meta(result, asset):
    (mat,) = [m for m in result.asset_materializations_for_node(asset)]
    return metadata_values(mat.metadata)


UNPARTITIONED = {"vector_index"}  # one index over every day


def _latest(instance, asset, partition):
    """The latest materialization of ``asset`` for ``partition`` (one day), never another day's;
    for the unpartitioned index, its latest materialization."""
    import dagster as dg

    days = None if asset in UNPARTITIONED else [partition]
    (rec,) = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=days), limit=1).records
    assert rec.asset_materialization.partition == (None if asset in UNPARTITIONED else partition)
    return rec


def _data_version(instance, asset, partition):
    return _latest(instance, asset, partition).asset_materialization.tags.get("dagster/data_version")


def _checks(result):
    return {e.check_name: e.passed for e in result.get_asset_check_evaluations()}


def _drop_demo(paths, demo_records, start, n, per_file=40, sub="demo"):
    for i in range(start, start + n, per_file):
        drop(paths.raw / sub, f"demo-{i:05d}.jsonl", demo_records[i:min(i + per_file, start + n)])


def _sensor_batches(paths):
    store = Store.of(paths)
    ingest.scan(paths, store, debounce_s=1)
    return ingest.plan_batches(store)


ALL_CHECKS = {"no_unembedded_records": True, "index_matches_embeddings": True,
              "index_ids_unique": True, "index_dimension_matches_model": True, "no_parked_units": True}


def test_micro_batch_end_to_end_then_rerun_then_incremental(paths, instance, demo_records, embedder):
    _drop_demo(paths, demo_records, 0, 120)
    (batch,) = _sensor_batches(paths)
    result = _run(paths, instance, batch.partition_key, batch.files)
    assert result.success
    assert _checks(result) == ALL_CHECKS
    raw = _meta(result, "raw_records")
    assert (raw["records_ingested"], raw["records_rejected"], raw["files_quarantined"]) == (120, 0, 0)
    emb = _meta(result, "embeddings")
    assert emb["records_embedded"] == 120 and emb["model_id"].startswith("all-MiniLM-L6-v2@")
    # the catalog's row count of each table-like asset: the partition's rows
    assert raw["dagster/row_count"] == emb["dagster/row_count"] == 120
    idx = _meta(result, "vector_index")
    assert (idx["mode"], idx["ntotal"], idx["version"]) == ("rebuild", 120, "v000001")
    day = batch.partition_key
    versions = {a: _data_version(instance, a, day) for a in ("raw_records", "embeddings", "vector_index")}
    assert all(versions.values())

    # what the user came for: the text of a record finds that record
    loaded = IndexStore(paths.index).load()
    target = demo_records[17]
    hits = loaded.search(embedder.embed([target["text"]]), 3)[0]
    assert hits[0][0] == target["id"] and hits[0][1] > 0.99

    # the same batch again (a retried run): nothing added, same data versions
    again = _run(paths, instance, batch.partition_key, batch.files)
    assert again.success and _checks(again) == ALL_CHECKS
    assert _meta(again, "raw_records")["records_ingested"] == 0
    assert _meta(again, "raw_records")["records_skipped_identical"] == 120
    assert _meta(again, "embeddings")["records_embedded"] == 0
    assert _meta(again, "vector_index")["mode"] == "unchanged"
    assert _latest(instance, "raw_records", day).run_id == again.run_id  # compared with the re-run itself
    assert {a: _data_version(instance, a, day) for a in versions} == versions

    # a small new batch grows the index in place
    _drop_demo(paths, demo_records, 120, 20)
    (small,) = _sensor_batches(paths)
    grown = _run(paths, instance, small.partition_key, small.files)
    assert grown.success and _checks(grown) == ALL_CHECKS
    idx = _meta(grown, "vector_index")
    assert (idx["mode"], idx["n_new"], idx["ntotal"], idx["parent_version"]) == ("incremental", 20, 140, "v000001")
    assert _latest(instance, "vector_index", small.partition_key).run_id == grown.run_id
    assert _data_version(instance, "vector_index", small.partition_key) != versions["vector_index"]


def test_bad_files_are_quarantined_and_the_run_still_succeeds(paths, instance):
    drop(paths.raw, "good.jsonl", [{"id": "g1", "text": "fine", "event_time": "2024-01-01T00:00:00Z"},
                                   {"id": "g2", "text": "", "event_time": "2024-01-01T00:00:00Z"}])
    drop(paths.raw, "bad.json", "{{{")
    (batch,) = _sensor_batches(paths)
    result = _run(paths, instance, batch.partition_key, batch.files)
    assert result.success and _checks(result) == ALL_CHECKS
    raw = _meta(result, "raw_records")
    assert (raw["records_ingested"], raw["records_rejected"], raw["files_quarantined"]) == (1, 1, 1)
    assert "bad.json" in raw["problem_files"]
    assert list(paths.failed.rglob("bad.json.error.json"))


def test_backfill_of_a_past_day_is_idempotent(paths, instance, demo_records):
    _drop_demo(paths, demo_records, 0, 60, sub="day1")
    store = Store.of(paths)
    ingest.scan(paths, store, debounce_s=1, now=datetime(2025, 1, 10, 8, tzinfo=timezone.utc))
    ingest.plan_batches(store)
    _drop_demo(paths, demo_records, 60, 30, sub="day2")
    ingest.scan(paths, store, debounce_s=1, now=datetime(2025, 1, 11, 8, tzinfo=timezone.utc))
    ingest.plan_batches(store)

    # what a UI backfill runs: one run per partition, no file list -> every file of that day
    days = ("2025-01-10", "2025-01-11")
    for day in days:
        assert _run(paths, instance, day).success
    status = store.status()
    assert status["records"] == 90 and status["embedded"] == 90
    first = {day: _data_version(instance, "raw_records", day) for day in days}
    assert all(first.values()) and first[days[0]] != first[days[1]]  # the version is the day's data

    # each day re-run is compared with its own first run, never with the other day
    redo = _run(paths, instance, days[0])
    assert redo.success and _checks(redo) == ALL_CHECKS
    assert _meta(redo, "raw_records")["records_ingested"] == 0
    assert _meta(redo, "raw_records")["partition_records"] == 60
    assert store.status()["records"] == 90
    assert _latest(instance, "raw_records", days[0]).run_id == redo.run_id
    assert _data_version(instance, "raw_records", days[0]) == first[days[0]]
    redo2 = _run(paths, instance, days[1])
    assert redo2.success and _meta(redo2, "raw_records")["partition_records"] == 30
    assert _latest(instance, "raw_records", days[1]).run_id == redo2.run_id
    assert _data_version(instance, "raw_records", days[1]) == first[days[1]]
    assert _data_version(instance, "raw_records", days[0]) == first[days[0]]  # day 1 untouched by day 2


def test_files_from_another_day_are_refused_with_a_clear_error(paths, instance):
    drop(paths.raw, "a.jsonl", [{"id": "a", "text": "t", "event_time": "2024-01-01T00:00:00Z"}])
    (batch,) = _sensor_batches(paths)
    result = _run(paths, instance, "2025-01-01", batch.files)
    assert not result.success
    failure = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"][0]
    assert "did not arrive on 2025-01-01" in str(failure.event_specific_data.error.message)


@pytest.mark.parametrize("backend", ["duckdb", "postgres"], indirect=True)
def test_index_checks_fail_when_index_and_embeddings_disagree(backend, paths, instance, demo_records):
    from datetime import timedelta

    _drop_demo(paths, demo_records, 0, 30)
    (batch,) = _sensor_batches(paths)
    assert _run(paths, instance, batch.partition_key, batch.files).success
    checks_job = _defs(paths).resolve_job_def("index_checks_job")
    ok = checks_job.execute_in_process(instance=instance, raise_on_error=False)
    assert ok.success and all(_checks(ok).values())
    ghost = """INSERT INTO embeddings SELECT ?, model_id, ?, dim, vector, ? FROM embeddings LIMIT 1"""
    now = datetime.now(timezone.utc)
    if backend == "postgres":  # runs overlap: a vector embedded after this version was built is the next one's
        with Store.of(paths).transaction() as con:
            con.execute(ghost, ["newer", 999998, now + timedelta(seconds=5)])
        assert _checks(checks_job.execute_in_process(instance=instance, raise_on_error=False))[
            "index_matches_embeddings"] is True
    # an embedding the index does not hold although it was written long before the index was built
    with Store.of(paths).transaction() as con:
        con.execute(ghost, ["ghost", 999999, now - timedelta(hours=1)])
    bad = checks_job.execute_in_process(instance=instance, raise_on_error=False)
    assert not bad.success
    assert _checks(bad)["index_matches_embeddings"] is False


def test_new_model_reembeds_on_backfill_and_rebuilds_index(paths, instance, demo_records, tmp_path, monkeypatch):
    _drop_demo(paths, demo_records, 0, 40)
    (batch,) = _sensor_batches(paths)
    first = _run(paths, instance, batch.partition_key, batch.files)
    old_model = _meta(first, "embeddings")["model_id"]
    model = tmp_path / "minilm-finetuned"
    shutil.copytree(default_model_path(), model)
    (model / "README.md").write_text("a different model\n")
    monkeypatch.setenv("STREAM_SENTINEL_MODEL_PATH", str(model))

    result = _run(paths, instance, batch.partition_key)  # backfill of the day with the new model
    assert result.success and _checks(result) == ALL_CHECKS
    emb = _meta(result, "embeddings")
    assert emb["model_id"].startswith("minilm-finetuned@") and emb["model_id"] != old_model
    assert emb["records_embedded"] == 40
    idx = _meta(result, "vector_index")
    assert (idx["mode"], idx["ntotal"], idx["model_id"]) == ("rebuild", 40, emb["model_id"])
