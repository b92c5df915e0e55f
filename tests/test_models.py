"""Model versions on real LightGBM: lineage, gated promotion, rejection, rollback, crash safety."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import dagster as dg
import pandas as pd

from stream_sentinel import feedback as fb
from stream_sentinel.learning import loop as learning
from stream_sentinel.definitions import build_definitions
from stream_sentinel.learning.models import TrainParams, load_training_set
from stream_sentinel.learning.registry import ModelRegistry

from .conftest import kill_when_paused
from .helpers import WINDOW, candidate, ingest_with_labels, label_records


def test_first_full_version_then_continued_child_with_exact_lineage(backend, paths, store, demo_embedder,
                                                                   demo_records, demo_labels):
    embedder = demo_embedder  # precomputed vectors: the embedder is not what is tested here
    registry = ModelRegistry(paths.models, store)
    ingest_with_labels(paths, store, embedder, demo_records, demo_labels, WINDOW, "a")
    first = candidate(registry, store, embedder)
    assert first.strategy == "full" and first.version.parent_version is None
    assert first.version.metrics["valid"]["roc_auc"] > 0.9
    registry.promote(first.version.version, first.version.metrics["valid"]["roc_auc"], "test")
    assert candidate(registry, store, embedder).version is None  # no new labels, no candidate

    ingest_with_labels(paths, store, embedder, demo_records, demo_labels, slice(1500, 1700), "b")
    # 200 more labels grow the training split 1.4x: under a refit rule looser than that the
    # champion is continued (the default rule, 1.2x, refits: checked at the end)
    child = candidate(registry, store, embedder, params=TrainParams(refit_growth=2.0))
    v = child.version
    assert (child.strategy, v.parent_version, v.semver) == ("incremental", first.version.version, "1.0.1")
    assert v.training_set_version != first.version.training_set_version
    with store.connect() as con:
        assert con.execute("SELECT count(*) FROM training_set_rows WHERE data_version = ?",
                           [v.training_set_version]).fetchall()[0][0] == 700
    # the parent's trees are inside the child (continued, not retrained)
    parent_trees = (paths.models / first.version.version / "model.txt").read_text().count("Tree=")
    child_trees = (paths.models / v.version / "model.txt").read_text().count("Tree=")
    assert child_trees == parent_trees + TrainParams().incremental_rounds
    assert json.loads((paths.models / v.version / "meta.json").read_text())["parent_version"] == first.version.version

    out = subprocess.run([sys.executable, "-m", "stream_sentinel.cli", "model", "list", "--json"],
                         capture_output=True, text=True, check=True)
    rows = json.loads(out.stdout)
    assert [(r["version"], r["parent"], r["status"], r["strategy"]) for r in rows] == [
        (first.version.version, None, "champion", "full"), (v.version, first.version.version, "candidate",
                                                            "incremental")]
    assert all("valid" in r["metrics"] for r in rows)
    assert candidate(registry, store, embedder).strategy == "full"  # the default refit rule at 1.4x


def _training_run(paths, instance, full=False):
    job = build_definitions(home=str(paths.home)).resolve_job_def("training_job")
    return job.execute_in_process(run_config={"ops": {"model": {"config": {"full": full}}}}, instance=instance,
                                  raise_on_error=False)


def test_shuffled_labels_candidate_is_rejected_and_the_champion_stays(paths, store, demo_embedder, demo_records,
                                                                     demo_labels, instance):
    embedder = demo_embedder  # precomputed vectors: the embedder is not what is tested here
    ingest_with_labels(paths, store, embedder, demo_records, demo_labels, WINDOW, "a")
    good = _training_run(paths, instance)
    assert good.success
    warn = {c.check_name: c for c in good.get_asset_check_evaluations() if c.check_name != "candidate_beats_champion"}
    assert set(warn) == {"update_failure_rate", "updates_under_1s", "score_not_degrading"}
    assert all(c.severity == dg.AssetCheckSeverity.WARN for c in warn.values())
    assert warn["update_failure_rate"].passed and warn["score_not_degrading"].passed
    registry = ModelRegistry(paths.models, store)
    champion = registry.champion_version()
    assert champion and registry.get(champion).status == "champion"
    with store.connect() as con:
        assert con.execute("SELECT count(*) FROM current_predictions").fetchall()[0][0] == 500

    # a deliberately worse candidate: every label shuffled
    with store.transaction() as con:
        labs = con.execute("SELECT record_id, label FROM labels ORDER BY record_id").df()
        labs["label"] = labs["label"].sample(frac=1.0, random_state=3).to_numpy()
        con.register("shuffled", labs)
        con.execute("UPDATE labels SET label = s.label FROM shuffled s WHERE labels.record_id = s.record_id")
    bad = _training_run(paths, instance, full=True)
    assert not bad.success  # the blocking check stops the run before promotion
    (check,) = [c for c in bad.get_asset_check_evaluations() if c.check_name == "candidate_beats_champion"]
    assert not check.passed
    assert "below" in check.description
    assert registry.champion_version() == champion
    rejected = [v for v in registry.list() if v.status == "rejected"]
    assert len(rejected) == 1 and rejected[0].parent_version == champion
    assert not bad.asset_materializations_for_node("champion")
    with store.connect() as con:
        kinds = [r[0] for r in con.execute("SELECT event_type FROM learning_events ORDER BY event_id").fetchall()]
    assert kinds == ["update", "promotion", "update", "rejection"]


def test_model_and_champion_steps_use_their_own_runs_facts(paths, store, demo_embedder, demo_records, demo_labels):
    """Before: `model` found its training set through the instance's latest `training_set`
    materialization (KeyError on a fresh instance) and `champion` its candidate through the
    latest `model` one. Each step now reads what its own run made; a step materialized alone
    on a fresh instance builds its training set itself."""
    embedder = demo_embedder  # precomputed vectors: the embedder is not what is tested here
    ingest_with_labels(paths, store, embedder, demo_records, demo_labels, WINDOW, "a")
    job = build_definitions(home=str(paths.home)).resolve_job_def("training_job")
    with dg.instance_for_test() as fresh:  # no training_set materialization anywhere
        alone = job.execute_in_process(instance=fresh, raise_on_error=False,
                                       asset_selection=[dg.AssetKey("model"), dg.AssetKey("champion")])
    assert alone.success
    meta = alone.asset_materializations_for_node("model")[0].metadata
    registry = ModelRegistry(paths.models, store)
    assert registry.champion_version() == meta["candidate"].value
    version = meta["training_set_version"].value
    with store.connect() as con:
        assert con.execute("SELECT count(*) FROM training_set_rows WHERE data_version = ?", [version]).fetchone()[0]
        facts = dict(con.execute("SELECT fact, value FROM run_facts WHERE run_id = ?", [alone.run_id]).fetchall())
    assert facts == {"training_set": version, "candidate": meta["candidate"].value}


def test_rollback_restores_the_previous_champion_and_its_predictions(backend, paths, store, demo_embedder,
                                                                    demo_records, demo_labels):
    embedder = demo_embedder  # precomputed vectors: the embedder is not what is tested here
    registry = ModelRegistry(paths.models, store)
    ingest_with_labels(paths, store, embedder, demo_records, demo_labels, WINDOW, "a")
    m1 = candidate(registry, store, embedder).version.version
    registry.promote(m1, None, "test")
    learning.score_new_records(registry, store, embedder.model_id)
    with store.connect() as con:
        before = dict(con.execute("SELECT record_id, probability FROM current_predictions").fetchall())
    ingest_with_labels(paths, store, embedder, demo_records, demo_labels, slice(1500, 1700), "b")
    m2 = candidate(registry, store, embedder).version.version
    registry.promote(m2, None, "test")
    learning.score_new_records(registry, store, embedder.model_id)
    with store.connect() as con:
        assert con.execute("SELECT DISTINCT model_version FROM current_predictions").fetchall() == [(m2,)]

    out = subprocess.run([sys.executable, "-m", "stream_sentinel.cli", "model", "rollback", "--json"],
                         capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == {"champion": m1, "previous": m2}
    assert registry.champion_version() == m1
    assert {v.version: v.status for v in registry.list()} == {m1: "champion", m2: "archived"}
    with store.connect() as con:
        restored = dict(con.execute("SELECT record_id, probability FROM current_predictions").fetchall())
        kinds = [r[0] for r in con.execute("SELECT event_type FROM learning_events ORDER BY event_id").fetchall()]
    assert {k: restored[k] for k in before} == before  # m1's own predictions serve again
    assert kinds[-1] == "rollback"


PROMOTER = textwrap.dedent("""
    import sys
    from stream_sentinel.learning.registry import ModelRegistry
    from stream_sentinel.store import Store
    ModelRegistry(sys.argv[1], Store(sys.argv[2])).promote(sys.argv[3], None, "killed mid-way")
