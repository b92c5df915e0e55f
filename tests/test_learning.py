"""Learning on any label stream: label names, one-sided data, every label learned once,
honest exit codes and strict JSON (issue 12, items 0, 1, 2, 6, 8)."""

from __future__ import annotations

import json

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from stream_sentinel import cli, jsonout
from stream_sentinel.sensors.once import run_outcome
from stream_sentinel.learning import loop as learning
from stream_sentinel.config import Settings
from stream_sentinel.definitions import build_definitions
from stream_sentinel.learning.models import TrainParams, load_training_set, split_rows
from stream_sentinel.learning.registry import ModelRegistry

from .conftest import drop
from .helpers import WINDOW, candidate, ingest_records, ingest_with_labels, label_records


def _strict_loads(text: str):
    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    return json.loads(text, parse_constant=refuse)


# ------------------------------------------------------------------------- label names


def test_label_pair_comes_from_the_configured_labels(monkeypatch):
    for var in ("STREAM_SENTINEL_LABELS", "STREAM_SENTINEL_POSITIVE_LABEL", "STREAM_SENTINEL_NEGATIVE_LABEL"):
        monkeypatch.delenv(var, raising=False)
    s = Settings.from_env()
    assert (s.positive_label, s.negative_label) == ("spam", "ham")
    monkeypatch.setenv("STREAM_SENTINEL_LABELS", "a,b")
    s = Settings.from_env()
    assert (s.positive_label, s.negative_label) == ("b", "a")
    monkeypatch.setenv("STREAM_SENTINEL_POSITIVE_LABEL", "a")
    s = Settings.from_env()
    assert (s.positive_label, s.negative_label) == ("a", "b")  # never "not_a"
    monkeypatch.setenv("STREAM_SENTINEL_POSITIVE_LABEL", "c")
    with pytest.raises(ValueError, match="'c' is not one of"):
        Settings.from_env()
    monkeypatch.setenv("STREAM_SENTINEL_LABELS", "a,b,c")
    with pytest.raises(ValueError, match="exactly two labels"):
        Settings.from_env()


def test_a_custom_label_pair_runs_the_whole_loop(paths, store, demo_embedder, demo_records, demo_labels, instance,
                                                 monkeypatch):
    """Before: with labels a,b and positive a, predictions said `not_a` for the negative class,
    live accuracy counted every correct negative as a miss and rolled the champion back."""
    monkeypatch.setenv("STREAM_SENTINEL_LABELS", "urgent,routine")
    monkeypatch.setenv("STREAM_SENTINEL_POSITIVE_LABEL", "urgent")
    names = {"spam": "urgent", "ham": "routine"}
    renamed = {rid: names[lab] for rid, lab in demo_labels.items()}
    ingest_with_labels(paths, store, demo_embedder, demo_records, renamed, WINDOW, "a")
    job = build_definitions(Settings.from_env(), home=str(paths.home)).resolve_job_def("training_job")
    first = job.execute_in_process(instance=instance, raise_on_error=False)
    assert first.success
    registry = ModelRegistry(paths.models, store)
    champion = registry.champion_version()
    assert champion
    with store.connect() as con:
        answered = dict(con.execute("SELECT label, count(*) FROM current_predictions GROUP BY 1").fetchall())
        assert set(answered) == {"urgent", "routine"}
        assert con.execute("SELECT positive_label, negative_label FROM training_sets").fetchall() == [
            ("urgent", "routine")]

    # new records are scored before their labels arrive; the labels then judge the champion live
    later = demo_records[1500:1700]
    ingest_with_labels(paths, store, demo_embedder, demo_records, None, slice(1500, 1700), "b")
    assert job.execute_in_process(instance=instance, raise_on_error=False,
                                  asset_selection=[dg.AssetKey("predictions")]).success
    label_records(store, later, renamed, "b", when=pd.Timestamp.now(tz="UTC").isoformat())
    res = learning.live_accuracy(registry, store, margin=0.05, min_samples=50, rollback=True)
    assert res.n == 200 and res.accuracy > 0.85, res
    assert res.rolled_back_to is None and not res.degraded
    with store.connect() as con:  # the negative answers are right, not misses
        right_negatives = con.execute(
            """SELECT count(*) FROM current_predictions p JOIN labels l ON l.record_id = p.record_id
               WHERE p.label = 'routine' AND l.label = 'routine'""").fetchone()[0]
    assert right_negatives > 50


# ------------------------------------------------------------------------- one-sided validation


