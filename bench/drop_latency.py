"""File drop -> searchable latency, and sustained ingest rate, with the real dagster-daemon.

A fresh data root and Dagster instance (the packaged dagster.yaml: queued runs, one at a
time) with the sensors as deployed. These parts are measured:

* latency: ``--drops`` single-record files, dropped one at a time. For each, the time
  from the file's write to the first index version (``index/CURRENT``) that holds its
  record: p50 / p95.
* burst rate: ``--burst`` demo records dropped at once in files of 50, against the
  time until the index holds them all. It is compared with the embedding stage alone: the
  same texts through the embedder the runs used (the server, compiled, or the in-process
  model), as a ratio. The burst's runs are listed with their queue time and step times.
* sustained rate: files of 50 records offered for ``--sustain`` seconds at 1.25x the
  embedding rate, so runs follow each other as in a steady stream; the rate from the first
  index version holding them to the last (see ``sustained``), against embedding alone.

All are measured twice in the same run. Once with the shared embedding server, as
`stream-sentinel up` runs it (compiled before anything is measured), and once with each
run loading the model itself. The sensor interval is set to 1 s, but the dagster-daemon
evaluates sensors at most every 5 s (its sensor loop), so a drop waits 0-5 s for a tick.

    python bench/drop_latency.py [--quick] [--drops 20] [--burst 3000] [--sustain 240]
                                 [--sensor-interval 1] [--mode both|server|in-process]

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
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the repo on sys.path)

from stream_sentinel import dagster_home as dagster_home_files  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


_IDS_CACHE: dict[Path, tuple[str, set[str]]] = {}


def indexed_ids(index_root: Path) -> set[str]:
    """Record ids in the current index version. The ids file is read once per version: the
    poll must not take CPU from the pipeline it measures."""
    import pyarrow.parquet as pq

    try:
        version = (index_root / "CURRENT").read_text().strip()
        cached = _IDS_CACHE.get(index_root)
        if cached and cached[0] == version:
            return cached[1]
        ids = set(pq.read_table(index_root / version / "ids.parquet", columns=["record_id"])
                  .column("record_id").to_pylist())
        _IDS_CACHE[index_root] = (version, ids)
        return ids
    except (FileNotFoundError, OSError):
        return set()


def wait_until(pred, timeout: float, poll: float = 0.1) -> float | None:
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if pred():
            return time.perf_counter()
        time.sleep(poll)
    return None


def server_state(home: Path) -> dict:
    from stream_sentinel.embedding.server import RemoteEmbedder

    try:
        return RemoteEmbedder(home / "embedder.sock", "", 0, timeout_s=5).ping()
    except OSError:
        return {}


def embedding_alone(home: Path, batch: list[dict], server: bool) -> float:
    """records/s of the embedding stage alone, as the runs embed (chunks of
    ``pipeline.EMBED_CHUNK``): through the server when one runs (compiled, as the runs saw
    it), else in this process."""
    from stream_sentinel.embedding.server import connect
    from stream_sentinel.embedding.embedder import Embedder
    from stream_sentinel.pipeline import EMBED_CHUNK

    emb = Embedder.load()
    embedder = connect(home / "embedder.sock", emb.model_id, emb.dim) if server else emb
    texts = [r["text"] for r in batch]
    embedder.embed(texts[:16])
    t = time.perf_counter()
    for i in range(0, len(texts), EMBED_CHUNK):
        embedder.embed(texts[i:i + EMBED_CHUNK])
    return len(texts) / (time.perf_counter() - t)


def run_breakdown(dagster_home: Path, since: float) -> list[dict]:
    """Where a burst's seconds went: per run, queued -> started -> each step -> ended."""
    import dagster as dg

    instance = dg.DagsterInstance.from_config(str(dagster_home))
    out = []
    prev_end = None
    for rec in sorted(instance.get_run_records(), key=lambda r: r.create_timestamp.timestamp()):
        created = rec.create_timestamp.timestamp()
        if created < since or rec.start_time is None:
            continue
        steps = {s.step_key: round(s.end_time - s.start_time, 2)
                 for s in instance.get_run_step_stats(rec.dagster_run.run_id) if s.end_time and s.start_time}
        # the handover: from the previous run's end to this one's start, when this one was waiting
        handover = (round(rec.start_time - prev_end, 2)
                    if prev_end is not None and created < prev_end < rec.start_time else None)
        out.append({"job": rec.dagster_run.job_name, "queued_s": round(rec.start_time - created, 2),
                    "handover_s": handover,
                    "run_s": round((rec.end_time or rec.start_time) - rec.start_time, 2), "steps": steps})
        prev_end = rec.end_time
    return out


