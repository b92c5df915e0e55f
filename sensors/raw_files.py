"""raw_files_sensor: new files in raw/ -> micro-batch runs of ingest_job.

The durable state is DuckDB (which files exist, which batch each is in); the cursor
only remembers the last batch already requested, so it stays small however many
files arrive. Run keys are derived from the batch's file hashes: a tick replayed after
a crash asks for the same keys and Dagster launches nothing twice.
"""


import json
import time

import dagster as dg

from stream_sentinel import ingest, retry
from stream_sentinel.assets.ingest import RawRecordsConfig, ingest_job
from stream_sentinel.config import Settings
from stream_sentinel.resources import StreamSentinelResource

from .units import retry_requests, skip_while_busy

TICK_LOCK_TIMEOUT_S = 20.0  # well under Dagster's 60 s sensor limit
INGEST_RETRIES = 2
# Plan the next batch once the running ingest run has about this long left: two sensor
# loops of the daemon (5 s each) and a launch, so that the next run is queued before this
# one ends. Until then new files keep joining the next batch.
PLAN_LEAD_S = 12.0


def batch_run_request(batch: ingest.Batch, run_key: str | None = None) -> dg.RunRequest:
    """The run of one micro-batch; ``run_key`` names a retry (``<batch key>#<attempt>``)."""
    return dg.RunRequest(
        run_key=run_key or batch.run_key,
        partition_key=batch.partition_key,
        run_config=dg.RunConfig(ops={"raw_records": RawRecordsConfig(files=list(batch.files))}),
        # a failed micro-batch (a crash, a lock held too long) is retried from the failed step;
        # every step is idempotent, and dagster.yaml enables retries (0 unless a run asks)
        tags={retry.UNIT_TAG: batch.run_key,
              "stream_sentinel/batch": str(batch.seq), "stream_sentinel/files": str(len(batch.files)),
              "stream_sentinel/records": str(batch.est_records), "dagster/max_retries": str(INGEST_RETRIES)},
    )


def ingest_run_waiting(instance: dg.DagsterInstance | None) -> bool:
    """True while an ingest_job run is queued but not yet started."""
    if instance is None:
        return False
    waiting = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED]
    return bool(instance.get_run_records(
        filters=dg.RunsFilter(job_name=ingest_job.name, statuses=waiting), limit=1))


def seconds_left(running: list[tuple[int, float]], records_per_s: float | None, now: float) -> float:
    """Expected seconds until the running ingest runs, ``(estimated records, started at)``,
    are done at the embedding rate last measured; 0 when unknown (plan at once)."""
    if not running or not records_per_s or records_per_s <= 0:
        return 0.0
    return max(0.0, max(est / records_per_s - (now - started) for est, started in running))


def running_ingest_left(instance: dg.DagsterInstance | None) -> float:
    """How long the ingest run in progress should still take. Planning the next batch right
    when a run starts fixes that batch for the whole run ahead of it, and batch sizes then
    swing between large and small; planning it shortly before the run ends lets it take
    in everything that arrived meanwhile, so that under load every batch is a full one."""
    if instance is None:
        return 0.0
    active = [dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED]
    running = []
    for rec in instance.get_run_records(filters=dg.RunsFilter(job_name=ingest_job.name, statuses=active), limit=5):
        est = rec.dagster_run.tags.get("stream_sentinel/records")
        if est is None:
            return 0.0  # a backfill or a run launched by hand: no estimate, do not wait on it
        running.append((int(est), rec.start_time or rec.create_timestamp.timestamp()))
    if not running:
        return 0.0
    # The fastest of the last few runs: a small run's rate is diluted by fixed costs (a model
    # load without the embedding server), and a rate too low would hold the plan past the
    # run's end. Too high only plans early, as if there were no estimate.
    rates = []
    for rec in instance.fetch_materializations(dg.AssetKey("embeddings"), limit=5).records:
        value = rec.asset_materialization.metadata.get("texts_per_s") if rec.asset_materialization else None
        if value is not None and isinstance(value.value, (int, float)):
            rates.append(float(value.value))
    return seconds_left(running, max(rates, default=None), time.time())


