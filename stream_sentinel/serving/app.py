"""The ASGI application behind ``stream-sentinel serve``.

Why Starlette and not FastAPI: the Dagster webserver already brings Starlette and uvicorn,
so the API adds no dependency, and the checks that matter here are the data contracts the
sensors apply (``records.validate``, ``feedback.validate``), not a second, pydantic copy of
them that could drift apart: a record the API accepts is a record ingest accepts, by
construction. The OpenAPI document is generated from the endpoint docstrings.

Rules every endpoint keeps:

* The request path never writes DuckDB (a run may hold its lock for minutes): records and
  feedback become files in the data root, or Kafka messages, that the sensors pick up.
  Reads wait at most ``STORE_WAIT_S`` for the database and answer ``503`` with
  ``Retry-After`` when a run holds it longer.
* Every error is JSON, ``{"error": {"code", "message", "field"?}}`` with a 4xx status for
  anything a client sent (a body that is too large, not UTF-8, not JSON, the wrong shape);
  a 500 is a bug.
* With ``STREAM_SENTINEL_API_TOKEN`` set, every endpoint but ``/healthz`` wants
  ``Authorization: Bearer <token>``, compared in constant time.
* Payloads are never logged (uvicorn's access log is off: a query string is a payload too).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import threading
import time
import traceback
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.schemas import SchemaGenerator

from .. import feedback as fb
from .metrics import ApiMetrics, LoopCollector, RequestMetrics
from .predict import TimedOut
from ..atomic import write_bytes_atomic
from ..batching import Overloaded
from ..config import Paths, Settings
from ..jsonout import dumps
from ..openmp import faiss_one_thread
from ..records import MAX_ID_CHARS, JSONProblem, Reject, is_utf8, loads, validate, value_problem
from ..store import ChangeWatch, Store, StoreBusy

log = logging.getLogger(__name__)

TOKEN_ENV = "STREAM_SENTINEL_API_TOKEN"
STORE_WAIT_S = 2.0  # how long a read waits for a run's database lock before answering 503
OPEN_PATHS = frozenset({"/healthz"})
MAX_QUERY_CHARS = 2000
MAX_K = 100
REFRESH_S = 0.5  # how often the served index and model are checked for a new version
SNAPSHOT_S = 5.0  # how often Kafka lag and drift flags are read for /metrics
FEEDBACK_THREADS = 4  # POST /v1/feedback requests waiting for Kafka at once; more are refused (503 overloaded)
SETTLE_EVERY_S = 30.0  # after WARM_S, the heap is collected and frozen at most this often as what is held changes
WARM_S = 120.0  # a server's first minutes: it settles as soon as what it loads stops changing
API_RECORDS_DIR = "api"  # raw/api/<day>/...: records posted to the API


class ApiError(Exception):
    """A request the API refuses: status, a stable code, a message naming what is wrong."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None, **extra: Any):
        super().__init__(message)
        self.status, self.code, self.message, self.field, self.extra = status, code, message, field, extra


class StrictJSONResponse(JSONResponse):
    """JSON that strict parsers accept (NaN and infinities become null, see ``jsonout``)."""

    def render(self, content: Any) -> bytes:
        try:
            return dumps(content, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate quoted back in a message: escaped, still valid JSON
            return dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def error_response(status: int, code: str, message: str, field: str | None = None,
                   headers: dict[str, str] | None = None, **extra: Any) -> Response:
    body: dict[str, Any] = {"code": code, "message": message}
    if field is not None:
        body["field"] = field
    body.update(extra)
    return StrictJSONResponse({"error": body}, status_code=status, headers=headers)


@dataclass
class Service:
    """What the endpoints share: the data root, the settings, the token."""

    paths: Paths
    settings: Settings
    token: str | None = None
    search: Any = None  # search.SearchService
    predictor: Any = None  # predict.Predictor
    batcher: Any = None  # embedding.Batcher
    prediction_log: Any = None  # served.PredictionLog
    metrics: Any = None  # metrics.ApiMetrics
    feedback: Any = None  # feedback_sources.FeedbackSender: one Kafka producer for the process
    # feedback waits for Kafka in threads of its own, never in the pool the other endpoints share
    feedback_pool: Any = None  # concurrent.futures.ThreadPoolExecutor
    feedback_sending: int = 0  # requests in the pool now (touched on the event loop only)
    loop: dict = dataclass_field(default_factory=dict)  # lag and drift, as last read from DuckDB
    loop_watch: ChangeWatch = dataclass_field(default_factory=ChangeWatch)  # read only after a write
    refreshed_at: float | None = None  # time.monotonic() of the background thread's last full pass

    def store(self) -> Store:
        return Store.of(self.paths, lock_timeout_s=STORE_WAIT_S)

    def registry(self):
        from ..learning.registry import ModelRegistry

        return ModelRegistry(self.paths.models, self.store())


class BearerToken:
    """ASGI middleware: with a token configured, every path but ``OPEN_PATHS`` wants it."""

    def __init__(self, app, token: str | None):
        self.app = app
        token = (token or "").strip()  # as the presented one is: a secret file's newline is not the token
        self.token = token.encode() if token else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.token is None or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        scheme, _, given = Headers(scope=scope).get("authorization", "").partition(" ")
        # header values arrive as bytes decoded as latin-1: back to those bytes, then compared
        # with the token's UTF-8 bytes in constant time
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode("latin-1", "replace"),
                                                                 self.token):
            response = error_response(401, "unauthorized", f"this server wants 'Authorization: Bearer <token>' "
                                      f"(the value of {TOKEN_ENV} where it runs)", field="Authorization",
                                      headers={"WWW-Authenticate": 'Bearer realm="stream-sentinel"'})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