def test_validation_slice_holds_both_classes_when_the_latest_rows_hold_one():
    n = 300
    frame = pd.DataFrame({"record_id": [f"r{i}" for i in range(n)],
                          "y": [1] * 150 + [0] * 150})  # the stream ends on a long one-class stretch
    split = split_rows(frame, golden_share=0.0)
    valid = frame[split == "valid"]
    assert set(valid["y"]) == {0, 1}
    assert (valid["y"] == 0).sum() == 60  # the latest 20 %, as before
    assert (valid["y"] == 1).sum() == 30  # the latest positives: their share, most stay in training
    assert frame[(split == "valid") & (frame["y"] == 1)]["record_id"].tolist() == [f"r{i}" for i in range(120, 150)]
    # one lone positive stays in training (a model needs it); nothing borrowed
    lone = pd.DataFrame({"record_id": [f"r{i}" for i in range(100)], "y": [1] + [0] * 99})
    assert (split_rows(lone, golden_share=0.0)[lone["y"] == 1] == "train").all()


def _period1(demo_records):
    key = lambda r: (r["event_time"], r["id"])  # noqa: E731
    ham = sorted([r for r in demo_records if r["id"].startswith("easy-ham-1/")], key=key)[-150:]
    spam = sorted([r for r in demo_records if r["id"].startswith("spam-1/")], key=key)[:150]
    return sorted(ham + spam, key=key)


def test_one_run_once_gives_a_fresh_root_a_first_model_then_exit_codes_say_what_happened(
        paths, store, demo_embedder, demo_records, demo_labels, monkeypatch, capsys):
    """300 labelled period-1 records whose latest 53 (by event time, outside the golden slice)
    are all ham. Before: the first candidate was rejected ('no validation data to judge the
    first model on': ROC-AUC undefined on one class) and the user got no champion at all.
    The records are embedded with the shared precomputed vectors (the embedder is not what is
    tested); the labels arrive as a feedback file and one `run --once` does the rest."""
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    recs = _period1(demo_records)
    ingest_records(paths, store, demo_embedder, recs, "period1")
    now = pd.Timestamp.now(tz="UTC").isoformat()
    drop(paths.feedback, "labels.jsonl", [{"record_id": r["id"], "label": demo_labels[r["id"]], "source": "analyst",
                                           "ts": now} for r in recs])
    code = cli.main(["run", "--once"])
    out, err = capsys.readouterr()
    assert code == 0, err
    registry = ModelRegistry(paths.models, store)
    champion = registry.champion_version()
    with store.connect() as con:
        files = con.execute("SELECT path, status, events, rejects, error FROM feedback_files").fetchall()
    assert champion, f"{err}\n{files}"
    assert "first model" in registry.get(champion).reason or "passed" in registry.get(champion).reason
    with store.connect() as con:
        assert con.execute("SELECT count(*) FROM current_predictions").fetchone()[0] == 300
    assert _strict_loads(out.strip().splitlines()[-1])["champion"] == champion

    # item 8: an undefined metric (ROC-AUC of a one-class slice) is null, not a bare NaN
    booster, spec = registry.load(champion)
    registry.save(booster, spec, parent=champion, strategy="incremental", params={},
                  metrics={"golden": {"roc_auc": float("nan"), "n": 3}}, training_samples=0,
                  training_set_version=registry.get(champion).training_set_version,
                  embedding_model_id=demo_embedder.model_id)
    assert cli.main(["model", "list", "--json"]) == 0
    rows = _strict_loads(capsys.readouterr().out)
    assert rows[-1]["metrics"]["golden"]["roc_auc"] is None

    # item 6: a candidate the gate rejects is not a failed run: exit 3, and the output says so
    with store.transaction() as con:
        labs = con.execute("SELECT record_id, label FROM labels ORDER BY record_id").df()
        labs["label"] = labs["label"].sample(frac=1.0, random_state=3).to_numpy()
        con.register("shuffled", labs)
        con.execute("UPDATE labels SET label = s.label FROM shuffled s WHERE labels.record_id = s.record_id")
    monkeypatch.setenv("STREAM_SENTINEL_RETRAIN_MIN_LABELS", "1")
    code = cli.main(["model", "retrain", "--full"])
    _, err = capsys.readouterr()
    assert code == 3, err
    assert "rejected by candidate_beats_champion" in err and "FAILED" not in err
    assert registry.champion_version() == champion


# ------------------------------------------------------------------------- every label learned once


