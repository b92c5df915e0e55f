"""drift_report: Evidently reports per arrival day, and recent_drift_report over the latest
records, each against the champion's training window."""

from datetime import timedelta
from pathlib import Path

import dagster as dg
from pydantic import Field

from stream_sentinel import drift
from stream_sentinel.resources import EmbedderResource, StreamSentinelResource

from .ingest import embeddings
from .models import predictions
from .partitions import declared_daily_arrivals


def _num(x) -> float:
    return float("nan") if x is None else float(x)


def _report_checks(asset: str) -> list[dg.AssetCheckSpec]:
    """The two checks every drift report carries (daily or rolling)."""
    return [dg.AssetCheckSpec("feature_drift_share", asset=asset,
                              description="WARN when the share of drifted feature columns exceeds the threshold"),
            dg.AssetCheckSpec("embedding_drift_with_accuracy_drop", asset=asset,
                              description="ERROR when the text embeddings drifted and the prequential accuracy "
                              "on the window's labelled records dropped below the champion's validation accuracy "
                              "at the same time")]


@dg.asset(
    partitions_def=declared_daily_arrivals, deps=[embeddings, predictions], group_name="monitoring",
    kinds={"evidently", "duckdb"},
    # A backfill runs one day per run (Dagster's default without a backfill_policy): each day
    # gets its own materialization, so its metadata (share drifted, embedding drift, accuracy)
    # plots over time; the reference sample is cached, so a day costs seconds.
    check_specs=_report_checks("drift_report"),
    description="Evidently drift report of one arrival day against the champion's training window (its "
    "training-set data version): features, text embeddings, predictions, labels, accuracy. HTML under "
    "`reports/<day>.html`, per-column rows in DuckDB `drift_metrics`, headline in `drift_reports`.",
)
def drift_report(context: dg.AssetExecutionContext, sentinel: StreamSentinelResource, embedder: EmbedderResource):
    cfg = sentinel.drift_config
    cfg.validate()  # the stat test names (Evidently's)
    res = drift.run_partition(sentinel.store(), sentinel.registry(), sentinel.paths.reports, embedder.model_id,
                              context.partition_key, cfg)
    yield from _report_events(context, res, cfg, sentinel)


def report_url(sentinel: StreamSentinelResource, report_path: str) -> str:
    """The report on the API (`stream-sentinel serve`): browsers refuse file:// links from a web page."""
    from urllib.parse import quote

    rel = Path(report_path).resolve().relative_to(sentinel.paths.reports.resolve())
    return f"{sentinel.settings.api_base_url}/reports/{quote(rel.as_posix())}"


