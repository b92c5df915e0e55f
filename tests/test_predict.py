"""POST /v1/predict on a real server process: the champion in memory, known ids from their
stored embeddings, new texts through the real model, A/B routing with shadow scoring, the
prediction log reaching DuckDB through its sensor, and hot reload under load."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from stream_sentinel import pipeline, served
from stream_sentinel.index import IndexStore
from stream_sentinel.learning import loop as learning
from stream_sentinel.learning.registry import ModelRegistry

from .helpers import WINDOW, candidate, ingest_records, ingest_with_labels, serve


def _error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    return resp.json()["error"]


def _loop_with_champion(paths, store, demo_embedder, demo_records, demo_labels, unlabelled=slice(1500, 1560)):
    """Labelled records, a champion, some records without labels, and an index of them all."""
    ingest_with_labels(paths, store, demo_embedder, demo_records, demo_labels, WINDOW, "w")
    ingest_records(paths, store, demo_embedder, demo_records[unlabelled], "u")
    registry = ModelRegistry(paths.models, store)
    first = candidate(registry, store, demo_embedder).version
    registry.promote(first.version, first.metrics["valid"]["roc_auc"], "test")
    pipeline.update_index(store, IndexStore(paths.index), demo_embedder.model_id, demo_embedder.dim)
    return registry, first.version


def _wait_loaded(api, what=("model", "index"), timeout_s: float = 30) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        health = api.get("/healthz").json()
        if all(health["loaded"][w] for w in what) and health["loaded"]["known_records"] and \
                health["loaded"]["labelled_reference"]:
            return health
        assert time.monotonic() < deadline, health
        time.sleep(0.1)


def test_predictions_by_id_and_by_text_are_the_loops_own_answers(paths, store, demo_embedder, demo_records,
                                                                 demo_labels):
    registry, champion = _loop_with_champion(paths, store, demo_embedder, demo_records, demo_labels)
    learning.score_new_records(registry, store, demo_embedder.model_id)
    with store.connect() as con:
        loop = {r: (p, lab) for r, p, lab in con.execute(
            "SELECT record_id, probability, label FROM predictions WHERE model_version = ?", [champion]).fetchall()}
    labelled = [r["id"] for r in demo_records[WINDOW][:20]]
    unlabelled = demo_records[1500:1520]
    with serve(paths) as api:
        _wait_loaded(api)
        # known ids, no text: stored embedding and features; a labelled record never sees its own label
        got = api.post("/v1/predict", json={"records": [{"id": i} for i in labelled]})
        assert got.status_code == 200, got.text
        preds = got.json()["predictions"]
        assert [p["id"] for p in preds] == labelled
        assert {(p["model_version"], p["served_by"]) for p in preds} == {(champion, "champion")}
        for p in preds:
            assert p["score"] == pytest.approx(loop[p["id"]][0], abs=1e-5)
            assert p["label"] == loop[p["id"]][1]
        # new texts (under new ids) through the real model: the same answers as their stored vectors
        by_text = api.post("/v1/predict", json={"records": [
            {"id": f"new-{r['id']}", "text": r["text"], "features": r.get("features") or {}} for r in unlabelled]})
        assert by_text.status_code == 200, by_text.text
        for r, p in zip(unlabelled, by_text.json()["predictions"]):
            assert p["id"] == f"new-{r['id']}" and p["label"] in ("spam", "ham")
            assert p["score"] == pytest.approx(loop[r["id"]][0], abs=0.02)
        assert sum(p["label"] == loop[r["id"]][1] for r, p in zip(unlabelled, by_text.json()["predictions"])) >= 19
        # what cannot be answered, and why
        err = _error(api.post("/v1/predict", json={"records": [{"id": labelled[0]}, {"id": "nobody"}]}), 404)
        assert err["code"] == "unknown_records" and err["ids"] == ["nobody"]
        err = _error(api.post("/v1/predict", json={"records": [{"id": 5}, {"id": "x", "text": 3},
                                                               {"id": "y", "features": {"f": [1]}},
                                                               {"id": "z", "routing_key": 9}, "r"]}), 422)
        assert [(e["index"], e["rule"]) for e in err["records"]] == [
            (0, "bad_id"), (1, "bad_text"), (2, "bad_feature_value"), (3, "bad_routing_key"), (4, "not_an_object")]
        assert _error(api.post("/v1/predict", json={"records": []}), 422)["code"] == "empty"
        assert _error(api.post("/v1/predict", content=b"{"), 400)["code"] == "invalid_json"
        metrics = api.get("/metrics").text
        assert f'stream_sentinel_api_predictions_total{{model_version="{champion}",served_by="champion"}} 40.0' \
            in metrics
    # every answer is in the prediction log (no challenger: one line per record, no shadow lines)
    lines = [json.loads(x) for p in served.files(paths.home) for x in p.read_text().splitlines()]
    assert len(lines) == 40 and {x["role"] for x in lines} == {"champion"}
    assert {x["input"] for x in lines} == {"stored", "text"}


def test_no_champion_yet_is_a_clear_503(paths):
    with serve(paths) as api:
        err = _error(api.post("/v1/predict", json={"records": [{"id": "a", "text": "hello"}]}), 503)
        assert err["code"] == "no_model"
        assert api.get("/healthz").json()["loaded"]["model"] is False


def _answer(i: int, role: str) -> dict:
    return {"request_id": "q1", "i": i, "record_id": f"r{i}", "routing_key": f"r{i}", "model_version": "m000001",
            "role": role, "served": role == "champion", "probability": 0.7, "label": "spam", "input": "stored",
            "served_at": "2026-12-03T10:00:00+00:00"}


def test_the_prediction_log_reaches_duckdb_once_whole_lines_only_bad_lines_kept(paths, store):
    import dagster as dg

    from stream_sentinel.config import Settings
    from stream_sentinel.resources import StreamSentinelResource
    from stream_sentinel.sensors.served import evaluate_served

    log = served.PredictionLog(paths.home)
    log.append([_answer(0, "champion"), _answer(0, "challenger"), _answer(1, "champion")])
    log.close()
    (path,) = served.files(paths.home)
    with open(path, "ab") as fh:  # a line that breaks the rules, then one still being written
        fh.write(b'{"request_id": "q2", "role": "nobody"}\n{"request_id": "q3", "i": ')
    with dg.build_resources({"sentinel": StreamSentinelResource.from_settings(Settings(), home=str(paths.home))}) as res:
        assert isinstance(evaluate_served(res.sentinel), dg.RunRequest)
        assert served.ingest(paths.home, store) == {"files": 1, "loaded": 3, "rejected": 1}
        # the half line is not work: no run, and a second load finds nothing
        assert isinstance(evaluate_served(res.sentinel), dg.SkipReason)
        assert served.ingest(paths.home, store)["loaded"] == 0
        with open(path, "ab") as fh:
            fh.write(json.dumps(_answer(2, "champion"))[len('{"request_id": "q3", "i": '):].encode() + b"\n")
        assert isinstance(evaluate_served(res.sentinel), dg.RunRequest)
    served.ingest(paths.home, store)
    with store.connect() as con:
        rows = con.execute("SELECT request_id, i, role, served FROM served_predictions ORDER BY 1, 2, 3").fetchall()
        rejects = con.execute("SELECT rule, raw FROM served_rejects").fetchall()
    assert rows == [("q1", 0, "challenger", False), ("q1", 0, "champion", True), ("q1", 1, "champion", True),
                    ("q3", 2, "champion", True)]
    assert rejects == [("bad_record_id", b'{"request_id": "q2", "role": "nobody"}')]
