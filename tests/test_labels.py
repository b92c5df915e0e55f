"""Consensus labels and the feedback/ drop folder (no Kafka needed for these)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import dagster as dg
import pandas as pd

from stream_sentinel import feedback as fb
from stream_sentinel import ingest
from stream_sentinel.definitions import build_definitions

from .conftest import drop, record

T0 = datetime(2024, 5, 1, 12, tzinfo=timezone.utc)


def votes(*rows):
    df = pd.DataFrame(rows, columns=["record_id", "label", "source", "confidence", "ts"])
    df["ts"] = pd.to_datetime(df["ts"], utc=True)
    df["topic"], df["partition"] = "t", 0
    df["offset"] = range(len(df))
    return df


def by_id(result):
    return result.labels.set_index("record_id")


def test_disagreeing_reviewers_of_equal_standing_are_a_conflict():
    res = fb.consensus(votes(("r1", "spam", "alice", 1.0, T0), ("r1", "ham", "bob", 1.0, T0)), ["r1"],
                       fb.ConsensusConfig())
    row = by_id(res).loc["r1"]
    assert row.conflict and row.status == "conflict" and row.margin < 0.2 and row.n_reviewers == 2


def test_a_reviewer_who_keeps_disagreeing_loses_weight():
    rows = []
    for i in range(30):
        for who in ("alice", "bob", "carol"):
            rows.append((f"r{i}", "spam", who, 1.0, T0))
        rows.append((f"r{i}", "ham", "mallory", 1.0, T0))
    rows += [("x", "ham", "mallory", 1.0, T0), ("x", "spam", "alice", 1.0, T0)]  # one against one
    res = fb.consensus(votes(*rows), [f"r{i}" for i in range(30)] + ["x"], fb.ConsensusConfig())
    rel = res.reliability.set_index("source")["reliability"]
    assert rel["mallory"] < 0.1 < 0.9 < rel["alice"]
    x = by_id(res).loc["x"]
    assert x.label == "spam" and not x.conflict  # alice is trusted, mallory is not


def test_a_changed_mind_counts_once_with_the_latest_vote():
    res = fb.consensus(votes(("r1", "spam", "alice", 1.0, T0), ("r1", "ham", "alice", 1.0, T0 + timedelta(hours=1))),
                       ["r1"], fb.ConsensusConfig())
    row = by_id(res).loc["r1"]
    assert (row.label, row.n_votes, row.n_reviewers, row.status) == ("ham", 2, 1, "resolved")


def test_older_votes_decay_and_confidence_weighs():
    cfg = fb.ConsensusConfig(half_life_hours=24)
    res = fb.consensus(votes(("r1", "spam", "alice", 1.0, T0), ("r1", "ham", "bob", 1.0, T0 + timedelta(days=5))),
                       ["r1"], cfg)
    assert by_id(res).loc["r1"].label == "ham" and not by_id(res).loc["r1"].conflict
    res = fb.consensus(votes(("r2", "spam", "alice", 0.2, T0), ("r2", "ham", "bob", 0.9, T0)), ["r2"], cfg)
    assert by_id(res).loc["r2"].label == "ham"


def _feedback_file(paths, name, messages):
    drop(paths.feedback, name, "".join((m if isinstance(m, str) else json.dumps(m)) + "\n" for m in messages))


def _run_feedback(paths, instance, files=()):
    job = build_definitions(home=str(paths.home)).resolve_job_def("feedback_job")
    result = job.execute_in_process(run_config={"ops": {"feedback": {"config": {"files": list(files)}}}},
                                    instance=instance, raise_on_error=False)
    assert result.success
    return result


def test_drop_folder_feedback_resolves_when_the_record_lands(paths, store, instance):
    drop(paths.raw, "a.jsonl", [record(1)])
    for b in (ingest.scan(paths, store, debounce_s=1), ingest.plan_batches(store))[1]:
        for sha in b.files:
            ingest.process_file(paths, store, sha)
    v = {"label": "spam", "source": "alice", "ts": "2024-05-02T00:00:00Z"}
    _feedback_file(paths, "votes.jsonl", [{"record_id": "r1", **v}, {"record_id": "r2", **v},
                                          {"record_id": "r1", "label": "nope", "source": "bob", "ts": "2024-05-02"},
                                          "{broken"])
    _feedback_file(paths, "garbage.jsonl", ["not json", "still not"])
    result = _run_feedback(paths, instance)
    meta = result.asset_materializations_for_node("feedback")[0].metadata
    assert (meta["events_new"].value, meta["rejects_new"].value, meta["files_quarantined"].value) == (2, 2, 1)
    assert list(paths.failed.glob("feedback/*/garbage.jsonl.error.json"))
    with store.connect() as con:
        status = dict(con.execute("SELECT record_id, status FROM labels").fetchall())
        kinds = {r[0] for r in con.execute("SELECT DISTINCT source_kind FROM feedback_events").fetchall()}
    assert status == {"r1": "resolved", "r2": "pending"} and kinds == {"file"}

    # r2 arrives late: its pending feedback resolves, nothing was dropped
    drop(paths.raw, "b.jsonl", [record(2)])
    for b in (ingest.scan(paths, store, debounce_s=1), ingest.plan_batches(store))[1]:
        for sha in b.files:
            ingest.process_file(paths, store, sha)
    job = build_definitions(home=str(paths.home)).resolve_job_def("feedback_job")
    assert job.execute_in_process(instance=instance, asset_selection=[dg.AssetKey("labels")]).success
    with store.connect() as con:
        assert dict(con.execute("SELECT record_id, status FROM labels").fetchall()) == {
            "r1": "resolved", "r2": "resolved"}
    # the same file again (a replay) adds nothing
    with store.connect() as con:
        processed = [r[0] for r in con.execute("SELECT sha256 FROM feedback_files WHERE status='processed'").fetchall()]
    again = _run_feedback(paths, instance, files=processed)
    assert again.asset_materializations_for_node("feedback")[0].metadata["events_new"].value == 0


def test_cli_feedback_send_without_kafka_uses_the_drop_folder(paths, monkeypatch):
    env = {k: v for k, v in os.environ.items() if k != "KAFKA_BOOTSTRAP_SERVERS"}
    ok = subprocess.run([sys.executable, "-m", "stream_sentinel.cli", "feedback", "send", "--record-id", "r9",
                         "--label", "ham", "--source", "me"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    (f,) = list(paths.feedback.glob("*.jsonl"))
    msg = json.loads(f.read_text())
    assert msg["record_id"] == "r9" and msg["label"] == "ham" and msg["source"] == "me"
    bad = subprocess.run([sys.executable, "-m", "stream_sentinel.cli", "feedback", "send", "--record-id", "r9",
                          "--label", "maybe"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "unknown_label" in bad.stderr