def sustained(raw: Path, index_root: Path, recs: list[dict], rate: float, seconds: float) -> dict:
    """Files of 50 records written at ``rate`` records/s for ``seconds`` (faster than the
    pipeline can go, so runs follow each other), then drained. The sustained rate is counted
    from the first index version holding any of them to the last: every later run, with its
    launch and every step, is inside that window; the first run's start-up is not."""
    per_file = 50
    n_files = max(3, int(rate * seconds / per_file))
    want = {f"sustain-{k}-{j}" for k in range(n_files) for j in range(per_file)}

    def produce() -> None:
        t0 = time.perf_counter()
        for k in range(n_files):
            time.sleep(max(0.0, t0 + k * per_file / rate - time.perf_counter()))
            body = "".join(json.dumps(dict(recs[(k * per_file + j) % len(recs)], id=f"sustain-{k}-{j}")) + "\n"
                           for j in range(per_file))
            (raw / f"sustain-{k:05d}.jsonl").write_text(body)

    producer = threading.Thread(target=produce, daemon=True)
    t_start = time.perf_counter()
    producer.start()
    samples: list[tuple[float, int]] = []
    while time.perf_counter() - t_start < 1800:
        n = len(want & indexed_ids(index_root))
        if not samples or n != samples[-1][1]:
            samples.append((time.perf_counter(), n))
        if n == len(want):
            break
        time.sleep(0.25)
    producer.join()
    first = next(((t, n) for t, n in samples if n > 0), None)
    # steady state: from the first index version after half the offering time. Batches start
    # small and grow to the cap over the first minutes (each queued batch holds what arrived
    # during the run before the one ahead of it), which the whole window includes.
    mid = next(((t, n) for t, n in samples if t >= t_start + seconds / 2 and n > 0), None)
    last = samples[-1]
    steps = sum(1 for i in range(1, len(samples)) if samples[i][1] > samples[i - 1][1])
    ok = first is not None and last[1] == len(want) and last[0] > first[0]
    steady_ok = ok and mid is not None and last[0] > mid[0]
    return {"records": len(want), "offered_per_s": round(rate, 1), "index_versions": steps,
            "records_per_s": round((last[1] - first[1]) / (last[0] - first[0]), 1) if ok else None,
            "steady_per_s": round((last[1] - mid[1]) / (last[0] - mid[0]), 1) if steady_ok else None,
            "steady_from_s": round(mid[0] - t_start, 1) if steady_ok else None,
            "total_s": round(last[0] - t_start, 1)}


