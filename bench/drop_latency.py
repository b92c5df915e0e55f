"""File drop -> searchable latency, and sustained ingest rate, with the real dagster-daemon.

A fresh data root and Dagster instance (the repo's dagster.yaml: queued runs, one at a
time) with the sensors as deployed. These parts are measured:

* latency: ``--drops`` single-record files, dropped one at a time. For each, the time
  from the file's write to the first index version (``index/CURRENT``) that holds its
  record: p50 / p95.
* sustained rate: ``--burst`` demo records dropped at once in files of 50, against the
  time until the index holds them all. It is compared with the embedding stage alone (the
  same texts through the same embedder in this process), as a ratio.

Both are measured twice in the same run. Once with the shared embedding server, as
`stream-sentinel up` runs it, and once with each run loading the model itself.

    python bench/drop_latency.py [--quick] [--drops 20] [--burst 3000] [--sensor-interval 1]

Prints a table, ends with one JSON line, writes bench/results/drop_latency.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def indexed_ids(index_root: Path) -> set[str]:
    import pyarrow.parquet as pq

    try:
        version = (index_root / "CURRENT").read_text().strip()
        return set(pq.read_table(index_root / version / "ids.parquet", columns=["record_id"])
                   .column("record_id").to_pylist())
    except (FileNotFoundError, OSError):
        return set()


def wait_until(pred, timeout: float, poll: float = 0.1) -> float | None:
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if pred():
            return time.perf_counter()
        time.sleep(poll)
    return None


def measure(recs: list[dict], drops: int, burst: int, sensor_interval: int, server: bool) -> dict:
    """One fresh deployment: daemon (+ the embedding server when ``server``), drops, then a burst."""
    tmp = Path(tempfile.mkdtemp(prefix="ss-latency-"))
    home, dagster_home = tmp / "home", tmp / "dagster"
    dagster_home.mkdir(parents=True)
    shutil.copyfile(ROOT / "dagster.yaml", dagster_home / "dagster.yaml")
    env = {**os.environ, "DAGSTER_HOME": str(dagster_home), "STREAM_SENTINEL_HOME": str(home),
           "STREAM_SENTINEL_SENSOR_INTERVAL": str(sensor_interval), "STREAM_SENTINEL_DEBOUNCE_SECONDS": "0.3"}
    env.pop("KAFKA_BOOTSTRAP_SERVERS", None)
    log = open(tmp / "daemon.log", "w")
    procs = []
    raw, index_root = home / "raw", home / "index"
    raw.mkdir(parents=True, exist_ok=True)
    if server:  # as `stream-sentinel up` does
        procs.append(subprocess.Popen([sys.executable, "-m", "stream_sentinel.cli", "embed-server"], cwd=ROOT,
                                      env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        if wait_until(lambda: (home / "embedder.sock").exists(), 300, 0.2) is None:
            raise RuntimeError(f"the embedding server did not start; see {tmp / 'daemon.log'}")
    procs.append(subprocess.Popen([str(Path(sys.executable).parent / "dagster-daemon"), "run", "-w",
                                   str(ROOT / "workspace.yaml")], cwd=ROOT, env=env, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True))
    latencies = []
    pipeline_s = None
    batch = [dict(r, id=f"burst-{j}") for j, r in enumerate(recs[2000:2000 + burst])]
    try:
        # a first file warms the daemon's code location and creates the index
        (raw / "warmup.jsonl").write_text(json.dumps(dict(recs[0], id="warmup")) + "\n")
        if wait_until(lambda: "warmup" in indexed_ids(index_root), 600, 0.5) is None:
            raise RuntimeError(f"the warm-up record never became searchable; see {tmp / 'daemon.log'}")
        for i in range(drops):
            rec = dict(recs[100 + i], id=f"latency-{i}")
            t0 = time.perf_counter()
            (raw / f"latency-{i:03d}.jsonl").write_text(json.dumps(rec) + "\n")
            t1 = wait_until(lambda: rec["id"] in indexed_ids(index_root), 300)
            latencies.append(None if t1 is None else t1 - t0)
            print(f"{'server' if server else 'in-process'} drop {i + 1}/{drops}: "
                  f"{'timeout' if t1 is None else f'{latencies[-1]:.2f} s'}", file=sys.stderr)
            time.sleep(0.5)
        t0 = time.perf_counter()
        for k in range(0, len(batch), 50):
            (raw / f"burst-{k:05d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in batch[k:k + 50]))
        want = {r["id"] for r in batch}
        t1 = wait_until(lambda: want <= indexed_ids(index_root), 1800, 0.5)
        pipeline_s = None if t1 is None else t1 - t0
    finally:
        for p in reversed(procs):
            os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)
    ok = [x for x in latencies if x is not None]
    return {"drops": drops, "timeouts": drops - len(ok),
            "p50_s": round(float(np.percentile(ok, 50)), 2) if ok else None,
            "p95_s": round(float(np.percentile(ok, 95)), 2) if ok else None,
            "burst_records": burst, "burst_s": round(pipeline_s, 1) if pipeline_s else None,
            "records_per_s": round(burst / pipeline_s, 1) if pipeline_s else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="5 drops, a burst of 200")
    ap.add_argument("--drops", type=int, default=20)
    ap.add_argument("--burst", type=int, default=3000)
    ap.add_argument("--sensor-interval", type=int, default=1)
    args = ap.parse_args()
    drops, burst = (5, 200) if args.quick else (args.drops, args.burst)
    recs, _, _ = common.corpus()
    results = {"embed-server (as `up` runs)": measure(recs, drops, burst, args.sensor_interval, True),
               "in-process model": measure(recs, drops, burst, args.sensor_interval, False)}

    from stream_sentinel.embedding import Embedder

    emb = Embedder.load()
    texts = [r["text"] for r in recs[2000:2000 + burst]]
    emb.embed(texts[:8])
    t = time.perf_counter()
    emb.embed(texts)
    embed_rate = burst / (time.perf_counter() - t)
    for r in results.values():
        r["embedding_alone_per_s"] = round(embed_rate, 1)
        r["ratio_to_embedding"] = round(r["records_per_s"] / embed_rate, 2) if r["records_per_s"] else None
    print(f"\n{drops} single-record drops, then {burst} records in files of 50; sensor interval "
          f"{args.sensor_interval} s; embedding alone {embed_rate:.1f} records/s\n")
    print(f"{'mode':<30}{'p50 s':>7}{'p95 s':>7}{'records/s':>11}{'vs embedding':>14}")
    for name, r in results.items():
        print(f"{name:<30}{r['p50_s']:>7}{r['p95_s']:>7}{r['records_per_s']:>11}{r['ratio_to_embedding']:>14}")
    figures = {"bench": "drop_latency", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "machine": platform.machine(), "results": results}
    common.save(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