def _report_events(context, res: drift.DriftResult, cfg: drift.DriftConfig, sentinel: StreamSentinelResource):
    """The materialization and both checks of one report (daily or rolling)."""
    context.log.info(f"drift {res.window_key}: {res.status}; {res.message}")
    meta = {
        "status": res.status, "message": res.message, "drifted": res.drifted,
        "report": dg.MetadataValue.path(res.report_path),
        "report_url": dg.MetadataValue.url(report_url(sentinel, res.report_path)),
        "rule": drift.rule(cfg),
        "n_current": res.n_current, "n_reference": res.n_reference, "n_labelled": res.n_labelled,
        "reference_excluded": res.reference_excluded, "n_accuracy": res.n_accuracy,
        "share_drifted": _num(res.share_drifted), "embedding_drift": _num(res.embedding_drift),
        "embedding_drifted": res.embedding_drifted, "prediction_drifted": res.prediction_drifted,
        "label_drifted": res.label_drifted, "accuracy": _num(res.accuracy),
        "reference_accuracy": _num(res.reference_accuracy),
        "columns_drifted": dg.MetadataValue.json([c.column for c in res.columns if c.drifted]),
        "reference_data_version": res.reference_data_version, "model_version": res.model_version,
        "duration_s": res.seconds,
    }
    yield dg.MaterializeResult(metadata=meta)
    if res.status != "ok":
        note = f"not evaluated: {res.message}"
        for name in ("feature_drift_share", "embedding_drift_with_accuracy_drop"):
            yield dg.AssetCheckResult(asset_key=context.asset_key, check_name=name, passed=True, description=note,
                                      metadata={"status": res.status})
        return
    yield dg.AssetCheckResult(
        asset_key=context.asset_key, check_name="feature_drift_share", passed=bool(res.share_drifted <= cfg.drift_share),
        severity=dg.AssetCheckSeverity.WARN,
        description=f"{res.n_drifted}/{res.n_features} feature columns drifted (threshold {cfg.drift_share:.0%})",
        metadata={"share_drifted": _num(res.share_drifted), "threshold": cfg.drift_share})
    both = res.embedding_drifted and res.accuracy_dropped
    yield dg.AssetCheckResult(
        asset_key=context.asset_key, check_name="embedding_drift_with_accuracy_drop", passed=not both, severity=dg.AssetCheckSeverity.ERROR,
        description=(f"embedding drift {'yes' if res.embedding_drifted else 'no'}; accuracy "
                     f"{'n/a' if res.accuracy is None else f'{res.accuracy:.3f}'} vs validation "
                     f"{'n/a' if res.reference_accuracy is None else f'{res.reference_accuracy:.3f}'}"),
        metadata={"embedding_drift": _num(res.embedding_drift), "accuracy": _num(res.accuracy),
                  "reference_accuracy": _num(res.reference_accuracy), "accuracy_drop_threshold": cfg.accuracy_drop})


class RecentDriftConfig(dg.Config):
    upto_vec_id: int = Field(0, description="the newest record (vec_id) of the window; 0 = the newest now")


@dg.asset(
    deps=[embeddings, predictions], group_name="monitoring", kinds={"evidently", "duckdb"},
    check_specs=_report_checks("recent_drift_report"),
    description="The rolling drift report: the latest STREAM_SENTINEL_DRIFT_RECENT_RECORDS records (at most half "
    "of all) against the champion's training window minus those records, made again every "
    "STREAM_SENTINEL_DRIFT_RECENT_EVERY new records by recent_drift_sensor. Daily partitions report finished days; "
    "this one shows the stream minutes after `up`. HTML under `reports/recent/`.",
)
def recent_drift_report(context: dg.AssetExecutionContext, config: RecentDriftConfig,
                        sentinel: StreamSentinelResource, embedder: EmbedderResource):
    cfg = sentinel.drift_config
    cfg.validate()  # the stat test names (Evidently's)
    store = sentinel.store()
    upto = config.upto_vec_id or drift.recent_due(store, cfg, every=0) or 0
    res = drift.run_recent(store, sentinel.registry(), sentinel.paths.reports, embedder.model_id, upto, cfg)
    yield from _report_events(context, res, cfg, sentinel)


recent_drift_job = dg.define_asset_job("recent_drift_job", selection=[recent_drift_report],
                                       description="The rolling drift report of the latest records.")

drift_job = dg.define_asset_job("drift_job", selection=[drift_report],
                                description="The drift report of one arrival day (backfill any range from the UI).")


def build_daily_drift_schedule(partitions_def: dg.DailyPartitionsDefinition) -> dg.ScheduleDefinition:
    """The daily report schedule, for the calendar the code location loaded with: a day
    before its first partition is skipped instead of requested (it is not a partition)."""
    first = partitions_def.start.strftime("%Y-%m-%d")

    @dg.schedule(name="daily_drift_report", job=drift_job, cron_schedule="30 0 * * *", execution_timezone="UTC",
                 default_status=dg.DefaultScheduleStatus.RUNNING,
                 description="Yesterday's (UTC) drift report, every day at 00:30 once the day is complete.")
    def daily_drift_report(context: dg.ScheduleEvaluationContext):
        day = (context.scheduled_execution_time - timedelta(days=1)).date().isoformat()
        if day < first:
            return dg.SkipReason(f"{day} is before the first partition ({first})")
        return dg.RunRequest(run_key=f"drift:{day}", partition_key=day)

    return daily_drift_report