def measure(recs: list[dict], drops: int, burst: int, sensor_interval: int, server: bool,
            sustain_s: float) -> dict:
    """One fresh deployment: daemon (+ the embedding server when ``server``), drops, then a burst."""
    tmp = Path(tempfile.mkdtemp(prefix="ss-latency-"))
    home, dagster_home = tmp / "home", tmp / "dagster"
    dagster_home_files.prepare(dagster_home)  # the packaged dagster.yaml and workspace.yaml, as `up` does
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
        compiled = wait_until(lambda: server_state(home).get("compiled") or server_state(home).get("compile_error"),
                              900, 1.0)  # measure the steady state, not the start
        state = server_state(home)
        print(f"embedding server: {'compiled' if state.get('compiled') else state.get('compile_error')}"
              f"{'' if compiled else ' (timed out waiting)'}", file=sys.stderr)
    procs.append(subprocess.Popen([str(Path(sys.executable).parent / "dagster-daemon"), "run", "-w",
                                   str(dagster_home / "workspace.yaml")], cwd=dagster_home, env=env, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True))
    latencies = []
    pipeline_s, burst_runs, embed_rate, sustain, sustain_runs = None, [], float("nan"), {}, []
    batch = [dict(r, id=f"burst-{j}") for j, r in enumerate(recs[2000:2000 + burst])]
    try:
        # a first file warms the daemon's code location and creates the index
        (raw / "warmup.jsonl").write_text(json.dumps(dict(recs[0], id="warmup")) + "\n")
        if wait_until(lambda: "warmup" in indexed_ids(index_root), 600, 0.5) is None:
            raise RuntimeError(f"the warm-up record never became searchable; see {tmp / 'daemon.log'}")
        embed_rate = embedding_alone(home, batch, server)
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
        burst_runs = run_breakdown(dagster_home, since=time.time() - (time.perf_counter() - t0))
        if sustain_s > 0:
            # The machine is shared and its speed drifts by tens of percent over minutes: the
            # embedding stage alone is measured on the stream's own texts right before and
            # right after the window, and the ratio uses their mean.
            n_alone = min(2000, max(300, burst))  # --quick: a few seconds each
            stream_texts = [recs[j * len(recs) // n_alone] for j in range(n_alone)]
            before = embedding_alone(home, stream_texts, server)
            since = time.time()
            sustain = sustained(raw, index_root, recs, 1.25 * before, sustain_s)
            sustain_runs = run_breakdown(dagster_home, since=since)
            after = embedding_alone(home, stream_texts, server)
            sustain.update(alone_before_per_s=round(before, 1), alone_after_per_s=round(after, 1),
                           alone_per_s=round((before + after) / 2, 1))
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
    return {"embedding_alone_per_s": round(embed_rate, 1),
            "ratio_to_embedding": round(burst / pipeline_s / embed_rate, 2) if pipeline_s else None,
            "sustained": sustain,
            "sustained_ratio_to_embedding": (round(sustain["records_per_s"] / sustain["alone_per_s"], 2)
                                             if sustain.get("records_per_s") else None),
            "steady_ratio_to_embedding": (round(sustain["steady_per_s"] / sustain["alone_per_s"], 2)
                                          if sustain.get("steady_per_s") else None),
            "burst_runs": burst_runs, "sustained_runs": sustain_runs,
            "drops": drops, "timeouts": drops - len(ok),
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
    ap.add_argument("--mode", choices=["both", "server", "in-process"], default="both")
    ap.add_argument("--sustain", type=float, default=240.0,
                    help="seconds of files offered at 1.25x the embedding rate (0: skip)")
    args = ap.parse_args()
    drops, burst, sustain_s = (5, 200, 8.0) if args.quick else (args.drops, args.burst, args.sustain)
    recs, _, _ = common.corpus()
    results = {}
    if args.mode in ("both", "server"):
        results["embed-server (as `up` runs)"] = measure(recs, drops, burst, args.sensor_interval, True, sustain_s)
    if args.mode in ("both", "in-process"):
        results["in-process model"] = measure(recs, drops, burst, args.sensor_interval, False, sustain_s)

    print(f"\n{drops} single-record drops, then {burst} records in files of 50; sensor interval "
          f"{args.sensor_interval} s\n")
    print(f"{'mode':<30}{'p50 s':>7}{'p95 s':>7}{'embedding alone':>17}{'burst/s':>9}{'ratio':>7}"
          f"{'sustained/s':>13}{'ratio':>7}")
    for name, r in results.items():
        print(f"{name:<30}{r['p50_s']:>7}{r['p95_s']:>7}{r['embedding_alone_per_s']:>17}{r['records_per_s']:>9}"
              f"{r['ratio_to_embedding']:>7}{r['sustained'].get('records_per_s')!s:>13}"
              f"{r['sustained_ratio_to_embedding']!s:>7}")
    for name, r in results.items():
        if r["sustained"].get("alone_per_s"):
            print(f"{name}: sustained window against embedding alone measured just before "
                  f"({r['sustained']['alone_before_per_s']}/s) and after ({r['sustained']['alone_after_per_s']}/s); "
                  f"steady state (from {r['sustained'].get('steady_from_s')} s): "
                  f"{r['sustained'].get('steady_per_s')}/s, ratio {r['steady_ratio_to_embedding']}")
    for name, r in results.items():
        for what in ("burst", "sustained"):
            print(f"\n{name}: {what} runs (queued s, handover from the previous run s, run s, steps s)")
            for run in r[f"{what}_runs"]:
                print(f"  {run['job']:<14}{run['queued_s']:>7}{run['handover_s']!s:>6}{run['run_s']:>8}  "
                      + ", ".join(f"{k} {v}" for k, v in run["steps"].items() if not k.startswith("vector_index_")))
    figures = {"bench": "drop_latency", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "machine": platform.machine(), "results": results}
    common.save(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
