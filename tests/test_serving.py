"""The HTTP API (`stream-sentinel serve`): a real server process on a free port, a real HTTP
client, a real data root (DuckDB, trained models, drift reports)."""

from __future__ import annotations

import hashlib
import json
import time
from urllib.parse import quote

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from stream_sentinel import feedback_sources as fs
from stream_sentinel import ingest
from stream_sentinel.learning.registry import ModelRegistry

from .conftest import record
from .helpers import WINDOW, candidate, ingest_with_labels, serve
from .strategies import FUZZ, JSON, clean_chars, json_body, json_values, record_shaped, texts, vote_shaped


def _error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    return resp.json()["error"]


def test_an_empty_root_answers_in_json_and_describes_itself(paths):
    with serve(paths) as api:
        health = api.get("/healthz").json()
        assert health["status"] == "ok" and health["champion"] is None and health["index"] is None
        assert health["embedding_model"].startswith("all-MiniLM-L6-v2")
        assert api.get("/v1/models").json() == {"champion": None, "challenger": None, "models": []}
        assert _error(api.get("/v1/models/champion"), 404)["code"] == "unknown_version"
        assert _error(api.get("/v1/models/m999999"), 404)["field"] == "version"
        assert _error(api.get("/no/such/path"), 404)["code"] == "not_found"
        assert _error(api.delete("/v1/models"), 405)["code"] == "method_not_allowed"
        metrics = api.get("/v1/learning/metrics").json()
        assert metrics["total_updates"] == 0 and metrics["current_model"] is None
        deadline = time.monotonic() + 10
        while (age := api.get("/healthz").json()["refreshed_s_ago"]) is None:  # the first pass
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert 0 <= age < 5
        spec = api.get("/openapi.json").json()
        assert {"/healthz", "/v1/records", "/v1/feedback", "/v1/models/{version}"} <= set(spec["paths"])
        assert "422" in spec["paths"]["/v1/records"]["post"]["responses"]


def test_models_and_learning_metrics_come_from_the_registry(paths, store, demo_embedder, demo_records, demo_labels):
    ingest_with_labels(paths, store, demo_embedder, demo_records, demo_labels, WINDOW, "w")
    registry = ModelRegistry(paths.models, store)
    first = candidate(registry, store, demo_embedder).version
    registry.promote(first.version, first.metrics["valid"]["roc_auc"], "test")
    with serve(paths) as api:
        listed = api.get("/v1/models").json()
        assert listed["champion"] == first.version
        (only,) = listed["models"]
        assert only["version"] == first.version and only["training_set_version"] == first.training_set_version
        assert api.get("/v1/models/champion").json() == only == api.get(f"/v1/models/{first.version}").json()
        assert api.get("/healthz").json()["champion"] == first.version
        metrics = api.get("/v1/learning/metrics").json()
        assert metrics["current_model"] == first.version
        assert metrics["current_model_score"] == pytest.approx(first.metrics["valid"]["roc_auc"])


def test_the_token_guards_every_endpoint_but_healthz(paths):
    with serve(paths, token="s3cret-token") as api:
        assert api.get("/healthz").status_code == 200
        for method, path in [("GET", "/v1/models"), ("GET", "/v1/learning/metrics"), ("POST", "/v1/records"),
                             ("POST", "/v1/feedback"), ("GET", "/reports/x.html"), ("GET", "/openapi.json")]:
            for auth in (None, "Bearer wrong-token", "Basic s3cret-token", "Bearer s3cret-token-and-more"):
                headers = {"Authorization": auth} if auth else {}
                err = _error(api.request(method, path, headers=headers), 401)
                assert err["code"] == "unauthorized"
        ok = api.get("/v1/models", headers={"Authorization": "Bearer s3cret-token"})
        assert ok.status_code == 200
    # the token never reaches the server's output (its log is the process's stderr)
    assert "s3cret-token" not in api.server_log()
    with serve(paths, token="clé-ünïcode") as api:  # a non-ASCII token: compared as UTF-8 bytes
        assert api.get("/v1/models", headers={"Authorization": "Bearer clé-ünïcode".encode()}).status_code == 200
        assert api.get("/v1/models", headers={"Authorization": "Bearer cle-unicode"}).status_code == 401


