"""records -> window_features: declared stream windows per key, kept up to date per micro-batch."""

import time

import dagster as dg

from stream_sentinel.windows import state as window_state
from stream_sentinel.resources import StreamSentinelResource

from .ingest import raw_records
from .partitions import declared_daily_arrivals as daily_arrivals

BACKFILL_TAG = "dagster/backfill"  # set by Dagster on every run of a backfill


@dg.asset(
    partitions_def=daily_arrivals,
    deps=[raw_records],
    group_name="ingest",
    kinds={"duckdb"},
    description="Window features `win_<name>` of each record, from the windows declared in "
    "`<data root>/windows.yaml` (tumbling, hopping, sliding or session aggregates per key, by event time). "
    "A record's value counts only records of its key with an earlier event time. Computed incrementally: "
    "the batch's records, plus later records that an out-of-order record within the allowed lateness falls "
    "into; a backfill recomputes the partition. Read by training, scoring, the API and drift (view `records_w`).",
)
def window_features(context: dg.AssetExecutionContext, sentinel: StreamSentinelResource) -> dg.MaterializeResult:
    started = time.perf_counter()
    wset = sentinel.window_set()
    backfill = BACKFILL_TAG in context.run.tags
    part = context.partition_key
    res = window_state.update(sentinel.store(), wset, partition=part if backfill else None)
    if not wset:
        context.log.info(f"no windows declared ({wset.source})")
    else:
        context.log.info(f"{res.new} records computed, {res.updated_later} earlier records updated, "
                         f"{res.late} late" + (" (declaration changed: every record recomputed)"
                                              if res.recomputed_all else ""))
    if res.late:
        context.log.warning(f"{res.late} records arrived later than the allowed lateness: flagged "
                            "(window_features.late) and left out of other records' values")
    rows = "\n".join(f"| `win_{w['name']}` | `{w['key']}` | {w['kind']} | {w.get('size') or w.get('gap')}"
                     f"{' / ' + w['hop'] if 'hop' in w else ''} | {w['agg']} {w.get('field', '')} |"
                     for w in wset.describe()["windows"])
    n_rows, version = window_state.partition_version(sentinel.store(), part)
    return dg.MaterializeResult(metadata={
        "declared_in": wset.source,
        "windows": dg.MetadataValue.md("| feature | key | kind | size/gap | agg |\n|---|---|---|---|---|\n" + rows)
        if rows else "none",
        "declaration_digest": wset.digest,
        "allowed_lateness_s": wset.lateness_us / 1e6,
        "records_computed": res.new,
        "earlier_records_updated": res.updated_later,
        "late_records": res.late,
        "recomputed_all": res.recomputed_all,
        "backfill": backfill,
        "watermark": res.watermark.isoformat() if res.watermark else "",
        "dagster/row_count": n_rows,  # the partition's rows of `window_features`
        "duration_s": round(time.perf_counter() - started, 3),
    }, data_version=dg.DataVersion(f"{wset.digest}:{version}"))
