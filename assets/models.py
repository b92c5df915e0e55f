"""labels -> training_set -> model (candidate) -> [candidate_beats_champion] -> champion -> predictions."""

from pathlib import Path

import dagster as dg
from pydantic import Field

from stream_sentinel import drift, run_facts
from stream_sentinel.learning import loop as learning
from stream_sentinel.learning.models import FeatureSpec, TrainParams, load_training_set
from stream_sentinel.resources import EmbedderResource, StreamSentinelResource

from .feedback import labels
from .ingest import embeddings
from .pools import POOL_REGISTRY


class ModelConfig(dg.Config):
    full: bool = Field(False, description="retrain from scratch instead of continuing the champion")


def training_run_config(full: bool) -> dg.RunConfig:
    """training_job's run config: continue the champion, or (``full``) retrain from scratch."""
    return dg.RunConfig(ops={"model": ModelConfig(full=full)})


DRIFT_TAG = "stream_sentinel/drift_report"  # set by drift_retrain_sensor: the report's day
DRIFT_TRIGGER_TAG = "stream_sentinel/drift_trigger"  # ... and the trigger, as JSON
ERASURE_TAG = "stream_sentinel/erasure"  # set by erasure_retrain_sensor: the erasure's hash (16 hex)


def _lineage(context) -> list[str | None]:
    """This run, then the runs it retries: where an earlier step of this run left its facts."""
    run = context.run
    return [run.run_id, run.parent_run_id, run.root_run_id]


def _build_training_set(sentinel: StreamSentinelResource, embedder: EmbedderResource):
    s = sentinel.settings
    store = sentinel.store()
    ts = load_training_set(store, embedder.model_id, s.positive_label, s.valid_share, s.golden_share, s.valid_max,
                           negative_label=s.negative_label)
    learning.persist_training_set(store, ts, embedder.model_id)
    return ts


@dg.asset(deps=[labels, embeddings, "window_features"], group_name="learning", kinds={"duckdb"},
          description="Resolved labels joined with records and current embeddings, split into train, a "
          "time-based validation slice (latest share) and a fixed golden slice; named by the hash of its "
          "label set, which every model version references.")
def training_set(context: dg.AssetExecutionContext, sentinel: StreamSentinelResource,
                 embedder: EmbedderResource) -> dg.MaterializeResult:
    ts = _build_training_set(sentinel, embedder)
    run_facts.put(sentinel.store(), context.run.run_id, "training_set", ts.data_version)
    counts = ts.frame["split"].value_counts().to_dict()
    return dg.MaterializeResult(
        metadata={"data_version": ts.data_version, "rows": len(ts.frame), "dagster/row_count": len(ts.frame), "train": counts.get("train", 0),
                  "valid": counts.get("valid", 0), "golden": counts.get("golden", 0),
                  "positive_label": ts.positive_label, "negative_label": ts.negative_label,
                  "positives": int(ts.frame["y"].sum()),
                  **({"left_out_labels": dg.MetadataValue.json(ts.left_out)} if ts.left_out else {}),
                  "embedding_model_id": embedder.model_id},
        data_version=dg.DataVersion(ts.data_version))


@dg.asset(deps=[training_set], group_name="learning", kinds={"lightgbm"}, output_required=False, pool=POOL_REGISTRY,
          check_specs=[dg.AssetCheckSpec(
              "candidate_beats_champion", asset="model", blocking=True,
              description="non-inferiority of the candidate against the champion on the validation slice "
              "(paired bootstrap); a failing candidate is rejected and the champion stays")],
          description="A candidate model version: continued from the champion (init_model) on the new labels "
          "plus a replay sample, or a full retrain (first version, `full: true`, or when continuing fails). "
          "A run with nothing new to learn (or one class only so far) makes no version and no materialization: "
          "it records an observation with the reason, and the promotion steps after it are skipped.")
