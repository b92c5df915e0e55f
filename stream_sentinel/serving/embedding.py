"""Embedding for the API: one embedder per process, and dynamic batching in front of it.

A transformer embeds 32 texts in little more time than one on a CPU (the weights are read
once per batch, not once per text), so requests that arrive together are embedded together:
:class:`Batcher` holds the first text for at most ``window_s`` while more arrive, up to
``max_batch`` texts, and answers each request from the one call. With ``window_s`` 0 each
request is embedded on its own (the switch a benchmark compares against).

The embedder is the embedding server when one runs with the wanted model (``up`` starts
it: one copy of the weights for the sensors and the API), else a model loaded in this
process on first use.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)


class IndexModelMismatch(RuntimeError):
    """The embedding model asked for is not the one this server has."""


class Embedding:
    """The embedder of one model id, chosen on first use and again after the server goes away."""

    def __init__(self, paths, settings):
        self.paths, self.settings = paths, settings
        self._embedder = None
        self._lock = threading.Lock()

    def embedder(self, model_id: str, dim: int):
        from ..embedding.embedder import Embedder
        from ..embedding.server import connect

        emb = self._embedder
        if emb is not None and emb.model_id == model_id:
            return emb
        with self._lock:
            emb = self._embedder
            if emb is not None and emb.model_id == model_id:
                return emb
            emb = connect(self.paths.embed_socket, model_id, dim)
            if emb is None:
                s = self.settings
                emb = Embedder.load(s.model_path, s.device, s.embed_batch_size, s.embed_precision, s.embed_backend,
                                    self.paths.embedding_models)
                if emb.model_id != model_id:
                    raise IndexModelMismatch(f"the data was embedded with {model_id} but this server's model is "
                                             f"{emb.model_id}; backfill embeddings and vector_index first")
            self._embedder = emb
            return emb

    def embed(self, texts: Sequence[str], model_id: str, dim: int) -> np.ndarray:
        emb = self.embedder(model_id, dim)
        try:
            return emb.embed(list(texts))
        except (OSError, RuntimeError):
            if emb is self._embedder and type(emb).__name__ == "RemoteEmbedder":
                self._embedder = None  # the server went away: look again (or load locally) once
                return self.embedder(model_id, dim).embed(list(texts))
            raise

    def describe(self) -> str | None:
        emb = self._embedder
        return None if emb is None else ("server" if type(emb).__name__ == "RemoteEmbedder" else "in-process")


class Batcher:
    """Texts from concurrent requests, embedded in shared batches by one worker thread."""

    def __init__(self, embedding: Embedding, window_s: float, max_batch: int):
        self.embedding, self.window_s, self.max_batch = embedding, float(window_s), max(1, int(max_batch))
        self._queue: queue.Queue = queue.Queue()
        self._worker: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.batches = 0  # embedder calls made
        self.texts = 0  # texts embedded

    @property
    def enabled(self) -> bool:
        return self.window_s > 0 and self.max_batch > 1

    def submit(self, texts: list[str], model_id: str, dim: int) -> Future:
        """A future of the texts' vectors (in order)."""
        fut: Future = Future()
        if not texts:
            fut.set_result(np.zeros((0, dim), dtype=np.float32))
            return fut
        if not self.enabled:  # each request on its own, in the caller's thread
            try:
                fut.set_result(self._embed(texts, model_id, dim))
            except BaseException as exc:  # noqa: BLE001 -- handed to the waiting request
                fut.set_exception(exc)
            return fut
        self._ensure_worker()
        self._queue.put((texts, model_id, dim, fut))
        return fut

    def _embed(self, texts: list[str], model_id: str, dim: int) -> np.ndarray:
        out = self.embedding.embed(texts, model_id, dim)
        self.batches += 1
        self.texts += len(texts)
        return out

    def _ensure_worker(self) -> None:
        if self._worker is not None and self._worker.is_alive():
            return
        with self._start_lock:
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._run, name="embed-batcher", daemon=True)
                self._worker.start()

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            group = [first]
            n = len(first[0])
            deadline = time.monotonic() + self.window_s
            while n < self.max_batch:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    item = self._queue.get(timeout=left)
                except queue.Empty:
                    break
                group.append(item)
                n += len(item[0])
            # one call per embedding model in the group (a model switch mid-group is rare)
            by_model: dict[tuple[str, int], list] = {}
            for item in group:
                by_model.setdefault((item[1], item[2]), []).append(item)
            for (model_id, dim), items in by_model.items():
                texts = [t for item in items for t in item[0]]
                try:
                    vecs = self._embed(texts, model_id, dim)
                except BaseException as exc:  # noqa: BLE001 -- every waiting request hears of it
                    for item in items:
                        item[3].set_exception(exc)
                    continue
                at = 0
                for item in items:
                    item[3].set_result(vecs[at:at + len(item[0])])
                    at += len(item[0])
