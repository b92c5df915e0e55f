"""POST /v1/predict on a real server process: the champion in memory, known ids from their
stored embeddings, new texts through the real model, A/B routing with shadow scoring, the
prediction log reaching DuckDB through its sensor, and hot reload under load."""

from __future__ import annotations

import json
import os
import time

import httpx
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from stream_sentinel import pipeline, served
from stream_sentinel.index import IndexStore
from stream_sentinel.learning import loop as learning
from stream_sentinel.learning.registry import ModelRegistry

from .helpers import WINDOW, candidate, ingest_records, ingest_with_labels, serve
from .strategies import FUZZ, JSON, json_body, json_values, predict_shaped


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
        assert _error(api.post("/v1/predict", content=b"{", headers=JSON), 400)["code"] == "invalid_json"
        # hostile input: never a 500, and whatever is answered names the champion
        @FUZZ
        @given(st.one_of(st.binary(max_size=100), json_values.map(json_body),
                         st.lists(st.one_of(predict_shaped(labelled), json_values), max_size=4)
                         .map(lambda rs: json_body({"records": rs}))))
        def fuzz(body):
            resp = api.post("/v1/predict", content=body, headers=JSON)
            assert resp.status_code in (200, 400, 404, 413, 422), (resp.status_code, resp.text[:500])
            if resp.status_code == 200:
                assert {p["model_version"] for p in resp.json()["predictions"]} <= {champion}
            else:
                assert resp.json()["error"]["code"] and resp.json()["error"]["message"]

        fuzz()
        assert "Traceback" not in api.server_log()
        n_fuzz = sum(x.strip() != "" for p in served.files(paths.home) for x in p.read_text().splitlines())
        metrics = api.get("/metrics").text
        assert f'stream_sentinel_api_predictions_total{{model_version="{champion}",served_by="champion"}} ' \
            f'{float(n_fuzz)}' in metrics
    # every answer is in the prediction log (no challenger: one line per record, no shadow lines)
    lines = [json.loads(x) for p in served.files(paths.home) for x in p.read_text().splitlines()]
    assert len(lines) == n_fuzz and {x["role"] for x in lines} == {"champion"}
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
    # a killed API's torn tail: once it has not grown for a while it is kept as a reject, and
    # loading goes on past it (a new line after it is loaded, the tail is not loaded twice)
    with open(path, "ab") as fh:
        fh.write(b'{"request_id": "q4", "i": 0, "rec')
    assert served.ingest(paths.home, store)["rejected"] == 0  # in progress, as far as anyone knows
    old = time.time() - served.TORN_AFTER_S - 5
    os.utime(path, (old, old))
    with dg.build_resources({"sentinel": StreamSentinelResource.from_settings(Settings(), home=str(paths.home))}) as res:
        assert isinstance(evaluate_served(res.sentinel), dg.RunRequest)
    assert served.ingest(paths.home, store) == {"files": 1, "loaded": 0, "rejected": 1}
    with open(path, "ab") as fh:
        fh.write(json.dumps(_answer(5, "champion")).encode() + b"\n")
    assert served.ingest(paths.home, store) == {"files": 1, "loaded": 1, "rejected": 0}
    with store.connect() as con:
        assert con.execute("SELECT raw FROM served_rejects WHERE rule = 'torn_line'").fetchall() == [
            (b'{"request_id": "q4", "i": 0, "rec',)]


def _another_version(registry, version: str, threshold: float) -> str:
    """A second version of the same trees under another threshold: a real registry version whose
    answers can be told apart from its parent's (cheaper than training one more)."""
    booster, spec, meta = registry.load_folder(version)
    v = registry.save(booster, spec, parent=version, strategy="continue", params=meta["params"],
                      metrics={**meta["metrics"], "threshold": threshold}, training_samples=meta["training_samples"],
                      training_set_version=meta["training_set_version"],
                      embedding_model_id=meta["embedding_model_id"], labels=("spam", "ham"))
    return v.version