def model(context: dg.AssetExecutionContext, config: ModelConfig, sentinel: StreamSentinelResource,
          embedder: EmbedderResource):
    s = sentinel.settings
    store = sentinel.store()
    registry = sentinel.registry()
    version = run_facts.get(store, _lineage(context), "training_set")
    if version is None:  # the model step materialized alone: its training set is today's labels
        ts = _build_training_set(sentinel, embedder)
        version = ts.data_version
        run_facts.put(store, context.run.run_id, "training_set", version)
    else:
        ts = learning.training_set_for_version(store, version, embedder.model_id)
    drift_day = context.run.tags.get(DRIFT_TAG)
    erasure = context.run.tags.get(ERASURE_TAG)
    cause = f"drift_report:{drift_day}" if drift_day else f"erasure:{erasure}" if erasure else None
    trigger = context.run.tags.get(DRIFT_TRIGGER_TAG)
    if trigger:  # the drift retrain's bookmark and audit record, written by the run it caused
        drift.record_retrain(registry, drift.RetrainTrigger.from_json(trigger))
    res = learning.train_candidate(registry, store, ts, embedder.model_id,
                                   TrainParams(replay=s.replay_size), full=config.full, cause=cause)
    cand = res.version
    meta = {"candidate": cand.version if cand else "", "strategy": res.strategy, "reason": res.reason,
            "training_set_version": version, "batch_size": res.batch_size, "duration_s": round(res.seconds, 3),
            "caused_by": cause or "labels"}
    if cand:
        meta.update({"semver": cand.semver, "parent": cand.parent_version or "", "sha256": cand.sha256,
                     "path": dg.MetadataValue.path(cand.path)})
        meta.update({f"valid_{k}": v for k, v in cand.metrics.get("valid", {}).items()})
        numeric = FeatureSpec.load(Path(cand.path)).numeric
        meta["window_features"] = ", ".join(n for n in numeric if n.startswith("win_")) or "none"
    context.log.info(f"candidate: {meta['candidate'] or 'none'} ({res.strategy}: {res.reason})")
    run_facts.put(store, context.run.run_id, "candidate", cand.version if cand else "")
    if cand is None:
        # not a version: a materialization here would become the asset's latest and plot zeros
        yield dg.AssetObservation(asset_key="model", metadata={k: meta[k] for k in (
            "strategy", "reason", "training_set_version", "caused_by")})
        # nothing to judge: the gate has nothing to stop (the steps after it are skipped anyway)
        yield dg.AssetCheckResult(check_name="candidate_beats_champion", passed=True,
                                  description=f"no candidate: {res.reason}")
        return
    yield dg.MaterializeResult(metadata=meta, data_version=dg.DataVersion(cand.sha256[:16]))
    verdict = learning.judge(registry, store, cand.version, s.promotion_metric, s.promotion_margin, ts=ts)
    if not verdict.passed:
        registry.reject(cand.version, verdict.reason)
        registry.event("rejection", cand.version, reason=verdict.reason, champion=registry.champion_version())
    yield dg.AssetCheckResult(
        check_name="candidate_beats_champion", passed=verdict.passed, description=verdict.reason,
        metadata={"candidate": cand.version, "metric": verdict.metric, "candidate_score": verdict.candidate_score,
                  "champion_score": verdict.champion_score if verdict.champion_score is not None else float("nan"),
                  "diff": verdict.diff if verdict.diff is not None else float("nan"),
                  "ci_low": verdict.ci_low if verdict.ci_low is not None else float("nan"),
                  "margin": verdict.margin})


@dg.asset(deps=[model], group_name="learning", kinds={"lightgbm"}, pool=POOL_REGISTRY,
          description="The serving model: the candidate of this run, promoted atomically once "
          "candidate_beats_champion passed (the check blocks this step otherwise).")
def champion(context: dg.AssetExecutionContext, sentinel: StreamSentinelResource) -> dg.MaterializeResult:
    registry = sentinel.registry()
    cand = run_facts.get(sentinel.store(), _lineage(context), "candidate") or ""
    current = registry.reconcile()
    v = registry.get(cand) if cand else None
    ab_share = sentinel.settings.ab_share
    if v is not None and v.status == "candidate" and current is not None and ab_share > 0:
        registry.start_challenger(cand, f"passed candidate_beats_champion; A/B on {ab_share:.0%} of records")
        context.log.info(f"{cand} challenges {current} on {ab_share:.0%} of records")
    elif v is not None and v.status == "candidate":
        registry.promote(cand, v.metrics.get("valid", {}).get(sentinel.settings.promotion_metric),
                         "passed candidate_beats_champion")
        context.log.info(f"promoted {cand} (was {current})")
        current = cand
    champ = registry.get(current) if current else None
    return dg.MaterializeResult(
        metadata={"champion": current or "", "challenger": registry.challenger_version() or "",
                  "semver": champ.semver if champ else "",
                  "parent": (champ.parent_version or "") if champ else "",
                  "training_set_version": champ.training_set_version if champ else "",
                  "promoted": bool(v is not None and current == cand)},
        data_version=dg.DataVersion(current or "none"))


@dg.asset(deps=[champion, embeddings, "window_features"], group_name="learning", kinds={"duckdb"},
          description="The champion's probability and label for new records, and (after a promotion) for the "
          "latest `STREAM_SENTINEL_RESCORE_WINDOW` records (table `predictions`, keyed by record and model "
          "version; view `current_predictions`: the served answer of every record).")
def predictions(context: dg.AssetExecutionContext, sentinel: StreamSentinelResource,
                embedder: EmbedderResource) -> dg.MaterializeResult:
    registry = sentinel.registry()
    s = sentinel.settings
    n = learning.score_new_records(registry, sentinel.store(), embedder.model_id, s.ab_share, s.ab_routing,
                                   s.rescore_window)
    return dg.MaterializeResult(metadata={"scored": n, "model_version": registry.champion_version() or "",
                                          "dagster/row_count": sentinel.store().row_count("predictions")})


