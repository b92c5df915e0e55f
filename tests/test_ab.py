"""Champion/challenger routing and decisions, on simulated outcomes and on real models."""

from __future__ import annotations

import numpy as np
import pytest
import pandas as pd

from stream_sentinel.learning import ab
from stream_sentinel import feedback as fb
from stream_sentinel.learning import loop as learning
from stream_sentinel.learning.registry import ModelRegistry

from .helpers import WINDOW, candidate, ingest_with_labels


def simulate(p_champion, p_challenger, n, share=0.5, routing="hash", seed=0, alpha=0.05, min_samples=100):
    rng = np.random.default_rng(seed)
    arms = {"champion": ab.Arm(), "challenger": ab.Arm()}
    truth = {"champion": p_champion, "challenger": p_challenger}
    decision = None
    for i in range(n):
        rid = f"rec-{seed}-{i}"
        arm = ab.route_hash(rid, share) if routing == "hash" else ab.route_thompson(rid, arms["champion"],
                                                                                    arms["challenger"])
        ok = rng.random() < truth[arm]
        arms[arm] = ab.Arm(arms[arm].successes + int(ok), arms[arm].trials + 1)
        if i % 50 == 49:
            decision = ab.decide(arms["champion"], arms["challenger"], alpha, min_samples)
            if decision.winner:
                return decision, arms
    return decision, arms


def test_consistent_hashing_is_stable_and_respects_the_share():
    ids = [f"r{i}" for i in range(20_000)]
    routes = [ab.route_hash(r, 0.2) for r in ids]
    assert routes == [ab.route_hash(r, 0.2) for r in ids]  # same record, same model, every time
    assert abs(routes.count("challenger") / len(ids) - 0.2) < 0.01
    # growing the share only moves champion records to the challenger, never back
    bigger = [ab.route_hash(r, 0.3) for r in ids]
    assert all(b == "challenger" for a, b in zip(routes, bigger) if a == "challenger")


def test_the_true_winner_wins_with_hash_routing():
    for seed in range(5):
        better, _ = simulate(0.80, 0.90, 20_000, seed=seed)
        assert better.winner == "challenger", better.reason
        worse, _ = simulate(0.90, 0.80, 20_000, seed=seed)
        assert worse.winner == "champion", worse.reason


def test_no_decision_without_enough_samples_or_significance():
    early = ab.decide(ab.Arm(9, 10), ab.Arm(1, 10), min_samples=100)
    assert early.winner is None and "waiting" in early.reason
    # equal models, looked at every 50 records: the sequential boundary keeps false winners rare
    false_challengers = sum(simulate(0.85, 0.85, 4_000, seed=s)[0].winner == "challenger" for s in range(20))
    assert false_challengers <= 2


def test_thompson_sampling_sends_more_traffic_to_the_better_arm_and_picks_it():
    decision, arms = simulate(0.75, 0.90, 20_000, routing="thompson", seed=3)
    assert decision.winner == "challenger"
    assert arms["challenger"].trials > arms["champion"].trials


def test_challenger_on_real_models_wins_and_is_promoted(paths, store, demo_embedder, demo_records, demo_labels):
    embedder = demo_embedder  # precomputed vectors: the embedder is not what is tested here
    registry = ModelRegistry(paths.models, store)
    ingest_with_labels(paths, store, embedder, demo_records, demo_labels, WINDOW, "a")
    champion = candidate(registry, store, embedder).version.version
    registry.promote(champion, None, "test")
    ingest_with_labels(paths, store, embedder, demo_records, demo_labels, slice(1500, 1700), "b")
    challenger = candidate(registry, store, embedder).version.version
    # a start that died between the pointer (it serves) and the status: reconcile mirrors the pointer
    registry.point_challenger(challenger)
    assert registry.get(challenger).status == "candidate"
    assert registry.reconcile() == champion and registry.get(challenger).status == "challenger"
    registry.start_challenger(challenger, "test")  # the rerun changes nothing
    assert registry.challenger_pointer() == challenger and registry.get(challenger).status == "challenger"
    scored = learning.score_new_records(registry, store, embedder.model_id, ab_share=0.5)
    assert scored == 2 * 700
    with store.connect() as con:
        served = dict(con.execute("SELECT role, count(*) FROM predictions WHERE served GROUP BY 1").fetchall())
        total = con.execute("SELECT count(DISTINCT record_id) FROM predictions WHERE served").fetchall()[0][0]
    assert total == 700 and 250 < served["challenger"] < 450  # each record served by exactly one model

    # feedback after the challenger started: the challenger's answers turn out right, the champion's wrong
    now = pd.Timestamp.now(tz="UTC").to_pydatetime()
    with store.connect() as con:
        preds = con.execute("SELECT record_id, role, label FROM predictions WHERE served").fetchall()
    flip = {"spam": "ham", "ham": "spam"}
    events = [fb.Event(fb.Position("ab", 0, i), rid, lab if role == "challenger" else flip[lab], "oracle", 1.0, now)
              for i, (rid, role, lab) in enumerate(preds)]
    fb.write(store, events, [], "kafka")
    fb.resolve_labels(store, fb.ConsensusConfig(half_life_hours=1.0))
    decision = learning.ab_step(registry, store, alpha=0.05, min_samples=100)
    assert decision.winner == "challenger"
    assert registry.champion_version() == challenger and registry.challenger_version() is None
    assert registry.challenger_pointer() is None
    with store.connect() as con:
        assert con.execute("SELECT count(*) FROM learning_events WHERE event_type = 'ab_decision'"
                           ).fetchall()[0][0] == 1
    # a challenger trained on an erased record is never served: refused as a new challenger, and a
    # pointer left naming one (an erasure that died before its pointer went) is removed
    with store.transaction() as con:
        con.execute("UPDATE model_versions SET tainted_by = 'e1' WHERE version = ?", [champion])
    from stream_sentinel.learning.registry import TaintedVersion

    with pytest.raises(TaintedVersion):
        registry.start_challenger(champion, "test: the old champion, tainted")
    registry.point_challenger(champion)
    registry.reconcile()
    assert registry.challenger_version() is None and registry.get(champion).status != "challenger"
    # a retired one stops first: its pointer goes, then its status
    newer = candidate(registry, store, embedder).version.version
    registry.start_challenger(newer, "test")
    registry.retire_challenger(newer, "test: rejected")
    assert registry.challenger_version() is None and registry.get(newer).status == "rejected"