def test_the_background_refresh_reads_the_database_only_after_a_write(paths, store, demo_embedder, demo_records,
                                                                     demo_labels, monkeypatch):
    """Labels, windows and the challenger are polled every LABELS_CHECK_S; opening the file for
    that took the model's CPU in 40-100 ms bursts (the search tail at 100k records), so the
    poll opens it only when the file or its log changed since the last read."""
    from stream_sentinel.config import Settings
    from stream_sentinel.serving import predict
    from stream_sentinel.store import Store

    registry, champion = _loop_with_champion(paths, store, demo_embedder, demo_records, demo_labels)
    index = IndexStore(paths.index)
    index = index.load(index.current_version())
    opens = []
    real_open = Store._open
    monkeypatch.setattr(Store, "_open", lambda self, deadline: (opens.append(1), real_open(self, deadline))[1])
    monkeypatch.setattr(predict, "LABELS_CHECK_S", 0.0)
    predictor = predict.Predictor(paths, Settings.from_env(), None, None)
    predictor.refresh(index)  # the index's records, labels, windows, A/B: read
    assert opens and predictor.challenger is None and predictor.reference is not None
    read = len(opens)
    for _ in range(3):
        predictor.refresh(index)
    assert len(opens) == read, "the database was opened with nothing written"
    challenger = _another_version(registry, champion, threshold=0.05)
    registry.start_challenger(challenger, "test")  # a write
    predictor.refresh(index)
    assert len(opens) > read and predictor.challenger == challenger


def test_ab_split_follows_the_routing_key_and_the_other_model_scores_in_shadow(paths, store, demo_embedder,
                                                                                demo_records, demo_labels):
    from stream_sentinel.learning import ab

    registry, champion = _loop_with_champion(paths, store, demo_embedder, demo_records, demo_labels)
    challenger = _another_version(registry, champion, threshold=0.05)
    registry.start_challenger(challenger, "test")
    ids = [r["id"] for r in demo_records[1000:1560]]
    with serve(paths, env={"STREAM_SENTINEL_AB_SHARE": "0.3", "STREAM_SENTINEL_AB_ROUTING": "hash"}) as api:
        deadline = time.monotonic() + 30
        while _wait_loaded(api)["challenger"] != challenger:
            assert time.monotonic() < deadline, "the challenger was not picked up"
            time.sleep(0.2)
        got = api.post("/v1/predict", json={"records": [{"id": i} for i in ids]})
        assert got.status_code == 200, got.text
        preds = got.json()["predictions"]
        # each record goes where the hash of its id sends it, and names the version that answered
        for p in preds:
            role = ab.route_hash(p["id"], 0.3)
            assert (p["served_by"], p["model_version"]) == (role, challenger if role == "challenger" else champion)
        share = sum(p["served_by"] == "challenger" for p in preds) / len(preds)
        assert 0.2 < share < 0.4, share
        # a routing key keeps a user on one arm, whatever the record
        keyed = api.post("/v1/predict", json={"records": [{"id": i, "routing_key": "user-7"} for i in ids[:50]]})
        roles = {p["served_by"] for p in keyed.json()["predictions"]}
        assert roles == {ab.route_hash("user-7", 0.3)}
        request_id = got.json()["request_id"]

        def answers() -> set:
            resp = api.post("/v1/predict", json={"records": [{"id": i} for i in ids[:100]]})
            assert resp.status_code == 200, resp.text
            return {(p["model_version"], p["served_by"]) for p in resp.json()["predictions"]}

        def within(seconds: float, want: set) -> None:
            deadline = time.monotonic() + seconds
            while (got_now := answers()) != want:
                assert time.monotonic() < deadline, got_now
                time.sleep(0.05)

        # while a run holds the database (the API cannot read it), the pointers still say at once
        # who may answer: a retired challenger stops, a new one starts, a promoted one is champion
        with store.session():
            registry.retire_challenger(challenger, "test: rejected")
            within(2.0, {(champion, "champion")})
            newer = _another_version(registry, champion, threshold=0.9)
            registry.start_challenger(newer, "test")
            within(2.0, {(champion, "champion"), (newer, "challenger")})
            registry.promote(newer, None, "test: won")
            within(2.0, {(newer, "champion")})
            assert registry.challenger_pointer() is None
    lines = [json.loads(x) for p in served.files(paths.home) for x in p.read_text().splitlines()]
    first = [x for x in lines if x["request_id"] == request_id]
    # both models answered every record; exactly the routed one was served, the other in shadow
    assert len(first) == 2 * len(ids)
    by_record = {}
    for x in first:
        by_record.setdefault(x["record_id"], {})[x["role"]] = x
    for p in preds:
        both = by_record[p["id"]]
        assert set(both) == {"champion", "challenger"}
        assert [r for r, x in both.items() if x["served"]] == [p["served_by"]]
        assert both["champion"]["probability"] == pytest.approx(both["challenger"]["probability"])  # same trees
        assert both["challenger"]["label"] == ("spam" if both["challenger"]["probability"] >= 0.05 else "ham")
    # and they reach DuckDB, where A/B decisions read them
    assert served.ingest(paths.home, store)["loaded"] == len(lines)
    with store.connect() as con:
        n = con.execute("SELECT count(*) FROM served_predictions WHERE request_id = ? AND NOT served",
                        [request_id]).fetchone()[0]
    assert n == len(ids)


