"""Continuous batching: work from concurrent requests, done together by one worker thread.

Used twice by the API: new texts before the embedder (a transformer embeds a batch faster
per text than one at a time) and records before the models (one kNN search, one linear
product and one tree pass for every waiting request instead of one each: the per-call costs
are what a prediction for one record is made of).

The worker takes whatever queued while it was busy (up to ``max_items``), so under load
groups grow by themselves and a lone request never waits for company. ``window_s`` > 0 adds
a wait for more after the first item of an idle spell (it only helps traffic that arrives
spread out, and costs a lone request that long). ``max_items`` 1 switches batching off: each
request is done on its own, in its own thread (what a benchmark compares against).
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable, Hashable


class ContinuousBatcher:
    """``run(key, payloads) -> results`` (one result per payload, in order) for the payloads
    that share a key, e.g. an embedding model id or a (champion, challenger) pair."""

    def __init__(self, run: Callable[[Hashable, list], list], max_items: int, window_s: float = 0.0,
                 name: str = "batcher"):
        self.run, self.max_items, self.window_s, self.name = run, max(1, int(max_items)), float(window_s), name
        self._queue: queue.Queue = queue.Queue()
        self._worker: threading.Thread | None = None
        self._start_lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.max_items > 1

    def submit(self, key: Hashable, payload: Any, n: int = 1) -> Future:
        """A future of ``payload``'s result; ``n`` is its size against ``max_items``."""
        fut: Future = Future()
        if not self.enabled:  # each request on its own, in the caller's thread
            try:
                fut.set_result(self.run(key, [payload])[0])
            except BaseException as exc:  # noqa: BLE001 -- handed to the waiting request
                fut.set_exception(exc)
            return fut
        self._ensure_worker()
        self._queue.put((key, payload, n, fut))
        return fut

    def _ensure_worker(self) -> None:
        if self._worker is not None and self._worker.is_alive():
            return
        with self._start_lock:
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._loop, name=self.name, daemon=True)
                self._worker.start()

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            group = [first]
            n = first[2]
            deadline = time.monotonic() + self.window_s
            while n < self.max_items:
                left = deadline - time.monotonic()
                try:  # what queued meanwhile at once; then wait out the window, if any
                    item = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                group.append(item)
                n += item[2]
            by_key: dict[Hashable, list] = {}
            for item in group:
                by_key.setdefault(item[0], []).append(item)
            for key, items in by_key.items():
                try:
                    results = self.run(key, [item[1] for item in items])
                except BaseException as exc:  # noqa: BLE001 -- every waiting request hears of it
                    for item in items:
                        item[3].set_exception(exc)
                    continue
                for item, result in zip(items, results):
                    item[3].set_result(result)
