"""Drift reports on the SpamAssassin demo data: real embeddings, a real LightGBM champion,
real Evidently, a real DuckDB file and a real Dagster instance."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import dagster as dg
import httpx
import numpy as np
import pandas as pd
import pytest

from stream_sentinel import drift, ingest, pipeline, served
from stream_sentinel.learning import loop as learning
from stream_sentinel import feedback as fb
from stream_sentinel.config import Paths
from stream_sentinel.learning.models import TrainParams, load_training_set
from stream_sentinel.learning.registry import ModelRegistry
from stream_sentinel.devtools.kafka_broker import free_port
from stream_sentinel.store import Store

from .conftest import drop
from .helpers import serve

DAYS = ["2024-03-01", "2024-03-02", "2024-03-03", "2024-03-04"]
CFG = drift.DriftConfig()


@pytest.fixture(scope="module")
def corpus(demo_embedder, demo_records, demo_labels):
    """Period 1 (groups *-1) and period 2 (groups *-2) samples with their real embeddings."""
    rng = np.random.default_rng(11)
    by_group: dict[str, list[dict]] = {}
    for r in demo_records:
        by_group.setdefault(r["id"].split("/")[0], []).append(r)

    def pick(group, n):
        recs = by_group[group]
        return [recs[i] for i in sorted(rng.choice(len(recs), n, replace=False))]

    period1 = pick("easy-ham-1", 170) + pick("hard-ham-1", 30) + pick("spam-1", 100)
    period2 = pick("easy-ham-2", 110) + pick("spam-2", 110)
    rng.shuffle(period1)
    texts = [r["text"] for r in period1 + period2]
    demo_embedder.embed(texts)  # the real model's vectors, once (see conftest.PrecomputedEmbedder)
    return period1, period2, demo_embedder


def ingest_day(paths, store, emb, recs, day: str, labels: dict | None) -> None:
    drop(paths.raw, f"{day}/{len(recs)}-{recs[0]['id'].replace('/', '_')}.jsonl", recs)
    ingest.scan(paths, store, debounce_s=1, now=datetime.fromisoformat(day).replace(hour=12, tzinfo=timezone.utc))
    for b in ingest.plan_batches(store):
        for sha in b.files:
            ingest.process_file(paths, store, sha)
    pipeline.embed_partition(store, emb, day)
    if labels:
        label_day(store, recs, day, labels)


def label_day(store, recs, day: str, labels: dict) -> None:
    events = [fb.Event(fb.Position(f"drift-{day}", 0, i), r["id"], labels[r["id"]], "oracle", 1.0,
                       datetime(2024, 3, 5, tzinfo=timezone.utc)) for i, r in enumerate(recs)]
    fb.write(store, events, [], "file")
    fb.resolve_labels(store, fb.ConsensusConfig())


@pytest.fixture(scope="module")
def pristine_home(tmp_path_factory, corpus, demo_labels) -> Path:
    """Built once, never touched by a test (each gets a copy, see ``home``).

    Day 1: 200 period-1 records, labelled; the champion trains on them. Day 2: period 2.
    Day 3: the other 100 period-1 records. Day 4: five records only."""
    period1, period2, emb = corpus
    paths = Paths.at(tmp_path_factory.mktemp("drift")).ensure()
    store = Store(paths.db).init()
    registry = ModelRegistry(paths.models, store)
    ingest_day(paths, store, emb, period1[:200], DAYS[0], demo_labels)
    ts = load_training_set(store, emb.model_id, "spam")
    learning.persist_training_set(store, ts, emb.model_id)
    res = learning.train_candidate(registry, store, ts, emb.model_id, TrainParams())
    registry.promote(res.version.version, res.version.metrics["valid"]["roc_auc"], "test")
    ingest_day(paths, store, emb, period2[:200], DAYS[1], None)
    ingest_day(paths, store, emb, period1[200:], DAYS[2], None)
    ingest_day(paths, store, emb, period2[200:205], DAYS[3], None)
    assert learning.score_new_records(registry, store, emb.model_id) == 505
    # the labels arrive after the champion answered: the reports' accuracy is prequential
    label_day(store, period2[:200], DAYS[1], demo_labels)
    label_day(store, period1[200:], DAYS[2], demo_labels)
    return paths.home


@pytest.fixture
def home(pristine_home, tmp_path, corpus):
    """This test's own copy of the module's data root: tests write reports, metrics and
    models into it, so no test sees what another left behind, whatever the order."""
    paths = Paths.at(shutil.copytree(pristine_home, tmp_path / "home")).ensure()
    store = Store(paths.db)
    return paths, store, ModelRegistry(paths.models, store), corpus[2]


def test_collection_period_shift_is_flagged_on_embeddings_and_predictions(home):
    paths, store, registry, emb = home
    shifted = drift.run_partition(store, registry, paths.reports, emb.model_id, DAYS[1], CFG)
    assert shifted.status == "ok" and shifted.n_current == 200
    assert shifted.embedding_drifted, shifted.headline()
    assert shifted.prediction_drifted
    assert shifted.label_drifted  # period 2 is half spam, period 1 a third
    assert shifted.drifted
    # prequential: every labelled record of the day counts with the answer served before its label
    assert shifted.n_accuracy == 200 and shifted.accuracy is not None
    # exact lineage: the reference is the champion's training set
    champion = registry.get(registry.champion_version())
    assert (shifted.model_version, shifted.reference_data_version) == (champion.version,
                                                                       champion.training_set_version)
    assert shifted.n_reference == 200

    same = drift.run_partition(store, registry, paths.reports, emb.model_id, DAYS[2], CFG)
    assert same.status == "ok" and same.n_current == 100
    assert not same.embedding_drifted and not same.drifted, same.headline()

    # outputs: the HTML report and queryable rows
    page = Path(shifted.report_path).read_text()
    assert Path(shifted.report_path) == paths.reports / f"{DAYS[1]}.html"
    assert "DRIFT" in page and "Drift for column feature.link_count" in page  # ours and Evidently's
    with store.connect() as con:
        rows = con.execute("""SELECT column_name, column_group, method, drifted, reference_data_version,
                              model_version FROM drift_metrics WHERE window_key = ?""", [DAYS[1]]).fetchall()
    groups = {r[1] for r in rows}
    assert {"feature", "embedding", "prediction", "label", "accuracy"} <= groups
    assert any(r[0] == "text_embedding" and r[3] for r in rows)
    assert all(r[4] == champion.training_set_version and r[5] == champion.version for r in rows)
    assert drift.latest(store, DAYS[1])["drifted"] is True


def test_random_halves_of_one_period_are_not_flagged(home, corpus):
    """The false-alarm check: two random halves of period 1, several seeds, never 'drifted'."""
    paths, store, registry, emb = home
    period1, _, _ = corpus
    champion = registry.champion_version()
    with store.connect() as con:
        preds = {r: (p, lab) for r, p, lab in con.execute(
            "SELECT record_id, probability, label FROM predictions WHERE model_version = ?", [champion]).fetchall()}
        labels = dict(con.execute("SELECT record_id, label FROM labels").fetchall())
    vecs = emb.embed([r["text"] for r in period1])
    frame = pd.DataFrame({"record_id": [r["id"] for r in period1], "features": [r["features"] for r in period1],
                          "prediction": [preds[r["id"]][0] for r in period1],
                          "predicted_label": [preds[r["id"]][1] for r in period1],
                          "label": [labels[r["id"]] for r in period1], "held_out": True})
    flagged = []
    for seed in range(5):
        idx = np.random.default_rng(seed).permutation(len(period1))
        a, b = idx[:150], idx[150:]
        ref = drift.Window(frame.iloc[a].reset_index(drop=True), vecs[a], 150, 150)
        cur = drift.Window(frame.iloc[b].reset_index(drop=True), vecs[b], 150, 150)
        res, _ = drift.compare(ref, cur, CFG)
        # length, link_count, uppercase_ratio, has_html, and the categorical sender_domain
        assert res.n_features == 5 and res.embedding_drift is not None
        flagged.append(res.drifted or res.embedding_drifted)
    assert not any(flagged), flagged


def test_too_few_rows_is_insufficient_data_not_a_crash(home):
    paths, store, registry, emb = home
    few = drift.run_partition(store, registry, paths.reports, emb.model_id, DAYS[3], CFG)
    assert few.status == "insufficient_data" and few.n_current == 5 and not few.drifted
    assert "insufficient data" in few.message and "5" in few.message
    empty = drift.run_partition(store, registry, paths.reports, emb.model_id, "2024-03-09", CFG)
    assert empty.status == "insufficient_data" and empty.n_current == 0
    assert "insufficient data" in Path(empty.report_path).read_text()
    assert drift.latest(store, "2024-03-09")["status"] == "insufficient_data"


def test_adhoc_window_by_event_time_and_bad_windows(home):
    paths, store, registry, emb = home
    with store.connect() as con:
        t0, t1 = con.execute("SELECT min(event_time), max(event_time) FROM records").fetchall()[0]
    res = drift.run_range(store, registry, paths.reports, emb.model_id, t0.date().isoformat(),
                          t1.date().isoformat(), "event_time", CFG)
    # every record: the champion's whole training set is in the window, so nothing is left to
    # compare with (before: the window was compared with its own records and said "no drift")
    assert res.kind == "adhoc" and res.n_current == 505 and res.status == "insufficient_data"
    assert res.reference_excluded == 200 and "insufficient reference" in res.message
    assert Path(res.report_path).exists() and "adhoc" in res.report_path
    assert drift.latest(store)["window_key"] == res.window_key  # `drift show` sees ad-hoc reports too
    with pytest.raises(ValueError, match="time field"):
        drift.run_range(store, registry, paths.reports, emb.model_id, "2024-01-01", "2024-02-01", "created", CFG)
    with pytest.raises(ValueError, match="empty window"):
        drift.run_range(store, registry, paths.reports, emb.model_id, "2024-02-01", "2024-01-01", "arrival", CFG)
    assert drift.parse_time("2024-03-31", end=True) == datetime(2024, 4, 1, tzinfo=timezone.utc)
    assert drift.parse_time("2024-03-31T10:00:00+02:00") == datetime(2024, 3, 31, 8, tzinfo=timezone.utc)


def test_unknown_methods_are_refused_with_the_name():
    with pytest.raises(ValueError, match="nosuchtest"):
        drift.DriftConfig(num_method="nosuchtest").validate()
    with pytest.raises(ValueError, match="umap"):
        drift.DriftConfig(embedding_method="umap").validate()


# ------------------------------------------------------------------ Dagster: asset, checks, backfill, sensor


def _cli(args: list[str], home: Path, dagster_home: Path) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "STREAM_SENTINEL_HOME": str(home), "DAGSTER_HOME": str(dagster_home)}
    return subprocess.run([sys.executable, "-m", "stream_sentinel.cli", *args], env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_backfill_over_three_days_from_the_cli_is_idempotent(home, tmp_path):
    paths, store, registry, emb = home
    dagster_home = tmp_path / "dagster"
    dagster_home.mkdir()

    def counts():
        with store.connect() as con:
            return con.execute("""SELECT (SELECT count(*) FROM drift_reports WHERE kind = 'partition'
                                          AND window_key BETWEEN ? AND ?),
                                         (SELECT count(*) FROM drift_metrics WHERE window_key BETWEEN ? AND ?)""",
                               [DAYS[0], DAYS[2]] * 2).fetchall()[0]

    first = _cli(["drift", "backfill", "--from", DAYS[0], "--to", DAYS[2], "--json"], paths.home, dagster_home)
    assert first.returncode == 0, first.stderr[-3000:]
    rows = json.loads(first.stdout)
    assert [r["partition"] for r in rows] == DAYS[:3] and all(r["success"] for r in rows)
    assert [r["drifted"] for r in rows] == [False, True, False]
    # day 1 is the champion's training window itself: not compared with itself, and said so
    assert drift.latest(store, DAYS[0])["status"] == "insufficient_data"
    assert "insufficient reference" in (paths.reports / f"{DAYS[0]}.html").read_text()
    for day in DAYS[1:3]:
        assert (paths.reports / f"{day}.html").stat().st_size > 10_000
    before = counts()
    assert before[0] == 3 and before[1] > 2 * 8  # the two compared days have a row per column

    again = _cli(["drift", "backfill", "--from", DAYS[0], "--to", DAYS[2], "--json"], paths.home, dagster_home)
    assert again.returncode == 0, again.stderr[-3000:]
    assert counts() == before  # replaced, not duplicated
    with dg.DagsterInstance.from_config(str(dagster_home)) as inst:
        assert inst.get_materialized_partitions(dg.AssetKey("drift_report")) == set(DAYS[:3])

    shown = _cli(["drift", "show", "--partition", DAYS[1], "--json"], paths.home, dagster_home)
    d = json.loads(shown.stdout)
    assert d["drifted"] is True and d["embedding_drifted"] is True and d["report_path"].endswith(f"{DAYS[1]}.html")
    assert {"share_drifted", "embedding_drift", "accuracy", "columns"} <= set(d)
    missing = _cli(["drift", "show", "--partition", "2023-01-01"], paths.home, dagster_home)
    assert missing.returncode == 1 and "no drift report for 2023-01-01" in missing.stderr

    adhoc = _cli(["drift", "run", "--from", "2002-01-01", "--to", "2003-12-31", "--time-field", "event_time",
                  "--json"], paths.home, dagster_home)
    assert adhoc.returncode in (0, 1), adhoc.stderr[-2000:]
    a = json.loads(adhoc.stdout, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
    assert {"drifted", "share_drifted", "embedding_drift", "report_path"} <= set(a)
    assert Path(a["report_path"]).exists()
    # before: "no drift report yet" and exit 1 right after `drift run` had built one
    latest = _cli(["drift", "show", "--json"], paths.home, dagster_home)
    assert latest.returncode == 0 and json.loads(latest.stdout)["window_key"] == a["window_key"]


def test_checks_warn_on_feature_share_and_error_on_embedding_drift_with_accuracy_drop(home, instance, monkeypatch):
    from stream_sentinel.definitions import build_definitions

    paths, store, registry, emb = home
    api_port = free_port()
    monkeypatch.setenv("STREAM_SENTINEL_API_PORT", str(api_port))  # where the report links point
    # any accuracy counts as a drop: the ERROR check must fire on the day whose embeddings drifted;
    # PSI instead of Evidently's default KS on the features (it flags all four on this small day).
    # Set for this run only, as a user would in the launchpad: the next runs use the defaults.
    job = build_definitions(home=str(paths.home)).resolve_job_def("drift_job")
    result = job.execute_in_process(partition_key=DAYS[1], instance=instance, raise_on_error=False, run_config={
        "resources": {"sentinel": {"config": {"drift": {"accuracy_drop": -1.0, "num_method": "psi"}}}}})
    assert result.success  # checks report, they do not fail the run
    evals = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert not evals["feature_drift_share"].passed
    assert evals["feature_drift_share"].severity == dg.AssetCheckSeverity.WARN
    assert not evals["embedding_drift_with_accuracy_drop"].passed
    assert evals["embedding_drift_with_accuracy_drop"].severity == dg.AssetCheckSeverity.ERROR
    mat = result.asset_materializations_for_node("drift_report")[0]
    assert mat.metadata["drifted"].value is True and mat.metadata["report"].value.endswith(f"{DAYS[1]}.html")
    assert mat.metadata["model_version"].value == registry.champion_version()
    # the link in the Dagster UI opens: http on the API, not file:// (which browsers refuse)
    url = mat.metadata["report_url"].value
    assert url == f"http://127.0.0.1:{api_port}/reports/{DAYS[1]}.html"
    with serve(paths, port=api_port):
        page = httpx.get(url, timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.content == Path(mat.metadata["report"].value).read_bytes()
    with store.connect() as con:
        methods = {m for (m,) in con.execute("SELECT method FROM drift_metrics WHERE window_key = ? AND "
                                             "column_group = 'feature' AND column_name NOT IN "
                                             "('has_html', 'sender_domain')",
                                             [DAYS[1]]).fetchall()}
    assert {m.lower() for m in methods} == {"psi"}, methods

    calm = job.execute_in_process(partition_key=DAYS[2], instance=instance)
    assert all(e.passed for e in calm.get_asset_check_evaluations())
    few = job.execute_in_process(partition_key=DAYS[3], instance=instance)
    assert few.asset_materializations_for_node("drift_report")[0].metadata["status"].value == "insufficient_data"


def _report(day: str, drifted: bool) -> drift.DriftResult:
    return drift.DriftResult(day, "partition", "arrival", day, day, "ok", "", n_current=100, share_drifted=0.5 if
                             drifted else 0.0, embedding_drift=0.3, embedding_drifted=drifted, drifted=drifted)


def test_drift_sensor_requests_one_full_retrain_per_episode(paths, store, monkeypatch):
    from stream_sentinel.config import Settings
    from stream_sentinel.resources import StreamSentinelResource
    from stream_sentinel.sensors.drift import DRIFT_TAG, build_drift_retrain_sensor

    sensor = build_drift_retrain_sensor(Settings())
    cursor: dict = {"value": None}

    def evaluate():
        from stream_sentinel.sensors.drift import evaluate_drift_retrain

        with dg.build_resources({"sentinel": StreamSentinelResource.from_env(home=str(paths.home))}) as res:
            out = evaluate_drift_retrain(res.sentinel, cursor["value"])
        if isinstance(out, dg.SkipReason):
            return out
        cursor["value"] = out.cursor  # Dagster stores it with the run request
        return out.run_requests[0]

    assert isinstance(evaluate(), dg.SkipReason)  # no reports
    drift.record(store, _report("2024-03-01", False))
    assert isinstance(evaluate(), dg.SkipReason)  # no drift
    drift.record(store, _report("2024-03-02", True))
    req = evaluate()
    assert isinstance(req, dg.RunRequest)
    assert req.run_config["ops"] == {"model": {"config": {"full": True}}}
    assert req.tags[DRIFT_TAG] == "2024-03-02" and req.run_key.startswith("drift-retrain:2024-03-02:")
    assert isinstance(evaluate(), dg.SkipReason)  # acted on
    drift.record(store, _report("2024-03-03", True))
    assert isinstance(evaluate(), dg.SkipReason)  # same episode, inside the cooldown
    drift.record(store, _report("2024-03-02", True))  # a backfill re-runs an old day
    assert isinstance(evaluate(), dg.SkipReason)
    drift.record(store, _report("2024-03-04", False))
    drift.record(store, _report("2024-03-05", True))  # calm day, then drift: a new episode
    again = evaluate()
    assert isinstance(again, dg.RunRequest) and again.tags[DRIFT_TAG] == "2024-03-05"
    drift.record(store, _report("2024-03-06", True))
    assert isinstance(evaluate(), dg.SkipReason)
    monkeypatch.setenv("STREAM_SENTINEL_DRIFT_COOLDOWN_SECONDS", "0")  # still drifting after the cooldown
    assert evaluate().tags[DRIFT_TAG] == "2024-03-06"
    # the sensor wrote nothing: a crash between its tick and the run request loses no retrain
    with store.connect() as con:
        assert con.execute("SELECT count(*) FROM learning_events WHERE event_type = 'drift_retrain'").fetchone()[0] == 0
    # through the sensor definition too
    with dg.build_resources({"sentinel": StreamSentinelResource.from_env(home=str(paths.home))}) as res:
        out = sensor(dg.build_sensor_context(resources={"sentinel": res.sentinel}, cursor=cursor["value"]))
    assert isinstance(out, dg.SkipReason)


def test_drift_retrain_bookmark_survives_a_lost_cursor(paths, store):
    """The run records the retrain: with the sensor's cursor gone, the episode is still known."""
    from stream_sentinel.resources import StreamSentinelResource
    from stream_sentinel.sensors.drift import evaluate_drift_retrain

    drift.record(store, _report("2024-04-02", True))
    with dg.build_resources({"sentinel": StreamSentinelResource.from_env(home=str(paths.home))}) as res:
        first = evaluate_drift_retrain(res.sentinel, None)
        assert isinstance(first, dg.SensorResult)
        trigger = drift.RetrainTrigger.from_json(first.cursor)
        # lost cursor before the run started: the same run key again (Dagster drops the copy)
        again = evaluate_drift_retrain(res.sentinel, None)
        assert again.run_requests[0].run_key == first.run_requests[0].run_key
        drift.record_retrain(res.sentinel.registry(), trigger)  # what the retrain run does
        drift.record_retrain(res.sentinel.registry(), trigger)  # a retried run: recorded once
        assert isinstance(evaluate_drift_retrain(res.sentinel, None), dg.SkipReason)
    with store.connect() as con:
        assert con.execute("SELECT count(*) FROM learning_events WHERE event_type = 'drift_retrain'").fetchone()[0] == 1


