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


def _cpus_of(tid: int) -> set[int]:
    with open(f"/proc/self/task/{tid}/status") as f:
        line = next(x for x in f if x.startswith("Cpus_allowed_list:"))
    out: set[int] = set()
    for part in line.split(":", 1)[1].strip().split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def test_a_model_thread_and_its_openmp_worker_are_pinned_one_per_cpu_and_its_children_spread_again():
    """The scheduler may stack a model's two OpenMP threads on one CPU (openmp.py); pinned, they
    cannot. Done in a thread of its own, as the servers' model threads do it: nothing else is pinned."""
    import torch

    from stream_sentinel.openmp import pin_team, spread

    allowed = os.sched_getaffinity(0)
    if len(allowed) < 2:
        pytest.fail("this test needs at least 2 CPUs (one OpenMP worker to pin)")
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    want = (a @ b).sum().item()

    def in_model_thread():
        # a team of 2 (LightGBM's num_threads=1 in an earlier test may have set this process's default to 1)
        before = torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            return pinned_in_this_thread()
        finally:
            torch.set_num_threads(before)

    def pinned_in_this_thread():
        pinned = pin_team()
        me = _cpus_of(threading.get_native_id())
        workers = {tid: _cpus_of(tid) for tid, _ in pinned[1:]}
        threads = _threads()
        got = (a @ b).sum().item()  # the team still computes, on the threads it pinned
        assert _threads() == threads  # no new team: torch ran on the pinned one
        child: dict = {}

        def started_by_pinned_thread():
            child["inherited"] = os.sched_getaffinity(0)
            spread()
            child["spread"] = os.sched_getaffinity(0)

        t = threading.Thread(target=started_by_pinned_thread)
        t.start()
        t.join()
        return pinned, me, workers, got, child

    pinned, me, workers, got, child = in_own_thread(in_model_thread)
    assert pinned is not None and len(pinned) == 2
    cpus = [cpu for _, cpu in pinned]
    assert len(set(cpus)) == min(len(cpus), len(allowed)) and set(cpus) <= allowed  # one CPU each
    assert me == {cpus[0]} and all(workers[tid] == {cpu} for tid, cpu in pinned[1:])
    assert got == pytest.approx(want, rel=1e-4)
    assert child["inherited"] == {cpus[0]} and child["spread"] == allowed
    assert os.sched_getaffinity(0) == allowed  # the test's own thread was never pinned


def test_a_model_thread_is_pinned_once_and_only_when_its_model_is_compiled():
    from stream_sentinel.openmp import TeamPinning

    def model_thread(pinning: TeamPinning) -> list:
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(2)
        seen = []
        try:
            for compiled in (False, False, True, True):
                pinning.after_call(compiled)
                seen.append((pinning.cpus, os.sched_getaffinity(0)))
        finally:
            torch.set_num_threads(before)
        return seen

    allowed = os.sched_getaffinity(0)
    seen = in_own_thread(model_thread, TeamPinning(True, "test"))
    assert [cpus for cpus, _ in seen[:2]] == [None, None] and seen[0][1] == allowed  # eager: left alone
    cpus = seen[2][0]
    assert cpus is not None and len(set(cpus)) == 2 and seen[2][1] == {cpus[0]} and seen[3] == seen[2]
    off = in_own_thread(model_thread, TeamPinning(False, "test"))
    assert all(cpus is None and mask == allowed for cpus, mask in off)  # STREAM_SENTINEL_EMBED_PIN_THREADS=0


def test_a_failed_pinning_leaves_no_member_of_the_team_pinned(monkeypatch):
    """If one member cannot pin itself, the others are freed again (not only the caller)."""
    import torch

    from stream_sentinel import openmp

    allowed = os.sched_getaffinity(0)
    real = os.sched_setaffinity

    def refuse_the_first_cpu(pid, mask):  # the caller's: its worker pins itself, then must be freed
        if mask == {sorted(allowed)[0]}:
            raise OSError(22, "refused")
        real(pid, mask)

    monkeypatch.setattr(os, "sched_setaffinity", refuse_the_first_cpu)

    def model_thread():
        before = torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            pinned = openmp.pin_team()
            threads = {int(t) for t in os.listdir("/proc/self/task")}
            return pinned, {tid: _cpus_of(tid) for tid in threads}
        finally:
            torch.set_num_threads(before)

    pinned, masks = in_own_thread(model_thread)
    assert pinned is None
    assert all(mask == allowed for mask in masks.values()), masks  # the worker that did pin is free again