@dg.asset(deps=[labels, predictions], group_name="learning", kinds={"duckdb"},
          description="Live monitoring on fresh feedback: decides a running champion/challenger test once it is "
          "significant, and restores the previous champion when the champion's accuracy falls more than the "
          "rollback margin under its validation accuracy.")
def live_accuracy(context: dg.AssetExecutionContext, sentinel: StreamSentinelResource) -> dg.MaterializeResult:
    s = sentinel.settings
    registry = sentinel.registry()
    decision = learning.ab_step(registry, sentinel.store(), s.ab_alpha, s.ab_min_samples)
    if decision is not None:
        context.log.info(f"A/B: {decision.reason}")
    res = learning.live_accuracy(registry, sentinel.store(), s.rollback_margin, s.rollback_min_samples)
    if res.kept_because:
        context.log.warning(f"champion {res.champion}: live accuracy {res.accuracy:.3f} on {res.n} labels vs "
                            f"{res.promoted_accuracy:.3f} promised; kept: {res.kept_because}")
    if res.rolled_back_to:
        context.log.warning(f"champion {res.champion}: live accuracy {res.accuracy:.3f} on {res.n} labels vs "
                            f"{res.promoted_accuracy:.3f} promised; rolled back to {res.rolled_back_to}")
    return dg.MaterializeResult(metadata={
        "champion": res.champion or "", "labelled_since_promotion": res.n,
        "live_accuracy": res.accuracy if res.accuracy is not None else float("nan"),
        "promised_accuracy": res.promoted_accuracy if res.promoted_accuracy is not None else float("nan"),
        "degraded": res.degraded, "rolled_back_to": res.rolled_back_to or "",
        **({"compared_with": res.compared_with, "champion_now": res.champion_now, "previous_now": res.previous_now}
           if res.compared_with else {}),
        **({"kept_because": res.kept_because} if res.kept_because else {}),
        "ab": decision.reason if decision is not None else "no challenger"})


LEARNING_ALERTS = {"max_failure_rate": 0.05, "max_update_ms": 1000.0}


@dg.multi_asset_check(
    specs=[dg.AssetCheckSpec("update_failure_rate", asset="model",
                             description="continued-training failures stay under 5 % of updates"),
           dg.AssetCheckSpec("updates_under_1s", asset="model",
                             description="continued updates (the last 20) take under 1 s on average; full "
                             "retrains are slower by design and not counted"),
           dg.AssetCheckSpec("score_not_degrading", asset="champion",
                             description="each promotion's validation score is not below the previous one's")],
    can_subset=True,
)
def learning_alerts(context: dg.AssetCheckExecutionContext, sentinel: StreamSentinelResource):
    """Alert thresholds of the learning loop, as WARN checks (they never block a run)."""
    from stream_sentinel.learning.loop import learning_metrics

    store = sentinel.store()
    m = learning_metrics(store, sentinel.registry().reconcile())
    rate = m["failed_updates"] / m["total_updates"] if m["total_updates"] else 0.0
    with store.connect() as con:
        scores = [r[0] for r in con.execute(
            "SELECT promoted_score FROM model_versions WHERE promoted_score IS NOT NULL ORDER BY promoted_at"
        ).fetchall()]
    results = {
        "update_failure_rate": (rate <= LEARNING_ALERTS["max_failure_rate"], {"failure_rate": rate}),
        "updates_under_1s": ((m["recent_incremental_update_ms"] or 0.0) <= LEARNING_ALERTS["max_update_ms"],
                             {"recent_incremental_update_ms": m["recent_incremental_update_ms"]}
                             if m["recent_incremental_update_ms"] is not None else {"continued_updates": 0}),
        "score_not_degrading": (len(scores) < 2 or scores[-1] >= scores[-2],
                                {"last_scores": dg.MetadataValue.json(scores[-5:])}),
    }
    for key in context.selected_asset_check_keys:
        passed, meta = results[key.name]
        yield dg.AssetCheckResult(asset_key=key.asset_key, check_name=key.name, passed=bool(passed),
                                  severity=dg.AssetCheckSeverity.WARN, metadata=meta)


training_job = dg.define_asset_job(
    "training_job", selection=[training_set, model, champion, predictions, live_accuracy],
    description="labels -> training_set -> candidate -> gated promotion -> predictions.")

weekly_full_retrain = dg.ScheduleDefinition(
    name="weekly_full_retrain", job=training_job, cron_schedule="0 3 * * 0", execution_timezone="UTC",
    run_config=training_run_config(full=True), default_status=dg.DefaultScheduleStatus.RUNNING,
    description="A full retrain every Sunday 03:00 UTC (refits the PCA and the trees from all labels), "
    "gated like every candidate.")
