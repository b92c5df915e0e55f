"""File drop -> searchable latency, and sustained ingest rate, with the real dagster-daemon.

A fresh data root and Dagster instance (the repo's dagster.yaml: queued runs, one at a
time) with the sensors as deployed. These parts are measured:

* latency: ``--drops`` single-record files, dropped one at a time. For each, the time
  from the file's write to the first index version (``index/CURRENT``) that holds its
  record: p50 / p95.
* sustained rate: ``--burst`` demo records dropped at once in files of 50, against the
  time until the index holds them all. It is compared with the embedding stage alone (the
  same texts through the same embedder in this process), as a ratio.

    python bench/drop_latency.py [--quick] [--drops 20] [--burst 1000] [--sensor-interval 1]

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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="5 drops, a burst of 200")
    ap.add_argument("--drops", type=int, default=20)
    ap.add_argument("--burst", type=int, default=1000)
    ap.add_argument("--sensor-interval", type=int, default=1)
    args = ap.parse_args()
    drops, burst = (5, 200) if args.quick else (args.drops, args.burst)
    recs, _, _ = common.corpus()
    tmp = Path(tempfile.mkdtemp(prefix="ss-latency-"))
    home, dagster_home = tmp / "home", tmp / "dagster"
    dagster_home.mkdir(parents=True)
    shutil.copyfile(ROOT / "dagster.yaml", dagster_home / "dagster.yaml")
    env = {**os.environ, "DAGSTER_HOME": str(dagster_home), "STREAM_SENTINEL_HOME": str(home),
           "STREAM_SENTINEL_SENSOR_INTERVAL": str(args.sensor_interval), "STREAM_SENTINEL_DEBOUNCE_SECONDS": "0.3"}
    env.pop("KAFKA_BOOTSTRAP_SERVERS", None)
    log = open(tmp / "daemon.log", "w")
    daemon = subprocess.Popen([str(Path(sys.executable).parent / "dagster-daemon"), "run", "-w",
                               str(ROOT / "workspace.yaml")], cwd=ROOT, env=env, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    raw, index_root = home / "raw", home / "index"
    latencies, results = [], {}
    try:
        raw.mkdir(parents=True, exist_ok=True)
        # a first file warms the daemon's code location and creates the index
        warm = dict(recs[0], id="warmup")
        (raw / "warmup.jsonl").write_text(json.dumps(warm) + "\n")
        if wait_until(lambda: "warmup" in indexed_ids(index_root), 600, 0.5) is None:
            raise RuntimeError(f"the warm-up record never became searchable; see {tmp / 'daemon.log'}")
        for i in range(drops):
            rec = dict(recs[100 + i], id=f"latency-{i}")
            path = raw / f"latency-{i:03d}.jsonl"
            t0 = time.perf_counter()
            path.write_text(json.dumps(rec) + "\n")
            t1 = wait_until(lambda: rec["id"] in indexed_ids(index_root), 300)
            latencies.append(None if t1 is None else t1 - t0)
            print(f"drop {i + 1}/{drops}: {latencies[-1] if t1 else 'timeout'} s", file=sys.stderr)
            time.sleep(0.5)
        ok = [x for x in latencies if x is not None]
        results["latency"] = {"drops": drops, "timeouts": drops - len(ok),
                              "p50_s": round(float(np.percentile(ok, 50)), 2) if ok else None,
                              "p95_s": round(float(np.percentile(ok, 95)), 2) if ok else None}

        batch = [dict(r, id=f"burst-{j}") for j, r in enumerate(recs[2000:2000 + burst])]
        t0 = time.perf_counter()
        for k in range(0, len(batch), 50):
            (raw / f"burst-{k:05d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in batch[k:k + 50]))
        want = {r["id"] for r in batch}
        t1 = wait_until(lambda: want <= indexed_ids(index_root), 1800, 0.5)
        pipeline_s = None if t1 is None else t1 - t0
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        try:
            daemon.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(daemon.pid, signal.SIGKILL)
        log.close()

    from stream_sentinel.embedding import Embedder

    emb = Embedder.load()
    emb.embed([r["text"] for r in batch[:8]])
    t = time.perf_counter()
    emb.embed([r["text"] for r in batch])
    embed_s = time.perf_counter() - t
    results["sustained"] = {"records": burst, "pipeline_s": round(pipeline_s, 1) if pipeline_s else None,
                            "records_per_s": round(burst / pipeline_s, 1) if pipeline_s else None,
                            "embedding_alone_per_s": round(burst / embed_s, 1),
                            "ratio_to_embedding": round(embed_s / pipeline_s, 2) if pipeline_s else None}
    shutil.rmtree(tmp, ignore_errors=True)
    lat, sus = results["latency"], results["sustained"]
    print(f"\ndrop -> searchable over {drops} single-record drops: p50 {lat['p50_s']} s, p95 {lat['p95_s']} s "
          f"({lat['timeouts']} timeouts); sensor interval {args.sensor_interval} s")
    print(f"sustained: {burst} records in {sus['pipeline_s']} s = {sus['records_per_s']} records/s; "
          f"embedding alone {sus['embedding_alone_per_s']} records/s (ratio {sus['ratio_to_embedding']})")
    figures = {"bench": "drop_latency", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "machine": platform.machine(), "results": results}
    out = ROOT / "bench" / "results" / "drop_latency.json"
    out.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
