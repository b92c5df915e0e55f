"""raw_files_sensor driven through build_sensor_context: run keys, partitions, cursor."""

from __future__ import annotations

import dataclasses
import json

import dagster as dg

from stream_sentinel.config import Settings
from stream_sentinel.definitions import build_definitions
from stream_sentinel.resources import StreamSentinelResource
from stream_sentinel.sensors.raw_files import build_raw_files_sensor

from .conftest import drop, record


def _tick(paths, instance, cursor=None, **knobs):
    defs = build_definitions(home=str(paths.home))
    sensor = build_raw_files_sensor(Settings())
    with dg.build_sensor_context(
        instance=instance, cursor=cursor, definitions=defs,
        resources={"sentinel": StreamSentinelResource.from_settings(
            dataclasses.replace(Settings.from_env(), **knobs), home=str(paths.home))},
    ) as ctx:
        return sensor.evaluate_tick(ctx)


def test_new_files_become_one_run_per_micro_batch(paths, instance):
    for i in range(5):
        drop(paths.raw, f"day/f{i}.jsonl", [record(f"{i}-{j}") for j in range(3)])
    result = _tick(paths, instance, batch_max_files=2)
    reqs = result.run_requests
    # the partial tail of the backlog waits for the next tick, which plans it (with whatever
    # arrived meanwhile) once these have started
    assert [len(r.run_config["ops"]["raw_records"]["config"]["files"]) for r in reqs] == [2, 2]
    today = dg.DailyPartitionsDefinition(start_date="2024-01-01", end_offset=1).get_last_partition_key()
    assert {r.partition_key for r in reqs} == {today}
    assert all(r.run_key.startswith(f"raw:{today}:") for r in reqs)
    assert len({r.run_key for r in reqs}) == 2
    assert json.loads(result.cursor) == {"batch_seq": 2}
    tail = _tick(paths, instance, cursor=result.cursor, batch_max_files=2)
    assert [len(r.run_config["ops"]["raw_records"]["config"]["files"]) for r in tail.run_requests] == [1]
    assert json.loads(tail.cursor) == {"batch_seq": 3}
    reqs = reqs + tail.run_requests
    assert len({r.run_key for r in reqs}) == 3
    # run config carries file hashes only, never payloads
    assert "record number" not in json.dumps([r.run_config for r in reqs])
    # a failed micro-batch is retried from the failed step, by the instance dagster.yaml configures
    assert all(int(r.tags["dagster/max_retries"]) >= 1 for r in reqs)
    import yaml

    from stream_sentinel import dagster_home

    instance_yaml = yaml.safe_load(dagster_home.packaged("dagster.yaml"))
    assert instance_yaml["run_retries"]["enabled"] is True


def test_next_tick_with_saved_cursor_launches_nothing_new(paths, instance):
    drop(paths.raw, "a.jsonl", [record(1)])
    first = _tick(paths, instance)
    second = _tick(paths, instance, cursor=first.cursor)
    assert second.run_requests == [] and "no new batch" in second.skip_message
    drop(paths.raw, "b.jsonl", [record(2)])
    third = _tick(paths, instance, cursor=second.cursor or first.cursor)
    assert len(third.run_requests) == 1
    assert third.run_requests[0].run_key != first.run_requests[0].run_key
    assert json.loads(third.cursor) == {"batch_seq": 2}


def test_lost_cursor_replays_the_same_run_keys(paths, instance):
    """A daemon that dies before saving its cursor asks again with identical run keys,
    which Dagster deduplicates: no file is launched twice."""
    drop(paths.raw, "a.jsonl", [record(1)])
    drop(paths.raw, "b.jsonl", [record(2)])
    first = _tick(paths, instance)
    replay = _tick(paths, instance, cursor=None)
    assert [r.run_key for r in replay.run_requests] == [r.run_key for r in first.run_requests]
    assert [r.run_config for r in replay.run_requests] == [r.run_config for r in first.run_requests]