def test_promotions_rollbacks_and_index_versions_are_picked_up_under_load_without_a_failed_request(
        paths, store, demo_embedder, demo_records, demo_labels):
    import threading

    registry, v1 = _loop_with_champion(paths, store, demo_embedder, demo_records, demo_labels)
    versions = [v1, _another_version(registry, v1, 0.4), _another_version(registry, v1, 0.6)]
    known = [r["id"] for r in demo_records[1000:1100]]
    answers: list[tuple[float, float, set, str]] = []  # (start, end, versions answered, error)
    stop = threading.Event()

    def client(base_url: str, seed: int) -> None:
        with httpx.Client(base_url=base_url, timeout=30) as c:
            k = seed
            while not stop.is_set():
                batch = [{"id": known[(k + j) % len(known)]} for j in range(5)]
                k += 5
                t0 = time.monotonic()
                try:
                    r = c.post("/v1/predict", json={"records": batch})
                    got = ({p["model_version"] for p in r.json()["predictions"]}, "") if r.status_code == 200 \
                        else (set(), f"{r.status_code} {r.text[:200]}")
                except Exception as exc:  # noqa: BLE001 -- every failure is counted
                    got = (set(), repr(exc))
                answers.append((t0, time.monotonic(), *got))

    promotions = [(float("-inf"), float("-inf"), v1)]  # (call started, call ended, version)
    picked_up = []
    with serve(paths) as api:
        _wait_loaded(api)
        clients = [threading.Thread(target=client, args=(str(api.base_url), s)) for s in (0, 50)]
        for t in clients:
            t.start()
        try:
            for n in range(10):
                time.sleep(0.3)
                t0 = time.monotonic()
                if n % 3 == 2:
                    to = registry.rollback()
                else:
                    to = versions[(n + 1) % 3]
                    registry.promote(to, None, "test")
                promotions.append((t0, time.monotonic(), to))
                if n % 2 == 1:  # five index versions, each with records only it holds
                    new = demo_records[1600 + 10 * n:1610 + 10 * n]
                    ingest_records(paths, store, demo_embedder, new, f"v{n}")
                    published = pipeline.update_index(store, IndexStore(paths.index), demo_embedder.model_id,
                                                      demo_embedder.dim)
                    t_pub = time.monotonic()
                    while api.post("/v1/predict", json={"records": [{"id": new[-1]["id"]}]}).status_code != 200:
                        assert time.monotonic() - t_pub < 10, "the new index version was not picked up"
                        time.sleep(0.05)
                    picked_up.append((published, time.monotonic() - t_pub))
            time.sleep(0.5)
        finally:
            stop.set()
            for t in clients:
                t.join()
        assert api.get("/healthz").json()["champion"] == registry.champion_version()
        # a champion whose files do not match their sha256: a clear 503 (not the previous
        # version, which is no longer the champion), said by healthz, until the pointer moves
        broken = _another_version(registry, v1, 0.5)
        with open(paths.models / broken / "model.txt", "a") as fh:
            fh.write("\n")
        before = registry.champion_version()
        registry.promote(broken, None, "test")
        err = _error(api.post("/v1/predict", json={"records": [{"id": known[0]}]}), 503)
        assert err["code"] == "model_unavailable" and broken in err["message"] and "sha256" in err["message"]
        health = api.get("/healthz").json()
        assert health["champion"] == broken and not health["loaded"]["model"]
        assert "sha256" in health["loaded"]["model_error"]
        registry.rollback(before)
        ok = api.post("/v1/predict", json={"records": [{"id": known[0]}]})
        assert ok.status_code == 200 and ok.json()["predictions"][0]["model_version"] == before
        assert api.get("/healthz").json()["loaded"]["model_error"] is None
    errors = [a for a in answers if a[3]]
    assert not errors, errors[:5]
    assert len(answers) > 50 and len({v for a in answers for v in a[2]}) == 3
    # each answer names a version that was the champion at some moment of its request: from the
    # start of the call that made it champion to the end of the call that replaced it
    spans = [(start, promotions[j + 1][1] if j + 1 < len(promotions) else float("inf"), v)
             for j, (start, _, v) in enumerate(promotions)]
    for t0, t1, got, _ in answers:
        for v in got:
            assert any(v == sv and s <= t1 and t0 <= e for s, e, sv in spans), (t0, t1, v, spans)
    assert len(picked_up) == 5 and all(dt <= 2.0 for _, dt in picked_up), picked_up


