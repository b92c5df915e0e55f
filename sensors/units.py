"""Retries of unfinished units, shared by the sensors that request them.

The policy is the library's (:mod:`stream_sentinel.retry`); this module reads each unit's
run history from the Dagster instance (runs carry the tag ``stream_sentinel/unit``) and
turns retry decisions into run requests. Dagster's own run retries still retry a crashed
run at once; what this adds is the end of the story: a unit is never forgotten once those
are used up, and one that keeps failing is parked where people look.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable, TypeVar

import dagster as dg

from stream_sentinel import retry
from stream_sentinel.store import Store

U = TypeVar("U")

ACTIVE = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
          dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]
# asked only about units that are not done: a run that ended, even "successfully", did not
# finish it (a step skipped, a bug) and counts as a failed attempt
ENDED = (dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED, dg.DagsterRunStatus.SUCCESS)


def skip_while_busy(evaluate):
    """A sensor evaluation that meets a held metrics.duckdb (``StoreBusy``: a run is writing
    it) skips this tick and looks again at the next, the same way in every sensor."""
    import functools

    from stream_sentinel.store import StoreBusy

    @functools.wraps(evaluate)
    def wrapper(*args, **kwargs):
        try:
            return evaluate(*args, **kwargs)
        except StoreBusy:
            return dg.SkipReason("metrics.duckdb is held by a running step; will look again next tick")
    return wrapper


def run_waiting(instance: dg.DagsterInstance | None, job_name: str) -> bool:
    """True while a run of ``job_name`` is queued but not started. New work then waits and
    joins the next, larger run instead of queueing one small run per tick behind it (each
    run pays a process start, and a queued run will read the newest data when it starts)."""
    if instance is None:
        return False
    waiting = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED]
    return bool(instance.get_run_records(filters=dg.RunsFilter(job_name=job_name, statuses=waiting), limit=1))


def unit_history(instance: dg.DagsterInstance, unit_key: str, with_error: bool = False) -> retry.UnitHistory:
    """The unit's runs; ``with_error`` also reads the last failed run's error from its event log
    (only needed when the unit is parked, so a tick does not read event logs it will not use)."""
    records = instance.get_run_records(filters=dg.RunsFilter(tags={retry.UNIT_TAG: unit_key}), limit=100)
    failed = [r for r in records if r.dagster_run.status in ENDED]
    active = [r for r in records if r.dagster_run.status in ACTIVE]
    last = max(failed, key=lambda r: r.end_time or r.update_timestamp.timestamp(), default=None)
    error = ""
    if with_error and last is not None:  # the step's exception says most; the run's failure message otherwise
        kinds = {dg.DagsterEventType.STEP_FAILURE, dg.DagsterEventType.RUN_FAILURE}
        for entry in instance.all_logs(last.dagster_run.run_id, of_type=kinds):
            event = entry.dagster_event
            data = event.step_failure_data if event and event.is_step_failure else None
            if data is not None and data.error is not None:
                err = data.error
                while err.cause is not None:  # Dagster's wrapper first, the user's exception last
                    err = err.cause
                error = err.message.strip()
                break
            error = error or entry.message or ""
    return retry.UnitHistory(
        failed=len(failed), active=len(active),
        last_end=(last.end_time or last.update_timestamp.timestamp()) if last else None,
        last_error=error, last_run_id=last.dagster_run.run_id if last else "")


def retry_requests(instance: dg.DagsterInstance | None, store: Store, kind: str, units: Iterable[U],
                   key_of: Callable[[U], str], request_for: Callable[[U, str], dg.RunRequest],
                   policy: retry.RetryPolicy | None = None, now: float | None = None,
                   ) -> tuple[list[dg.RunRequest], list[str]]:
    """Run requests for the unfinished, already requested ``units`` that are due for another
    try, and notes for the tick's message. Parked units are recorded in ``parked_units``;
    units of this kind no longer unfinished leave it."""
    policy = policy or retry.RetryPolicy()
    now = time.time() if now is None else now
    units = list(units)
    requests: list[dg.RunRequest] = []
    notes: list[str] = []
    open_keys = {key_of(u) for u in units}
    done = [p["unit_key"] for p in retry.parked(store, kind) if p["unit_key"] not in open_keys]
    retry.clear_parked(store, done)
    if instance is None:
        return requests, notes
    parked = 0
    for unit in units:
        key = key_of(unit)
        history = unit_history(instance, key)
        decision = retry.decide(key, history, policy, now)
        if decision.parked:
            parked += 1
            retry.record_parked(store, kind, key, unit_history(instance, key, with_error=True))
        if decision.action == "retry":
            requests.append(request_for(unit, decision.run_key))
            if history.failed:
                notes.append(f"{key}: {decision.reason}")
    if parked:
        notes.append(f"{parked} {kind} unit(s) parked after {policy.max_attempts} failed runs "
                     "(see `stream-sentinel status`); still retried every "
                     f"{policy.parked_retry_s / 60:.0f} min")
    return requests, notes