@skip_while_busy
def evaluate(sentinel: StreamSentinelResource, cursor: str | None,
             instance: dg.DagsterInstance | None = None) -> dg.SensorResult | dg.SkipReason:
    """One tick. Files are always registered (so their arrival day is exact), but while an
    ingest run is still queued, or one is running that has more than ``PLAN_LEAD_S`` to go,
    new files wait and join the next, larger batch instead of queueing one small run per
    tick behind it."""
    state = json.loads(cursor) if cursor else {}
    last_seq = int(state.get("batch_seq", 0))
    s = sentinel.settings
    store = sentinel.store(lock_timeout_s=TICK_LOCK_TIMEOUT_S)
    scanned = ingest.scan(sentinel.paths, store, s.debounce_s, lock_timeout_s=TICK_LOCK_TIMEOUT_S,
                          settle_s=s.settle_s)
    held = ingest_run_waiting(instance)
    left = 0.0 if held else running_ingest_left(instance)
    if not held and left <= PLAN_LEAD_S:
        ingest.plan_batches(store, s.batch_max_files, s.batch_max_records,
                            lock_timeout_s=TICK_LOCK_TIMEOUT_S, tail_waits=True)
    batches = ingest.batches_after(store, last_seq, lock_timeout_s=TICK_LOCK_TIMEOUT_S)
    # batches requested before whose files are not all done: their runs failed or vanished
    stale = [b for b in ingest.unfinished_batches(store, lock_timeout_s=TICK_LOCK_TIMEOUT_S)
             if b.seq <= last_seq]
    retries, retry_notes = retry_requests(instance, store, "raw_batch", stale, lambda b: b.run_key,
                                          batch_run_request, s.retry_policy())
    notes = list(retry_notes)
    if scanned.duplicates:
        notes.append(f"{len(scanned.duplicates)} duplicate file(s) recorded, no rows added")
    if scanned.unstable:
        notes.append(f"{len(scanned.unstable)} file(s) still being written")
    if scanned.skipped_links:
        notes.append(f"{len(scanned.skipped_links)} symlink(s) out of raw/ ignored")
    if scanned.problems:
        first, why = scanned.problems[0]
        notes.append(f"{len(scanned.problems)} entr(y/ies) cannot be read and are skipped (e.g. {first}: {why}); "
                     "see `stream-sentinel status`")
    if scanned.waiting:
        notes.append(f"{len(scanned.waiting)} file(s) look unfinished and wait for their writer")
    if scanned.superseded:
        notes.append(f"{len(scanned.superseded)} file(s) changed after they were picked up; re-registered")
    if scanned.quarantined:
        notes.append(f"{len(scanned.quarantined)} copy(ies) of quarantined content quarantined too")
    if held and scanned.registered:
        notes.append(f"{len(scanned.registered)} new file(s) wait for the queued ingest run to start")
    if left > PLAN_LEAD_S and scanned.registered:
        notes.append(f"{len(scanned.registered)} new file(s) join the next batch, planned about "
                     f"{PLAN_LEAD_S:.0f} s before the running ingest run ends (in ~{left:.0f} s)")
    if not batches and not retries:
        return dg.SkipReason("no new batch" + (f" ({'; '.join(notes)})" if notes else ""))
    return dg.SensorResult(
        run_requests=[batch_run_request(b) for b in batches] + retries,
        cursor=json.dumps({"batch_seq": max([last_seq] + [b.seq for b in batches])}),
    )


def build_raw_files_sensor(settings: Settings) -> dg.SensorDefinition:
    @dg.sensor(
        name="raw_files_sensor",
        job=ingest_job,
        minimum_interval_seconds=settings.sensor_interval_s,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Registers stable files in raw/ by sha256 and launches one ingest_job run per micro-batch.",
    )
    def raw_files_sensor(context: dg.SensorEvaluationContext, sentinel: StreamSentinelResource):
        return evaluate(sentinel, context.cursor, context.instance)

    return raw_files_sensor