def test_records_land_in_raw_and_ingest_takes_them_unchanged(paths, store):
    recs = [record(1, "first text"), record(2, "second text", features={"n": 3, "kind": "a"}, extra={"x": [1]})]
    with serve(paths) as api:
        resp = api.post("/v1/records", json={"records": recs})
    assert resp.status_code == 202, resp.text
    body = resp.json()
    assert body["accepted"] == 2
    written = paths.raw / body["file"]
    assert hashlib.sha256(written.read_bytes()).hexdigest() == body["sha256"]
    assert [json.loads(line) for line in written.read_text().splitlines()] == recs
    assert not [p for p in written.parent.iterdir() if p.name.startswith(".")]  # no temp file left
    # the next sensor tick's work: scan, plan, process
    ingest.scan(paths, store, debounce_s=0)
    (batch,) = ingest.plan_batches(store)
    (out,) = ingest.process_files(paths, store, list(batch.files))
    assert (out.status, out.ingested, out.rejected) == ("processed", 2, 0)
    with store.connect() as con:
        rows = con.execute("SELECT id, text FROM records ORDER BY id").fetchall()
    assert rows == [("r1", "first text"), ("r2", "second text")]


def test_invalid_records_are_refused_whole_naming_record_and_rule(paths):
    recs = [record(1), {"id": "r2", "text": "no time"}, {"text": "no id", "event_time": "2024-05-01T00:00:00Z"},
            record(4, features={"f": [1, 2]})]
    with serve(paths) as api:
        err = _error(api.post("/v1/records", json={"records": recs}), 422)
        assert err["code"] == "invalid_records" and "3 of 4" in err["message"]
        assert [(r["index"], r["id"], r["rule"]) for r in err["records"]] == [
            (1, "r2", "missing_event_time"), (2, None, "missing_id"), (3, "r4", "bad_feature_value")]
        assert _error(api.post("/v1/records", content=b'{"records": [\xff]}', headers=JSON), 400)["code"] == "invalid_utf8"
        assert _error(api.post("/v1/records", content=b'{"records": [1,', headers=JSON), 400)["code"] == "invalid_json"
        assert _error(api.post("/v1/records", content=b'{"records": [NaN]}', headers=JSON), 400)["code"] == "invalid_json"
        assert _error(api.post("/v1/records", content=b"", headers=JSON), 400)["code"] == "invalid_json"
        assert _error(api.post("/v1/records", json=[record(1)]), 422)["code"] == "bad_body"
        assert _error(api.post("/v1/records", json={"records": "r1"}), 422)["field"] == "records"
        assert _error(api.post("/v1/records", json={"records": []}), 422)["code"] == "empty"
        # limits: the body (streamed, without Content-Length too) and the number of items
        big = b'{"records": [' + b'"' + b"x" * 11_000_000 + b'"]}'
        assert _error(api.post("/v1/records", content=big, headers=JSON), 413)["code"] == "body_too_large"
        assert _error(api.post("/v1/records", content=iter([big[:6_000_000], big[6_000_000:]]), headers=JSON),
                      413)["code"] == "body_too_large"
        many = {"records": [record(i) for i in range(1001)]}
        assert _error(api.post("/v1/records", json=many), 413)["code"] == "too_many_items"
    assert not list(paths.raw.rglob("*.jsonl"))  # nothing refused was written