class _Gated:
    """The embedding side of a Batcher over the real model's vectors, whose first call waits
    for ``release`` (so that texts queue behind it, as under load) and whose calls are counted."""

    def __init__(self, embedder, fail_on: str | None = None):
        import threading

        self.embedder, self.fail_on = embedder, fail_on
        self.entered, self.release = threading.Event(), threading.Event()
        self.calls: list[tuple[int, str]] = []

    def embed(self, texts, model_id, dim):
        import threading

        self.calls.append((len(texts), threading.current_thread().name))
        self.entered.set()
        self.release.wait(30)
        if self.fail_on in texts:
            raise RuntimeError("embedder failed")
        return self.embedder.embed(list(texts))


def test_texts_that_queue_while_the_embedder_is_busy_go_in_one_call_each_answered_with_its_own(demo_embedder,
                                                                                              demo_records):
    from concurrent.futures import ThreadPoolExecutor

    from stream_sentinel.serving.embedding import Batcher

    texts = [r["text"] for r in demo_records[WINDOW][:12]]  # vectors the suite has already
    gated = _Gated(demo_embedder)
    batcher = Batcher(gated, window_s=0.0, max_batch=8)
    first = batcher.submit(texts[:1], "m", demo_embedder.dim)
    assert gated.entered.wait(10)  # a lone text is embedded at once, without waiting for company
    with ThreadPoolExecutor(11) as pool:
        futures = list(pool.map(lambda t: batcher.submit([t], "m", demo_embedder.dim), texts[1:]))
        time.sleep(0.2)  # all eleven are queued behind the busy embedder
        gated.release.set()
        got = [first.result(60)] + [f.result(60) for f in futures]
    assert [n for n, _ in gated.calls] == [1, 8, 3]  # batches of what queued, at most max_batch
    assert {name for _, name in gated.calls} == {"embed-batcher"}
    for text, vec in zip(texts, got):
        assert vec.shape == (1, demo_embedder.dim)
        np.testing.assert_array_equal(vec[0], demo_embedder.embed([text])[0])
    # a failed call fails each of its requests, and the next call works
    failing = _Gated(demo_embedder, fail_on=texts[2])
    batcher = Batcher(failing, window_s=0.0, max_batch=8)
    blocker = batcher.submit(texts[:1], "m", demo_embedder.dim)
    assert failing.entered.wait(10)
    doomed = [batcher.submit([t], "m", demo_embedder.dim) for t in texts[1:4]]
    time.sleep(0.1)
    failing.release.set()
    assert blocker.result(60).shape == (1, demo_embedder.dim)
    for f in doomed:
        with pytest.raises(RuntimeError, match="embedder failed"):
            f.result(60)
    assert batcher.submit(texts[5:6], "m", demo_embedder.dim).result(60).shape == (1, demo_embedder.dim)
    # batching off: one request per call, queued ones too, in the same one thread (only the
    # batching differs from the default: the model never runs in the requests' threads)
    off = _Gated(demo_embedder)
    batcher = Batcher(off, window_s=0.0, max_batch=1)
    first = batcher.submit(texts[:2], "m", demo_embedder.dim)
    assert off.entered.wait(10)
    queued = [batcher.submit([t], "m", demo_embedder.dim) for t in texts[2:5]]
    time.sleep(0.1)
    off.release.set()
    assert [f.result(60).shape[0] for f in (first, *queued)] == [2, 1, 1, 1]
    assert off.calls == [(2, "embed-batcher")] + [(1, "embed-batcher")] * 3