def test_labels_that_sat_in_validation_are_learned_when_they_move_into_training(paths, store, demo_embedder,
                                                                               demo_records, demo_labels):
    """Before: a label first seen in the validation slice counted as 'seen' once it moved into
    training (the parent's training set held it, as a validation row), so the next candidate
    said 'no new labels' and that label was never learned."""
    registry = ModelRegistry(paths.models, store)
    ingest_with_labels(paths, store, demo_embedder, demo_records, demo_labels, WINDOW, "a")

    def candidate():
        ts = load_training_set(store, demo_embedder.model_id, "spam")
        learning.persist_training_set(store, ts, demo_embedder.model_id)
        return ts, learning.train_candidate(registry, store, ts, demo_embedder.model_id, TrainParams())

    ts1, first = candidate()
    registry.promote(first.version.version, None, "test")
    was_valid = set(ts1.split("valid")["record_id"])
    # later labels push the validation window forward: some of its rows move into training
    ingest_with_labels(paths, store, demo_embedder, demo_records, demo_labels, slice(1500, 1540), "b")
    ts2 = load_training_set(store, demo_embedder.model_id, "spam")
    moved = was_valid & set(ts2.split("train")["record_id"])
    new_train = set(ts2.split("train")["record_id"]) - set(ts1.split("train")["record_id"])
    assert moved and moved <= new_train
    _, child = candidate()
    assert child.version is not None, child.reason
    n_old = len(ts2.split("train")) - len(new_train)
    assert child.batch_size == len(new_train) + min(TrainParams().replay, n_old)


def test_strict_json_turns_undefined_numbers_into_null():
    out = jsonout.dumps({"a": float("nan"), "b": [np.float64("inf"), 1.5], "c": np.float32(2.0), "d": "x"})
    assert _strict_loads(out) == {"a": None, "b": [None, 1.5], "c": 2.0, "d": "x"}


# ------------------------------------------------------------------------- decision threshold


def test_decision_threshold_moves_only_on_evidence():
    from stream_sentinel.learning.loop import decision_threshold

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    # a good, calibrated model: a cut tuned freely would chase noise (it did: 0.05..0.95 seen)
    p = np.clip(np.where(y == 1, 0.8, 0.2) + rng.normal(0, 0.2, 200), 0, 1)
    free = np.linspace(0.05, 0.95, 91)[int(np.argmax([((p >= t) == y).mean() for t in np.linspace(0.05, 0.95, 91)]))]
    assert round(float(free), 2) != 0.5  # the unregularized choice moves ...
    assert decision_threshold(y, p) == 0.5  # ... on no real evidence
    # every score shifted up by 0.35 (a prior that moved): the evidence is strong, the cut follows
    shifted = np.clip(p + 0.35, 0, 1)
    assert 0.7 <= decision_threshold(y, shifted) <= 0.95
    assert decision_threshold(y[:40], shifted[:40]) == 0.5  # too few rows


# ------------------------------------------------------------------------- bounded rescoring


def test_a_promotion_scores_new_records_and_rescores_only_a_recent_window(paths, store, demo_embedder, demo_records,
                                                                         demo_labels):
    """Before: every promoted version rescored every record (176,492 rows for 11,620 records
    after 31 versions). Now new records always, older ones only within the window; every
    record still has one served answer."""
    registry = ModelRegistry(paths.models, store)
    ingest_with_labels(paths, store, demo_embedder, demo_records, demo_labels, WINDOW, "a")
    m1 = candidate(registry, store, demo_embedder).version.version
    registry.promote(m1, None, "test")
    assert learning.score_new_records(registry, store, demo_embedder.model_id, rescore_window=300) == 500
    ingest_with_labels(paths, store, demo_embedder, demo_records, demo_labels, slice(1500, 1700), "b")
    m2 = candidate(registry, store, demo_embedder).version.version
    registry.promote(m2, None, "test")
    # the 200 new records, and the 100 newest of the 500 older ones
    assert learning.score_new_records(registry, store, demo_embedder.model_id, rescore_window=300) == 300
    assert learning.score_new_records(registry, store, demo_embedder.model_id, rescore_window=300) == 0
    with store.connect() as con:
        assert con.execute("SELECT count(*) FROM predictions").fetchone()[0] == 800  # not 500 + 700
        served = dict(con.execute("SELECT model_version, count(*) FROM current_predictions GROUP BY 1").fetchall())
        assert served == {m2: 300, m1: 400}
        assert con.execute("SELECT count(DISTINCT record_id) FROM current_predictions").fetchone()[0] == 700


# ------------------------------------------------------------------------- signals that cried wolf


