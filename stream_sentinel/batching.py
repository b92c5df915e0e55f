"""Continuous batching: work from concurrent requests, done together by one worker thread.

Used by the API twice: new texts before the embedder (a transformer embeds a batch faster
per text than one at a time) and records before the models (one kNN search, one linear
product and one tree pass for every waiting request instead of one each: the per-call costs
are what a prediction for one record is made of). And by the embedding server, whose
clients' texts are embedded by its one worker thread.

Why one worker thread matters beyond batching: torch runs on OpenMP, and GNU OpenMP keeps a
team of threads for every thread that ever started a parallel region. Once a process holds
more OpenMP threads than CPUs, every team's threads stop spinning between parallel regions
and sleep instead (libgomp's throttled spin count), and waking them costs the model a large
share of its speed: on 2 cores, one idle team held by another thread took an eager embedder
from 255 to 195 texts/s (1.98 to 1.45 cores busy). A model called from many threads (one per
connection, as the embedding server did until 2026-12-05) pays that all the time.

The worker takes whatever queued while it was busy (up to ``max_items``), so under load
groups grow by themselves and a lone request never waits for company. ``window_s`` > 0 adds
a wait for more after the first item of an idle spell (it only helps traffic that arrives
spread out, and costs a lone request that long). ``max_items`` 1 switches batching off: the
worker does one request at a time (what a benchmark compares against: the same server, the
same one thread for the work, only the batching gone; until 2026-12-05 "off" ran each request
in its own thread, which on a CPU model mostly measured the cost of many OpenMP teams).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable, Hashable

log = logging.getLogger(__name__)


class Overloaded(RuntimeError):
    """More work is queued than the batcher takes (``max_queued``): refused at once, not queued."""


class ContinuousBatcher:
    """``run(key, payloads) -> results`` (one result per payload, in order) for the payloads
    that share a key, e.g. an embedding model id or a (champion, challenger) pair.

    ``max_queued`` (sizes, as ``n`` counts them) bounds what may wait: past it :meth:`submit`
    raises :class:`Overloaded`, so that a burst costs its excess a quick refusal instead of
    memory and a wait that would time out anyway (work is always taken when nothing waits)."""

    def __init__(self, run: Callable[[Hashable, list], list], max_items: int, window_s: float = 0.0,
                 name: str = "batcher", on_start: Callable[[], None] | None = None, max_queued: int | None = None):
        self.run, self.max_items, self.window_s, self.name = run, max(1, int(max_items)), float(window_s), name
        self.on_start = on_start  # run once in the worker thread before its first item
        self.max_queued = max_queued
        self._queued = 0  # sizes waiting in the queue
        self._queued_lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        self._worker: threading.Thread | None = None
        self._start_lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.max_items > 1

    @property
    def pending(self) -> int:
        """Requests waiting for the worker (not counting the ones it is doing)."""
        return self._queue.qsize()

    def submit(self, key: Hashable, payload: Any, n: int = 1, admitted: bool = False) -> Future:
        """A future of ``payload``'s result; ``n`` is its size against ``max_items``;
        ``admitted``: the rest of work already taken in (never refused as overload)."""
        fut: Future = Future()
        with self._queued_lock:
            if not admitted and self.max_queued is not None and self._queued and self._queued + n > self.max_queued:
                raise Overloaded(f"{self.name}: {self._queued} queued, at most {self.max_queued}")
            self._queued += n
        self._ensure_worker()
        self._queue.put((key, payload, n, fut))
        return fut

    def _took(self, item) -> None:
        with self._queued_lock:
            self._queued -= item[2]

    def _ensure_worker(self) -> None:
        if self._worker is not None and self._worker.is_alive():
            return
        with self._start_lock:
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._loop, name=self.name, daemon=True)
                self._worker.start()

    def _loop(self) -> None:
        if self.on_start is not None:
            try:
                self.on_start()
            except Exception:  # noqa: BLE001 -- a tuning step: the work goes on without it
                log.warning("%s: its start step failed; working without it", self.name, exc_info=True)
        while True:
            first = self._queue.get()
            self._took(first)
            group = [first]
            n = first[2]
            deadline = time.monotonic() + self.window_s
            while n < self.max_items:
                left = deadline - time.monotonic()
                try:  # what queued meanwhile at once; then wait out the window, if any
                    item = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                self._took(item)
                group.append(item)
                n += item[2]
            by_key: dict[Hashable, list] = {}
            for item in group:
                # a waiter that gave up (its request timed out or went away) costs no work; and a
                # future marked running can no longer be cancelled under the worker
                if item[3].set_running_or_notify_cancel():
                    by_key.setdefault(item[0], []).append(item)
            for key, items in by_key.items():
                self._run_group(key, items)

    def _run_group(self, key: Hashable, items: list) -> None:
        """Every future of ``items`` ends answered or failed, whatever ``run`` does."""
        try:
            results = self.run(key, [item[1] for item in items])
            if len(results) != len(items):
                raise RuntimeError(f"{self.name}: {len(results)} results for {len(items)} requests")
        except BaseException as exc:  # noqa: BLE001 -- every waiting request hears of it
            for item in items:
                item[3].set_exception(exc)
            return
        for item, result in zip(items, results):
            item[3].set_result(result)

def split_rows(rows, groups: list[list]) -> list:
    """``rows`` made for the concatenation of ``groups`` (one row per item), cut back into one
    slice per group, in order: how a batch's answer is handed back to its requests."""
    out, at = [], 0
    for g in groups:
        out.append(rows[at:at + len(g)])
        at += len(g)
    return out