def test_drift_retrain_run_is_full_and_names_its_drift_report(home, instance):
    """It replaces the champion: on its own copy of the data root (``home``), so the other
    tests still compare against the champion trained on day 1."""
    from stream_sentinel.definitions import build_definitions
    from stream_sentinel.sensors.drift import DRIFT_TAG

    paths, store, registry, emb = home
    job = build_definitions(home=str(paths.home)).resolve_job_def("training_job")
    from stream_sentinel.assets.models import DRIFT_TRIGGER_TAG

    trigger = drift.RetrainTrigger(DAYS[1], DAYS[1], "2024-03-02T00:00:00+00:00", 0.5, 0.3)
    result = job.execute_in_process(instance=instance, run_config={"ops": {"model": {"config": {"full": True}}}},
                                    tags={DRIFT_TAG: DAYS[1], DRIFT_TRIGGER_TAG: trigger.to_json()},
                                    raise_on_error=False)
    mat = result.asset_materializations_for_node("model")[0]
    assert mat.metadata["caused_by"].value == f"drift_report:{DAYS[1]}"
    assert mat.metadata["strategy"].value == "full"
    with store.connect() as con:
        cause = con.execute("""SELECT json_extract_string(detail, '$.cause') FROM learning_events
                               WHERE event_type = 'update' ORDER BY event_id DESC LIMIT 1""").fetchall()[0][0]
    assert cause == f"drift_report:{DAYS[1]}"
    with store.connect() as con:  # the run recorded the retrain it was asked for
        recorded = con.execute("""SELECT json_extract_string(detail, '$.run_key') FROM learning_events
                                  WHERE event_type = 'drift_retrain'""").fetchall()
    assert recorded == [(trigger.run_key,)]