def test_a_request_larger_than_a_batch_lets_later_requests_into_its_next_batch(demo_embedder, demo_records):
    """Ten texts with batches of four: embedded four at a time, each batch queued when the one
    before is done, so a text that came meanwhile goes in the second call instead of waiting
    behind all ten; every request gets its own vectors, in its own order."""
    from stream_sentinel.serving.embedding import Batcher

    texts = [r["text"] for r in demo_records[WINDOW][:11]]
    gated = _Gated(demo_embedder)
    batcher = Batcher(gated, window_s=0.0, max_batch=4)
    big = batcher.submit(texts[:10], "m", demo_embedder.dim)
    assert gated.entered.wait(10)
    small = batcher.submit(texts[10:], "m", demo_embedder.dim)
    gated.release.set()
    got_small, got_big = small.result(60), big.result(60)
    assert [n for n, _ in gated.calls] == [4, 5, 2]  # the small request rode in the second call
    np.testing.assert_allclose(got_big, demo_embedder.embed(texts[:10]), atol=1e-6)
    np.testing.assert_allclose(got_small, demo_embedder.embed(texts[10:]), atol=1e-6)
    # a request that gives up stops its remaining batches
    gated = _Gated(demo_embedder)
    batcher = Batcher(gated, window_s=0.0, max_batch=4)
    big = batcher.submit(texts[:10], "m", demo_embedder.dim)
    assert gated.entered.wait(10) and big.cancel()
    gated.release.set()
    assert batcher.submit(texts[10:], "m", demo_embedder.dim).result(60).shape == (1, demo_embedder.dim)
    assert [n for n, _ in gated.calls] == [4, 1]


def test_a_waiter_that_gives_up_costs_no_work_and_never_stops_the_batcher():
    """A request that times out (its future cancelled) while queued is left out of the next call;
    the rest of its group is answered and the worker lives on. A ``run`` that answers the wrong
    number of requests fails them all instead of leaving some waiting forever."""
    import threading

    from stream_sentinel.batching import ContinuousBatcher

    entered, release, calls = threading.Event(), threading.Event(), []

    def run(key, payloads):
        calls.append(list(payloads))
        entered.set()
        release.wait(10)
        return [p * 10 for p in payloads] if key == "ok" else payloads[:-1]

    batcher = ContinuousBatcher(run, max_items=8, name="test-batcher")
    first = batcher.submit("ok", 1)
    assert entered.wait(10)
    gave_up, waiting = batcher.submit("ok", 2), batcher.submit("ok", 3)
    assert gave_up.cancel()  # still queued: it can be cancelled
    release.set()
    assert first.result(10) == 10 and waiting.result(10) == 30
    assert calls == [[1], [3]]  # the cancelled request was never run
    assert batcher.submit("ok", 4).result(10) == 40
    worker = batcher._worker
    short = [batcher.submit("short", i) for i in (5, 6)]
    for f in short:
        with pytest.raises(RuntimeError, match=r"\d results for \d requests"):
            f.result(10)
    assert batcher.submit("ok", 7).result(10) == 70 and batcher._worker is worker and worker.is_alive()


def test_a_stopped_embedding_server_costs_each_text_request_its_deadline_and_nothing_else(
        paths, store, demo_embedder, demo_records, demo_labels):
    """The embedding server stopped (SIGSTOP: alive, silent): requests that need a text embedded
    are answered 503 ``timed_out`` after STREAM_SENTINEL_API_TIMEOUT_SECONDS, never left hanging;
    known ids, lexical search and /healthz answer meanwhile; once it runs again texts are
    answered by it again (no second model loaded in the API, no restart)."""
    import signal
    from concurrent.futures import ThreadPoolExecutor

    from .helpers import start_embed_server, stop_process

    _loop_with_champion(paths, store, demo_embedder, demo_records, demo_labels)
    known = [r["id"] for r in demo_records[WINDOW][:3]]
    embed_server = start_embed_server(paths)
    try:
        with serve(paths, env={"STREAM_SENTINEL_API_TIMEOUT_SECONDS": "2"}) as api:
            _wait_loaded(api)
            first = api.post("/v1/predict", json={"records": [{"id": "t0", "text": "win a free prize now"}]})
            assert first.status_code == 200, first.text
            assert api.get("/healthz").json()["search"]["query_embedder"] == "server"
            embed_server.send_signal(signal.SIGSTOP)
            try:
                with ThreadPoolExecutor(6) as pool:
                    started = time.monotonic()
                    texts = list(pool.map(lambda i: api.post("/v1/predict", json={
                        "records": [{"id": f"s{i}", "text": f"a text to embed, number {i}"}]}), range(4)))
                    searches = list(pool.map(lambda i: api.get("/v1/search", params={"q": f"prize {i}",
                                                                                     "mode": "hybrid"}), range(3)))
                    took = time.monotonic() - started
                for resp in texts + searches:
                    assert resp.status_code == 503, resp.text
                    assert resp.json()["error"]["code"] == "timed_out" and resp.headers["Retry-After"]
                assert took < 60  # each within its deadline plus the ones queued before it
                # what needs no embedding is answered at once meanwhile
                by_id = api.post("/v1/predict", json={"records": [{"id": i} for i in known]})
                assert by_id.status_code == 200, by_id.text
                assert api.get("/v1/search", params={"q": "prize", "mode": "lexical"}).status_code == 200
                assert api.get("/healthz").status_code == 200
            finally:
                embed_server.send_signal(signal.SIGCONT)
            deadline = time.monotonic() + 60
            while True:  # the server answers what queued while it was stopped, then the new texts
                again = api.post("/v1/predict", json={"records": [{"id": "t1", "text": "win a free prize now"}]})
                if again.status_code == 200:
                    break
                assert again.status_code == 503 and time.monotonic() < deadline, again.text
                time.sleep(0.5)
            assert again.json()["predictions"][0]["score"] == pytest.approx(
                first.json()["predictions"][0]["score"], abs=1e-6)
            assert api.get("/healthz").json()["search"]["query_embedder"] == "server"
            assert "Traceback" not in api.server_log()
    finally:
        stop_process(embed_server)