def test_duplicates_and_unstable_files_are_reported_not_launched(paths, instance):
    drop(paths.raw, "a.jsonl", [record(1)])
    first = _tick(paths, instance)
    drop(paths.raw, "copy.jsonl", [record(1)])
    drop(paths.raw, "writing.jsonl", [record(2)], age=0)
    tick = _tick(paths, instance, cursor=first.cursor, debounce_s=10)
    assert tick.run_requests == []
    assert "1 duplicate file(s)" in tick.skip_message and "1 file(s) still being written" in tick.skip_message


def test_new_files_wait_while_an_ingest_run_is_queued(paths, instance):
    """Under load, files accumulate into one larger batch instead of one queued run per tick."""
    drop(paths.raw, "a.jsonl", [record(1)])
    first = _tick(paths, instance)
    (req,) = first.run_requests
    job = build_definitions(home=str(paths.home)).resolve_job_def("ingest_job")
    queued = instance.create_run_for_job(job, run_config=req.run_config, tags={"dagster/partition": req.partition_key},
                                         status=dg.DagsterRunStatus.NOT_STARTED)
    drop(paths.raw, "b.jsonl", [record(2)])
    drop(paths.raw, "c.jsonl", [record(3)])
    held = _tick(paths, instance, cursor=first.cursor)
    assert held.run_requests == [] and "wait for the queued ingest run" in held.skip_message
    instance.report_run_canceled(queued)  # the queue moves on
    released = _tick(paths, instance, cursor=first.cursor)
    (batch,) = released.run_requests
    assert len(batch.run_config["ops"]["raw_records"]["config"]["files"]) == 2


def test_next_batch_is_planned_shortly_before_the_running_ingest_run_ends(paths, instance):
    """While an ingest run has far to go, new files keep joining the next batch; near its
    expected end (its records at the last measured embedding rate) the batch is planned."""
    from stream_sentinel.sensors.raw_files import PLAN_LEAD_S, seconds_left

    assert seconds_left([], 100.0, now=1000.0) == 0.0
    assert seconds_left([(5000, 1000.0)], None, now=1000.0) == 0.0  # no rate measured yet: plan at once
    assert seconds_left([(5000, 1000.0)], 100.0, now=1010.0) == 40.0
    assert seconds_left([(5000, 1000.0)], 100.0, now=1100.0) == 0.0

    drop(paths.raw, "a.jsonl", [record(1)])
    first = _tick(paths, instance)
    (req,) = first.run_requests
    assert req.tags["stream_sentinel/records"] == "1"
    job = build_definitions(home=str(paths.home)).resolve_job_def("ingest_job")
    running = instance.create_run_for_job(
        job, run_config=req.run_config, status=dg.DagsterRunStatus.STARTED,
        tags={"dagster/partition": req.partition_key, "stream_sentinel/records": "4000"})
    for rate in (100.0, 20.0):  # the fastest recent rate counts (the latest was a small run)
        instance.report_runless_asset_event(dg.AssetMaterialization(
            "embeddings", partition=req.partition_key, metadata={"texts_per_s": rate}))
    drop(paths.raw, "b.jsonl", [record(2)])
    held = _tick(paths, instance, cursor=first.cursor)  # ~40 s to go
    assert held.run_requests == [] and "join the next batch" in held.skip_message
    # the same run, estimated close to its end: the batch is planned now
    instance.delete_run(running.run_id)
    instance.create_run_for_job(
        job, run_config=req.run_config, status=dg.DagsterRunStatus.STARTED,
        tags={"dagster/partition": req.partition_key, "stream_sentinel/records": str(int(100 * PLAN_LEAD_S / 2))})
    drop(paths.raw, "c.jsonl", [record(3)])
    planned = _tick(paths, instance, cursor=first.cursor)
    (batch,) = planned.run_requests
    assert len(batch.run_config["ops"]["raw_records"]["config"]["files"]) == 2