def test_daily_schedule_requests_yesterdays_partition():
    from stream_sentinel.assets import daily_arrivals
    from stream_sentinel.assets.drift import build_daily_drift_schedule

    daily_drift_report = build_daily_drift_schedule(daily_arrivals("2024-01-01"))
    ctx = dg.build_schedule_context(scheduled_execution_time=datetime(2024, 3, 5, 0, 30, tzinfo=timezone.utc))
    req = daily_drift_report(ctx)
    assert isinstance(req, dg.RunRequest) and req.partition_key == "2024-03-04" and req.run_key == "drift:2024-03-04"
    early = daily_drift_report(dg.build_schedule_context(
        scheduled_execution_time=datetime(2024, 1, 1, 0, 30, tzinfo=timezone.utc)))
    assert isinstance(early, dg.SkipReason)  # 2023-12-31 is before the first partition


def test_a_rolling_report_shows_the_latest_records_without_waiting_for_midnight(home, instance, monkeypatch, capsys):
    """After `up`, the first report used to wait for the next 00:30 UTC. recent_drift_sensor asks
    for one as soon as a champion and records for both sides exist; it compares the latest
    records (at most half of all) with the champion's training set, and says what it found
    in a headline that follows the stated rule and the prequential accuracy."""
    from stream_sentinel.resources import StreamSentinelResource
    from stream_sentinel.sensors.drift import evaluate_recent_drift

    from stream_sentinel.definitions import build_definitions

    paths, store, registry, emb = home
    monkeypatch.setenv("STREAM_SENTINEL_HOME", str(paths.home))
    with dg.build_resources({"sentinel": StreamSentinelResource.from_env(home=str(paths.home))}) as res:
        req = evaluate_recent_drift(res.sentinel, instance)
    assert isinstance(req, dg.RunRequest) and req.run_key.startswith("drift-recent:")
    job = build_definitions(home=str(paths.home)).resolve_job_def("recent_drift_job")
    result = job.execute_in_process(run_config=req.run_config, instance=instance, raise_on_error=False)
    assert result.success
    d = drift.latest(store)
    assert d["kind"] == "recent" and d["status"] == "ok" and d["n_current"] == 505 // 2
    assert d["embedding_drifted"] and d["drifted"]  # the latest stretch holds period-2 mail
    assert d["message"].startswith("inputs DRIFTED") and "prequential accuracy" in d["message"]
    page = Path(d["report_path"]).read_text()
    assert "Rule:" in page and "recent" in d["report_path"]
    from stream_sentinel import cli

    capsys.readouterr()
    cli._drift_human(d)  # `drift show` prints the same headline
    assert capsys.readouterr().out.splitlines()[0] == f"{d['window_key']}: {d['message']}"
    meta = result.asset_materializations_for_node("recent_drift_report")[0].metadata
    assert meta["rule"].value == drift.rule(drift.DriftConfig.from_env())
    with dg.build_resources({"sentinel": StreamSentinelResource.from_env(home=str(paths.home))}) as res:
        again = evaluate_recent_drift(res.sentinel, instance)
    assert isinstance(again, dg.SkipReason) and "new records" in again.skip_message
    # launched by hand (the launchpad, no run config): a report up to the newest record, due or not
    by_hand = job.execute_in_process(instance=instance, raise_on_error=False)
    assert by_hand.success
    assert by_hand.asset_materializations_for_node("recent_drift_report")[0].metadata["status"].value == "ok"