def test_known_records_are_read_without_a_lock_while_they_grow_and_an_erasure_forgets_at_once():
    """A request reads the known records while the background thread appends: a row it can see
    always has its vector and features (it raised IndexError once a row was published first).
    An erasure's copy forgets the erased ids at once, leaving the others readable."""
    import threading

    from stream_sentinel.serving.predict import KnownRecords

    known, dim, stop, errors = KnownRecords(), 8, threading.Event(), []

    def reader():
        while not stop.is_set():
            n = len(known)
            try:
                for i in range(n, n + 3_000, 7):  # rows about to be published
                    got = known.get([f"r{i}"])
                    if got is not None:
                        assert got[0].shape == (1, dim) and got[1][0] == {"n": i}
            except Exception as exc:  # noqa: BLE001 -- what the test looks for
                errors.append(repr(exc))
                return

    import sys

    threads = [threading.Thread(target=reader) for _ in range(2)]
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads take turns often: a reader lands inside an append
    for t in threads:
        t.start()
    for start in range(0, 60_000, 3_000):
        ids = [f"r{i}" for i in range(start, start + 3_000)]
        known.add("m", list(range(start, start + 3_000)), ids, [{"n": i} for i in range(start, start + 3_000)],
                  np.full((3_000, dim), 1.0, np.float32))
    stop.set()
    for t in threads:
        t.join()
    sys.setswitchinterval(switch)
    assert not errors and len(known) == 60_000
    with pytest.raises(ValueError, match="a new KnownRecords"):
        known.add("another-model", [1], ["x"], [{}], np.zeros((1, dim), np.float32))
    left = known.without({5, 6})
    assert left.get(["r5"]) is None and left.get(["r6"]) is None
    assert left.get(["r4", "r7"])[1] == [{"n": 4}, {"n": 7}] and known.get(["r5"]) is not None
    assert 5 not in left.vec_ids and len(left.row) == 59_998


def test_past_its_queue_bound_the_batcher_refuses_at_once_and_takes_work_again_once_it_drains():
    import threading

    from stream_sentinel.batching import ContinuousBatcher, Overloaded

    release = threading.Event()
    batcher = ContinuousBatcher(lambda key, ps: (release.wait(10), ps)[1], max_items=8, name="test", max_queued=3)
    busy = batcher.submit("k", "busy")  # taken by the worker at once: waits on nothing
    deadline = time.monotonic() + 5
    while batcher._queued and time.monotonic() < deadline:  # taken by the worker (and counted out)
        time.sleep(0.01)
    queued = [batcher.submit("k", "a", 2), batcher.submit("k", "b", 1)]
    with pytest.raises(Overloaded, match="3 queued, at most 3"):
        batcher.submit("k", "c", 1)
    more = batcher.submit("k", "d", 1, admitted=True)  # the rest of a request already taken in
    release.set()
    assert [f.result(10) for f in (busy, *queued, more)] == ["busy", "a", "b", "d"]
    assert batcher.submit("k", "e", 3).result(10) == "e"  # drained: taken again
    big = ContinuousBatcher(lambda key, ps: ps, max_items=8, name="test", max_queued=3)
    assert big.submit("k", "huge", 50).result(10) == "huge"  # nothing waits: always taken
