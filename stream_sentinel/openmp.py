"""One OpenMP team per long-lived process: how a server keeps its model fast beside other native code.

GNU OpenMP (libgomp; torch, LightGBM and the kernels ``torch.compile`` builds share one copy
of it in a process, FAISS ships its own) keeps a team of worker threads for every thread that
has run a parallel region, for as long as that thread lives. Once one copy manages more
threads than the process may use CPUs, the workers of *every* team stop spinning between
parallel regions and sleep instead (libgomp's throttled spin count), and waking them for each
of a transformer's many small parallel regions costs the model much of its second core.
Measured on 2 cores (AMD EPYC, 2026-12-05, ``bench/serving.py`` texts):

* an idle team left in another thread by one LightGBM model load took one 20-40 token text
  from 5.2 to 9.2 ms on the compiled embedder;
* an idle torch team in another thread took an eager batch of 16 texts from 255 to 195
  texts/s (1.98 to 1.45 cores busy);
* the embedding server, which ran the model in a new thread per connection, answered one
  text in 11 ms end to end through the API, and in 7.4 ms with one model thread.

So a server runs its model in one thread (``batching.ContinuousBatcher``), and whatever else
may start a team runs in a thread that ends with it (:func:`in_own_thread`: a thread's team
is released when it exits) or on one thread (:func:`faiss_one_thread`, LightGBM's
``num_threads=1``). Batch jobs (a Dagster run) run everything in one thread and are unaffected.

And once its model is compiled, a server's model thread and its team are pinned one per CPU
(:func:`pin_team`, :class:`TeamPinning`): left to the scheduler, the two were at times stacked
on one CPU, taking turns, while the other CPU idled (measured below).
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

log = logging.getLogger(__name__)


def in_own_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` in a new thread that ends with it (its OpenMP teams end too);
    its result or its exception, in the caller."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 -- raised again in the caller
            out["error"] = exc

    t = threading.Thread(target=run, name=f"own-{getattr(fn, '__name__', 'call')}", daemon=True)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def faiss_one_thread() -> None:
    """FAISS on one thread in the calling thread (its OpenMP setting is per thread). A server's
    searches are one query or a few records: threads gain them nothing, and their idle workers
    spin after each call beside the model's."""
    import faiss

    faiss.omp_set_num_threads(1)


# ---------------------------------------------------------------------- pinning a model's team
#
# Why: on 2 vCPUs (AMD EPYC VM, 2026-12-05) about 3 % of one-query embeddings in the API took
# 11-20 ms against a p99 of 5 ms in a process of their own. `perf sched timehist` showed why:
# after a wake-up the scheduler had put the model's thread and its OpenMP worker on the same
# CPU, where they took turns in 4 ms slices (each spinning at a barrier for the other) while
# the other CPU stood idle for 10-15 ms. Pinned one per CPU they cannot share one: dense search
# p50 7.2 -> 5.9 ms and p99 21-24 -> 11-12 ms in one run (bench/serving_search.py's queries).
# Only the long-lived servers' model threads are pinned (STREAM_SENTINEL_EMBED_PIN_THREADS);
# a thread they start afterwards takes the process's CPUs back (:func:`spread`).

_process_cpus: frozenset[int] | None = None  # the CPUs before anything was pinned


def _torch_libgomp():
    """The GNU OpenMP library torch's kernels run on, or None.

    By soname, already loaded (``RTLD_NOLOAD``): torch's wheel brings a ``libgomp.so.1``, but
    when another library loaded one first (LightGBM imported before torch), the dynamic linker
    gives torch that one. Checked against what ``libtorch_cpu`` itself resolves
    ``omp_get_thread_num`` to, so that a torch on another runtime (a renamed copy, Intel's) is
    never pinned through a library it does not use."""
    import ctypes
    import os
    from pathlib import Path

    import torch

    mode = os.RTLD_NOLOAD | os.RTLD_LAZY
    try:
        gomp = ctypes.CDLL("libgomp.so.1", mode=mode)
        torch_cpu = ctypes.CDLL(str(Path(torch.__file__).resolve().parent / "lib" / "libtorch_cpu.so"), mode=mode)
        same = (ctypes.cast(gomp.omp_get_thread_num, ctypes.c_void_p).value
                == ctypes.cast(torch_cpu.omp_get_thread_num, ctypes.c_void_p).value)
    except (OSError, AttributeError):
        return None
    return gomp if same else None


