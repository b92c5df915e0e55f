"""Window values for records that are not stored: what the API gives a new text.

A served record gets the value that training and scoring would give it at its event time
(``event_time`` in the request, else the time of the request): from the same events
(``window_events``: every ingested record, without those dropped as late), by the same code
(:class:`compute.Prepared`), with the same tie rule (only strictly earlier events count). The
request's record itself is not added to the state: it counts for others once it is ingested
(``POST /v1/records``).

No database on the request path: the API's background thread loads the state into memory once
and then only the events appended since (``window_events.seq``). Anything other than an append
(a changed declaration, a backfilled partition, a removed record) changes the row count in a
way appends cannot, and the state is loaded again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import pandas as pd

from . import compute
from .spec import WindowSet, lookup
from .state import stored_set_of


@dataclass
class _Window:
    codes: dict  # key (JSON text) -> code
    prepared: compute.Prepared


class LiveWindows:
    """The stored window state in memory, and each window's events ready to query."""

    def __init__(self, wset: WindowSet, digest: str, rows: int, seq: int, cols: dict, how: str):
        self.wset, self.digest, self.rows, self.seq = wset, digest, rows, seq
        self.how = how  # "full": loaded whole; "appended": the previous state and what came after it
        self._cols = cols  # per window: the live events' columns, sorted by (code, t)
        self._windows = {w.name: self._prepare(w, cols[w.name]) for w in wset.windows}

    @property
    def events(self) -> int:
        return sum(len(c["t"]) for c in self._cols.values())

    @staticmethod
    def _prepare(w, c: dict) -> _Window:
        ev = compute.Events(c["code"], c["t"], c["num"], c["tok"], c["has"])
        prep = compute.Prepared(w, ev)
        prep.bounds(np.zeros(0, np.int64), np.zeros(0, np.int64))  # ranks and breaks now, not in a request
        if w.agg in ("count", "sum", "mean"):
            prep._sums
        return _Window(c["codes"], prep)

    # ------------------------------------------------------------------ loading
    @classmethod
    def refresh(cls, con, have: "LiveWindows | None") -> "LiveWindows | None":
        """The state as the database holds it now: ``have`` itself when nothing changed, ``have``
        extended with the appended events, or a full load. None: no windows are declared."""
        wset = stored_set_of(con)
        if not wset.windows:
            return None
        digest = hashlib.sha256(json.dumps([(w.name, w.digest) for w in wset.windows]).encode()).hexdigest()
        since = have.seq if have is not None and have.digest == digest else None
        rows, seq, appended = con.execute(
            "SELECT count(*), coalesce(max(seq), 0), count(*) FILTER (WHERE seq > ?) FROM window_events",
            [since if since is not None else -1]).fetchall()[0]
        if have is not None and since is not None:
            if rows == have.rows and seq == have.seq:
                return have
            if rows == have.rows + appended:  # appends only: load them
                return cls(wset, digest, rows, seq, cls._merge(wset, have._cols, cls._read(con, since)), "appended")
        return cls(wset, digest, rows, seq, cls._merge(wset, None, cls._read(con, None)), "full")

    @staticmethod
    def _read(con, after: int | None) -> pd.DataFrame:
        where = "NOT dropped" + ("" if after is None else f" AND seq > {int(after)}")
        return con.sql(f"SELECT name, key, t, num, tok FROM window_events WHERE {where}").df()

    @staticmethod
    def _merge(wset: WindowSet, old: dict | None, new: pd.DataFrame) -> dict:
        """Each window's columns sorted by (key code, time): the new events sorted and merged
        into the held ones (a copy per column, no sort of what was already sorted)."""
        out = {}
        for w in wset.windows:
            part = new[new["name"] == w.name]
            prev = (old or {}).get(w.name)
            codes = dict(prev["codes"]) if prev is not None else {}
            local, uniques = pd.factorize(part["key"])
            to_code = np.fromiter((codes.setdefault(k, len(codes)) for k in uniques), dtype=np.int64,
                                  count=len(uniques))
            code = to_code[local] if len(local) else np.zeros(0, np.int64)
            tok = part["tok"].to_numpy(dtype=object)
            cols = {"code": code, "t": part["t"].to_numpy(dtype=np.int64),
                    "num": part["num"].to_numpy(dtype=np.float64, na_value=np.nan),
                    "has": np.array([x is not None for x in tok], dtype=bool),
                    # the values themselves only where they are counted; the others need presence
                    "tok": tok if w.agg == "distinct" else np.empty(len(tok), dtype=object)}
            order = np.lexsort((cols["t"], cols["code"]))
            cols = {c: v[order] for c, v in cols.items()}
            if prev is not None and len(prev["t"]):
                # where each new event goes: after the held events of its key at or before its time
                o_code, o_t = prev["code"], prev["t"]
                lo = np.searchsorted(o_code, cols["code"], side="left")
                hi = np.searchsorted(o_code, cols["code"], side="right")
                at = np.fromiter((a + np.searchsorted(o_t[a:b], t, side="right")
                                  for a, b, t in zip(lo.tolist(), hi.tolist(), cols["t"].tolist())),
                                 dtype=np.int64, count=len(lo))
                cols = {c: np.insert(prev[c], at, v) for c, v in cols.items()}
            out[w.name] = {**cols, "codes": codes}
        return out

    # ------------------------------------------------------------------ answering
    def values(self, records: list[dict], times_us: list[int]) -> list[dict]:
        """Each record's ``{win_<name>: value}`` at its time; records are ``{"features", "extra"}``."""
        out: list[dict] = [{} for _ in records]
        t = np.asarray(times_us, dtype=np.int64)
        for w in self.wset.windows:
            win = self._windows[w.name]
            keys = []
            for rec in records:
                k = lookup(rec, w.key)
                keys.append(compute.token(k) if k is not None else None)
            code = np.array([win.codes.get(k, -1) if k is not None else -1 for k in keys], dtype=np.int64)
            lo, hi = win.prepared.bounds(code, t)
            vals = win.prepared.aggregate(lo, hi)
            for i, (k, v) in enumerate(zip(keys, vals)):
                out[i][w.column] = v if k is not None else None
        return out
