"""Erasing records: every copy removed, the models trained on them withdrawn, an audit row kept.

The steps, for a set of record ids (each named by its keyed hash from here on):

1. **Register** each in ``erasures`` (status ``running``). From then on ingest refuses a record
   with that id (reject rule ``erased``).
2. **Plan** once: what the record's rows point at that will be gone after the delete (its
   vec_id, its days, the model versions whose training set held it and their incremental
   descendants, the drift reports whose window or reference held it), and how many rows each
   table holds. The plan is saved in the row, without the id, so a rerun after a crash
   finishes the same work.
3. **Models**: the planned versions are marked ``tainted_by`` (never served, promoted or rolled
   back to). A tainted champion is withdrawn at once: the newest untainted earlier champion
   serves again, or none does (the API answers 503) until the retrain (``retrain_needed``,
   cause ``erasure``) is promoted through the usual gate.
4. **Rows**, in one transaction: the record, its embeddings (every model), label, predictions,
   served answers, training-set rows, window state and values (the later records of its keys
   are recomputed without it), rejects; its feedback votes become tombstones (same Kafka or
   file offset, no id, label or source: exactly-once still holds), dead-letter rows lose the
   payload; drift reports that held it lose their HTML.
5. **Files**: a new index version without it, and every older version holding its vector
   deleted; raw and quarantined record files rewritten without it; its lines in the feedback
   and prediction logs blanked in place; drift reference caches and linear-state caches
   dropped; tainted model folders deleted (``STREAM_SENTINEL_ERASURE_TAINTED_MODELS``).
6. **Done**: counts per place in the row, ``completed``; then the DuckDB file is rewritten so
   deleted rows leave no bytes behind (``compact``).

Every step is idempotent (a delete of what is already gone, a rewrite of a file that no longer
holds it), so a run killed anywhere and run again completes each erasure exactly once.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

from ..atomic import pause_point, write_bytes_atomic
from ..config import Paths
from ..store import Store
from . import files
from .keys import IdHasher
from .requests import Request

log = logging.getLogger(__name__)

# tables whose rows name the record by record_id, deleted outright
_BY_RECORD_ID = ("embeddings", "labels", "predictions", "served_predictions", "training_set_rows", "rejects",
                 "window_features", "window_events")


@dataclass
class Outcome:
    id_hash: str
    status: str  # completed | already_erased
    counts: dict = field(default_factory=dict)
    tainted: list = field(default_factory=list)
    withdrawn: str | None = None  # the champion taken out of service
    serving: str | None = None  # the champion afterwards (None: none until a retrain is promoted)
    retrain_needed: bool = False

    def short(self) -> str:
        return self.id_hash[:16]


@dataclass
class Result:
    outcomes: list[Outcome]
    seconds: float = 0.0
    db_bytes: int | None = None

    @property
    def retrain_needed(self) -> bool:
        return any(o.retrain_needed for o in self.outcomes)

    def totals(self) -> dict:
        out: dict = {}
        for o in self.outcomes:
            for k, v in o.counts.items():
                out[k] = out.get(k, 0) + v
        return out


def _now() -> datetime:
    return datetime.now(timezone.utc)


def erased_hashes(con) -> set[str]:
    """Hashes of ids that ingest refuses (erased and not lifted)."""
    return {r[0] for r in con.execute("SELECT id_hash FROM erasures WHERE lifted_at IS NULL").fetchall()}


# ------------------------------------------------------------------ the operation
def erase(paths: Paths, store: Store, requests: list[Request], *, keep_backups: int = 3,
          tainted_models: str = "delete", index_options: dict | None = None) -> Result:
    """``index_options``: ``pipeline.update_index``'s rebuild settings (rebuild_ratio,
    ivf_threshold, nprobe), so that a rebuild after an erasure makes the index the settings ask for."""
    started = time.perf_counter()
    hasher = IdHasher.for_root(paths.home)
    todo: dict[str, Request] = {}
    outcomes: dict[str, Outcome] = {}
    for req in requests:
        h = hasher(req.record_id)
        if h in outcomes:
            continue
        with store.transaction() as con:
            row = con.execute("SELECT status, lifted_at FROM erasures WHERE id_hash = ?", [h]).fetchall()
            if row and row[0][0] == "completed" and row[0][1] is None:
                counts = con.execute("SELECT counts FROM erasures WHERE id_hash = ?", [h]).fetchall()[0][0]
                outcomes[h] = Outcome(h, "already_erased", json.loads(counts or "{}"))
                continue
            if row:  # running (a retry), or lifted and now erased again
                con.execute("""UPDATE erasures SET status = 'running', lifted_at = NULL,
                               reason = coalesce(nullif(?, ''), reason) WHERE id_hash = ?""", [req.reason, h])
                if row[0][0] == "completed":
                    con.execute("UPDATE erasures SET plan = NULL, counts = NULL, started_at = ? WHERE id_hash = ?",
                                [_now(), h])
            else:
                con.execute("""INSERT INTO erasures (id_hash, reason, status, requested_at, started_at)
                               VALUES (?, ?, 'running', ?, ?)""", [h, req.reason, req.requested_at, _now()])
        todo[h] = req
        outcomes[h] = Outcome(h, "completed")
    if todo:
        plans = {h: _plan(store, h, req.record_id) for h, req in todo.items()}
        pause_point("erasure.after_plan")
        _models(paths, store, plans, outcomes)
        pause_point("erasure.after_models")
        _rows(store, plans, todo)
        pause_point("erasure.after_rows")
        _windows(store)
        _index(paths, store, plans, keep_backups, index_options or {})
        pause_point("erasure.after_index")
        _files(paths, store, plans, todo)
        pause_point("erasure.after_files")
        _caches(paths, plans, tainted_models, store)
        with store.transaction() as con:
            for h, plan in plans.items():
                o = outcomes[h]
                o.counts = plan["counts"]
                o.tainted = plan["versions"]
                con.execute("""UPDATE erasures SET status = 'completed', completed_at = ?, counts = ?, plan = NULL,
                               retrain_needed = ? WHERE id_hash = ?""",
                            [_now(), json.dumps(o.counts, sort_keys=True), o.retrain_needed, h])
        pause_point("erasure.before_compact")
    from .compact import compact

    # also when every request was done already: a run killed after the last commit left the
    # file uncompacted (and its request file, which is why this run has it)
    db_bytes = compact(store) if requests else None
    return Result(list(outcomes.values()), time.perf_counter() - started, db_bytes)


# ------------------------------------------------------------------ 2. plan
def _plan(store: Store, h: str, rid: str) -> dict:
    """What this erasure removes, read once and saved (without the id): a rerun after the rows
    are gone still knows the vec_ids, versions and reports."""
    with store.transaction() as con:
        saved = con.execute("SELECT plan FROM erasures WHERE id_hash = ?", [h]).fetchall()[0][0]
        if saved:
            return json.loads(saved)
        rec = con.execute("""SELECT vec_id, CAST(arrival_date AS VARCHAR), CAST(CAST(event_time AS DATE) AS VARCHAR)
                             FROM records WHERE id = ?""", [rid]).fetchall()
        vec_ids = sorted({r[0] for r in con.execute("SELECT vec_id FROM embeddings WHERE record_id = ?",
                                                    [rid]).fetchall()} | ({rec[0][0]} if rec else set()))
        days = sorted(set(rec[0][1:])) if rec else []
        direct = [r[0] for r in con.execute(
            """SELECT DISTINCT m.version FROM model_versions m JOIN training_set_rows t
               ON t.data_version = m.training_set_version WHERE t.record_id = ?""", [rid]).fetchall()]
        versions = _with_descendants(con, direct)
        reports = _reports_holding(con, vec_ids, days, versions)
        counts = {t: con.execute(f"SELECT count(*) FROM {t} WHERE record_id = ?", [rid]).fetchall()[0][0]
                  for t in _BY_RECORD_ID}
        counts["records"] = len(rec)
        counts["feedback_events"] = con.execute("SELECT count(*) FROM feedback_events WHERE record_id = ?",
                                                [rid]).fetchall()[0][0]
        counts["model_versions_tainted"] = len(versions)
        counts["drift_reports"] = len(reports)
        plan = {"vec_ids": vec_ids, "days": days, "versions": versions, "reports": reports, "counts": counts}
        con.execute("UPDATE erasures SET plan = ? WHERE id_hash = ?", [json.dumps(plan), h])
    return plan


def _with_descendants(con, versions: list[str]) -> list[str]:
    """The versions and every version continued from them (incremental training keeps a
    parent's trees, so what the parent learned from the record is in them too)."""
    out, frontier = set(versions), list(versions)
    while frontier:
        kids = [r[0] for r in con.execute(
            """SELECT version FROM model_versions WHERE parent_version IN (SELECT unnest(?))
               AND strategy = 'incremental'""", [frontier]).fetchall()]
        frontier = [k for k in kids if k not in out]
        out.update(frontier)
    return sorted(out)


def _reports_holding(con, vec_ids: list[int], days: list[str], versions: list[str]) -> list[str]:
    """Drift reports whose window (a day, a time range, a vec_id range) or reference (a tainted
    version's training set) may hold the record: their HTML goes."""
    out = []
    for key, kind, start, end, version, path in con.execute(
            """SELECT window_key, kind, start, "end", model_version, report_path FROM drift_reports
               WHERE report_path IS NOT NULL""").fetchall():
        hit = version in versions
        if not hit and kind == "recent":
            try:
                hit = any(int(start) <= v <= int(end) for v in vec_ids)
            except ValueError:
                hit = True
        elif not hit:
            hit = any(str(start)[:10] <= d <= str(end)[:10] for d in days)
        if hit:
            out.append(key)
    return out


# ------------------------------------------------------------------ 3. models
def _models(paths: Paths, store: Store, plans: dict, outcomes: dict) -> None:
    from ..learning.registry import ModelRegistry

    registry = ModelRegistry(paths.models, store)
    tainted = {v for p in plans.values() for v in p["versions"]}
    if registry.challenger_pointer() in tainted:
        registry.point_challenger(None)  # it stops answering before anything else changes
    for h, plan in plans.items():
        if plan["versions"]:
            with store.transaction() as con:
                con.execute("""UPDATE model_versions SET tainted_by = coalesce(tainted_by, ?)
                               WHERE version IN (SELECT unnest(?))""", [h[:16], plan["versions"]])
    for version in tainted:  # its pointer went first (above); the status follows
        registry.retire_challenger(version, "trained on an erased record")
    champion = registry.champion_version()
    with store.connect() as con:
        # a rerun after the withdrawal: the champion it left is not tainted, but the retrain is owed
        owed = con.execute("""SELECT count(*) FROM model_versions WHERE tainted_by IN (SELECT unnest(?))
                              AND promoted_at IS NOT NULL""", [[h[:16] for h in plans]]).fetchall()[0][0]
    if champion is not None and champion not in tainted:
        for h, plan in plans.items():
            outcomes[h].serving = champion
            outcomes[h].withdrawn = plan.get("withdrawn")  # by an earlier, interrupted run of it
            outcomes[h].retrain_needed = bool(owed) and bool(plan["versions"])
        return
    if champion is None and not owed:
        return
    replacement = _untainted_champion(store, paths) if champion is not None else None
    why = "the champion was trained on an erased record"
    if replacement is not None:
        registry.promote(replacement, None, f"{why} ({champion})", event_type="rollback")
    elif champion is not None:
        from ..learning.registry import POINTER

        (paths.models / POINTER).unlink(missing_ok=True)
        registry.reconcile()
        registry.event("withdrawn", champion, reason=why)
    for h, plan in plans.items():
        outcomes[h].withdrawn = champion or plan.get("withdrawn")
        outcomes[h].serving = replacement
        outcomes[h].retrain_needed = True
        if champion is not None:
            plan["withdrawn"] = champion
            plan["counts"]["champion_withdrawn"] = 1
            with store.transaction() as con:  # a rerun reports it too
                con.execute("UPDATE erasures SET plan = ? WHERE id_hash = ?", [json.dumps(plan), h])
    if champion is not None:
        log.warning("erasure: champion %s withdrawn (trained on an erased record); now serving: %s",
                    champion, replacement or "nothing until the retrain is promoted")


def _untainted_champion(store: Store, paths: Paths) -> str | None:
    with store.connect() as con:
        rows = [r[0] for r in con.execute(
            """SELECT version FROM model_versions WHERE promoted_at IS NOT NULL AND tainted_by IS NULL
               AND status NOT IN ('rejected', 'champion') ORDER BY promoted_at DESC""").fetchall()]
    return next((v for v in rows if (paths.models / v / "model.txt").exists()), None)


# ------------------------------------------------------------------ 4. rows
def _rows(store: Store, plans: dict, todo: dict[str, Request]) -> None:
    ids = [req.record_id for req in todo.values()]
    with store.transaction() as con:
        # window values of later records of the same keys counted the record: recomputed without it
        con.execute("""UPDATE window_features SET digest = 'erased' WHERE record_id IN (
                         SELECT DISTINCT o.record_id FROM window_events e JOIN window_events o
                           ON o.name = e.name AND o.key = e.key AND o.t >= e.t
                         WHERE e.record_id IN (SELECT unnest(?)) AND o.record_id NOT IN (SELECT unnest(?)))""",
                    [ids, ids])
        con.execute("UPDATE window_defs SET ingested_through = NULL")
        for t in _BY_RECORD_ID:
            con.execute(f"DELETE FROM {t} WHERE record_id IN (SELECT unnest(?))", [ids])
        con.execute("DELETE FROM records WHERE id IN (SELECT unnest(?))", [ids])
        # votes: tombstones at the same offsets (a range stays done; a replay inserts nothing)
        con.execute("""UPDATE feedback_events SET record_id = '', label = '', source = '', confidence = 0
                       WHERE record_id IN (SELECT unnest(?))""", [ids])
        # dead-letter rows and bad log lines that quote an id: the payload goes, the key stays
        needles = [n for i in ids for n in files.needles(i)]

        def quotes(*values) -> bool:
            for v in values:
                if v is None:
                    continue
                b = v if isinstance(v, (bytes, bytearray)) else str(v).encode("utf-8", "surrogatepass")
                if any(n in b for n in needles):
                    return True
            return False

        hit = [r[:3] for r in con.execute("""SELECT topic, "partition", "offset", msg_key, raw, raw_bytes, key_bytes
                                              FROM feedback_rejects""").fetchall() if quotes(*r[3:])]
        for key in hit:
            con.execute("""UPDATE feedback_rejects SET msg_key = NULL, raw = NULL, raw_bytes = NULL, key_bytes = NULL,
                               error = 'payload removed by an erasure'
                           WHERE topic = ? AND "partition" = ? AND "offset" = ?""", list(key))
        hit = [r[:2] for r in con.execute("SELECT file, file_offset, raw FROM served_rejects").fetchall()
               if quotes(r[2])]
        for key in hit:
            con.execute("UPDATE served_rejects SET raw = ''::BLOB WHERE file = ? AND file_offset = ?", list(key))
        keys = sorted({k for p in plans.values() for k in p["reports"]})
        if keys:
            con.execute("""UPDATE drift_reports SET message = 'report removed by an erasure (it held an erased '
                           || 'record)' WHERE window_key IN (SELECT unnest(?))""", [keys])


def _windows(store: Store) -> None:
    """Recompute the window values marked stale above (the records of the erased one's keys)."""
    from ..windows import state

    wset = state.stored_set(store)
    if wset.windows:
        state.update(store, wset)


# ------------------------------------------------------------------ 5. files
def _index(paths: Paths, store: Store, plans: dict, keep_backups: int, options: dict) -> None:
    """A new index version without the vectors, then every other version holding one deleted."""
    import numpy as np
    import pyarrow.parquet as pq

    from ..index import IndexStore
    from ..pipeline import update_index

    gone = {v for p in plans.values() for v in p["vec_ids"]}
    index = IndexStore(paths.index, keep_backups=keep_backups)
    meta = index.read_meta()
    if meta is None or not gone:
        return
    update_index(store, index, meta.model_id, meta.dim, **options)
    removed = 0
    with index.writer_lock():
        current = index.current_version()
        for v in index.versions():
            if v == current:
                continue
            ids = pq.read_table(paths.index / v / "ids.parquet", columns=["vec_id"]).column("vec_id").to_numpy()
            if np.isin(ids, list(gone)).any():
                shutil.rmtree(paths.index / v)
                removed += 1
    for p in plans.values():
        p["counts"]["index_versions_deleted"] = p["counts"].get("index_versions_deleted", 0) + removed
        p["counts"]["index_versions_rebuilt"] = 1


def _files(paths: Paths, store: Store, plans: dict, todo: dict[str, Request]) -> None:
    from .. import served

    by_hash = {h: req.record_id for h, req in todo.items()}
    for h, rid in by_hash.items():
        c = plans[h]["counts"]
        for area, root in (("raw_files", paths.raw), ("quarantined_files", paths.failed)):
            for path in files.record_files(root):
                if not files.holds(path, rid):
                    continue
                before = path.stat()
                n, what = files.without_record(path, rid)
                if not n:
                    continue
                c[area] = c.get(area, 0) + 1
                if area == "raw_files" and what != "removed":
                    after = path.stat()  # the scanner keeps knowing the file (its records are in)
                    with store.transaction() as con:
                        con.execute("""UPDATE file_paths SET size = ?, mtime_ns = ? WHERE path = ? AND size = ?
                                       AND mtime_ns = ?""", [after.st_size, after.st_mtime_ns,
                                                             path.relative_to(root).as_posix(),
                                                             before.st_size, before.st_mtime_ns])
        for path in files.other_files(paths.failed):  # quarantine reports quoting the id
            data = path.read_bytes()
            if any(n in data for n in files.needles(rid)):
                for n in files.needles(rid):
                    data = data.replace(n, b"(erased)")
                write_bytes_atomic(path, data)
                c["quarantine_reports"] = c.get("quarantine_reports", 0) + 1

        def votes(line: bytes, rid=rid) -> bool:
            try:
                obj = json.loads(line)
            except ValueError:
                return any(n in line for n in files.needles(rid))
            return isinstance(obj, dict) and rid in (obj.get("record_id"), obj.get("routing_key"))

        for area, root, table, col in (("feedback_files", paths.feedback, "feedback_files", "path"),
                                       ("served_logs", served.folder(paths.home), None, None)):
            for path in (root.rglob("*") if root.is_dir() else []):
                if not path.is_file() or path.is_symlink() or not files.holds(path, rid):
                    continue
                before = path.stat()
                n = files.blank_lines(path, votes)
                if n:
                    c[area] = c.get(area, 0) + n
                    after = path.stat()
                    if table:
                        with store.transaction() as con:
                            con.execute(f"""UPDATE {table} SET size = ?, mtime_ns = ? WHERE {col} = ? AND size = ?
                                            AND mtime_ns = ?""", [after.st_size, after.st_mtime_ns,
                                                                  path.relative_to(root).as_posix(),
                                                                  before.st_size, before.st_mtime_ns])
        with store.transaction() as con:
            con.execute("UPDATE erasures SET plan = ? WHERE id_hash = ?", [json.dumps(plans[h]), h])


def _caches(paths: Paths, plans: dict, tainted_models: str, store: Store) -> None:
    """Drift HTML that held the record, caches built from it, tainted model folders."""
    keys = sorted({k for p in plans.values() for k in p["reports"]})
    if keys:
        with store.connect() as con:
            rows = con.execute("SELECT window_key, report_path FROM drift_reports WHERE window_key IN "
                               "(SELECT unnest(?))", [keys]).fetchall()
        for _, where in rows:
            target = paths.reports / where if where else None
            if target is not None and target.resolve().is_relative_to(paths.reports.resolve()):
                target.unlink(missing_ok=True)
        with store.transaction() as con:
            con.execute("UPDATE drift_reports SET report_path = NULL WHERE window_key IN (SELECT unnest(?))", [keys])
    # reference samples and linear sums are caches over labelled records: rebuilt on next use
    for cache in (paths.reports / "reference", paths.models / "linear-cache"):
        if cache.is_dir():
            shutil.rmtree(cache)
    if tainted_models == "delete":
        from ..learning.registry import ModelRegistry

        champion = ModelRegistry(paths.models, store).champion_version()
        deleted = 0
        for v in sorted({v for p in plans.values() for v in p["versions"]}):
            if v != champion and (paths.models / v).is_dir():
                shutil.rmtree(paths.models / v)
                deleted += 1
        for p in plans.values():
            p["counts"]["model_folders_deleted"] = p["counts"].get("model_folders_deleted", 0) + deleted
