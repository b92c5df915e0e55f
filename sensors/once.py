"""One pass of every sensor, in this process: what `stream-sentinel run --once` does.

The sensors' own evaluations plan the work (the same run keys and tags a daemon would use,
so a daemon started later does not run a batch again), and the jobs run in process, one
after the other. ``run_outcome`` reads a finished run as ok / rejected / failed, which the
CLI turns into its exit status.
"""

from __future__ import annotations

import os
import time
from typing import Callable

import dagster as dg

from stream_sentinel import ingest, pipeline
from stream_sentinel.config import Paths, Settings
from stream_sentinel.resources import KafkaResource, StreamSentinelResource
from stream_sentinel.status import embedding_model_id
from stream_sentinel.store import Store

from .feedback import evaluate_files, evaluate_kafka
from .raw_files import batch_run_request
from .training import evaluate_retrain

# The tags a sensor launch carries (the keys Dagster shows on every sensor run, and that the
# daemon's de-duplication reads). Dagster exports no public constant for them; spelled out
# here so `run --once` needs no private `dagster._core` import. tests/test_daemon_e2e.py
# asserts the daemon's own runs carry exactly these keys.
RUN_KEY_TAG = "dagster/run_key"
SENSOR_NAME_TAG = "dagster/sensor_name"


def dagster_instance() -> dg.DagsterInstance:
    """The instance of ``$DAGSTER_HOME`` (where `up` runs), else an ephemeral one: `run --once`
    and `model retrain` work on a data root that no `up` has touched."""
    return dg.DagsterInstance.get() if os.environ.get("DAGSTER_HOME") else dg.DagsterInstance.ephemeral()


def console(level: str) -> dict:
    """Run config that keeps Dagster's per-event DEBUG lines off the terminal."""
    return {"loggers": {"console": {"config": {"log_level": level}}}}


def metadata_values(metadata) -> dict:
    """Dagster metadata entries as plain values (what a table cell or JSON wants)."""
    return {k: getattr(v, "value", v) for k, v in metadata.items()}


GATE = "candidate_beats_champion"  # the blocking check whose failure is a verdict, not a fault


def run_outcome(result) -> tuple[str, list[str]]:
    """ok | rejected | failed for one in-process run, and the lines that say why.

    A candidate the gate rejects is the gate doing its job, not a failure: the blocking check
    stops the run before promotion (Dagster marks the run failed), so a run whose only
    failure is that check's step reports ``rejected``. WARN checks never fail a run."""
    failed_checks = [e for e in result.get_asset_check_evaluations() if not e.passed]
    warns = [c for c in failed_checks if c.severity == dg.AssetCheckSeverity.WARN]
    errors = [c for c in failed_checks if c.severity != dg.AssetCheckSeverity.WARN]
    lines = [f"warning: check {c.check_name} (WARN) did not pass: {c.description or ''}".rstrip(": ")
             for c in warns]
    for event in result.get_asset_materialization_events() + result.get_asset_observation_events():
        if event.asset_key != dg.AssetKey("model"):
            continue
        found = (event.step_materialization_data.materialization if event.is_step_materialization
                 else event.asset_observation_data.asset_observation)
        meta = metadata_values(found.metadata)
        lines.append(f"model: candidate {meta.get('candidate') or 'none'} "
                     f"({meta.get('strategy')}: {meta.get('reason')})")
    rejected = [c for c in errors if c.check_name == GATE]
    other_errors = [c for c in errors if c.check_name != GATE]
    failed_steps = {e.step_key for e in result.get_step_failure_events()}
    for c in rejected:
        cand = c.metadata.get("candidate")
        lines.append(f"candidate {cand.value if cand else ''} rejected by {GATE}: {c.description}")
    if result.success and not other_errors:
        return "ok", lines + [f"ok (run id {result.run_id})"]
    if rejected and not other_errors and failed_steps <= {"model"}:
        return "rejected", lines + [f"ok: the champion stays (run id {result.run_id})"]
    why = [f"check {c.check_name} failed" for c in other_errors] + [f"step {k} failed" for k in sorted(failed_steps)]
    return "failed", lines + [f"FAILED ({', '.join(why) or 'run failed'}); run id {result.run_id}"]


def training_due(paths: Paths, settings: Settings) -> bool:
    """What retrain_sensor would say with the labels flushed: is there anything to train on?"""
    with dg.build_resources({"sentinel": StreamSentinelResource.from_settings(settings, home=str(paths.home))}) as res:
        return isinstance(evaluate_retrain(res.sentinel, flush=True), dg.RunRequest)


