"""What keeps a long-lived server's tail short: work that starts an OpenMP team runs in a thread
that ends with it, so the embedder's team is the only one the process keeps (openmp.py), and the
heap is collected and frozen when a new version is loaded (serving/app.py)."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

from stream_sentinel.openmp import in_own_thread


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def test_in_own_thread_gives_the_result_or_the_exception_in_the_caller():
    assert in_own_thread(lambda a, b=0: (threading.current_thread().name, a + b), 2, b=3) == ("own-<lambda>", 5)
    with pytest.raises(KeyError, match="gone"):
        in_own_thread(lambda: {}["gone"])


def test_a_model_loaded_in_its_own_thread_leaves_no_openmp_team_behind(tmp_path):
    import lightgbm as lgb

    if (os.cpu_count() or 1) < 2:
        pytest.fail("this test needs at least 2 CPUs (one OpenMP worker per team to count)")
    rng = np.random.default_rng(0)
    X = rng.normal(size=(3000, 20))
    model = tmp_path / "model.txt"
    lgb.train({"verbose": -1, "num_threads": 1}, lgb.Dataset(X, (X[:, 0] > 0).astype(int)), 200).save_model(model)

    before = _threads()
    booster, during = in_own_thread(lambda: (lgb.Booster(model_file=str(model)), _threads()))
    assert booster.num_trees() == 200 and during >= before + 1  # it ran in a thread of its own
    # that thread is gone, and the OpenMP team LightGBM may have started in it with it (libgomp
    # lets a team's workers go as their thread exits, a moment later)
    deadline = time.monotonic() + 10
    while _threads() > before:
        assert time.monotonic() < deadline, f"{_threads() - before} thread(s) left behind"
        time.sleep(0.05)


def test_settling_the_heap_frees_old_cycles_then_freezes_what_lives():
    """The API settles its heap whenever it loads a new version (serving/app.py: a full
    collection over a frozen heap is short); an old version in a reference cycle must still be
    freed at the next settle, or every index swap would leak the previous index."""
    import gc
    import weakref

    from stream_sentinel.serving.app import settle_heap

    class Node:
        pass

    def cycle() -> Node:
        n = Node()
        n.self = n
        return n

    garbage = weakref.ref(cycle())  # unreachable already: collected, not frozen
    held = [cycle()]  # alive now: frozen with the rest
    old = weakref.ref(held[0])
    try:
        settle_heap()
        assert garbage() is None and gc.get_freeze_count() > 0
        held.clear()  # the old version is dropped while frozen: a full collection skips it...
        gc.collect()
        assert old() is not None
        settle_heap()  # ...the next settle unfreezes first, so it goes
        assert old() is None
    finally:
        gc.unfreeze()