def test_feedback_goes_to_the_drop_folder_and_is_checked_like_the_sensor_does(paths, store, monkeypatch):
    with serve(paths) as api:
        one = api.post("/v1/feedback", json={"record_id": "r1", "label": "spam", "source": "alice",
                                             "confidence": 0.9})
        assert one.status_code == 202, one.text
        many = api.post("/v1/feedback", json={"feedback": [{"record_id": "r2", "label": "ham"},
                                                           {"record_id": "r3", "label": "spam"}]})
        assert many.status_code == 202 and many.json()["accepted"] == 2
        err = _error(api.post("/v1/feedback", json={"feedback": [{"record_id": "r4", "label": "eggs"},
                                                                 {"record_id": "r5", "label": "ham",
                                                                  "confidence": 7}]}), 422)
        assert [(e["index"], e["record_id"], e["rule"]) for e in err["feedback"]] == [
            (0, "r4", "unknown_label"), (1, "r5", "confidence_out_of_range")]
        assert _error(api.post("/v1/feedback", json={"record_id": "r6"}), 422)["feedback"][0]["rule"] == "bad_label"
    files = sorted(paths.feedback.glob("*.jsonl"))
    assert [p.name for p in files] == sorted(p.name for p in files) and len(files) == 2
    assert one.json()["to"] in {str(p) for p in files}
    # the drop-folder sensor's work takes them as they are
    shas = fs.scan_files(paths, store, debounce_s=0)
    for sha in shas:
        fs.ingest_file(paths, store, sha, frozenset({"ham", "spam"}))
    with store.connect() as con:
        votes = con.execute("SELECT record_id, label, source, confidence FROM feedback_events ORDER BY record_id"
                            ).fetchall()
    assert votes == [("r1", "spam", "alice", 0.9), ("r2", "ham", "api", 1.0), ("r3", "spam", "api", 1.0)]


def test_reports_are_served_from_the_reports_folder_only(paths):
    (paths.reports / "daily").mkdir()
    (paths.reports / "daily" / "2024-05-01.html").write_text("<html>report</html>")
    (paths.home / "secret.html").write_text("no")
    with serve(paths) as api:
        page = api.get("/reports/daily/2024-05-01.html")
        assert page.status_code == 200 and page.text == "<html>report</html>"
        assert page.headers["content-type"].startswith("text/html")
        for bad in ("/reports/../secret.html", "/reports/%2e%2e/secret.html", "/reports/daily/..%2f..%2fsecret.html",
                    "/reports/daily/2024-05-02.html", "/reports/daily", "/reports/%00.html"):
            assert _error(api.get(bad), 404)["code"] in ("unknown_report", "not_found"), bad


# ------------------------------------------------------------------ search


def _subject(rec: dict) -> str:
    return rec["text"].split("\n", 1)[0].strip()


def _index(paths, store, embedder, recs, name):
    from stream_sentinel import pipeline
    from stream_sentinel.index import IndexStore

    from .helpers import ingest_records

    ingest_records(paths, store, embedder, recs, name)
    return pipeline.update_index(store, IndexStore(paths.index), embedder.model_id, embedder.dim)


