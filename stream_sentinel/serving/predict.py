"""Predictions for the API: the champion (and a challenger) in memory, always the current one.

What a prediction needs, and where it comes from without the database on the request path:

* the **version**: the registry's ``CHAMPION`` pointer is checked on every request (a
  ``stat``, microseconds) and a new version is loaded from its folder (``load_folder``:
  trees, feature spec, threshold and label names from ``meta.json``) before the request is
  answered. So an answer always names the version the pointer named while the request was
  being served, whatever a promotion or rollback did a millisecond before. The challenger
  the same way, by its ``CHALLENGER`` pointer (like ``CHAMPION``, the source of truth: emptied
  the moment a challenger is retired, promoted or tainted); the arms of Thompson routing are
  read by the background thread.
* the **labelled neighbours** (kNN and linear columns): every resolved label's vector, read
  again by the background thread when the labels changed, with the kNN index and the linear
  state built once per read (``Reference`` memoizes them), not once per request.
* a **known record's** vector and numeric features: the records of the served vector index,
  held in memory and extended when a new index version appears. A record that is not in it
  yet must come with its text.
* a **new text's** vector: the shared embedder, through the dynamic batcher.
* a **new text's window values** (``win_<name>``): from the window state in memory
  (``windows.online.LiveWindows``), which the background thread extends with the events
  ingested since its last look.

Every answer (the served one and the shadow one of the other model) is appended to the
prediction log (``served.PredictionLog``), which a sensor loads into DuckDB.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np

from ..openmp import faiss_one_thread, in_own_thread

log = logging.getLogger(__name__)

LABELS_CHECK_S = 2.0  # how often the labels' digest is compared (a cheap aggregate)
SCORE_MAX_ROWS = 1024  # records of concurrent requests scored in one pass
MODEL_RETRY_S = 2.0  # a champion that failed to load is tried again this often


@dataclass(frozen=True)
class ServedModel:
    version: str
    booster: Any
    spec: Any  # learning.models.FeatureSpec
    threshold: float
    positive: str
    negative: str
    embedding_model_id: str


class KnownRecords:
    """Vector and numeric features of every record in the served index, by record id.

    Read without a lock by requests: a row is published only after its vector and features
    are in place, and what would change rows under a reader (another embedding model, records
    erased) makes a new object that replaces this one whole (:meth:`without`, a new one)."""

    def __init__(self) -> None:
        self.row: dict[str, int] = {}
        self.vec_of: dict[str, int] = {}  # record id -> vec_id
        self.vectors = np.zeros((0, 0), dtype=np.float32)
        self.features: list[dict] = []
        self.model_id: str | None = None
        self.vec_ids: set[int] = set()
        self._n = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._n

    def add(self, model_id: str, vec_ids: list[int], ids: list[str], features: list[dict],
            vectors: np.ndarray) -> None:
        with self._lock:
            if self.model_id is None:
                self.model_id = model_id
                self.vectors = np.zeros((0, vectors.shape[1]), dtype=np.float32)
            elif model_id != self.model_id:
                raise ValueError(f"these records were embedded with {model_id}, not {self.model_id}: a new "
                                 "KnownRecords holds them")
            need = self._n + len(ids)
            if need > len(self.vectors):  # grow by doubling: appends cost O(1) amortized
                grown = np.zeros((max(need, 2 * len(self.vectors), 1024), vectors.shape[1]), dtype=np.float32)
                grown[:self._n] = self.vectors[:self._n]
                self.vectors = grown
            self.vectors[self._n:need] = vectors
            self.features.extend(features)  # before the rows that point at them are published
            self.vec_ids.update(vec_ids)
            self.vec_of.update(zip(ids, vec_ids))
            for j, rid in enumerate(ids, self._n):
                self.row[rid] = j
            self._n = need

    def without(self, gone: set[int]) -> "KnownRecords":
        """A copy without the records of the vec ids ``gone`` (an erasure): what the index left.
        Compacted (about 50 ms at 100k records), so the erased vectors and features are not
        kept in memory by it."""
        with self._lock:
            keep = sorted(self.row[r] for r, v in self.vec_of.items() if v not in gone)
            ids = {j: r for r, j in self.row.items()}
            new = KnownRecords()
            if keep:
                new.add(self.model_id, [self.vec_of[ids[j]] for j in keep], [ids[j] for j in keep],
                        [self.features[j] for j in keep], self.vectors[keep])
            new.model_id = self.model_id
        return new

    def get(self, ids: list[str]) -> tuple[np.ndarray, list[dict]] | None:
        rows = [self.row.get(r) for r in ids]
        if any(r is None for r in rows):
            return None
        vectors, features = self.vectors, self.features  # a grow swaps the array, never edits rows
        return vectors[rows], [features[r] for r in rows]


class Predictor:
    def __init__(self, paths, settings, batcher, log_writer):
        from ..learning.registry import ModelRegistry
        from ..batching import ContinuousBatcher
        from ..store import ChangeWatch

        self.paths, self.settings, self.batcher, self.log = paths, settings, batcher, log_writer
        self.registry = ModelRegistry(paths.models, None)  # the pointer and folders only
        self._models: dict[str, ServedModel] = {}
        self._pointer: tuple | None = None  # (inode, mtime_ns, size) of CHAMPION when last read
        self._champion: str | None = None
        self._broken: tuple | None = None  # (pointer key, why, retry after): a champion that failed to load
        self._load_lock = threading.Lock()
        # (stat key of CHALLENGER: (inode, mtime_ns, size), () when absent; the loaded challenger or
        # None): one reference, replaced whole, so a request never pairs one key with another model
        self._challenger: tuple = (None, None)
        self._challenger_retry = 0.0  # a challenger that failed to load is tried again after this
        from ..learning.registry import CHALLENGER_POINTER

        self._challenger_path = str(paths.models / CHALLENGER_POINTER)
        self.arms: dict = {}
        # (embedding model id, positive label, learning.models.Reference over every resolved label):
        # one reference, swapped whole, so a request never pairs a reference with another's key
        self._reference: tuple | None = None
        self._labels_digest: str | None = None
        self._labels_checked = 0.0
        self._store_watch = ChangeWatch()  # labels, windows and A/B are read after a write only
        self._known_index: str | None = None  # the index version whose records ``known`` holds
        self.known = KnownRecords()
        self.windows = None  # windows.online.LiveWindows: the declared windows' state, None: none declared
        # the records of concurrent requests scored together (one kNN search, one tree pass)
        self.scorer = ContinuousBatcher(self._score_group, SCORE_MAX_ROWS if settings.api_batch_max > 1 else 1,
                                        name="score-batcher", on_start=faiss_one_thread)

    # ------------------------------------------------------------------ the version
    def model(self, version: str) -> ServedModel:
        m = self._models.get(version)
        if m is not None:
            return m
        with self._load_lock:
            m = self._models.get(version)
            if m is None:
                # LightGBM parses a model on an OpenMP team: in a thread of its own, so that the
                # team ends with it instead of slowing the embedder's (openmp.py)
                booster, spec, meta = in_own_thread(self.registry.load_folder, version)
                labels = meta.get("labels") or self._labels_from_db(version)
                m = ServedModel(version, booster, spec, float((meta.get("metrics") or {}).get("threshold", 0.5)),
                                labels["positive"], labels["negative"], meta["embedding_model_id"])
                # versions are immutable: keep a few (a rollback goes back to a recent one)
                for old in list(self._models)[:-3]:
                    if old not in (self._champion, self.challenger, version):
                        del self._models[old]
                self._models[version] = m
                log.info("predict: loaded model %s", version)
        return m

    def _labels_from_db(self, version: str) -> dict:
        """Label names of a version made before meta.json kept them."""
        from ..learning.loop import version_labels
        from ..learning.registry import ModelRegistry
        from ..store import Store

        store = Store.of(self.paths, lock_timeout_s=2.0)
        v = ModelRegistry(self.paths.models, store).get(version)
        positive, negative = version_labels(store, v)
        return {"positive": positive, "negative": negative}

    def champion(self) -> ServedModel | None:
        """The version ``CHAMPION`` names now (loaded first if it is new)."""
        from ..learning.registry import POINTER

        pointer = self.paths.models / POINTER
        try:
            st = os.stat(pointer)
        except FileNotFoundError:
            self._pointer, self._champion = None, None
            return None
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if key != self._pointer:
            version = self.registry.champion_version()
            if version is None:
                return None
            broken = self._broken
            if broken is not None and broken[0] == key and time.monotonic() < broken[2]:
                raise ModelUnavailable(broken[1])
            try:
                model = self.model(version)  # loaded before it is answered with
            except Exception as exc:  # noqa: BLE001 -- a sha mismatch, missing or unreadable files
                # not the previous version instead: it is no longer the champion. Tried again
                # every MODEL_RETRY_S (a folder still being repaired), until the pointer moves.
                msg = f"the champion {version} cannot be loaded ({type(exc).__name__}: {exc})"
                self._broken = (key, msg, time.monotonic() + MODEL_RETRY_S)
                log.warning("predict: %s", msg)
                raise ModelUnavailable(msg) from None
            self._champion, self._pointer, self._broken = version, key, None
            return model
        return self.model(self._champion) if self._champion else None

    def _challenger_stat(self) -> tuple:
        path = self._challenger_path
        if not os.access(path, os.F_OK):  # no A/B test ever: no exception per request
            return ()
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return ()
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    @property
    def challenger(self) -> str | None:
        """The version of the challenger held now (None: none)."""
        model = self._challenger[1]
        return None if model is None else model.version

    def _challenger_if_current(self) -> tuple[bool, ServedModel | None]:
        """(True, the loaded challenger or None) when ``CHALLENGER`` has not moved since it was
        read (a stat), else (False, None): read it with :meth:`current_challenger`."""
        key, model = self._challenger
        if self._challenger_stat() != key:
            return False, None
        return True, model

    def current_challenger(self) -> ServedModel | None:
        """The version ``CHALLENGER`` names now, loaded; None when there is none, or when its files
        cannot be loaded (the champion answers alone meanwhile: never the previous challenger,
        which is no longer one; tried again every ``MODEL_RETRY_S``)."""
        key = self._challenger_stat()
        version = self.registry.challenger_pointer() if key else None
        held_key, held = self._challenger
        model = None
        if version is not None and held is not None and held.version == version:
            model = held
        elif version is not None and (key != held_key or time.monotonic() >= self._challenger_retry):
            try:
                model = self.model(version)
            except Exception as exc:  # noqa: BLE001 -- a sha mismatch, missing or unreadable files
                log.warning("predict: the challenger %s cannot be loaded (%s: %s); the champion answers alone",
                            version, type(exc).__name__, exc)
                self._challenger_retry = time.monotonic() + MODEL_RETRY_S
        # one that failed to load: the champion answers alone; the background thread tries it
        # again every MODEL_RETRY_S (here, as requests find the key unchanged)
        self._challenger = (key, model)
        return model

    @property
    def reference(self):
        """The labelled reference held now (None before the first read)."""
        held = self._reference
        return None if held is None else held[2]

    def loaded(self) -> dict:
        ref = self.reference
        return {"champion": self._champion, "challenger": self.challenger,
                "model_error": None if self._broken is None else self._broken[1],
                "labelled_reference": 0 if ref is None else len(ref.ids), "known_records": len(self.known),
                "window_events": None if self.windows is None else self.windows.events}

    # ------------------------------------------------------------------ keeping current
    def refresh(self, index) -> None:
        """The background thread's step: known records of the served ``index``, the labelled
        reference when the labels changed, the challenger and the arms."""
        from ..store import Store, StoreBusy

        try:
            self.champion()  # a promotion is loaded here too, not only by the next request
        except ModelUnavailable:
            pass  # said by healthz and by each request
        self.current_challenger()
        new_index = index is not None and index.meta.version != self._known_index
        store = Store.of(self.paths, lock_timeout_s=0.2)
        stamp, due = None, time.monotonic() - self._labels_checked >= LABELS_CHECK_S
        if due:
            stamp = store.stamp()  # before the read: a write meanwhile is read next time
            due = self._store_watch.changed(stamp)
        if not (new_index or due):
            return  # the database is opened only when there is something to read
        try:
            with store.session():
                if new_index:
                    self._add_known(index)
                    self._known_index = index.meta.version
                if due:
                    self._read_windows()
                    self._read_labels()
                    self._read_ab()
                    self._labels_checked = time.monotonic()
                    self._store_watch.read(stamp)
        except StoreBusy:
            return  # a run holds the database: next time

    def _add_known(self, index) -> None:
        import json

        from ..store import Store, vectors_from_arrow

        served = set(index.vec_ids.tolist())
        known = self.known
        if known.model_id not in (None, index.meta.model_id):
            known = KnownRecords()  # another embedding model: built aside, in place once loaded
        elif known.vec_ids - served:  # records left the index (an erasure): forgotten at once
            known = known.without(known.vec_ids - served)
            self.known = known
        new = [v for v in served if v not in known.vec_ids]
        if not new:
            self.known = known
            return
        with Store.of(self.paths, lock_timeout_s=0.2).connect() as con:
            table = con.sql(
                """SELECT r.vec_id, r.id, r.features, e.vector FROM records_w r
                   JOIN embeddings e ON e.record_id = r.id AND e.model_id = ?
                   WHERE r.vec_id IN (SELECT unnest(?::BIGINT[])) ORDER BY r.vec_id""",
                params=[index.meta.model_id, new]).to_arrow_table()
        n = table.num_rows
        if n:
            known.add(index.meta.model_id, table.column("vec_id").to_pylist(), table.column("id").to_pylist(),
                      [json.loads(x) if x else {} for x in table.column("features").to_pylist()],
                      vectors_from_arrow(table.column("vector"), n))
        self.known = known

    def _read_windows(self) -> None:
        from ..store import Store
        from ..windows.online import LiveWindows

        with Store.of(self.paths, lock_timeout_s=0.2).connect() as con:
            self.windows = LiveWindows.refresh(con, self.windows)

    def _read_labels(self) -> None:
        from ..learning.loop import current_reference, resolved_labels_digest
        from ..store import Store

        champion = self._champion
        if champion is None:
            return
        model = self.model(champion)
        store = Store.of(self.paths, lock_timeout_s=0.2)
        digest = f"{resolved_labels_digest(store)}:{model.embedding_model_id}:{model.positive}"
        if digest == self._labels_digest:
            return
        ref = current_reference(store, model.embedding_model_id, model.positive)
        ref.knn_index()  # built here, once, not by a request
        ref.row_of()
        # for the (embedding model, positive label) it was built with: a request whose model
        # differs scores without neighbours rather than against another space's or label's
        self._reference, self._labels_digest = (model.embedding_model_id, model.positive, ref), digest

    def _read_ab(self) -> None:
        """The arms of Thompson routing (the challenger itself is read from its pointer)."""
        from ..learning.loop import read_arms
        from ..learning.registry import ModelRegistry
        from ..store import Store

        if self.settings.ab_routing != "thompson":
            return
        registry = ModelRegistry(self.paths.models, Store.of(self.paths, lock_timeout_s=0.2))
        champion, challenger = registry.champion_version(), registry.challenger_pointer()
        self.arms = {} if champion is None or challenger is None else \
            {"versions": (champion, challenger), **read_arms(registry, champion, challenger)}

    # ------------------------------------------------------------------ answering
    def route(self, key: str, pair: tuple[str, str], arms: dict) -> str:
        """Which of the pair (champion, challenger versions) answers ``key``."""
        from ..learning import ab

        if self.settings.ab_routing == "thompson" and arms.get("versions") == pair:
            return ab.route_thompson(key, arms["champion"], arms["challenger"])
        return ab.route_hash(key, self.settings.ab_share)

    def vectors_for(self, records: list[dict], model: ServedModel):
        """Vectors and numeric features of the records (stored ones for known ids without text,
        new texts embedded) and how each was found ("stored" or "text"). A generator: it
        yields the embedding's future and is sent its result (see :meth:`_answer`)."""
        dim = len(model.spec.pca_mean)
        vectors = np.zeros((len(records), dim), dtype=np.float32)
        features: list[dict] = [r.get("features") or {} for r in records]
        source = ["text" if r.get("text") is not None else "stored" for r in records]
        stored = [i for i, s in enumerate(source) if s == "stored"]
        if stored:
            known = self.known  # one snapshot per request: a swap never mixes two
            if known.model_id not in (None, model.embedding_model_id):
                raise UnknownRecords([records[i]["id"] for i in stored], "the served index was embedded with "
                                     f"{known.model_id}, the model with {model.embedding_model_id}")
            got = known.get([records[i]["id"] for i in stored])
            if got is None:
                missing = [records[i]["id"] for i in stored if records[i]["id"] not in known.row]
                raise UnknownRecords(missing, "not in the served vector index (yet)")
            for j, i in enumerate(stored):
                vectors[i] = got[0][j]
                if not records[i].get("features"):
                    features[i] = got[1][j]
        new = [i for i, s in enumerate(source) if s == "text"]
        live = self.windows
        # features from the request: the windows' values as of the record's event time (as
        # training computes them; they replace any win_ keys sent). Stored ones have theirs.
        sent = [i for i, r in enumerate(records) if live is not None and (r.get("text") is not None or r.get("features"))]
        if sent:
            from ..windows.state import to_us

            now = to_us(datetime.now(timezone.utc))
            vals = live.values([{"features": features[i], "extra": records[i].get("extra") or {}} for i in sent],
                               [to_us(records[i]["event_time"]) if records[i].get("event_time") else now for i in sent])
            for i, v in zip(sent, vals):
                features[i] = {**features[i], **v}
        if new:
            vectors[new] = yield self.batcher.submit([records[i]["text"] for i in new], model.embedding_model_id, dim)
        return vectors, features, source

    def score(self, model: ServedModel, vectors: np.ndarray, features: list[dict],
              ids: list[str]) -> tuple[np.ndarray, list[str]]:
        from ..learning.models import Reference, build_features

        held = self._reference
        ref = held[2] if held is not None and held[:2] == (model.embedding_model_id, model.positive) else None
        if ref is None or ref.vectors.shape[1] != vectors.shape[1]:
            ref = Reference(np.zeros((0, vectors.shape[1]), np.float32), np.zeros(0, int), [])
        # a labelled record never sees its own label (as when the loop scores it)
        X = build_features(model.spec, vectors, features, ref, ids)
        # one thread: the rows of a few requests gain nothing from more, and a second OpenMP team
        # in this process would slow the embedder's (openmp.py)
        p = model.booster.predict(X, num_threads=1)
        return p, [model.positive if x >= model.threshold else model.negative for x in p]

    def _score_group(self, pair: tuple, requests: list[tuple]) -> list[tuple]:
        """The records of several requests (same champion and challenger) scored in one pass;
        each request's (probabilities, labels) of each model."""
        champion, challenger = requests[0][0], requests[0][1]
        vectors = np.vstack([r[2] for r in requests]) if len(requests) > 1 else requests[0][2]
        features = [f for r in requests for f in r[3]]
        ids = [i for r in requests for i in r[4]]
        answers = [self.score(m, vectors, features, ids) if m is not None else (None, None)
                   for m in (champion, challenger)]
        out, at = [], 0
        for r in requests:
            n = len(r[4])
            out.append(tuple((None, None) if p is None else (p[at:at + n], labels[at:at + n]) for p, labels in answers))
            at += n
        return out

    async def predict_async(self, records: list[dict]) -> dict:
        """The answer to a request, on the event loop: only the batchers' threads work, so a
        request costs no thread of its own (for known ids the thread pool's hand-offs were a
        tenth of the API's busy time at concurrency 32, sampled by py-spy; for new texts a
        seventh of their throughput). A new champion is loaded off the loop."""
        import asyncio

        started = time.time()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.api_timeout_s
        # one timer for the whole request (cheaper than a wait_for per await): when it fires,
        # what the request waits on is cancelled, and a waiter that gives up cancels its future,
        # so queued work is never done for nobody
        waiting: list = [None]
        expired: list = [False]

        def expire() -> None:
            expired[0] = True
            if waiting[0] is not None:
                waiting[0].cancel()

        async def bounded(awaitable):
            waiting[0] = asyncio.ensure_future(awaitable)
            if expired[0]:
                waiting[0].cancel()
            try:
                return await waiting[0]
            except asyncio.CancelledError:
                if not expired[0]:
                    raise  # the request itself was cancelled (the client left, a shutdown)
                raise TimedOut(f"no answer within {self.settings.api_timeout_s:g} s "
                               "(STREAM_SENTINEL_API_TIMEOUT_SECONDS): the embedder or the models are "
                               "busy, loading or not answering") from None
            finally:
                waiting[0] = None

        timer = loop.call_at(deadline, expire)
        try:
            champion = self._champion_if_current()
            if champion is None:
                champion = await bounded(asyncio.to_thread(self.champion))
            current, challenger = self._challenger_if_current()
            if not current:
                challenger = await bounded(asyncio.to_thread(self.current_challenger))
            steps = self._answer(records, champion, challenger, started)
            try:
                fut = next(steps)
                while True:
                    try:
                        got = await bounded(asyncio.wrap_future(fut))
                    except TimedOut:
                        steps.close()
                        raise
                    fut = steps.send(got)
            except StopIteration as done:
                return done.value
        finally:
            timer.cancel()

    def _champion_if_current(self) -> ServedModel | None:
        """The loaded champion when the pointer has not moved since (a stat), else None."""
        from ..learning.registry import POINTER

        try:
            st = os.stat(self.paths.models / POINTER)
        except FileNotFoundError:
            return None
        if (st.st_ino, st.st_mtime_ns, st.st_size) != self._pointer or self._champion is None:
            return None
        return self._models.get(self._champion)

    def _answer(self, records: list[dict], champion: ServedModel | None, challenger: ServedModel | None,
                started: float):
        """The steps of an answer, as a generator that yields the futures it waits for (an
        embedding, a scoring pass) and is sent their results, so that the event loop awaits them.
        ``champion`` and ``challenger`` are what the pointers named when the request came."""
        if champion is None:
            raise NoModel("no champion yet: the loop has not promoted a first model")
        if challenger is not None and (challenger.version == champion.version
                                       or challenger.embedding_model_id != champion.embedding_model_id):
            challenger = None  # just promoted, or cannot share the vectors: the champion answers alone
        arms = self.arms
        vectors, features, source = yield from self.vectors_for(records, champion)
        ids = [r["id"] for r in records]
        keys = [str(r.get("routing_key") or r["id"]) for r in records]
        roles = [self.route(k, (champion.version, challenger.version), arms) if challenger is not None
                 else "champion" for k in keys]
        pair = (champion.version, None if challenger is None else challenger.version)
        (p_champ, l_champ), (p_chal, l_chal) = yield self.scorer.submit(
            pair, (champion, challenger, vectors, features, ids), len(ids))
        request_id = uuid.uuid4().hex
        served_at = datetime.now(timezone.utc).isoformat()
        out, lines = [], []
        for i, rid in enumerate(ids):
            answers = {"champion": (champion.version, float(p_champ[i]), l_champ[i])}
            if challenger is not None:
                answers["challenger"] = (challenger.version, float(p_chal[i]), l_chal[i])
            role = roles[i]
            version, p, label = answers[role]
            out.append({"id": rid, "label": label, "score": round(p, 6), "model_version": version,
                        "served_by": role})
            for r, (v, pr, lab) in answers.items():
                lines.append({"request_id": request_id, "i": i, "record_id": rid, "routing_key": keys[i],
                              "model_version": v, "role": r, "served": r == role, "probability": pr,
                              "label": lab, "input": source[i], "served_at": served_at})
        try:
            self.log.append(lines)
        except OSError as exc:  # an answer that cannot be logged is not given (the loop must see it)
            raise LogUnavailable(f"the prediction log cannot be written ({type(exc).__name__}: "
                                 f"{exc.strerror or exc}); nothing was answered") from None
        return {"predictions": out, "request_id": request_id,
                "took_ms": round((time.time() - started) * 1000, 2)}


class UnknownRecords(Exception):
    def __init__(self, ids: list[str], why: str):
        super().__init__(f"{len(ids)} record(s) without text are {why}: {', '.join(map(repr, ids[:5]))}")
        self.ids = ids


class NoModel(Exception):
    pass


class LogUnavailable(Exception):
    """The prediction log refused an append (a full disk): the request is answered 503."""


class TimedOut(Exception):
    """A request's embedding or scoring did not finish within ``api_timeout_s``."""


class ModelUnavailable(Exception):
    """The champion pointer names a version whose files cannot be loaded (yet)."""