def test_a_training_run_with_nothing_new_makes_no_model_materialization(paths, store, demo_embedder, demo_records,
                                                                       demo_labels, instance):
    """Before: it materialized `model` with candidate '', batch_size 0, duration_s 0, which became
    the asset's latest and dropped the UI's plots to 0; and `run --once` exited 1 on WARN checks."""
    from stream_sentinel.resources import StreamSentinelResource
    from stream_sentinel.sensors.training import evaluate_retrain

    ingest_with_labels(paths, store, demo_embedder, demo_records, demo_labels, WINDOW, "a")
    # slow continued updates on record: the WARN check fails; it is printed, never counted as failure
    with store.transaction() as con:
        for _ in range(3):
            con.execute("INSERT INTO learning_events (event_type, duration_ms, detail, created_at) "
                        "VALUES ('update', 5000, ?, now())", [json.dumps({"strategy": "incremental"})])
    job = build_definitions(home=str(paths.home)).resolve_job_def("training_job")
    first = job.execute_in_process(instance=instance, raise_on_error=False)
    outcome, lines = run_outcome(first)
    assert first.success and outcome == "ok", lines
    assert any("updates_under_1s (WARN)" in line for line in lines)
    again = job.execute_in_process(instance=instance, raise_on_error=False)
    assert again.success
    assert not again.asset_materializations_for_node("model")
    (obs,) = [e for e in again.get_asset_observation_events() if e.asset_key == dg.AssetKey("model")]
    assert "no new labels" in obs.asset_observation_data.asset_observation.metadata["reason"].value
    latest = instance.get_latest_materialization_event(dg.AssetKey("model"))
    assert latest.asset_materialization.metadata["candidate"].value  # still the real version
    outcome, lines = run_outcome(again)
    assert outcome == "ok" and any("model: candidate none" in line for line in lines)

    # a queued training run holds the sensor: it reads every label there is when it starts
    ingest_with_labels(paths, store, demo_embedder, demo_records, demo_labels, slice(1600, 1700), "c")
    with dg.build_resources({"sentinel": StreamSentinelResource.from_env(home=str(paths.home))}) as res:
        assert isinstance(evaluate_retrain(res.sentinel, flush=True, instance=instance), dg.RunRequest)
        instance.create_run_for_job(job, status=dg.DagsterRunStatus.NOT_STARTED)
        held = evaluate_retrain(res.sentinel, flush=True, instance=instance)
    assert isinstance(held, dg.SkipReason) and "queued" in held.skip_message


# ------------------------------------------------------------------------- the linear score column


def test_linear_scores_never_use_a_records_own_label_and_follow_recent_labels():
    from stream_sentinel.learning.models import LINEAR_FOLDS, Reference, linear_scores

    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(200, 8)).astype(np.float32)
    y = (vecs[:, 0] > 0).astype(int)
    ids = [f"r{i}" for i in range(200)]
    ref = Reference(vecs, y, ids)
    held_out = linear_scores(ref, vecs[:20], None)
    assert ((held_out > 0) == (y[:20] == 1)).mean() >= 0.9  # a linear view of the labels
    # a training row scores with a fit that never saw its fold, which is its own label's fold
    oof = linear_scores(ref, vecs[:20], ids[:20])
    fold = np.arange(200) % LINEAR_FOLDS
    for j in (0, 7, 13):
        without = Reference(vecs[fold != fold[j]], y[fold != fold[j]], [i for i, f in zip(ids, fold) if f != fold[j]])
        assert np.isclose(oof[j], linear_scores(without, vecs[j:j + 1], None)[0], atol=1e-4)
    # the stream turns: the newest labels say the opposite of the older, more numerous ones
    turned = Reference(vecs, np.concatenate([y[:150], 1 - y[150:]]), ids)
    probe = np.eye(8, dtype=np.float32)[:1]  # far along the first direction
    assert linear_scores(turned, probe, None, half_life=0.0)[0] > 0  # all labels alike: the old majority
    assert linear_scores(turned, probe, None, half_life=20.0)[0] < 0  # recent labels weigh more