""")


def test_process_killed_during_promotion_leaves_exactly_one_consistent_champion(paths, store, demo_embedder,
                                                                               demo_records, demo_labels, tmp_path):
    embedder = demo_embedder  # precomputed vectors: the embedder is not what is tested here
    registry = ModelRegistry(paths.models, store)
    ingest_with_labels(paths, store, embedder, demo_records, demo_labels, WINDOW, "a")
    m1 = candidate(registry, store, embedder).version.version
    registry.promote(m1, None, "test")
    ingest_with_labels(paths, store, embedder, demo_records, demo_labels, slice(1500, 1700), "b")
    m2 = candidate(registry, store, embedder).version.version
    kill_when_paused([sys.executable, "-c", PROMOTER, str(paths.models), str(paths.db), m2],
                     "promotion_after_pointer", tmp_path / "paused", timeout_s=60)
    # the pointer moved, the mirror did not: the next reader repairs it
    assert registry.champion_version() == m2
    assert registry.reconcile() == m2
    statuses = {v.version: v.status for v in registry.list()}
    assert list(statuses.values()).count("champion") == 1 and statuses[m2] == "champion"
    booster, spec = registry.load(m2)  # the promoted file is whole and matches its sha256
    assert booster.num_trees() > 0


def test_retrain_policy_waits_for_enough_new_labels(paths, store, demo_embedder, demo_records, demo_labels, monkeypatch):
    embedder = demo_embedder  # precomputed vectors: the embedder is not what is tested here
    import dagster as dg

    from stream_sentinel.resources import StreamSentinelResource
    from stream_sentinel.sensors.training import evaluate_retrain

    def evaluate(flush=False):
        with dg.build_resources({"sentinel": StreamSentinelResource.from_env(home=str(paths.home))}) as res:
            return evaluate_retrain(res.sentinel, flush=flush)

    monkeypatch.setenv("STREAM_SENTINEL_RETRAIN_MIN_LABELS", "1000")
    ingest_with_labels(paths, store, embedder, demo_records, demo_labels, slice(1000, 1100), "a")
    waiting = evaluate()
    assert isinstance(waiting, dg.SkipReason) and "100 new label(s)" in waiting.skip_message
    flushed = evaluate(flush=True)
    assert isinstance(flushed, dg.RunRequest) and flushed.run_key.startswith("train:")
    monkeypatch.setenv("STREAM_SENTINEL_RETRAIN_MIN_LABELS", "50")
    due = evaluate()
    assert isinstance(due, dg.RunRequest) and due.run_key == flushed.run_key  # same labels, same key


def test_live_accuracy_rollback_compares_like_with_like(paths, store, demo_embedder, demo_records, demo_labels):
    """A degraded champion goes back to the previous version only when that version is better
    on the same fresh records. Before: the champion's live score was compared with its own
    promise and the previous version restored blindly, so after a shift (where the older
    model is worse still) versions ping-ponged."""
    embedder = demo_embedder  # precomputed vectors: the embedder is not what is tested here
    registry = ModelRegistry(paths.models, store)
    ingest_with_labels(paths, store, embedder, demo_records, demo_labels, WINDOW, "a")
    first = candidate(registry, store, embedder).version
    registry.promote(first.version, None, "test")
    ingest_with_labels(paths, store, embedder, demo_records, demo_labels, slice(1500, 1700), "b")
    second = candidate(registry, store, embedder).version
    registry.promote(second.version, None, "test")
    learning.score_new_records(registry, store, embedder.model_id)
    healthy = learning.live_accuracy(registry, store, margin=0.05, min_samples=50)
    assert healthy.n == 0 and not healthy.degraded  # no feedback since the promotion yet

    # the world changes after the promotion: fresh feedback contradicts what both versions learned
    now = pd.Timestamp.now(tz="UTC").to_pydatetime()
    flipped = {"spam": "ham", "ham": "spam"}
    fresh = [fb.Event(fb.Position("fresh", 0, i), r["id"], flipped[demo_labels[r["id"]]], "oracle", 1.0, now)
             for i, r in enumerate(demo_records[1000:1200])]
    fb.write(store, fresh, [], "kafka")
    fb.resolve_labels(store, fb.ConsensusConfig(half_life_hours=1.0))
    res = learning.live_accuracy(registry, store, margin=0.05, min_samples=50)
    assert res.champion == second.version and res.n >= 50 and res.degraded
    assert res.accuracy < res.promoted_accuracy - 0.05
    # the previous version is no better on the same records: the champion stays
    assert res.compared_with == first.version and "not better beyond chance" in res.kept_because
    assert res.rolled_back_to is None and registry.champion_version() == second.version
    with store.connect() as con:
        assert con.execute("SELECT event_type FROM learning_events ORDER BY event_id DESC LIMIT 1").fetchall() == [
            ("rollback_declined",)]


def test_live_accuracy_rollback_restores_a_better_previous_version(paths, store, demo_embedder, demo_records,
                                                                   demo_labels):
    embedder = demo_embedder
    registry = ModelRegistry(paths.models, store)
    ingest_with_labels(paths, store, embedder, demo_records, demo_labels, WINDOW, "a")
    first = candidate(registry, store, embedder).version
    registry.promote(first.version, None, "test")
    # a labelling bug: every label of the window inverted; a model trained on it is promoted
    with store.transaction() as con:
        con.execute("UPDATE labels SET label = CASE label WHEN 'spam' THEN 'ham' ELSE 'spam' END")
    # trees on the content alone (no live label columns to rescue it): it learned spam as ham
    ts = load_training_set(store, embedder.model_id, "spam")
    learning.persist_training_set(store, ts, embedder.model_id)
    bad = learning.train_candidate(registry, store, ts, embedder.model_id, TrainParams(linear=False, replay=0),
                                   full=True).version
    registry.promote(bad.version, None, "test")
    with store.transaction() as con:  # the bug is fixed
        con.execute("UPDATE labels SET label = CASE label WHEN 'spam' THEN 'ham' ELSE 'spam' END")
    later = demo_records[1500:1700]
    ingest_with_labels(paths, store, embedder, demo_records, None, slice(1500, 1700), "b")
    learning.score_new_records(registry, store, embedder.model_id)
    label_records(store, later, demo_labels, "b", when=pd.Timestamp.now(tz="UTC").isoformat())
    res = learning.live_accuracy(registry, store, margin=0.05, min_samples=50)
    assert res.champion == bad.version and res.degraded and res.n == 200
    assert res.previous_now > res.champion_now
    assert res.rolled_back_to == first.version and registry.champion_version() == first.version
    with store.connect() as con:
        assert con.execute("SELECT event_type FROM learning_events ORDER BY event_id DESC LIMIT 1").fetchall() == [
            ("auto_rollback",)]
    # the restored champion is judged from its return on: no ping-pong on the same old feedback
    again = learning.live_accuracy(registry, store, margin=0.05, min_samples=50)
    assert again.champion == first.version and again.n == 0 and not again.degraded
