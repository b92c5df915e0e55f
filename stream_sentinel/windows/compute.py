"""A record's window value, from the events of its key: pure functions over sorted arrays.

**Point in time.** A record at event time ``t`` sees only events of its key with an event
time *strictly earlier* than ``t``: never itself, never a record with the same timestamp
(whichever arrived first), never anything later. So a value does not depend on arrival
order, and a model trained on it sees what it would have seen when the record happened.

The window each kind gives a record at ``t`` (times in UTC microseconds since the epoch):

* ``sliding`` size S: ``[t - S, t)``.
* ``tumbling`` size S: ``[floor(t / S) * S, t)``, the part of the record's fixed, epoch-aligned
  window that happened before it.
* ``hopping`` size S, hop H: windows ``[k*H, k*H + S)`` for every k; the record's value comes
  from the oldest window that contains ``t`` (the most history at hop resolution):
  ``[start, t)`` with ``start`` the smallest multiple of H above ``t - S``. H = S is tumbling.
* ``session`` gap G: the events before ``t`` chained to it by gaps of at most G (a gap of more
  than G, including the one between the last event and ``t``, starts a new session).

Empty windows: ``count``, ``sum`` and ``distinct`` are 0; ``mean``, ``min`` and ``max`` are
None (a missing feature, which LightGBM handles, not a 0 that means something else).
``count`` without a field counts events; with one it counts events where the field is
present. ``sum/mean/min/max`` use numeric values (booleans and strings are skipped);
``distinct`` counts distinct values of any scalar type.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .spec import Window


@dataclass
class KeyEvents:
    """The events of one key, sorted by time."""

    t: np.ndarray  # int64 microseconds
    num: np.ndarray  # float64, NaN where the field is not a number
    token: list  # the field's value as a comparable string, None where absent
    has: np.ndarray  # bool: the field is present


def numeric(v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return np.nan
    f = float(v)
    return f if np.isfinite(f) else np.nan


_encode_str = json.encoder.encode_basestring_ascii  # what json.dumps does for a str, without its wrapper


def token(v) -> str | None:
    """A scalar as JSON text (a key, a distinct value): comparable across types ("3" != 3)."""
    t = type(v)
    if t is str:
        return _encode_str(v)
    if t is int:
        return int.__repr__(v)
    if v is None or isinstance(v, (dict, list)):
        return None
    return json.dumps(v)


@dataclass
class Events:
    """Live events of many keys of one window, sorted by (key code, time)."""

    code: np.ndarray  # int64 key code
    t: np.ndarray  # int64 microseconds
    num: np.ndarray  # float64, NaN where the field is not a number
    token: list  # comparable field value, None where absent
    has: np.ndarray  # bool: the field is present

    @classmethod
    def of_key(cls, ev: KeyEvents) -> "Events":
        return cls(np.zeros(len(ev.t), dtype=np.int64), ev.t, ev.num, ev.token, ev.has)


class Prepared:
    """One window's events with what every query needs computed once: the time ranks, the
    session breaks and the running sums. The incremental update builds one per batch; the API
    keeps one per window between refreshes and answers each request from it."""

    def __init__(self, w: Window, ev: Events):
        self.w, self.ev = w, ev

    @cached_property
    def _ranked(self) -> tuple[np.ndarray, int, np.ndarray]:
        ev = self.ev
        grid = np.unique(ev.t)
        m = len(grid) + 1
        return grid, m, ev.code * m + np.searchsorted(grid, ev.t, side="left")

    @cached_property
    def _session_starts(self) -> np.ndarray:
        # a break where a key starts or a gap > G opens
        ev, n = self.ev, len(self.ev.t)
        brk = np.ones(n, dtype=bool)
        if n > 1:
            brk[1:] = (ev.code[1:] != ev.code[:-1]) | (np.diff(ev.t) > self.w.size_us)
        return np.flatnonzero(brk)

    def bounds(self, q_code: np.ndarray, q_t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For queries (key code, time): the slice ``[lo, hi)`` of the events each one's window
        holds. All keys at once: times become ranks, so (key, rank) is one sortable integer."""
        w, ev = self.w, self.ev
        q_code, q_t = np.asarray(q_code, dtype=np.int64), np.asarray(q_t, dtype=np.int64)
        grid, m, key = self._ranked

        def first_at_or_after(t: np.ndarray) -> np.ndarray:
            return np.searchsorted(key, q_code * m + np.searchsorted(grid, t, side="left"), side="left")

        hi = first_at_or_after(q_t)  # strictly earlier events end here
        group_start = np.searchsorted(key, q_code * m, side="left")
        if w.kind == "sliding":
            lo = first_at_or_after(q_t - w.size_us)
        elif w.kind == "tumbling":
            lo = first_at_or_after((q_t // w.size_us) * w.size_us)
        elif w.kind == "hopping":
            lo = first_at_or_after(((q_t - w.size_us) // w.hop_us + 1) * w.hop_us)
        else:  # session: the chain back from the query
            n, starts = len(ev.t), self._session_starts
            prev = np.maximum(hi - 1, 0)
            k = np.searchsorted(starts, prev, side="right")
            first = starts[np.maximum(k - 1, 0)] if len(starts) else np.zeros_like(hi)
            cut = (hi <= group_start) | (q_t - (ev.t[prev] if n else q_t) > w.size_us)
            lo = np.where(cut, hi, first)
        return np.minimum(np.maximum(lo, group_start), hi), hi

    @cached_property
    def _sums(self) -> tuple[np.ndarray, np.ndarray]:
        ev = self.ev
        if self.w.agg == "count":
            c = np.concatenate([[0], np.cumsum(ev.has if self.w.field is not None else np.ones(len(ev.t), dtype=bool))])
            return c, c
        isnum = ~np.isnan(ev.num)
        return (np.concatenate([[0.0], np.cumsum(np.where(isnum, ev.num, 0.0))]),
                np.concatenate([[0], np.cumsum(isnum)]))

    def aggregate(self, lo: np.ndarray, hi: np.ndarray) -> list:
        """The aggregate of each slice ``ev[lo:hi]``."""
        w, ev = self.w, self.ev
        if w.agg == "count":
            c = self._sums[0]
            return (c[hi] - c[lo]).astype(int).tolist()
        if w.agg in ("sum", "mean"):
            s, c = self._sums
            tot, cnt = s[hi] - s[lo], c[hi] - c[lo]
            if w.agg == "sum":
                return [float(x) if n else 0.0 for x, n in zip(tot.tolist(), cnt.tolist())]
            return [float(x) / n if n else None for x, n in zip(tot.tolist(), cnt.tolist())]
        if w.agg in ("min", "max"):
            f = np.fmin if w.agg == "min" else np.fmax
            out = []
            for a, b in zip(lo.tolist(), hi.tolist()):
                v = f.reduce(ev.num[a:b]) if b > a else np.nan
                out.append(None if np.isnan(v) else float(v))
            return out
        return [len({x for x in ev.token[a:b] if x is not None}) for a, b in zip(lo.tolist(), hi.tolist())]


def bounds(w: Window, ev: Events, q_code: np.ndarray, q_t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return Prepared(w, ev).bounds(q_code, q_t)


def aggregate(w: Window, ev: Events, lo: np.ndarray, hi: np.ndarray) -> list:
    return Prepared(w, ev).aggregate(lo, hi)


def starts(w: Window, t: np.ndarray, ev: KeyEvents) -> np.ndarray:
    """Index into one key's events of the first event each target's window holds."""
    lo, _ = bounds(w, Events.of_key(ev), np.zeros(len(t), dtype=np.int64), t)
    return lo


def values(w: Window, t: np.ndarray, ev: KeyEvents) -> list:
    """The window value of targets at times ``t`` (int64 us) given their key's events."""
    e = Events.of_key(ev)
    lo, hi = bounds(w, e, np.zeros(len(t), dtype=np.int64), np.asarray(t, dtype=np.int64))
    return aggregate(w, e, lo, hi)