def test_linear_state_extends_in_stream_order_and_rebuilds_when_the_past_changes(tmp_path):
    """Scores from a state extended batch by batch (and reloaded from disk by another process)
    equal scores from scratch; a changed label, an inserted row or another embedding is a
    rebuild, never a silent mix of old and new statistics."""
    from stream_sentinel.learning import models
    from stream_sentinel.learning.models import Reference, linear_scores, linear_state

    rng = np.random.default_rng(1)
    vecs = rng.normal(size=(600, 8)).astype(np.float32)
    y = (vecs[:, 0] + 0.3 * rng.normal(size=600) > 0).astype(int)
    ids = [f"r{i}" for i in range(600)]
    probe = rng.normal(size=(30, 8)).astype(np.float32)
    cache = tmp_path / "linear" / "all.npz"

    def scratch(ref):
        models._LINEAR_MEMO.clear()
        plain = Reference(ref.vectors, ref.y, ref.ids)  # no file: built from nothing
        return linear_scores(plain, probe, None, 50.0), linear_scores(plain, ref.vectors[:40], ref.ids[:40], 50.0)

    models._LINEAR_MEMO.clear()
    for n in (100, 250, 400, 600):  # batches arrive; each process starts with an empty memory
        models._LINEAR_MEMO.clear()
        ref = Reference(vecs[:n], y[:n], ids[:n], cache)
        got = linear_scores(ref, probe, None, 50.0), linear_scores(ref, vecs[:40], ids[:40], 50.0)
        assert linear_state(ref, 50.0).n == n
        want = scratch(ref)
        assert np.allclose(got[0], want[0], atol=1e-4) and np.allclose(got[1], want[1], atol=1e-4)
    assert cache.exists()
    # the state on disk grew with the stream, at most LINEAR_SAVE_ROWS behind it (saved only
    # when it grew that much): the next process extends it, it does not rebuild
    models._LINEAR_MEMO.clear()
    assert 600 - models.LINEAR_SAVE_ROWS < models.LinearState.from_file(cache).n <= 600
    # the past changed: one old label flipped; a late label inserted in the middle; new vectors
    flipped = y.copy()
    flipped[10] = 1 - flipped[10]
    inserted = np.insert(vecs, 50, rng.normal(size=8).astype(np.float32), axis=0)
    for ref in (Reference(vecs, flipped, ids, cache),
                Reference(inserted, np.insert(y, 50, 1), ids[:50] + ["late"] + ids[50:], cache),
                Reference(vecs * 0.5, y, ids, cache)):
        models._LINEAR_MEMO.clear()
        got = linear_scores(ref, probe, None, 50.0)
        assert np.allclose(got, scratch(ref)[0], atol=1e-4)


def test_one_class_so_far_is_a_clear_waiting_state_not_a_failed_run(paths, store, demo_embedder, demo_records,
                                                                   demo_labels, instance):
    """120 labels, all ham: no candidate, no failure, and the output says what it waits for."""
    hams = [r for r in demo_records if demo_labels[r["id"]] == "ham"][:120]
    ingest_records(paths, store, demo_embedder, hams, "hams")
    label_records(store, hams, demo_labels, "hams")
    job = build_definitions(home=str(paths.home)).resolve_job_def("training_job")
    result = job.execute_in_process(instance=instance, raise_on_error=False)
    assert result.success  # not a failed run
    outcome, lines = run_outcome(result)
    assert outcome == "ok" and any("waiting for both classes ('spam' and 'ham')" in line for line in lines), lines
    assert not result.asset_materializations_for_node("model")
    assert ModelRegistry(paths.models, store).champion_version() is None


def test_retrain_policy_grows_with_the_labels_trained_on():
    """Training is due when the new labels reach both the minimum and a share of those trained
    on: at 1,000 labels 100 new ones wait, 250 train; a slow stream still trains after the
    wait bound, and a flush trains whatever is there; nothing new never trains."""
    from stream_sentinel.learning.loop import LabelBacklog, retrain_due

    assert retrain_due(LabelBacklog(60, 0, None), 50, 0.25, 600)[0]  # the first training set
    assert retrain_due(LabelBacklog(60, 100, 5.0), 50, 0.25, 600)[0]  # small: the minimum rules
    due, why = retrain_due(LabelBacklog(100, 1000, 5.0), 50, 0.25, 600)
    assert not due and "waiting for 250" in why and "25% of the 1000 trained on" in why
    assert retrain_due(LabelBacklog(250, 1000, 5.0), 50, 0.25, 600)[0]
    assert retrain_due(LabelBacklog(100, 1000, 700.0), 50, 0.25, 600)[0]  # waited long enough
    assert retrain_due(LabelBacklog(1, 1000, 5.0), 50, 0.25, 600, flush=True)[0]
    assert not retrain_due(LabelBacklog(0, 1000, 9e9), 50, 0.25, 600, flush=True)[0]
    assert retrain_due(LabelBacklog(50, 100_000, 5.0), 50, 0.0, 600)[0]  # growth 0: the fixed count
