"""Stream windows: one 5,000-record micro-batch over a 1M-record history, incremental vs from scratch.

A synthetic stream (50,000 keys with Zipf-like activity, one record every ~2.6 s over a month,
a numeric field) fills a real DuckDB file; five windows (sliding count 1h, sliding sum 1d,
hopping mean 1h/15m, tumbling distinct 1d, session count 30m) are computed for the history.
Then the next micro-batch of 5,000 records arrives, 5 % of them up to 30 min out of order
(within the allowed lateness, so they update later records), and:

    incremental   window_state.update on the batch (what the window_features asset runs)
    from scratch  the same engine recomputing every record (state emptied first)
    API state     what `serve` holds for new texts: the state loaded whole, extended by the
                  batch, and the time to value 1 and 64 records against it

Both give the batch the same values (checked). Prints a table, ends with one JSON line,
writes bench/results/windows.json.

    python bench/windows.py [--quick] [--history 1000000] [--batch 5000]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

WINDOWS = """
allowed_lateness: 1h
windows:
  - {name: msgs_1h, key: features.user, kind: sliding, size: 1h, agg: count}
  - {name: amount_1d, key: features.user, kind: sliding, size: 1d, agg: sum, field: features.amount}
  - {name: amount_hop, key: features.user, kind: hopping, size: 1h, hop: 15m, agg: mean, field: features.amount}
  - {name: kinds_day, key: features.user, kind: tumbling, size: 1d, agg: distinct, field: features.kind}
  - {name: burst, key: features.user, kind: session, gap: 30m, agg: count}
"""


def insert(store, start: int, n: int, step_s: float, shuffle_share: float = 0.0, now: bool = False) -> None:
    """Records start..start+n-1; a share of them moved up to 30 min back in event time. History
    was ingested when it happened (ingested_at = its time); the new batch now."""
    with store.transaction() as con:
        con.execute(f"""
            INSERT INTO records
            SELECT 'h' || i, i, 'x',
                   TIMESTAMPTZ '2025-01-01 00:00:00+00' + to_microseconds(CAST(i * {step_s} * 1e6 AS BIGINT))
                     - CASE WHEN hash(i, 'late') % 1000 < {int(shuffle_share * 1000)}
                            THEN to_microseconds(CAST(hash(i, 'by') % 1800000000 AS BIGINT)) ELSE INTERVAL 0 SECOND END,
                   json_object('user', 'u' || CAST(floor(50000 * pow((hash(i, 'u') % 1000000) / 1e6, 3)) AS BIGINT),
                               'amount', hash(i, 'a') % 100, 'kind', 'k' || hash(i, 'k') % 7),
                   NULL, NULL, 'c' || i, 'f', NULL, DATE '2025-01-01',
                   {"now()" if now else "TIMESTAMPTZ '2025-01-01 00:00:00+00' + to_microseconds(CAST(i * " + str(step_s) + " * 1e6 AS BIGINT))"}
            FROM range({start}, {start + n}) t(i)""")


def main() -> int:
    from stream_sentinel.store import Store
    from stream_sentinel.windows import spec, state
    from stream_sentinel.windows.online import LiveWindows

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="100k history")
    ap.add_argument("--history", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=5_000)
    args = ap.parse_args()
    history = 100_000 if args.quick else args.history
    wset = spec.parse_text(WINDOWS, "bench")
    step = 30 * 86400 / history  # a month of history, whatever its size
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "metrics.duckdb")
        with store.session():
            t0 = time.perf_counter()
            insert(store, 0, history, step)
            built = state.update(store, wset)
            setup_s = time.perf_counter() - t0
            print(f"history: {history:,} records, windows computed in {built.seconds:.1f} s")
            # what the API holds: the state in memory, loaded whole once
            with store.connect() as con:
                t0 = time.perf_counter()
                live = LiveWindows.refresh(con, None)
                load_s = time.perf_counter() - t0
            print(f"API state: {live.events:,} events loaded in {load_s:.2f} s")
            insert(store, history, args.batch, step, shuffle_share=0.05, now=True)
            inc = state.update(store, wset)
            print(f"incremental: {inc.new} new, {inc.updated_later} earlier records updated, {inc.late} late, "
                  f"{inc.seconds:.3f} s")
            with store.connect() as con:
                t0 = time.perf_counter()
                live2 = LiveWindows.refresh(con, live)
                append_s = time.perf_counter() - t0
                probe = con.execute("SELECT features, event_time FROM records ORDER BY vec_id DESC LIMIT 64").fetchall()
            assert live2.how == "appended"
            recs = [{"features": json.loads(f), "extra": {}} for f, _ in probe]
            times = [state.to_us(t) + 1 for _, t in probe]
            per_call = {}
            for n in (1, 64):
                reps = 200 if n == 1 else 50
                t0 = time.perf_counter()
                for _ in range(reps):
                    live2.values(recs[:n], times[:n])
                per_call[n] = (time.perf_counter() - t0) / reps * 1000
            print(f"API state after the batch: appended in {append_s:.2f} s; values of 1 record {per_call[1]:.2f} ms, "
                  f"of 64 records {per_call[64]:.2f} ms (all {len(wset.windows)} windows)")
            ids = [f"h{i}" for i in range(history, history + args.batch)]
            with store.connect() as con:
                want = dict(con.execute('SELECT record_id, "values" FROM window_features WHERE record_id IN '
                                        "(SELECT unnest(?))", [ids]).fetchall())
                con.execute("DELETE FROM window_defs")
                con.execute("DELETE FROM window_events")
                con.execute("DELETE FROM window_features")
            scratch = state.update(store, wset)
            with store.connect() as con:
                got = dict(con.execute('SELECT record_id, "values" FROM window_features WHERE record_id IN '
                                       "(SELECT unnest(?))", [ids]).fetchall())
            same = {k: json.loads(v) for k, v in got.items()} == {k: json.loads(v) for k, v in want.items()}
            print(f"from scratch: {scratch.new:,} records, {scratch.seconds:.1f} s; batch values identical: {same}")
    ratio = scratch.seconds / inc.seconds
    print(f"\nincremental is {ratio:.0f}x faster than recomputing from scratch (goal: <= 1 s per 5,000-record "
          f"batch over 1M; {'met' if inc.seconds <= 1.0 else 'not met'})")
    common.save({
        "bench": "windows", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.machine(), "cpu": common.cpu_name(), "history": history, "batch": args.batch,
        "windows": len(wset.windows), "setup_s": round(setup_s, 1),
        "incremental_s": round(inc.seconds, 3), "earlier_records_updated": inc.updated_later,
        "from_scratch_s": round(scratch.seconds, 2), "ratio": round(ratio, 1), "values_identical": same,
        "api_state_events": live.events, "api_state_load_s": round(load_s, 2), "api_state_append_s": round(append_s, 2),
        "api_values_ms_1": round(per_call[1], 3), "api_values_ms_64": round(per_call[64], 3),
    })
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
