"""Facts one step of a run hands to a later step of the same run (table ``run_facts``).

A step must learn what an earlier step of *its own run* produced (the training set the
model step trains on, the candidate the champion step promotes), never "the latest
materialization" of that asset: another run may have materialized it since, and a fresh
instance has none. A retried run re-executes only the failed steps under a new run id, so
readers look the fact up along the run's lineage (itself, its parent, its root).
"""

from __future__ import annotations

from .store import Store


def put(store: Store, run_id: str, fact: str, value: str) -> None:
    with store.transaction() as con:
        con.execute("INSERT OR REPLACE INTO run_facts VALUES (?, ?, ?)", [run_id, fact, value])


def get(store: Store, run_ids: list[str | None], fact: str) -> str | None:
    """The fact from the first run of ``run_ids`` (own run first, then its ancestors) that has it."""
    ids = [r for r in run_ids if r]
    if not ids:
        return None
    with store.connect() as con:
        found = dict(con.execute("SELECT run_id, value FROM run_facts WHERE fact = ? AND run_id IN (SELECT unnest(?))",
                                 [fact, ids]).fetchall())
    return next((found[r] for r in ids if r in found), None)
