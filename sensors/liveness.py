"""run_liveness_sensor: a run whose worker process is gone is failed, so nothing waits on it.

Dagster's default run launcher cannot tell whether a run's worker still lives (its run
monitoring only times out runs that never start, or that exceed ``dagster/max_runtime``).
After a SIGKILL of the whole stack, a run killed mid-step stays STARTED forever and, with
one run at a time, every queued run waits behind it. This sensor finds such runs, marks
them failed with a message that says why, and so frees the queue; the failed run is then
retried by Dagster (ingest runs: ``dagster/max_retries``) or by the sensor that owns its
unit (:mod:`stream_sentinel.sensors.units`), never silently dropped.

A run names its worker in the tag ``stream_sentinel/worker`` (host, boot id, pid and the
process's start time, set when its first resource starts); a run that died before that is
judged by Dagster's "Started process for run (pid: N)" event and that process's start
time. Runs on another host are left alone: only that host can tell.
"""

from __future__ import annotations

import time

import dagster as dg

from stream_sentinel import procs
from stream_sentinel.resources.sentinel import WORKER_TAG

LIVENESS_INTERVAL_S = 10
# a launched run's worker reports "Started process for run (pid)" within seconds; a run still
# STARTING without that after this long was launched into a code server that died
LOST_LAUNCH_S = 45.0


def _event_pid_alive(instance: dg.DagsterInstance, run_id: str) -> bool | None:
    for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT):
        data = entry.dagster_event.engine_event_data if entry.dagster_event else None
        pid = data.metadata.get("pid") if data and data.metadata else None
        if pid is None:
            continue
        pid_value = int(getattr(pid, "value", pid))
        started = procs.started_at(pid_value)
        # a process with that pid started after the event is another process
        return started is not None and started <= entry.timestamp + 2.0
    return None


def worker_alive(instance: dg.DagsterInstance, run: dg.DagsterRun) -> bool | None:
    """True/False when this host can tell, None when it cannot (yet)."""
    ident = run.tags.get(WORKER_TAG)
    if ident:
        return procs.alive(ident)
    return _event_pid_alive(instance, run.run_id)


def reap_orphaned_runs(instance: dg.DagsterInstance, now: float | None = None) -> list[str]:
    """Mark runs whose worker is gone as failed; returns their run ids. A STARTED run whose
    worker died; a STARTING run whose worker started and died, or that has not reported a
    worker after ``LOST_LAUNCH_S`` (its launch went to a code server killed with the stack)."""
    now = time.time() if now is None else now
    reaped = []
    statuses = [dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING]
    for rec in instance.get_run_records(filters=dg.RunsFilter(statuses=statuses)):
        run = rec.dagster_run
        alive = worker_alive(instance, run)
        if alive is None and run.status == dg.DagsterRunStatus.STARTING:
            lost = now - rec.update_timestamp.timestamp() > LOST_LAUNCH_S
            why = f"The run was launched but no worker process reported in {LOST_LAUNCH_S:.0f} s (its code " \
                  "server was killed, or the machine restarted)"
        else:
            lost = alive is False
            why = "The run's worker process is gone (killed, or the machine restarted) while the run was in progress"
        if not lost:
            continue
        fresh = instance.get_run_by_id(run.run_id)  # it may have moved on while we looked
        if fresh is None or fresh.status != run.status:
            continue
        instance.report_run_failed(fresh, message=f"{why}; marked failed by run_liveness_sensor so queued runs can "
                                   "start. Its work is retried.")
        reaped.append(run.run_id)
    return reaped


def build_run_liveness_sensor() -> dg.SensorDefinition:
    @dg.sensor(name="run_liveness_sensor", minimum_interval_seconds=LIVENESS_INTERVAL_S,
               default_status=dg.DefaultSensorStatus.RUNNING,
               description="Fails runs whose worker process died (SIGKILL, crash, restart), so the run queue "
               "never waits on a dead run; their work is retried.")
    def run_liveness_sensor(context: dg.SensorEvaluationContext):
        reaped = reap_orphaned_runs(context.instance)
        if reaped:
            context.log.warning(f"marked {len(reaped)} orphaned run(s) failed: {', '.join(reaped)}")
            return dg.SkipReason(f"marked {len(reaped)} run(s) whose worker died as failed: {', '.join(reaped)}")
        return dg.SkipReason("every started run has a live worker")

    return run_liveness_sensor
