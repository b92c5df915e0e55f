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
"""

from __future__ import annotations

import threading
from typing import Any, Callable


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
