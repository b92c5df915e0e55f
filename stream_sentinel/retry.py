"""Every unit of work ends recorded exactly once: retried with backoff, or parked in sight.

A *unit* is what one run is asked to do: a raw-file micro-batch, a Kafka offset range, a
feedback file. Its durable record says whether it is done (the batch's files processed,
the range's offsets written, the file processed). Runs can still die without finishing
it: a SIGKILL of the worker, the whole machine going down, a poison value the code did not
foresee. Dagster's own run retries cover a crash or two, but once they are used up the
unit used to be forgotten (the sensor's cursor had moved past it) and the lag hid it.

The sensors ask :func:`decide` about every unit that is not done but was requested
before. The answer depends only on the unit's run history, so a replayed tick decides the
same, and the retry's run key (``<unit key>#<attempt>``) makes Dagster drop a duplicate.
After ``max_attempts`` failed runs the unit is *parked*: it shows in ``status``, in the
``units_not_parked`` asset check and in the sensor's skip message, and it is still tried
again every ``parked_retry_s``, so a fault that heals (a broker back, a disk freed) heals
the unit without a human.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from .store import Store

UNIT_TAG = "stream_sentinel/unit"


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 4  # failed runs before a unit is parked
    base_delay_s: float = 20.0  # wait after the first failure; doubles with each one
    max_delay_s: float = 300.0
    parked_retry_s: float = 900.0  # a parked unit is still tried this often


@dataclass(frozen=True)
class UnitHistory:
    """What the Dagster instance knows about the runs of one unit."""

    failed: int  # runs that ended without finishing the unit (failed, canceled, or done too early)
    active: int  # runs queued, starting, started or canceling
    last_end: float | None  # when the last failed run ended (epoch seconds)
    last_error: str = ""
    last_run_id: str = ""


@dataclass(frozen=True)
class Decision:
    action: str  # wait | retry | park
    run_key: str = ""  # for retry: the attempt's run key
    parked: bool = False  # past max_attempts (retry may still be true: a parked unit's slow retry)
    reason: str = ""


def backoff_s(failed: int, policy: RetryPolicy) -> float:
    if failed >= policy.max_attempts:
        return policy.parked_retry_s
    return min(policy.max_delay_s, policy.base_delay_s * 2 ** max(0, failed - 1))


def decide(unit_key: str, history: UnitHistory, policy: RetryPolicy, now: float) -> Decision:
    """What to do with a unit that is not done. A unit with a run in flight waits; a unit
    whose runs all failed is retried once its backoff has passed. Parked units are retried
    at the slow cadence, and the decision says they are parked either way."""
    parked = history.failed >= policy.max_attempts
    if history.active:
        return Decision("wait", parked=parked, reason="a run is in flight")
    if history.failed == 0:
        # requested, but no run exists: the request is being submitted, or a daemon killed
        # before saving its cursor re-requests it under the same key anyway
        return Decision("wait", reason="requested; no run yet")
    due_at = (history.last_end or 0.0) + backoff_s(history.failed, policy)
    if now < due_at:
        return Decision("wait", parked=parked,
                        reason=f"{history.failed} failed run(s); next try in {due_at - now:.0f} s")
    return Decision("retry", f"{unit_key}#{history.failed + 1}", parked=parked,
                    reason=f"attempt {history.failed + 1} after {history.failed} failed run(s)")


# ------------------------------------------------------------------ the parked list, for people


def record_parked(store: Store, kind: str, unit_key: str, history: UnitHistory) -> None:
    now = datetime.now(timezone.utc)
    with store.transaction(timeout_s=20) as con:
        con.execute(
            """INSERT INTO parked_units VALUES (?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT (unit_key) DO UPDATE SET attempts = excluded.attempts,
                 last_error = excluded.last_error, last_run_id = excluded.last_run_id,
                 updated_at = excluded.updated_at""",
            [unit_key, kind, history.failed, history.last_error[:2000], history.last_run_id, now, now])


def clear_parked(store: Store, unit_keys: list[str]) -> None:
    """Units that are done leave the parked list."""
    if not unit_keys:
        return
    with store.transaction(timeout_s=20) as con:
        con.executemany("DELETE FROM parked_units WHERE unit_key = ?", [[k] for k in unit_keys])


def parked(store: Store, kind: str | None = None) -> list[dict]:
    with store.connect(timeout_s=20) as con:
        rows = con.execute(
            """SELECT unit_key, kind, attempts, last_error, last_run_id, parked_at, updated_at FROM parked_units
               WHERE ? IS NULL OR kind = ? ORDER BY parked_at""", [kind, kind]).fetchall()
    cols = ["unit_key", "kind", "attempts", "last_error", "last_run_id", "parked_at", "updated_at"]
    return [dict(zip(cols, r)) for r in rows]