# ------------------------------------------------------------------ request bodies
async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes ``limit`` bytes (never read whole first).

    A POST must say its body is JSON: a web page can send a cross-site POST without asking
    first only as a form or as ``text/plain``, so with no token set (the default, on this
    machine only) this is what keeps a page in the user's browser from adding records or labels."""
    if request.method == "POST":
        media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if not (media == "application/json" or (media.startswith("application/") and media.endswith("+json"))):
            raise ApiError(415, "unsupported_media_type", f"the body must be sent as Content-Type: application/json, "
                           f"got {media[:60]!r}" if media else "the body must be sent as Content-Type: "
                           "application/json (no Content-Type was given)", field="Content-Type")
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            too_big = int(declared) > limit
        except ValueError:
            raise ApiError(400, "bad_content_length", f"Content-Length {declared[:40]!r} is not a number",
                           field="Content-Length") from None
        if too_big:
            raise ApiError(413, "body_too_large", f"the body is {declared} bytes; this server takes at most "
                           f"{limit} (STREAM_SENTINEL_API_MAX_BODY_BYTES)", field="body")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, "body_too_large", f"the body is over {limit} bytes "
                           "(STREAM_SENTINEL_API_MAX_BODY_BYTES)", field="body")
    return bytes(body)


def parse_json(body: bytes) -> Any:
    """One JSON value, strictly: UTF-8, no NaN or Infinity, nesting and numbers bounded."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, "invalid_utf8", f"the body is not UTF-8 (byte {exc.start} is {body[exc.start]:#04x})",
                       field="body") from None
    if not text.strip():
        raise ApiError(400, "invalid_json", "the body is empty; it must be a JSON object", field="body")
    try:
        obj = loads(text)
    except JSONProblem as exc:
        raise ApiError(400, exc.rule, f"the body is not valid JSON: {exc.message}", field="body") from None
    # nothing that a file, a log line or a Kafka message could not hold goes further; only a
    # text that can hold one (a \uD800-\uDFFF escape, a 3-digit exponent or a 300-digit number) is walked
    if _SUSPECT.search(text):
        problem = value_problem(obj)
        if problem is not None:
            raise ApiError(422, problem[0], f"the body: {problem[1]}", field="body")
    return obj


_SUSPECT = re.compile(r"\\u[dD][89a-fA-F]|[eE][+-]?\d{3}|\d{300}")


def items_of(obj: Any, key: str, limit: int) -> list[Any]:
    """``obj[key]``, which must be a non-empty list of at most ``limit`` items."""
    if not isinstance(obj, dict):
        raise ApiError(422, "bad_body", f"the body must be a JSON object with a {key!r} list, "
                       f"got {type(obj).__name__}", field="body")
    items = obj.get(key)
    if not isinstance(items, list):
        raise ApiError(422, "bad_body", f"{key!r} must be a list, got "
                       f"{'nothing' if items is None else type(items).__name__}", field=key)
    if not items:
        raise ApiError(422, "empty", f"{key!r} is empty", field=key)
    if len(items) > limit:
        raise ApiError(413, "too_many_items", f"{len(items)} items in {key!r}; at most {limit} per request "
                       "(STREAM_SENTINEL_API_MAX_ITEMS)", field=key)
    return items


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


# ------------------------------------------------------------------ endpoints
async def healthz(request: Request) -> Response:  # on the event loop: answers even when the thread pool is busy
    """
    summary: Liveness, and what is being served
    description: Open even when a token is set. The champion version (the registry's pointer),
      the current vector index (version, size, embedding model), the configured embedding model.
    responses:
      200: {description: "{status, champion, index, embedding_model}"}
    """
    from ..index import IndexStore
    from ..status import embedding_model_id

    svc: Service = request.app.state.svc
    meta = IndexStore(svc.paths.index).read_meta()
    champion = svc.registry().champion_version()
    served_index = svc.search.index
    held = svc.predictor.loaded()
    return StrictJSONResponse({
        "status": "ok",
        "champion": champion,
        "index": None if meta is None else {"version": meta.version, "size": meta.ntotal,
                                            "embedding_model": meta.model_id, "type": meta.index_type},
        "embedding_model": embedding_model_id(svc.settings),
        # what this process holds now: each part is loaded in the background (or on first use)
        "loaded": {"model": champion is not None and held["champion"] == champion,
                   "index": served_index is not None and meta is not None
                   and served_index.meta.version == meta.version,
                   "embedder": svc.batcher.embedding.describe() is not None,
                   "embedder_compiled": svc.batcher.embedding.compiled,
                   "embedder_pinned_cpus": svc.batcher.pinned_cpus,
                   "labelled_reference": held["labelled_reference"], "known_records": held["known_records"],
                   "window_events": held["window_events"],
                   "model_error": held["model_error"]},
        "challenger": held["challenger"],
        "search": svc.search.describe(),
        # the background thread that picks up new versions: seconds since its last pass (every
        # 0.5 s normally; a load of a large index or model takes longer; growing without end: stuck)
        "refreshed_s_ago": None if svc.refreshed_at is None else round(time.monotonic() - svc.refreshed_at, 1),
    })


def list_models(request: Request) -> Response:
    """
    summary: The model registry
    description: Every version (as stream-sentinel model list --json), the champion and the challenger.
    responses:
      200: {description: "{champion, challenger, models: [version, ...]}"}
      503: {description: a run holds the database; try again after Retry-After}
    """
    reg = request.app.state.svc.registry()
    return StrictJSONResponse({"champion": reg.champion_version(), "challenger": reg.challenger_version(),
                               "models": [v.as_json() for v in reg.list()]})


def get_model(request: Request) -> Response:
    """
    summary: One model version
    description: >
      {version} is a version (m000003), "champion" or "challenger": parent, training-set
      data version, parameters, metrics, status.
    responses:
      200: {description: the version}
      404: {description: "no such version (error code unknown_version)"}
    """
    reg = request.app.state.svc.registry()
    name = request.path_params["version"]
    version = {"champion": reg.champion_version, "challenger": reg.challenger_version}.get(name, lambda: name)()
    v = reg.get(version) if version else None
    if v is None:
        raise ApiError(404, "unknown_version", f"no model version {name[:80]!r}"
                       + (" (there is none yet)" if name in ("champion", "challenger") else ""), field="version")
    return StrictJSONResponse(v.as_json())


def get_learning_metrics(request: Request) -> Response:
    """
    summary: Learning metrics
    description: total_updates, successful_updates, failed_updates, avg_update_time_ms,
      samples_processed, current_model_score, improvement_rate, promotions, rejections, rollbacks.
    responses:
      200: {description: the metrics}
    """
    from ..learning.loop import learning_metrics

    svc: Service = request.app.state.svc
    return StrictJSONResponse(learning_metrics(svc.store(), svc.registry().champion_version()))


def get_report(request: Request) -> Response:
    """
    summary: A drift report (HTML)
    description: >
      /reports/<name>.html, as linked from the report_url of drift_report in the Dagster UI.
    responses:
      200: {description: the report}
      404: {description: "no such report (error code unknown_report)"}
    """
    svc: Service = request.app.state.svc
    name = request.path_params["name"]
    root = svc.paths.reports.resolve()
    try:
        path = (root / name).resolve()
    except (OSError, ValueError):  # a NUL byte, a path too long
        path = None
    try:
        found = path is not None and name.endswith(".html") and path.is_relative_to(root) and path.is_file()
    except OSError:  # a name longer than the file system takes
        found = False
    if not found:
        raise ApiError(404, "unknown_report", f"no drift report {name[:120]!r}", field="name")
    return FileResponse(path, media_type="text/html; charset=utf-8")


async def post_records(request: Request) -> Response:
    """
    summary: Add records
    description: >
      Body {"records": [record, ...]}, each per the data contract (id, text, event_time,
      features, label, anything else). All are checked first with the rules ingest applies; if any breaks
      one, nothing is written and the answer is 422 listing each (index, id, rule, error). Otherwise they
      are written as one JSON Lines file under raw/api/<day>/ (temp name, fsync, rename) for the next
      sensor tick.
    requestBody:
      content: {application/json: {example: {records: [{id: r1, text: hello, event_time: "2026-12-03T08:00:00Z"}]}}}
    responses:
      202: {description: "{accepted, file, sha256}"}
      413: {description: body or batch too large}
      422: {description: "records break the contract (error.records: [{index, id, rule, error}])"}
    """
    svc: Service = request.app.state.svc
    s = svc.settings
    items = items_of(parse_json(await read_body(request, s.api_max_body_bytes)), "records", s.api_max_items)
    broken = []
    for i, obj in enumerate(items):
        checked = validate(obj, f"records[{i}]")
        if isinstance(checked, Reject):
            broken.append({"index": i, "id": checked.record_id, "rule": checked.rule, "error": checked.message})
    if broken:
        raise ApiError(422, "invalid_records", f"{len(broken)} of {len(items)} records break the data contract; "
                       "nothing was written", field="records", records=broken[:100])
    data = "".join(json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")) + "\n"
                   for obj in items).encode("utf-8")
    now = _utcnow()
    rel = Path(API_RECORDS_DIR) / f"{now:%Y-%m-%d}" / f"{now:%Y%m%dT%H%M%S%fZ}-{uuid.uuid4().hex[:12]}.jsonl"
    await run_in_threadpool(write_bytes_atomic, svc.paths.raw / rel, data)
    log.info("records: %d accepted into raw/%s", len(items), rel)
    return StrictJSONResponse({"accepted": len(items), "file": rel.as_posix(),
                               "sha256": hashlib.sha256(data).hexdigest()}, status_code=202)


async def delete_record(request: Request) -> Response:
    """
    summary: Erase a record everywhere (right to erasure)
    description: >
      Queues an erasure request (a file in <data root>/erasures/, temp name then rename); the
      erasure_sensor runs erasure_job, which removes the record from every table, the vector index
      and its older versions, files, logs, reports and caches, withdraws models trained on it and
      keeps an audit row named by a keyed hash of the id (never the id). Optional body
      {"reason": "..."}. Answers 202 whether or not the id is known (an unknown id is erased from
      nowhere, and is refused if it arrives later).
    responses:
      202: {description: "{queued, status_hint}"}
      413: {description: body too large}
    """
    from ..erasure import requests as erasure_requests

    svc: Service = request.app.state.svc
    rid = request.path_params["record_id"]
    body = await read_body(request, 64 << 10)
    reason = ""
    if body.strip():
        obj = parse_json(body)
        if not isinstance(obj, dict) or not isinstance(obj.get("reason", ""), str):
            raise ApiError(422, "bad_reason", "the body, when given, is {\"reason\": \"...\"}", field="reason")
        reason = obj.get("reason", "")[:500]
    if not rid.strip() or not is_utf8(rid):
        raise ApiError(422, "bad_id", "the record id must be a non-empty UTF-8 string", field="record_id")
    path = await run_in_threadpool(erasure_requests.write, svc.paths.home, [rid], reason)
    log.info("erasure: one request queued in erasures/%s", path.name)
    return StrictJSONResponse({"queued": path.name,
                               "status_hint": "stream-sentinel status --json: erasures"}, status_code=202)


async def post_feedback(request: Request) -> Response:
    """
    summary: Send label feedback
    description: >
      Body: one feedback message (record_id, label, source, confidence, ts) or
      {"feedback": [message, ...]}. ts defaults to now and source to "api". Checked with the rules
      the feedback sensors apply (a label outside STREAM_SENTINEL_LABELS is refused); sent to Kafka when
      KAFKA_BOOTSTRAP_SERVERS is set, else written to the feedback/ drop folder.
    requestBody:
      content: {application/json: {example: {record_id: r1, label: spam, source: alice, confidence: 0.9}}}
    responses:
      202: {description: "{accepted, to}"}
      422: {description: "messages break the contract (error.feedback: [{index, record_id, rule, error}])"}
      503: {description: Kafka did not acknowledge the messages}
    """
    import asyncio

    from ..feedback_sources import MAX_MESSAGE_BYTES, NotDelivered

    svc: Service = request.app.state.svc
    s = svc.settings
    body = parse_json(await read_body(request, s.api_max_body_bytes))
    single = isinstance(body, dict) and "feedback" not in body
    items = [body] if single else items_of(body, "feedback", s.api_max_items)
    messages, broken = [], []
    now = _utcnow().isoformat()
    for i, obj in enumerate(items):
        msg = {"source": "api", "ts": now, **obj} if isinstance(obj, dict) else obj
        checked = fb.validate(fb.Position("api", 0, i), json.dumps(msg, ensure_ascii=False), None,
                              s.allowed_labels)
        size = len(json.dumps(msg)) if not isinstance(checked, fb.Rejected) else 0
        if isinstance(checked, fb.Rejected) or size > MAX_MESSAGE_BYTES:
            rid = msg.get("record_id") if isinstance(msg, dict) else None
            rid = rid[:MAX_ID_CHARS] if isinstance(rid, str) else None  # a 9 MB id is not echoed whole
            rule, error = (checked.rule, checked.error) if isinstance(checked, fb.Rejected) else \
                ("too_large", f"the message is {size} bytes as JSON; at most {MAX_MESSAGE_BYTES}")
            broken.append({"index": i, "record_id": rid, "rule": rule, "error": error})
        else:
            messages.append(msg)
    if broken:
        raise ApiError(422, "invalid_feedback", f"{len(broken)} of {len(items)} feedback messages break the "
                       "contract; none was sent", field="feedback", feedback=broken[:100])
    if svc.feedback_sending >= FEEDBACK_THREADS:  # each send is bounded, so this clears within the deadline
        raise Overloaded(f"{svc.feedback_sending} feedback requests are waiting for Kafka already")
    svc.feedback_sending += 1
    try:
        # the sender confirms or fails each message within api_timeout_s (message.timeout.ms)
        to = await asyncio.wait_for(asyncio.wrap_future(svc.feedback_pool.submit(svc.feedback.send, messages)),
                                    s.api_timeout_s + 10)
    except NotDelivered as exc:  # the failed ones may be sent again (a vote counts once per record and source)
        raise ApiError(503, "feedback_not_delivered", str(exc), delivered=exc.delivered, failed=exc.failed,
                       headers={"Retry-After": "5"}) from None
    except asyncio.TimeoutError:
        raise TimedOut(f"Kafka did not answer within {s.api_timeout_s:g} s") from None
    finally:
        svc.feedback_sending -= 1
    log.info("feedback: %d message(s) sent to %s", len(messages), to)
    return StrictJSONResponse({"accepted": len(messages), "to": to}, status_code=202)


def search(request: Request) -> Response:
    """
    summary: Search the records
    description: >
      Nearest records to a text: the dense vector index and BM25 over the texts, fused by
      reciprocal rank (mode=hybrid, the default), or either alone (mode=dense, mode=lexical).
      Each result has its id, score, a snippet and its rank in each list.
    parameters:
      - {name: q, in: query, required: true, schema: {type: string, maxLength: 2000}}
      - {name: k, in: query, schema: {type: integer, minimum: 1, maximum: 100, default: 10}}
      - {name: mode, in: query, schema: {type: string, enum: [hybrid, dense, lexical], default: hybrid}}
    responses:
      200: {description: "{query, mode, index_version, results: [{id, score, snippet, dense_rank, lexical_rank}]}"}
      409: {description: the index was built with another embedding model than this server's}
      422: {description: a bad q, k or mode}
    """
    from .embedding import IndexModelMismatch
    from .search import MODES

    svc: Service = request.app.state.svc
    params = request.query_params
    q = params.get("q", "")
    if not q.strip():
        raise ApiError(422, "bad_query", "q (the text to search for) is required", field="q")
    if len(q) > MAX_QUERY_CHARS:
        raise ApiError(422, "bad_query", f"q is {len(q)} characters; at most {MAX_QUERY_CHARS}", field="q")
    try:
        k = int(params.get("k", "10"))
    except ValueError:
        k = 0
    if not 1 <= k <= MAX_K:
        raise ApiError(422, "bad_k", f"k must be an integer from 1 to {MAX_K}, got {params.get('k', '')[:20]!r}",
                       field="k")
    mode = params.get("mode", "hybrid")
    if mode not in MODES:
        raise ApiError(422, "bad_mode", f"mode must be one of {', '.join(MODES)}, got {mode[:20]!r}", field="mode")
    try:
        found = svc.search.search(q, k, mode)
    except IndexModelMismatch as exc:
        raise ApiError(409, "index_model_mismatch", str(exc)) from None
    return StrictJSONResponse({"query": q, "mode": mode, **found})


def _predict_items(body: Any, limit: int) -> list[dict]:
    """The records of a predict body, each checked: an id (a string, as ingest wants it), an
    optional text (then checked with ingest's rules), optional numeric features and routing key."""
    items = items_of(body, "records", limit)
    out, broken = [], []
    for i, obj in enumerate(items):
        if not isinstance(obj, dict):
            broken.append({"index": i, "id": None, "rule": "not_an_object",
                           "error": f"a record must be a JSON object, got {type(obj).__name__}"})
            continue
        key = obj.get("routing_key")
        if key is not None and not (isinstance(key, str) and 0 < len(key) <= 1000):
            broken.append({"index": i, "id": obj["id"][:MAX_ID_CHARS] if isinstance(obj.get("id"), str) else None,
                           "rule": "bad_routing_key", "error": "routing_key must be a string of 1 to 1000 characters"})
            continue
        # the record contract's own rules (id, text, event_time, features, other keys); a known
        # id may come without text, and a record without event_time is valued as of now
        probe = {k: v for k, v in obj.items() if k != "routing_key"}
        if probe.get("text") is None:  # no text, or null: a known id, scored from what is stored
            probe["text"] = "x"
        probe.setdefault("event_time", "2000-01-01T00:00:00Z")
        checked = validate(probe, f"records[{i}]")
        if isinstance(checked, Reject):
            broken.append({"index": i, "id": checked.record_id, "rule": checked.rule, "error": checked.message})
            continue
        out.append({"id": checked.id, "text": obj.get("text"), "features": checked.features or {},
                    "routing_key": key, "extra": checked.extra,
                    "event_time": checked.event_time if obj.get("event_time") is not None else None})
    if broken:
        raise ApiError(422, "invalid_records", f"{len(broken)} of {len(items)} records cannot be scored; none was",
                       field="records", records=broken[:100])
    return out


async def predict(request: Request) -> Response:
    """
    summary: Predict with the champion (and the challenger)
    description: >
      Body {"records": [{"id", "text"?, "features"?, "event_time"?, "routing_key"?, ...}, ...]}. A
      record with a known id and no text is scored from its stored embedding and features (window
      values included); a text is embedded (requests that arrive together are embedded in one batch)
      and gets the declared windows' values at its event_time (default: now) from the records ingested
      so far, as training computes them (its other keys are its extra, for window keys there). Each answer is served by the champion or, while an
      A/B test runs, by the route of its routing key (routing_key, else id: hash share or Thompson
      sampling); the other model scores it in shadow. Every answer is logged for the loop (served/,
      loaded into served_predictions by served_predictions_sensor). The version is the one the
      champion pointer named while the request was served.
    requestBody:
      content: {application/json: {example: {records: [{id: r1}, {id: new-1, text: "win a free prize now"}]}}}
    responses:
      200: {description: "{predictions: [{id, label, score, model_version, served_by}], request_id, took_ms}"}
      404: {description: "records without text that the served index does not hold (error.ids)"}
      409: {description: the data was embedded with another model than this server's}
      413: {description: body or batch too large}
      422: {description: "records that cannot be scored (error.records: [{index, id, rule, error}])"}
      503: {description: "no champion yet (no_model), or its files cannot be loaded (model_unavailable)"}
    """
    from .embedding import IndexModelMismatch
    from .predict import LogUnavailable, ModelUnavailable, NoModel, UnknownRecords

    svc: Service = request.app.state.svc
    s = svc.settings
    records = _predict_items(parse_json(await read_body(request, s.api_max_body_bytes)), s.api_max_items)
    try:
        # the batchers' threads do the work (embedding, scoring), the loop only waits: a thread
        # per request waiting instead cost new texts at concurrency 32 a seventh of their
        # throughput (240 -> 280-287/s, AMD EPYC 2 vCPUs, 2026-12-06): 32 more threads woken
        # twice per request, each wake-up taking a CPU from the model's pinned threads
        answer = await svc.predictor.predict_async(records)
    except NoModel as exc:
        raise ApiError(503, "no_model", str(exc)) from None
    except ModelUnavailable as exc:
        raise ApiError(503, "model_unavailable", f"{exc}; roll back or repair it") from None
    except UnknownRecords as exc:
        raise ApiError(404, "unknown_records", f"{exc}; send their text to score them", field="records",
                       ids=exc.ids[:100]) from None
    except IndexModelMismatch as exc:
        raise ApiError(409, "index_model_mismatch", str(exc)) from None
    except LogUnavailable as exc:
        raise ApiError(503, "prediction_log_unavailable", str(exc), headers={"Retry-After": "5"}) from None
    counts: dict[tuple[str, str], int] = {}
    for p in answer["predictions"]:
        key = (p["model_version"], p["served_by"])
        counts[key] = counts.get(key, 0) + 1
    for (version, served_by), n in counts.items():
        svc.metrics.predicted(version, served_by, n)
    return StrictJSONResponse(answer)


def metrics(request: Request) -> Response:
    """
    summary: Prometheus metrics
    description: >
      Requests and latency per route, the champion (info), the served index size, Kafka lag,
      drift flags, in the Prometheus text format.
    responses:
      200: {description: the metrics, text/plain}
    """
    body, content_type = request.app.state.svc.metrics.exposition()
    return Response(body, media_type=content_type)


def openapi(request: Request) -> Response:
    """
    summary: This API as OpenAPI 3
    responses:
      200: {description: the document}
    """
    return StrictJSONResponse(SCHEMAS.get_schema(routes=request.app.routes))


SCHEMAS = SchemaGenerator({"openapi": "3.0.0", "info": {"title": "Stream Sentinel", "version": "1"}})


# ------------------------------------------------------------------ errors
async def on_api_error(request: Request, exc: ApiError) -> Response:
    return error_response(exc.status, exc.code, exc.message, exc.field, **exc.extra)


async def on_store_busy(request: Request, exc: StoreBusy) -> Response:
    return error_response(503, "database_busy", "a run holds the database; try again shortly",
                          headers={"Retry-After": "2"})


async def on_http_error(request: Request, exc: HTTPException) -> Response:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error_response(exc.status_code, code, f"{request.method} {request.url.path[:200]}: {exc.detail}",
                          headers=exc.headers)


async def on_timed_out(request: Request, exc: Exception) -> Response:
    return error_response(503, "timed_out", str(exc), headers={"Retry-After": "2"})


async def on_overloaded(request: Request, exc: Exception) -> Response:
    return error_response(503, "overloaded", f"too much work waits already ({exc}); try again shortly",
                          headers={"Retry-After": "1"})


class Contained:
    """ASGI middleware (inside the others): whatever escapes an endpoint ends here.

    A bug is a JSON 500, logged by its type, route template and stack frames only: never the
    exception's message or the request path, either of which can hold a payload (a record id,
    a text). Starlette's own 500 handler re-raises, after which uvicorn logs the message and
    closes the connection, so a client's next request on it failed too. A client that went
    away mid-body is 499 (nobody hears it), not a 500 with a traceback."""

    def __init__(self, app, templates: dict[Any, str]):
        self.app, self.templates = app, templates

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_noting(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_noting)
        except ClientDisconnect:
            if not started:
                await error_response(499, "client_disconnected", "the request ended before its body")(
                    scope, receive, send)
        except Exception as exc:  # noqa: BLE001 -- a bug: answered, logged without payloads
            route = self.templates.get(scope.get("endpoint"), "unmatched")
            log.error("%s %s failed: %s\n%s", scope.get("method"), route, type(exc).__name__,
                      "".join(traceback.format_tb(exc.__traceback__)).rstrip())
            if not started:
                await error_response(500, "internal_error", f"the server failed ({type(exc).__name__}); "
                                     "see its log")(scope, receive, send)


def read_loop_state(svc: Service) -> None:
    """Kafka lag and the newest drift verdict of each kind, for /metrics (a short read: when a
    run holds the database the previous snapshot stays, and its age says so)."""
    store = Store.of(svc.paths, lock_timeout_s=0.2)
    stamp = store.stamp()  # before the read: a write meanwhile is read next time
    if svc.loop and not svc.loop_watch.changed(stamp):
        svc.loop = {**svc.loop, "snapshot_at": time.time()}  # nothing written since: still what it says
        return
    try:
        with store.connect() as con:
            lag = {(t, p): n for t, p, n in con.execute('SELECT topic, "partition", lag FROM kafka_lag').fetchall()}
            drift = {kind: (window, bool(drifted)) for kind, window, drifted in con.execute(
                """SELECT kind, window_key, drifted FROM (
                       SELECT kind, window_key, drifted,
                              row_number() OVER (PARTITION BY kind ORDER BY created_at DESC) AS n
                       FROM drift_reports WHERE status = 'ok') newest WHERE n = 1""").fetchall()}
    except StoreBusy:
        return
    svc.loop = {"kafka_lag": lag, "drift": drift, "snapshot_at": time.time()}
    svc.loop_watch.read(stamp)


def loop_state(svc: Service) -> dict:
    from ..learning.registry import ModelRegistry

    index = svc.search.index
    return {**svc.loop, "champion": ModelRegistry(svc.paths.models, None).champion_version(),
            "index_version": None if index is None else index.meta.version,
            "index_size": 0 if index is None else index.meta.ntotal, "lexical_records": len(svc.search.lexical)}


def keep_current(svc: Service, stop: threading.Event) -> None:
    """The background thread: new index versions (and the texts of their new records) are
    picked up within ``REFRESH_S`` of being published, the loop's state for /metrics every
    ``SNAPSHOT_S``; an error is logged and tried again."""

    def guarded(step) -> None:
        try:
            step()
        except Exception as exc:  # noqa: BLE001 -- a bad version must not stop the refreshes
            log.warning("refresh failed (%s: %s); trying again", type(exc).__name__, exc)

    settled: list = [None, 0.0]  # what was held at the last settle, and when
    seen: list = [None]  # what was held at the last pass
    born = time.monotonic()

    def settle() -> None:
        # once what is held has stopped changing (one quiet pass: a start loads the index, the
        # models, the records over several); then, past the first WARM_S, at most every
        # SETTLE_EVERY_S, since a full collection walks the whole heap and continuous ingest
        # brings a new index version every micro-batch (a compiled model: at once)
        held, now, last = _held(svc), time.monotonic(), settled[0]
        quiet, seen[0] = held == seen[0], held
        if held == last or not quiet:
            return
        if last is None or now - born < WARM_S or held[-1] != last[-1] or now >= settled[1] + SETTLE_EVERY_S:
            settle_heap()
            settled[:] = [held, now]

    faiss_one_thread()  # this thread lives as long as the server: no FAISS team of its own (openmp.py)
    next_snapshot = 0.0
    while True:
        guarded(svc.search.refresh)
        guarded(lambda: svc.predictor.refresh(svc.search.index))
        guarded(svc.prediction_log.sync)
        guarded(settle)
        if time.monotonic() >= next_snapshot:
            guarded(lambda: read_loop_state(svc))
            next_snapshot = time.monotonic() + SNAPSHOT_S
        svc.refreshed_at = time.monotonic()
        if stop.wait(REFRESH_S):
            return


def _held(svc: Service) -> tuple:
    """What the server holds, by version: when it changes, the heap is settled again."""
    index, held = svc.search.index, svc.predictor.loaded()
    return (None if index is None else index.meta.version, len(svc.search.lexical), held["champion"],
            held["challenger"], held["known_records"], held["labelled_reference"], svc.batcher.embedding.compiled)


def settle_heap() -> None:
    """Collect, then freeze what survives (``gc.freeze``): the model, the index, the records
    and the compiled graphs are millions of objects that live until the next version, and a
    full collection walks every one of them. Python runs one whenever enough objects have been
    allocated, which a busy server does within seconds: it held a search for 600 ms on the
    demo (bench/serving_search.py, 2026-12-05). Frozen objects are skipped by collections until
    the next settle, which unfreezes first, so an old version in a reference cycle is still freed."""
    import gc

    gc.unfreeze()
    gc.collect()
    gc.freeze()


def create_app(paths: Paths | None = None, settings: Settings | None = None, token: str | None = None) -> Starlette:
    """The application for a data root (default: the environment's), its settings and token."""
    paths = paths or Paths.from_env()
    settings = settings or Settings.from_env()
    token = (token if token is not None else os.environ.get(TOKEN_ENV, "")).strip() or None
    from concurrent.futures import ThreadPoolExecutor

    from ..feedback_sources import FeedbackSender
    from ..served import PredictionLog
    from .embedding import Batcher, Embedding
    from .predict import Predictor
    from .search import SearchService

    svc = Service(paths.ensure(), settings, token)
    svc.batcher = Batcher(Embedding(svc.paths, settings), settings.api_batch_window_ms / 1000.0,
                          settings.api_batch_max, pin=settings.embed_pin_threads,
                          max_queued=settings.api_max_queued_texts)
    svc.search = SearchService(svc.paths, settings, svc.batcher)
    svc.prediction_log = PredictionLog(svc.paths.home)
    svc.predictor = Predictor(svc.paths, settings, svc.batcher, svc.prediction_log)
    svc.feedback = FeedbackSender(settings, svc.paths, settings.api_timeout_s)
    svc.feedback_pool = ThreadPoolExecutor(FEEDBACK_THREADS, thread_name_prefix="feedback")

    @asynccontextmanager
    async def lifespan(app):
        stop = threading.Event()
        keeper = threading.Thread(target=keep_current, args=(svc, stop), name="keep-current", daemon=True)
        keeper.start()
        try:
            yield
        finally:
            stop.set()
            keeper.join(timeout=5)
            svc.prediction_log.close()
            svc.feedback_pool.shutdown(wait=False, cancel_futures=True)
            svc.feedback.close()

    routes = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"], include_in_schema=False),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{version}", get_model, methods=["GET"]),
        Route("/v1/learning/metrics", get_learning_metrics, methods=["GET"]),
        Route("/v1/search", search, methods=["GET"]),
        Route("/v1/predict", predict, methods=["POST"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v1/records", post_records, methods=["POST"]),
        Route("/v1/records/{record_id:path}", delete_record, methods=["DELETE"]),
        Route("/v1/feedback", post_feedback, methods=["POST"]),
        Route("/reports/{name:path}", get_report, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={
        ApiError: on_api_error, StoreBusy: on_store_busy, HTTPException: on_http_error, TimedOut: on_timed_out,
        Overloaded: on_overloaded})
    app.state.svc = svc
    svc.metrics = ApiMetrics()
    svc.metrics.registry.register(LoopCollector(lambda: loop_state(svc)))
    templates = {r.endpoint: r.path for r in routes}
    app.add_middleware(Contained, templates=templates)
    app.add_middleware(BearerToken, token=token)
    # outermost: every request is counted, refused ones too
    app.add_middleware(RequestMetrics, metrics=svc.metrics, templates=templates)
    return app