def run_once(paths: Paths, settings: Settings, wait_seconds: float, say: Callable[[str], None]) -> list[str] | None:
    """Every sensor once, flushed, and their runs in this process, in order: raw batches,
    catch-up embedding, feedback, then training on the new labels. Returns each run's
    outcome (``run_outcome``), or None when there was nothing to do. ``say`` gets the
    progress lines (the CLI prints them to stderr)."""
    from stream_sentinel.definitions import build_definitions

    store = Store.of(paths)
    scanned = ingest.scan(paths, store, settings.debounce_s, settle_s=settings.settle_s)
    # a cron or CI job that just wrote its files expects them in this run: wait out the
    # debounce of files already there (bounded, for a file that never stops growing)
    deadline = time.monotonic() + wait_seconds
    while scanned.unstable and time.monotonic() < deadline:
        say(f"waiting for {len(scanned.unstable)} file(s) still being written (unchanged for "
             f"{settings.debounce_s:g} s counts as done; at most {wait_seconds:g} s)")
        time.sleep(max(0.1, min(settings.debounce_s / 2, deadline - time.monotonic())))
        scanned = ingest.scan(paths, store, settings.debounce_s, settle_s=settings.settle_s)
    ingest.plan_batches(store, settings.batch_max_files, settings.batch_max_records)
    batches = ingest.unfinished_batches(store)
    if scanned.unstable:
        say(f"{len(scanned.unstable)} file(s) still being written after {wait_seconds:g} s; "
             "they wait for the next run")
    for rel, why in scanned.problems:
        say(f"raw/{rel}: {why}")
    batch_days = {b.partition_key for b in batches}
    # days whose records miss vectors for the current model: a failed run, or a new model
    catch_up = [d for d in pipeline.partitions_with_unembedded(store, embedding_model_id(settings))
                if d not in batch_days]
    # feedback: everything pending, regardless of the micro-batch policy (a flush)
    feedback_requests: list[tuple[str, dg.RunRequest]] = []
    with dg.build_resources({"sentinel": StreamSentinelResource.from_settings(settings, home=str(paths.home)),
                             "kafka": KafkaResource.from_env()}) as res:
        for sensor_name, outcome in (("feedback_files_sensor", evaluate_files(res.sentinel, None)),
                                     ("feedback_kafka_sensor", evaluate_kafka(res.sentinel, res.kafka, None, flush=True))):
            if isinstance(outcome, dg.SensorResult):
                feedback_requests += [(sensor_name, r) for r in outcome.run_requests]
            elif "not configured" not in outcome.skip_message and "no new" not in outcome.skip_message:
                say(f"{sensor_name}: {outcome.skip_message}")
    from stream_sentinel import served

    served_unread = served.unread(paths.home, store)
    if not batches and not catch_up and not feedback_requests and not served_unread \
            and not training_due(paths, settings):
        return None
    defs = build_definitions(settings, home=str(paths.home))
    ingest_job = defs.resolve_job_def("ingest_job")
    feedback_job = defs.resolve_job_def("feedback_job")
    instance = dagster_instance()
    outcomes: list[str] = []

    def report(result) -> None:
        outcome, lines = run_outcome(result)
        outcomes.append(outcome)
        for line in lines:
            say(f"    {line}")

    total = len(batches) + len(catch_up) + len(feedback_requests) + bool(served_unread)
    n = 0
    with instance:
        for batch in batches:
            n += 1
            req = batch_run_request(batch)
            say(f"[{n}/{total}] {batch.run_key}: {len(batch.files)} file(s), ~{batch.est_records} records")
            # same tags as a sensor launch, so a daemon started later does not run the batch again
            tags = {**req.tags, RUN_KEY_TAG: batch.run_key, SENSOR_NAME_TAG: "raw_files_sensor"}
            run_config = {**req.run_config, **console("INFO")}
            report(ingest_job.execute_in_process(run_config=run_config, partition_key=batch.partition_key,
                                                 instance=instance, tags=tags, raise_on_error=False))
        for day in catch_up:
            n += 1
            say(f"[{n}/{total}] {day}: embedding records that have no vector for the current model")
            report(ingest_job.execute_in_process(
                run_config=console("INFO"), partition_key=day, instance=instance, raise_on_error=False,
                asset_selection=[dg.AssetKey("embeddings"), dg.AssetKey("vector_index")]))
        if served_unread:  # the API's answers, before live accuracy and the A/B arms are read
            n += 1
            say(f"[{n}/{total}] prediction log: {len(served_unread)} file(s) with new lines")
            report(defs.resolve_job_def("served_job").execute_in_process(
                run_config=console("INFO"), instance=instance, raise_on_error=False,
                tags={SENSOR_NAME_TAG: "served_predictions_sensor"}))
        for sensor_name, req in feedback_requests:
            n += 1
            say(f"[{n}/{total}] feedback {req.run_key}")
            tags = {**req.tags, RUN_KEY_TAG: req.run_key, SENSOR_NAME_TAG: sensor_name}
            report(feedback_job.execute_in_process(run_config={**req.run_config, **console("INFO")},
                                                   instance=instance, tags=tags, raise_on_error=False))
        # new labels (from the feedback just ingested) -> one training run, flushed like the feedback
        if training_due(paths, settings):
            n += 1
            say(f"[{n}/{total + 1}] training on new labels")
            training_job = defs.resolve_job_def("training_job")
            report(training_job.execute_in_process(run_config=console("INFO"), instance=instance,
                                                   raise_on_error=False))
    return outcomes