def test_the_headline_follows_the_rule_and_names_what_else_moved():
    cfg = drift.DriftConfig()
    calm_inputs = drift.DriftResult("d", "partition", "arrival", "", "", "ok", "", n_drifted=0, n_features=4,
                                    share_drifted=0.0, prediction_drifted=True, accuracy=0.9, n_accuracy=100)
    line = calm_inputs.summary(cfg)
    # before: "no drift" beside flagged prediction columns, with nothing saying why
    assert line.startswith("inputs stable") and "also drifted: predictions" in line
    assert calm_inputs.verdict() == "no input drift, but outputs moved"
    assert "prequential accuracy 0.9000 on 100" in line
    moved = drift.DriftResult("d", "partition", "arrival", "", "", "ok", "", n_drifted=2, n_features=4,
                              share_drifted=0.5, embedding_drifted=True, drifted=True)
    assert moved.summary(cfg).startswith("inputs DRIFTED (text embeddings, 2/4 feature columns)")


def test_what_the_api_served_is_compared_and_counts_for_prequential_accuracy(home, corpus, demo_labels):
    """Real traffic: the API's answers (its prediction log, loaded by the served sensor's code)
    are their own columns in the day's report, and an answer it served before a label arrived
    is the one accuracy is judged on, as the loop's own are."""
    paths, store, registry, emb = home
    champion = registry.champion_version()
    day3 = [r["id"] for r in corpus[0][200:]]
    with store.transaction() as con:  # these records were answered by the API only
        con.execute("DELETE FROM predictions WHERE record_id IN (SELECT unnest(?::VARCHAR[]))", [day3])
    log = served.PredictionLog(paths.home)
    log.append([{"request_id": "q", "i": i, "record_id": rid, "routing_key": rid, "model_version": champion,
                 "role": "champion", "served": True, "probability": 0.99, "label": "spam", "input": "stored",
                 "served_at": "2024-03-03T12:00:00+00:00"} for i, rid in enumerate(day3)])
    log.close()
    assert served.ingest(paths.home, store)["loaded"] == len(day3)
    res = drift.run_partition(store, registry, paths.reports, emb.model_id, DAYS[2], CFG)
    assert res.status == "ok" and not res.drifted  # the same period's inputs
    cols = {c.column: c for c in res.columns}
    assert cols["served_prediction"].drifted and res.prediction_drifted, res.headline()
    assert f"{len(day3)} answers served by the API" in cols["served_prediction"].detail
    assert "served_label" in cols and "prediction" not in cols  # the loop answered none of them
    spam_share = sum(demo_labels[r] == "spam" for r in day3) / len(day3)
    assert res.n_accuracy == len(day3) and res.accuracy == pytest.approx(spam_share)
    # another day's report does not see them
    other = drift.run_partition(store, registry, paths.reports, emb.model_id, DAYS[1], CFG)
    assert "served_prediction" not in {c.column for c in other.columns}
