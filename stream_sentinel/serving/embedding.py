"""Embedding for the API: one embedder per process, and dynamic batching in front of it.

A transformer embeds texts in batches faster than one at a time (the weights are read once
per batch; on two cores without bf16 units, 42 against 23.5 short texts/s: bench/serving.py),
so texts from concurrent requests are embedded together: :class:`Batcher` is continuous
batching (``batching.ContinuousBatcher``) before the embedder.

The embedder is the embedding server when one runs with the wanted model (``up`` starts
it: one copy of the weights for the sensors and the API), else a model loaded in this
process on first use, and compiled there in the background (``STREAM_SENTINEL_EMBED_COMPILE``,
as the embedding server does): the API is long-lived, and a compiled model embeds one
query in about half the time of the eager one (encoder.py).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from typing import Sequence

import numpy as np

from ..batching import ContinuousBatcher, split_rows
from ..openmp import TeamPinning, spread

log = logging.getLogger(__name__)

REPROBE_S = 30.0  # while the in-process model serves, the embedding server is looked for this often


class IndexModelMismatch(RuntimeError):
    """The embedding model asked for is not the one this server has."""


class Embedding:
    """The embedder of one model id: the embedding server while it runs with that model, else a
    model loaded in this process (once: a model whose id is not the one asked for is kept and
    refused, never loaded again per batch). While the in-process model serves, the server is
    looked for again every ``REPROBE_S``: an embedding server that `up` restarted takes over
    again (the model loaded here stays loaded, for the next time the server is away)."""

    def __init__(self, paths, settings):
        self.paths, self.settings = paths, settings
        self._embedder = None
        self._local = None  # the in-process model, once loaded
        self._probed = 0.0  # when the server was last looked for
        self._lock = threading.Lock()

    def _current(self, model_id: str):
        emb = self._embedder
        if emb is None or emb.model_id != model_id:
            return None
        if type(emb).__name__ != "RemoteEmbedder" and time.monotonic() - self._probed >= REPROBE_S:
            return None  # in-process: time to look for the server again
        return emb

    def embedder(self, model_id: str, dim: int):
        from ..embedding.embedder import Embedder
        from ..embedding.server import connect, default_address

        emb = self._current(model_id)
        if emb is not None:
            return emb
        with self._lock:
            emb = self._current(model_id)
            if emb is not None:
                return emb
            self._probed = time.monotonic()
            remote = connect(default_address(self.paths.embed_socket), model_id, dim)
            if remote is not None:
                # a request waits at most this long (then 503), so the model thread does too
                remote.timeout_s = self.settings.api_timeout_s
                if self._embedder is not None and self._embedder is self._local:
                    log.info("embedding: the embedding server is back; it embeds again")
                # the model loaded here (if any) is kept: a server that keeps restarting must not
                # cost a load and a compile each time
                self._embedder = remote
                return remote
            local = self._local
            if local is None:
                s = self.settings
                if s.embed_compile:
                    from ..embedding.encoder import keep_kernels

                    keep_kernels()  # before the model's first kernel
                local = Embedder.load(s.model_path, s.device, s.embed_batch_size, s.embed_precision, s.embed_backend,
                                      self.paths.embedding_models)
                if s.embed_compile and local.backend == "torch":
                    # spread(): this may run in the pinned model thread, whose CPU a new thread inherits
                    threading.Thread(target=lambda: (spread(), local.compile()), name="embed-compile",
                                     daemon=True).start()
                self._local = local
            if local.model_id != model_id:
                raise IndexModelMismatch(f"the data was embedded with {model_id} but this server's model is "
                                         f"{local.model_id}; backfill embeddings and vector_index first")
            self._embedder = local
            return local

    def embed(self, texts: Sequence[str], model_id: str, dim: int) -> np.ndarray:
        emb = self.embedder(model_id, dim)
        try:
            return emb.embed(list(texts))
        except TimeoutError:
            # the server is there but does not answer (stopped, or busy for longer than a request
            # may wait): not a reason to load a second copy of the model here
            from .predict import TimedOut

            raise TimedOut(f"the embedding server did not answer within {self.settings.api_timeout_s:g} s "
                           "(STREAM_SENTINEL_API_TIMEOUT_SECONDS)") from None
        except (OSError, RuntimeError):
            if emb is self._embedder and type(emb).__name__ == "RemoteEmbedder":
                self._embedder = None  # the server went away: look again (or load locally) once
                return self.embedder(model_id, dim).embed(list(texts))
            raise

    def describe(self) -> str | None:
        emb = self._embedder
        return None if emb is None else ("server" if type(emb).__name__ == "RemoteEmbedder" else "in-process")

    @property
    def compiled(self) -> bool | None:
        """Whether the embedder in use runs compiled (for the embedding server: as it said in its
        last reply); None before one is chosen."""
        emb = self._embedder
        return None if emb is None else bool(emb.compiled)


class Batcher:
    """Texts from concurrent requests, embedded in shared batches by one worker thread."""

    def __init__(self, embedding: Embedding, window_s: float, max_batch: int, pin: bool = False,
                 max_queued: int | None = None):
        self.embedding, self.window_s, self.max_batch = embedding, float(window_s), max(1, int(max_batch))
        self.batches = 0  # embedder calls made
        self.texts = 0  # texts embedded
        self._pinning = TeamPinning(pin, "api embedder")  # only a model in this process: openmp.py
        self._batcher = ContinuousBatcher(self._run, self.max_batch, self.window_s, name="embed-batcher",
                                          max_queued=max_queued)

    @property
    def enabled(self) -> bool:
        return self._batcher.enabled

    @property
    def pinned_cpus(self) -> list[int] | None:
        """The CPUs the in-process model's threads are pinned to (None: not pinned)."""
        return self._pinning.cpus

    def submit(self, texts: list[str], model_id: str, dim: int) -> Future:
        """A future of the texts' vectors (in order).

        A request with more texts than one batch holds is embedded one batch at a time (its
        texts sorted by length, so each batch is of like lengths), each queued only when the
        one before is done: requests that came meanwhile share the next batch instead of
        waiting behind all of it (a 1,000-text predict held a search for 10 s when it went
        to the model as one call)."""
        if not texts:
            fut: Future = Future()
            fut.set_result(np.zeros((0, dim), dtype=np.float32))
            return fut
        key = (model_id, dim)
        if len(texts) <= self.max_batch or not self.enabled:  # batching off: each request alone, whole
            return self._batcher.submit(key, list(texts), len(texts))
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        chunks = [order[i:i + self.max_batch] for i in range(0, len(order), self.max_batch)]
        out: Future = Future()
        vectors = np.zeros((len(texts), dim), dtype=np.float32)

        def send(k: int) -> None:
            if out.cancelled():  # the request gave up: the rest is never embedded
                return
            try:
                part = self._batcher.submit(key, [texts[i] for i in chunks[k]], len(chunks[k]), admitted=k > 0)
            except BaseException as exc:  # noqa: BLE001 -- (Overloaded, for the first) the request hears of it
                if k == 0:
                    raise
                _settle(out, exc=exc)
                return
            out.add_done_callback(lambda f: f.cancelled() and part.cancel())  # still queued: never embedded
            part.add_done_callback(lambda f: landed(k, f))

        def landed(k: int, part: Future) -> None:
            if part.cancelled():
                return  # the request gave up
            try:
                vectors[chunks[k]] = part.result()
            except BaseException as exc:  # noqa: BLE001 -- the request hears of it
                _settle(out, exc=exc)
                return
            if k + 1 < len(chunks):
                send(k + 1)
            else:
                _settle(out, value=vectors)

        send(0)
        return out

    def _run(self, key: tuple[str, int], groups: list[list[str]]) -> list[np.ndarray]:
        """One embedder call for every request's texts (one per embedding model)."""
        texts = [t for g in groups for t in g]
        vecs = self.embedding.embed(texts, *key)
        if self._pinning.pending:
            self._pinning.after_call(self.embedding.describe() == "in-process" and bool(self.embedding.compiled))
        self.batches += 1
        self.texts += len(texts)
        return split_rows(vecs, groups)


def _settle(fut: Future, value=None, exc: BaseException | None = None) -> None:
    """Answer ``fut`` unless its waiter gave up meanwhile (then nobody is listening)."""
    from concurrent.futures import InvalidStateError

    try:
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(value)
    except InvalidStateError:
        pass