def _in_each_member(gomp, n: int, fn: Callable[[int], None]) -> list[BaseException]:
    """``fn(thread number)`` in every member of the calling thread's team of ``n`` (one
    parallel region through ctypes); the exceptions raised, which ctypes would only print."""
    import ctypes

    errors: list[BaseException] = []

    def member(_data) -> None:
        try:
            fn(gomp.omp_get_thread_num())
        except BaseException as exc:  # noqa: BLE001 -- handed back to the caller
            errors.append(exc)

    callback = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(member)  # alive until the region ends
    gomp.GOMP_parallel(callback, None, ctypes.c_uint(n), ctypes.c_uint(0))
    return errors


def pin_team() -> list[tuple[int, int]] | None:
    """Pin the calling thread and each worker of its torch OpenMP team to a CPU of its own.

    Runs one empty parallel region of torch's team size (GOMP_PARALLEL through ctypes) in which
    every member pins itself; later regions reuse the same threads in the same order. Returns
    ``[(native thread id, cpu)]`` in team order, or None where it cannot, and then nothing is
    left pinned: not Linux, fewer than two CPUs or threads, more threads than CPUs (two would
    share one for good), torch not on GNU OpenMP."""
    import os

    global _process_cpus
    if not hasattr(os, "sched_setaffinity"):
        return None
    import torch

    cpus = sorted(os.sched_getaffinity(0))
    n = torch.get_num_threads()
    if n < 2 or n > len(cpus):
        return None
    gomp = _torch_libgomp()
    if gomp is None:
        return None
    if _process_cpus is None:
        _process_cpus = frozenset(cpus)
    pinned: list = [None] * n

    def pin(i: int) -> None:
        os.sched_setaffinity(0, {cpus[i]})
        pinned[i] = (threading.get_native_id(), cpus[i])

    if _in_each_member(gomp, n, pin) or not all(pinned):
        _in_each_member(gomp, n, lambda i: spread())  # every member free again, not only the caller
        return None
    return pinned


def spread() -> None:
    """The calling thread back on every CPU the process had before anything was pinned (a
    thread inherits its parent's CPUs: one started by a pinned model thread would otherwise
    share its one CPU). Never raises: a tuning step."""
    import os

    if _process_cpus is not None:
        try:
            os.sched_setaffinity(0, _process_cpus)
        except OSError as exc:  # e.g. the cpuset shrank meanwhile
            log.warning("could not spread a thread over CPUs %s: %s", sorted(_process_cpus), exc)


class TeamPinning:
    """Pins a model thread's team once, when the model it runs is compiled (the fast path the
    servers keep; nothing is pinned while they serve eager)."""

    def __init__(self, enabled: bool, name: str, report: Callable[[str], None] | None = None):
        self.enabled, self.name, self.done = enabled, name, False
        self.report = report or log.info  # where the outcome is told (a server's own stderr log)
        self.cpus: list[int] | None = None  # the team's CPUs, in team order, once pinned

    @property
    def pending(self) -> bool:
        """Whether a call may still pin (on, and not tried yet): what to ask before working out
        whether the model is compiled."""
        return self.enabled and not self.done

    def after_call(self, compiled: bool) -> None:
        """Called by the model thread after each model call."""
        if not self.enabled or self.done or not compiled:
            return
        self.done = True
        try:
            pinned = pin_team()
        except Exception:  # noqa: BLE001 -- a tuning step: the model runs as it did
            log.warning("%s: pinning the model's threads failed; they stay unpinned", self.name, exc_info=True)
            return
        if pinned is not None:
            self.cpus = [cpu for _, cpu in pinned]
        try:
            self.report(f"{self.name}: model threads pinned one per CPU (CPUs {self.cpus})" if pinned is not None
                        else f"{self.name}: model threads not pinned (one CPU, one thread, more threads than "
                        "CPUs, or torch not on GNU OpenMP)")
        except Exception:  # noqa: BLE001 -- telling must not fail the model call it follows
            log.debug("could not report the pinning", exc_info=True)
