"""The soak run: `stream-sentinel up` with the demo, left alone, then every sensor tick counted.

Sensors run in threads of the daemon and share one DuckDB file with the runs; a tick that
fails (a handle conflict, a lock held too long, a bug on some data) is invisible unless
someone opens the UI's tick history. This starts the stack exactly as a user does (a fresh
data root and Dagster instance, the demo feed on), waits, stops it, and reads every tick of
every sensor and schedule from the instance: how many succeeded, skipped and failed, with
the error of each failed one. Ends with one JSON line, like every bench script.

    python bench/soak.py                # 30 minutes
    python bench/soak.py --minutes 5    # a short look
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from common import ROOT, save  # noqa: E402  (puts the repo on sys.path)

from stream_sentinel.devtools.kafka_broker import free_port  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def ticks(dagster_home: Path) -> tuple[dict[str, Counter], list[str]]:
    """Tick statuses per instigator (sensors and schedules), and the failed ticks' errors."""
    import dagster as dg

    by_name: dict[str, Counter] = {}
    errors: list[str] = []
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        for state in instance.all_instigator_state():
            counts = by_name.setdefault(state.instigator_name, Counter())
            for tick in instance.get_ticks(state.instigator_origin_id, state.selector_id, limit=100_000):
                status = tick.status.value
                counts[status] += 1
                if status == "FAILURE":
                    err = tick.error.message.strip().splitlines()[-1] if tick.error else "no error recorded"
                    errors.append(f"{state.instigator_name}: {err[:300]}")
    return by_name, errors


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=None, help="default 30 (--quick: 5)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--demo-limit", type=int, default=1000, help="demo records `up` feeds (its default: 1000)")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder (logs, data root)")
    args = ap.parse_args()
    args.minutes = args.minutes or (5.0 if args.quick else 30.0)
    tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    home, dagster_home = tmp / "home", tmp / "home" / "dagster"
    env = {**os.environ, "STREAM_SENTINEL_HOME": str(home), "DAGSTER_HOME": str(dagster_home)}
    env.pop("KAFKA_BOOTSTRAP_SERVERS", None)  # the drop folder, as a first-time user runs it
    up = subprocess.Popen([sys.executable, "-m", "stream_sentinel.cli", "up", "--port", str(free_port()),
                           "--demo-limit", str(args.demo_limit)], env=env, cwd=ROOT,
                          stdout=open(tmp / "up.log", "ab"), stderr=subprocess.STDOUT, start_new_session=True)
    started = time.monotonic()
    log(f"stack up (pid {up.pid}); soaking {args.minutes:g} min; log {tmp / 'up.log'}")
    try:
        while time.monotonic() - started < args.minutes * 60:
            if up.poll() is not None:
                log(f"`up` exited with {up.returncode} before the end")
                break
            time.sleep(10)
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGTERM)
            try:
                up.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(up.pid, signal.SIGKILL)
    by_name, errors = ticks(dagster_home)
    from stream_sentinel.store import Store

    with Store(home / "metrics.duckdb").connect() as con:
        records = con.execute("SELECT count(*) FROM records").fetchone()[0]
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    total = sum(by_name.values(), Counter())
    figures = {"bench": "soak", "cpu": cpu, "cores": os.cpu_count(), "minutes": args.minutes,
               "records_ingested": records, "ticks": sum(total.values()),
               "ticks_by_status": dict(total), "failed_ticks": total.get("FAILURE", 0),
               "ticks_by_sensor": {k: dict(v) for k, v in sorted(by_name.items())}, "failed_tick_errors": errors[:20]}
    for name, counts in sorted(by_name.items()):
        log(f"{name:>36}  {dict(counts)}")
    for e in errors[:20]:
        log(f"FAILED TICK {e}")
    save(figures)
    return 0 if figures["failed_ticks"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
