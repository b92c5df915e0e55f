"""Window values kept up to date per micro-batch, from state in DuckDB.

The state is ``window_events``: per window, each keyed record's event time and field. A batch
(the records that have no values yet, plus a backfilled partition's records) is added to it,
and only the values that can change are computed: the batch's own, and those of later
records of the same keys that a batch record now falls into (a record that arrived out of
order, within the allowed lateness). The key's events are read for the batch's keys and
time span only, never the whole history.

**Lateness.** The watermark is the newest event time seen before the batch. A record older
than the watermark minus ``allowed_lateness`` is *late*: it gets its own value (from every
earlier event, as any record does), is flagged (``window_features.late``, the run's
``late_records``), and is kept out of every other record's value, so values of records older
than the watermark are final once the lateness has passed. A record within the lateness
updates the later records it falls into.

**Idempotent and crash-safe.** A batch is one transaction; a record without a current row in
``window_features`` is pending, so a killed run leaves nothing half-written and the next run
computes the same values. A changed declaration (its digest) recomputes every record from the
records table once, since values computed under the old rules would not mean the new ones.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pyarrow as pa

from ..atomic import pause_point
from ..store import Store
from . import compute
from .compute import KeyEvents
from .spec import Window, WindowSet, lookup

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
# session windows read a key's events back this many gaps at first, and further while the
# chain of events still reaches the start of what was read
_SESSION_LOOKBACK_GAPS = 16


def to_us(ts: datetime) -> int:
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=timezone.utc)
    d = ts - _EPOCH
    return (d.days * 86_400 + d.seconds) * 1_000_000 + d.microseconds


def from_us(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=int(us))


def key_of(record: dict, w: Window) -> str | None:
    k = lookup(record, w.key)
    return compute.token(k) if k is not None else None


@dataclass
class Update:
    computed: int = 0  # records whose values were written
    new: int = 0  # records that had none
    updated_later: int = 0  # earlier records' values changed by an out-of-order arrival
    late: int = 0  # new records beyond the allowed lateness
    recomputed_all: bool = False  # the declaration changed
    watermark: datetime | None = None
    seconds: float = 0.0
    per_window: dict = field(default_factory=dict)


def _sync_defs(con, wset: WindowSet) -> tuple[bool, int | None]:
    """Make window_defs match the declaration; True when the state had to be reset (every
    record's values are then stale: ``_pending`` finds them by digest), and the watermark.
    Records keep the lateness they were judged with, and the watermark stays."""
    have = {r[0]: r[1:] for r in con.execute(
        "SELECT name, digest, lateness_us, watermark_us FROM window_defs").fetchall()}
    marks = [h[2] for h in have.values() if h[2] is not None]
    watermark = max(marks) if marks else None
    want = {w.name: w for w in wset.windows}
    if set(have) == set(want) and all(have[n][0] == w.digest and have[n][1] == wset.lateness_us
                                      for n, w in want.items()):
        return False, watermark
    con.execute("DELETE FROM window_defs")
    con.execute("DELETE FROM window_events")
    if wset.windows:
        n = len(wset.windows)
        _insert(con, "window_defs", {
            "name": [w.name for w in wset.windows], "digest": [w.digest for w in wset.windows],
            "spec": [json.dumps(w.describe()) for w in wset.windows], "lateness_us": [wset.lateness_us] * n,
            "watermark_us": pa.array([watermark] * n, pa.int64()),
            "declared_at": [datetime.now(timezone.utc)] * n})
    return True, watermark


def _insert(con, table: str, columns: dict, replace: bool = False) -> None:
    """Insert columns (lists or Arrow arrays) in one statement, through Arrow: registering a
    pandas frame of strings costs more than the insert."""
    con.register("_win_rows", pa.table(columns))
    try:
        con.execute(f"INSERT {'OR REPLACE ' if replace else ''}INTO {table} ({', '.join(columns)}) "
                    "SELECT * FROM _win_rows")
    finally:
        con.unregister("_win_rows")


# records ingested this long before the last update's start are looked at again (clock steps
# between processes); older ones all have values
_INGEST_MARGIN_S = 3600


def _pending(con, digest: str, partition: str | None, after: tuple | None, limit: int,
             since: datetime | None) -> list[tuple]:
    """Up to ``limit`` records without values of the current declaration, plus (a backfill)
    every record of a partition, in event-time order after ``after`` (event time in µs, id).
    ``since``: only records ingested after it can lack values (a column scan of ``records``,
    not a join with every value)."""
    fresh = "(w.record_id IS NULL OR w.digest != ?)"
    params: list = [digest]
    if since is not None:
        fresh = f"(r.ingested_at >= ? AND {fresh})"
        params = [since - timedelta(seconds=_INGEST_MARGIN_S), digest]
    where = f"({fresh}" + (" OR r.arrival_date = CAST(? AS DATE))" if partition else ")")
    params += [partition] if partition else []
    if after is not None:
        where += " AND (epoch_us(r.event_time) > ? OR (epoch_us(r.event_time) = ? AND r.id > ?))"
        params += [after[0], after[0], after[1]]
    return con.execute(
        f"""SELECT r.id, epoch_us(r.event_time), r.features, r.extra, w.late AS was_late FROM records r
            LEFT JOIN window_features w ON w.record_id = r.id
            WHERE {where} ORDER BY r.event_time, r.id LIMIT {int(limit)}""", params).fetchall()


_COLS = ["name", "record_id", "key", "t", "num", "tok", "dropped"]


def _load_events(con, bounds: list[tuple]) -> dict:
    """The state's events of each (window, key, lo, hi) in ``bounds`` (hi None: open), as columns."""
    name, key, lo, hi = zip(*bounds) if bounds else ((), (), (), ())
    con.register("_win_bounds", pa.table({"name": pa.array(name, pa.string()), "key": pa.array(key, pa.string()),
                                          "lo": pa.array(lo, pa.int64()), "hi": pa.array(hi, pa.int64())}))
    # the overall time span as a plain filter too: the state is appended roughly in time order,
    # so DuckDB's zone maps skip the row groups outside it before the join looks at a row
    t_lo = min(lo) if lo else 0
    t_hi = None if not hi or any(h is None for h in hi) else max(hi)
    try:
        tbl = con.sql(
            f"""SELECT e.name, e.record_id, e.key, e.t, e.num, e.tok, e.dropped FROM window_events e
               JOIN _win_bounds b ON b.name = e.name AND b.key = e.key
               WHERE e.t >= {int(t_lo)} {"" if t_hi is None else f"AND e.t <= {int(t_hi)}"}
                 AND e.t >= b.lo AND (b.hi IS NULL OR e.t <= b.hi)""").to_arrow_table()
    finally:
        con.unregister("_win_bounds")
    return _columns(tbl)


def _columns(tbl) -> dict:
    tbl = tbl.read_all() if hasattr(tbl, "read_all") else tbl
    def obj(c):
        return np.array(tbl.column(c).to_pylist(), dtype=object)

    return {"name": obj("name"), "record_id": obj("record_id"), "key": obj("key"),
            "t": tbl.column("t").to_numpy().astype(np.int64),
            "num": tbl.column("num").to_numpy(zero_copy_only=False).astype(np.float64),
            "tok": obj("tok"), "dropped": tbl.column("dropped").to_numpy(zero_copy_only=False).astype(bool)}


def _concat(a: dict, b: dict, keep) -> dict:
    return {c: np.concatenate([a[c][keep], b[c]]) for c in a}


def _state_for(con, wset: WindowSet, new: dict) -> dict:
    """Events (read from the state, where the batch's already are) that the batch's values
    need: per window and key, from one window before the key's earliest batch event to one
    window after its latest; sessions: back to the start of the chain, and every later event."""
    kinds = {w.name: w for w in wset.windows}
    span: dict[tuple, list] = {}
    for name, key, t in zip(new["name"], new["key"], new["t"]):
        b = span.get((name, key))
        if b is None:
            span[(name, key)] = [t, t]
        else:
            b[0], b[1] = min(b[0], t), max(b[1], t)
    bounds = []
    for (name, key), (lo, hi) in span.items():
        w = kinds[name]
        if w.kind == "session":
            bounds.append((name, key, lo - _SESSION_LOOKBACK_GAPS * w.size_us, None))
        else:
            bounds.append((name, key, lo - w.size_us, hi + w.size_us))
    rows = _load_events(con, bounds)
    reach = {(n, k): lo for n, k, lo, _ in bounds if kinds[n].kind == "session"}
    grow = 0
    while reach:
        # session keys whose earliest live event is within a gap of where reading started: the
        # chain may go on before it
        live = ~rows["dropped"] & np.isin(rows["name"], list({n for n, _ in reach}))
        first = (pd.DataFrame({"n": rows["name"][live], "k": rows["key"][live], "t": rows["t"][live]})
                 .groupby(["n", "k"], sort=False)["t"].min().to_dict())
        first = {nk: t for nk, t in first.items() if nk in reach}
        short = [(n, k) for (n, k), t in first.items()
                 if t - reach[(n, k)] <= kinds[n].size_us and reach[(n, k)] > -(2 ** 60)]
        if not short:
            break
        grow += 1
        reach = {nk: max(first[nk] - 64 ** grow * _SESSION_LOOKBACK_GAPS * kinds[nk[0]].size_us, -(2 ** 61))
                 for nk in short}
        keep = ~pd.MultiIndex.from_arrays([rows["name"], rows["key"]]).isin(list(reach))
        rows = _concat(rows, _load_events(con, [(n, k, lo, None) for (n, k), lo in reach.items()]), keep)
    return rows


def _events(t, num, tok, sel) -> KeyEvents:
    toks = [tok[i] for i in sel]
    return KeyEvents(t[sel], num[sel], toks, np.array([x is not None for x in toks], dtype=bool))


def _groups(names: list, keys: list, t: np.ndarray):
    """(name, key, row indices sorted by time) of each group."""
    if len(t) == 0:
        return
    pairs = list(zip(names, keys))
    code_of: dict = {}
    codes = np.fromiter((code_of.setdefault(p, len(code_of)) for p in pairs), dtype=np.int64, count=len(pairs))
    uniq = list(code_of)
    order = np.lexsort((t, codes))
    cut = np.flatnonzero(np.diff(codes[order])) + 1
    for part in np.split(order, cut):
        name, key = uniq[codes[part[0]]]
        yield name, key, part


# Records per transaction: a first computation over a large history (or a changed
# declaration) goes through it in event-time order, in bounded memory.
CHUNK = 50_000


def update(store: Store, wset: WindowSet, partition: str | None = None, chunk: int = CHUNK) -> Update:
    """Compute the window values of pending records (and of a backfilled partition's), and
    update the later records they change. One transaction per ``chunk`` records, in event-time
    order (a chunk's records are never later than the next chunk's, so none is judged late
    against a record that only came first in this computation)."""
    started = time.perf_counter()
    out = Update()
    after, newest = None, None
    while True:
        with store.transaction() as con:
            reset, wm = _sync_defs(con, wset)
            out.recomputed_all |= reset
            if not wset.windows:
                break
            if after is None:
                newest = con.execute("SELECT max(ingested_at) FROM records").fetchall()[0][0]
            since = con.execute("SELECT min(ingested_through) FROM window_defs").fetchall()[0][0]
            batch = _pending(con, wset.digest, partition, after, chunk, since)
            if batch:
                _apply(con, wset, batch, wm, partition, out)
            if len(batch) < chunk and newest is not None:
                # the last chunk: every record ingested before this update began has values
                con.execute("UPDATE window_defs SET ingested_through = ?", [newest])
            pause_point("windows.before_commit")
        if len(batch) < chunk:
            break
        after = (batch[-1][1], batch[-1][0])
    out.seconds = time.perf_counter() - started
    return out


def _apply(con, wset: WindowSet, batch: list[tuple], wm: int | None, partition: str | None, out: Update) -> None:
    ids = [r[0] for r in batch]
    ts = [r[1] for r in batch]  # event time in µs, from the database (not through tz-aware datetimes)
    late_cut = None if wm is None else wm - wset.lateness_us
    # a backfilled record keeps the lateness it was judged with on arrival
    was = {r[0]: bool(r[4]) for r in batch if r[4] is not None}
    late = [bool(was.get(r, late_cut is not None and t < late_cut)) for r, t in zip(ids, ts)]
    values: dict[str, dict] = {r: {} for r in ids}
    new: dict[str, list] = {c: [] for c in _COLS}
    keys = sorted({w.key for w in wset.windows})
    fields = sorted({w.field for w in wset.windows if w.field})
    for (rid, _, f, x, _), t, lt in zip(batch, ts, late):
        rec = {"features": json.loads(f) if f else {}, "extra": json.loads(x) if x else {}}
        key_tok = {}
        for path in keys:  # windows share keys and fields: each looked up and written once
            k = lookup(rec, path)
            key_tok[path] = compute.token(k) if k is not None else None
        field_val = {}
        for path in fields:
            v = lookup(rec, path)
            field_val[path] = (compute.numeric(v), compute.token(v))
        for w in wset.windows:
            k = key_tok[w.key]
            if k is None:
                values[rid][w.column] = None
                continue
            num, tok = field_val[w.field] if w.field else (np.nan, "true")
            for c, val in zip(_COLS, (w.name, rid, k, t, num, tok, lt)):
                new[c].append(val)
    if partition or was:  # recomputed records: a key they no longer have leaves no event behind
        con.execute("DELETE FROM window_events WHERE record_id IN (SELECT unnest(?))", [ids])
    touched: dict[str, dict] = defaultdict(dict)  # earlier records whose values changed
    if new["name"]:
        base = con.execute("SELECT coalesce(max(seq), 0) FROM window_events").fetchall()[0][0]
        _insert(con, "window_events", {**new, "t": pa.array(new["t"], pa.int64()),
                                       "seq": pa.array(np.arange(base + 1, base + 1 + len(new["t"])), pa.int64()),
                                       "num": pa.array(new["num"], pa.float64(), from_pandas=True),
                                       "tok": pa.array(new["tok"], pa.string())})
        st = _state_for(con, wset, new)
        s_name = st["name"]
        s_new = pd.Series(st["record_id"]).isin(ids).to_numpy()
        for w in wset.windows:
            sel = np.flatnonzero(s_name == w.name)
            if not len(sel):
                continue
            code = pd.factorize(st["key"][sel])[0].astype(np.int64)
            order = np.lexsort((st["t"][sel], code))
            sel, code = sel[order], code[order]
            t = st["t"][sel]
            live = ~st["dropped"][sel]
            lsel = sel[live]
            toks = st["tok"][lsel].tolist()
            ev = compute.Events(code[live], t[live], st["num"][lsel], toks,
                                np.array([x is not None for x in toks], dtype=bool))
            # every row's window; an earlier record changes when an on-time batch event is in it
            prep = compute.Prepared(w, ev)
            lo, hi = prep.bounds(code, t)
            is_new = s_new[sel]
            c_new = np.concatenate([[0], np.cumsum(is_new[live])])
            target = is_new | (c_new[hi] - c_new[lo] > 0)
            vals = prep.aggregate(lo[target], hi[target])
            n_later = 0
            for rid, v in zip(st["record_id"][sel[target]].tolist(), vals):
                if rid in values:
                    values[rid][w.column] = v
                else:
                    touched[rid][w.column] = v
                    n_later += 1
            if n_later:
                out.per_window[w.name] = n_later
    now = datetime.now(timezone.utc)
    n = len(ids)
    _insert(con, "window_features", replace=True, columns={
        "record_id": ids, "values": [json.dumps(values[r], allow_nan=False, sort_keys=True) for r in ids], "late": late,
        "digest": [wset.digest] * n, "computed_at": [now] * n})
    if touched:
        # earlier records: the changed windows patched into their stored values
        old_vals = dict(con.execute("""SELECT record_id, "values" FROM window_features WHERE record_id IN
                                       (SELECT unnest(?))""", [list(touched)]).fetchall())
        patch = pa.table({"record_id": list(old_vals), "v": [
            json.dumps({**json.loads(old_vals[r]), **touched[r]}, allow_nan=False, sort_keys=True) for r in old_vals]})
        con.register("_win_patch", patch)
        try:
            con.execute("""UPDATE window_features SET "values" = p.v, computed_at = ? FROM _win_patch p
                           WHERE window_features.record_id = p.record_id""", [now])
        finally:
            con.unregister("_win_patch")
    new_wm = max(ts) if wm is None else max(wm, max(ts))
    con.execute("UPDATE window_defs SET watermark_us = ?", [new_wm])
    out.new += len(ids)
    out.updated_later += len(touched)
    out.computed = out.new + out.updated_later
    out.late += sum(1 for rid, lt in zip(ids, late) if lt and rid not in was)
    out.watermark = from_us(new_wm)


def explain(store: Store, wset: WindowSet, record_id: str) -> dict | None:
    """A record's window values and, per window, the records they were computed from (the
    audit trail of a feature value). None when the record is unknown."""
    with store.connect() as con:
        row = con.execute("""SELECT r.id, r.event_time, r.features, r.extra, w."values", w.late, w.digest,
                                    w.computed_at FROM records r LEFT JOIN window_features w ON w.record_id = r.id
                             WHERE r.id = ?""", [record_id]).fetchall()
        if not row:
            return None
        row = row[0]
        rec = {"features": json.loads(row[2]) if row[2] else {}, "extra": json.loads(row[3]) if row[3] else {}}
        t = to_us(row[1])
        stored = json.loads(row[4]) if row[4] else None
        out = {"record_id": record_id, "event_time": row[1].astimezone(timezone.utc).isoformat(),
               "late": row[5], "computed": stored is not None and row[6] == wset.digest,
               "computed_at": row[7].astimezone(timezone.utc).isoformat() if row[7] else None, "windows": []}
        for w in wset.windows:
            k = key_of(rec, w)
            item = {**w.describe(), "column": w.column, "key_value": json.loads(k) if k else None,
                    "value": (stored or {}).get(w.column), "from": []}
            if k is not None:
                st = _state_for(con, WindowSet((w,), wset.lateness_us), {"name": [w.name], "key": [k], "t": [t]})
                live = [i for i in sorted(range(len(st["t"])), key=lambda i: (st["t"][i], st["record_id"][i]))
                        if not st["dropped"][i]]
                ev = _events(st["t"], st["num"], st["tok"], np.array(live, dtype=np.int64))
                hi = int(np.searchsorted(ev.t, t))
                lo = int(min(compute.starts(w, np.array([t]), ev)[0], hi))
                item["from"] = [{"record_id": st["record_id"][i],
                                 "event_time": from_us(st["t"][i]).isoformat(),
                                 "value": json.loads(st["tok"][i]) if st["tok"][i] is not None and w.field else None}
                                for i in live[lo:hi]]
                item["recomputed"] = compute.values(w, np.array([t]), ev)[0]
            out["windows"].append(item)
    return out


def partition_version(store: Store, partition: str) -> tuple[int, str]:
    """(rows, version) of a partition's window values; the version changes exactly when they do."""
    import hashlib

    with store.connect() as con:
        row = con.execute("""SELECT count(*), coalesce(sum(hash(w.record_id, w."values")), 0) FROM window_features w
                             JOIN records r ON r.id = w.record_id WHERE r.arrival_date = CAST(? AS DATE)""",
                          [partition]).fetchone()
    return int(row[0]), hashlib.sha256(f"{row[0]}:{row[1]}".encode()).hexdigest()[:16]


def stored_set(store: Store) -> WindowSet:
    """The declaration the stored values were computed with (what `windows show` and the API
    explain and serve), from ``window_defs``."""
    with store.connect() as con:
        return stored_set_of(con)


def stored_set_of(con) -> WindowSet:
    from .spec import fmt_duration, parse

    rows = con.execute("SELECT spec, lateness_us FROM window_defs ORDER BY name").fetchall()
    if not rows:
        return WindowSet(source="window_defs")
    return parse({"windows": [json.loads(r[0]) for r in rows], "allowed_lateness": fmt_duration(rows[0][1])},
                 "window_defs")