def _unique_subjects(recs: list[dict], n: int) -> list[dict]:
    counts: dict[str, int] = {}
    for r in recs:
        counts[_subject(r).lower()] = counts.get(_subject(r).lower(), 0) + 1
    picked = [r for r in recs if counts[_subject(r).lower()] == 1 and len(_subject(r).split()) >= 3]
    return picked[:: max(1, len(picked) // n)][:n]


def _wait_for(api, key: str, value, timeout_s: float = 2.0) -> float:
    start = time.monotonic()
    while api.get("/healthz").json()["search"][key] != value:
        assert time.monotonic() - start < timeout_s, f"search {key} is not {value!r} after {timeout_s} s"
        time.sleep(0.05)
    return time.monotonic() - start


def test_search_finds_a_record_by_its_exact_subject_and_picks_up_new_index_versions(
        paths, store, demo_embedder, demo_records):
    first, second = demo_records[1000:1300], demo_records[1300:1400]
    v1 = _index(paths, store, demo_embedder, first, "first").meta.version
    with serve(paths) as api:
        _wait_for(api, "index_version", v1)
        _wait_for(api, "lexical_records", len(first))
        probes = _unique_subjects(first, 12)
        hits = {"hybrid": 0, "dense": 0, "lexical": 0}
        for rec in probes:
            for mode in hits:
                found = api.get("/v1/search", params={"q": _subject(rec), "k": 5, "mode": mode}).json()
                assert found["index_version"] == v1 and len(found["results"]) <= 5
                hits[mode] += found["results"][0]["id"] == rec["id"] if found["results"] else 0
        assert hits["hybrid"] >= len(probes) - 1 and hits["hybrid"] >= hits["dense"], hits
        top = api.get("/v1/search", params={"q": _subject(probes[0])}).json()["results"][0]
        assert top["snippet"] == " ".join(probes[0]["text"].split())[:200]
        assert top["lexical_rank"] == 1 and set(top) == {"id", "score", "snippet", "dense_rank", "lexical_rank"}
        # a new index version (new records) is served within 2 s, without a restart
        v2 = _index(paths, store, demo_embedder, second, "second").meta.version
        _wait_for(api, "index_version", v2)
        _wait_for(api, "lexical_records", len(first) + len(second))
        fresh = _unique_subjects(second, 1)[0]
        found = api.get("/v1/search", params={"q": _subject(fresh)}).json()
        assert found["index_version"] == v2 and found["results"][0]["id"] == fresh["id"]
        assert api.get("/healthz").json()["search"]["query_embedder"] == "in-process"
        # bad parameters name the parameter
        for params, field in [({}, "q"), ({"q": " "}, "q"), ({"q": "x" * 2001}, "q"), ({"q": "a", "k": "0"}, "k"),
                              ({"q": "a", "k": "many"}, "k"), ({"q": "a", "k": "101"}, "k"),
                              ({"q": "a", "mode": "fuzzy"}, "mode")]:
            assert _error(api.get("/v1/search", params=params), 422)["field"] == field, params


def test_search_on_an_empty_root_answers_with_no_results(paths):
    with serve(paths) as api:
        found = api.get("/v1/search", params={"q": "anything at all"}).json()
        assert found == {"query": "anything at all", "mode": "hybrid", "index_version": None, "results": []}


def test_metrics_count_requests_by_route_and_show_the_loop(paths, store):
    from prometheus_client.parser import text_string_to_metric_families

    fs.record_lag(store, "stream-sentinel.feedback", 2, high=40, next_offset=25)
    with serve(paths) as api:
        deadline = time.monotonic() + 20  # the loop's state is read in the background, after start
        while "stream_sentinel_kafka_lag{" not in api.get("/metrics").text:
            assert time.monotonic() < deadline, "Kafka lag never reached /metrics"
            time.sleep(0.2)
        # a later write is read (the server opens the file only after one: store.ChangeWatch)
        fs.record_lag(store, "stream-sentinel.feedback", 2, high=40, next_offset=31)
        while not any(x.name == "stream_sentinel_kafka_lag" and x.value == 9
                      for fam in text_string_to_metric_families(api.get("/metrics").text) for x in fam.samples):
            assert time.monotonic() < deadline + 30, "a new Kafka lag never reached /metrics"
            time.sleep(0.2)
        api.get("/v1/models/m000123")
        api.get("/v1/models/m000456")
        api.get("/v1/models")
        api.get("/no/such/path")
        text = api.get("/metrics").text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    count = "stream_sentinel_api_requests_total"
    # one series per route template, not per raw path
    assert samples[(count, (("method", "GET"), ("route", "/v1/models/{version}"), ("status", "404")))] == 2
    assert samples[(count, (("method", "GET"), ("route", "/v1/models"), ("status", "200")))] == 1
    assert samples[(count, (("method", "GET"), ("route", "unmatched"), ("status", "404")))] == 1
    assert samples[("stream_sentinel_api_request_seconds_count",
                    (("method", "GET"), ("route", "/v1/models/{version}")))] == 2
    assert samples[("stream_sentinel_kafka_lag", (("partition", "2"), ("topic", "stream-sentinel.feedback")))] == 9
    assert samples[("stream_sentinel_champion_info", (("version", ""),))] == 1
    assert not any(name == "stream_sentinel_drift_detected" for name, _ in samples)  # no report yet: no series


# ------------------------------------------------------------------ hostile input

def _sane(resp: httpx.Response) -> None:
    """Never a 500; every refusal is JSON naming a code and saying what is wrong."""
    assert resp.status_code < 500, (resp.status_code, resp.text[:500])
    if resp.status_code >= 400:
        assert resp.headers["content-type"].startswith("application/json")
        err = resp.json()["error"]
        assert isinstance(err["code"], str) and err["message"]


def test_no_request_gets_a_500_fuzz(paths):
    bodies = st.one_of(st.binary(max_size=200), json_values.map(json_body))
    record_bodies = st.lists(st.one_of(record_shaped, json_values), max_size=4).map(lambda rs: json_body({"records": rs}))
    vote_bodies = st.one_of(vote_shaped.map(json_body),
                            st.lists(st.one_of(vote_shaped, json_values), max_size=4).map(lambda vs: json_body({"feedback": vs})))
    words = st.text(clean_chars, max_size=12)
    with serve(paths) as api:
        @FUZZ
        @given(st.one_of(bodies, record_bodies))
        def records(body):
            _sane(api.post("/v1/records", content=body, headers=JSON))

        @FUZZ
        @given(st.one_of(bodies, vote_bodies))
        def feedback(body):
            _sane(api.post("/v1/feedback", content=body, headers=JSON))

        @FUZZ
        @given(st.dictionaries(st.sampled_from(["q", "k", "mode", "other"]), words, max_size=4))
        def search(params):
            _sane(api.get("/v1/search", params=params))

        @FUZZ
        @given(texts, st.sampled_from(["/v1/models/", "/reports/", "/v1/", "/"]))
        def paths_(name, prefix):
            _sane(api.get(prefix + quote(name.encode("utf-8", "surrogatepass"), safe="/")))

        @FUZZ
        @given(texts, bodies)
        def erase(name, body):
            resp = api.request("DELETE", "/v1/records/" + quote(name.encode("utf-8", "surrogatepass"), safe=""),
                               content=body)
            _sane(resp)
            if resp.status_code == 202:  # queued as a request file the erasure job can read
                from stream_sentinel.erasure import requests as erasure_requests

                path = erasure_requests.folder(paths.home) / resp.json()["queued"]
                (req,) = erasure_requests.read(path)
                assert req.record_id.strip() and (req.record_id == name or not name.isprintable()
                                                  or name.strip(".") == "")
                path.unlink()

        for fuzz in (records, feedback, search, paths_, erase):
            fuzz()
        assert "Traceback" not in api.server_log()


def test_a_run_holding_the_database_gets_503s_for_reads_only(paths, store):
    """Another process (a run) holds metrics.duckdb: the API starts anyway, reads answer 503
    with Retry-After after a short wait, and what needs no database (records, health) works."""
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); "
                               "print('held', flush=True); time.sleep(120)", str(paths.db)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with serve(paths) as api:
            started = time.monotonic()
            err = _error(api.get("/v1/models"), 503)
            assert err["code"] == "database_busy" and time.monotonic() - started < 10
            assert api.get("/v1/learning/metrics").headers["retry-after"] == "2"
            assert api.post("/v1/records", json={"records": [record(1)]}).status_code == 202
            holder.kill()
            holder.wait()
            assert api.get("/v1/models").status_code == 200  # released: reads work again
    finally:
        holder.kill()
        holder.wait()


def test_what_a_hostile_client_found_is_refused_by_name_and_the_connection_stays_usable(paths):
    """Inputs a probe of a running server turned into 500s (each closing the connection, so
    the client's next good request failed too): a lone surrogate anywhere in a body, a number
    no double holds, a report name longer than the file system takes, a client gone mid-body.
    And a cross-site form cannot post: a POST body must say it is JSON."""
    import socket

    from stream_sentinel.erasure import requests as erasure_requests

    surrogate = b'"\\ud800"'
    with serve(paths) as api:
        bad = [
            ("/v1/predict", b'{"records": [{"id": ' + surrogate + b', "routing_key": 5}]}', "invalid_unicode"),
            ("/v1/predict", b'{"records": [{"id": "r1", "routing_key": ' + surrogate + b'}]}', "invalid_unicode"),
            ("/v1/feedback", b'{"record_id": ' + surrogate + b', "label": "spam"}', "invalid_unicode"),
            ("/v1/feedback", b'{"record_id": "r1", "label": "spam", "note": ' + surrogate + b'}', "invalid_unicode"),
            ("/v1/feedback", b'{"record_id": "r1", "label": "spam", "note": 1e400}', "number_out_of_range"),
            ("/v1/records", b'{"records": [{"id": "r1", "text": "t", "x": {' + surrogate + b': 1}}]}',
             "invalid_unicode"),
        ]
        for _ in range(2):  # one keep-alive connection: every good request after a refusal is answered
            for path, body, code in bad:
                err = _error(api.post(path, content=body, headers=JSON), 422)
                assert err["code"] == code and err["field"] == "body", err
                assert api.get("/healthz").status_code == 200
            err = _error(api.request("DELETE", "/v1/records/abc", content=b'{"reason": ' + surrogate + b'}'), 422)
            assert err["code"] == "invalid_unicode"
            assert _error(api.get("/reports/" + "a" * 300 + ".html"), 404)["code"] == "unknown_report"
            assert _error(api.get("/reports/" + "a/" * 3000 + "b.html"), 404)["code"] == "unknown_report"
            assert api.get("/healthz").status_code == 200
        # a form (or text/plain, or no type) cannot post, so a web page cannot either
        for headers in ({"Content-Type": "text/plain"}, {"Content-Type": "application/x-www-form-urlencoded"}, {}):
            err = _error(api.post("/v1/records", content=json.dumps({"records": [record(1)]}), headers=headers), 415)
            assert err["code"] == "unsupported_media_type" and err["field"] == "Content-Type"
        assert api.post("/v1/records", json={"records": [record(1)]},
                        headers={"Content-Type": "application/json; charset=utf-8"}).status_code == 202
        # a client that leaves half-way through its body is nobody's error
        host, port = api.base_url.host, api.base_url.port
        for _ in range(3):
            with socket.create_connection((host, port)) as sock:
                sock.sendall(b"POST /v1/records HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 1000\r\n\r\n" + b'{"records": [')
        from prometheus_client.parser import text_string_to_metric_families

        deadline = time.monotonic() + 15
        while True:  # the server notices each disconnect when it reads the body
            statuses = {s.labels["status"]: s.value for fam in text_string_to_metric_families(api.get("/metrics").text)
                        for s in fam.samples if s.name == "stream_sentinel_api_requests_total"}
            if statuses.get("499") == 3 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert "500" not in statuses and statuses["499"] == 3, statuses
        assert not erasure_requests.folder(paths.home).exists() or not list(erasure_requests.folder(paths.home).iterdir())
        log = api.server_log()
        assert "Traceback" not in log and "internal_error" not in log and " failed: " not in log, log[-2000:]
    assert len(list(paths.raw.rglob("*.jsonl"))) == 1  # only the request that said it was JSON


def test_metric_series_stay_bounded_however_many_versions_and_methods_come():
    from prometheus_client.parser import text_string_to_metric_families

    from stream_sentinel.serving.metrics import VERSIONS_KEPT, ApiMetrics

    m = ApiMetrics()
    for i in range(VERSIONS_KEPT + 5):  # a loop that promotes all day
        m.predicted(f"m{i:06d}", "champion", 2)
        m.predicted(f"m{i:06d}", "challenger")
    m.predicted("m000005", "champion")  # served again: kept
    samples = {(s.labels["model_version"], s.labels["served_by"]): s.value
               for fam in text_string_to_metric_families(m.exposition()[0].decode())
               for s in fam.samples if s.name == "stream_sentinel_api_predictions_total"}
    versions = {v for v, _ in samples}
    assert len(versions) == VERSIONS_KEPT and "m000000" not in versions and "m000005" in versions
    assert samples[("m000005", "champion")] == 3 and samples[(f"m{VERSIONS_KEPT + 4:06d}", "challenger")] == 1
