"""Code-location load time and the peak memory of each kind of run.

* load time: ``import stream_sentinel.definitions`` and building its definitions in a fresh
  interpreter (median of 5),
  and which heavy libraries that import pulled in (there should be none: torch,
  sentence_transformers, evidently, lightgbm, faiss are imported inside the runs).
* peak RSS: each run kind through the CLI on a fresh data root and Dagster instance,
  in its own process (``wait4`` rusage of the child):
    ingest    demo records -> records -> embeddings -> index -> predictions (run --once)
    feedback  their labels from the feedback/ folder -> labels -> training run (run --once)
    retrain   a full retrain (model retrain --full)
    drift     today's drift report (drift backfill)
    status    stream-sentinel status --json
    embed-server   the embedding server after compiling the model and embedding 256 texts
                   (VmHWM: it keeps running)

    python bench/footprint.py [--quick] [--records 1000]

Prints a table, ends with one JSON line, writes bench/results/footprint.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import common  # noqa: E402
HEAVY = ("torch", "sentence_transformers", "evidently", "lightgbm", "faiss", "transformers", "bm25s", "starlette")


def load_time() -> tuple[float, list[str]]:
    # the import and the definitions (built lazily, when Dagster asks the code location for them)
    code = ("import sys, time; t = time.perf_counter(); import stream_sentinel.definitions as d; d.defs(); "
            "print(time.perf_counter() - t); print(','.join(m for m in %r if m in sys.modules))" % (HEAVY,))
    times, heavy = [], []
    for _ in range(5):
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
        lines = out.stdout.strip().splitlines()
        times.append(float(lines[0]))
        heavy = [m for m in (lines[1].split(",") if len(lines) > 1 else []) if m]
    return statistics.median(times), heavy


def run_measured(args: list[str], env: dict) -> dict:
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "stream_sentinel.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read()
    code = os.waitstatus_to_exitcode(status)
    if code not in (0, 1):
        raise RuntimeError(f"{' '.join(args)} exited {code}: {err[-2000:]}")
    return {"seconds": round(time.perf_counter() - started, 1), "peak_rss_mb": usage.ru_maxrss // 1024,
            "exit": code}


def embed_server_peak(env: dict, home: Path) -> dict:
    """The embedding server from start until it has compiled the model and embedded a batch:
    its VmHWM (it keeps running, so wait4 cannot tell)."""
    import signal

    from stream_sentinel.embedding.server import RemoteEmbedder, connect
    from stream_sentinel.embedding.embedder import model_dimension, model_id

    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "stream_sentinel.cli", "embed-server"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    sock = home / "embedder.sock"
    try:
        deadline = time.monotonic() + 900
        head: dict = {}
        while time.monotonic() < deadline and not (head.get("compiled") or head.get("compile_error")):
            time.sleep(1)
            try:
                head = RemoteEmbedder(sock, "", 0, timeout_s=5).ping() if sock.exists() else {}
            except OSError:
                head = {}
        remote = connect(sock, model_id(), model_dimension())
        recs, _, _ = common.corpus()
        if remote is not None:
            remote.embed([r["text"] for r in recs[:256]])
        hwm = next(int(line.split()[1]) for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
                   if line.startswith("VmHWM:"))
        return {"seconds": round(time.perf_counter() - started, 1), "peak_rss_mb": hwm // 1024,
                "compiled": bool(head.get("compiled")), "exit": 0}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="200 records")
    ap.add_argument("--records", type=int, default=1000)
    args = ap.parse_args()
    n = 200 if args.quick else args.records
    seconds, heavy = load_time()
    results: dict = {"load": {"seconds": round(seconds, 2), "heavy_imports": heavy}}
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "STREAM_SENTINEL_HOME": f"{tmp}/home", "DAGSTER_HOME": f"{tmp}/dagster",
               "STREAM_SENTINEL_DEBOUNCE_SECONDS": "0", "STREAM_SENTINEL_RETRAIN_MIN_LABELS": "1"}
        env.pop("KAFKA_BOOTSTRAP_SERVERS", None)
        Path(env["DAGSTER_HOME"]).mkdir(parents=True)
        cli = [sys.executable, "-m", "stream_sentinel.cli"]
        subprocess.run(cli + ["demo-data", "replay", "--limit", str(n), "--start", "1000", "--quiet"], cwd=ROOT,
                       env=env, check=True, capture_output=True)
        time.sleep(1)
        results["ingest"] = run_measured(["run", "--once"], env)
        subprocess.run(cli + ["demo-data", "feedback", "--limit", str(n), "--start", "1000", "--quiet"], cwd=ROOT,
                       env=env, check=True, capture_output=True)
        results["feedback + training"] = run_measured(["run", "--once"], env)
        results["full retrain"] = run_measured(["model", "retrain", "--full"], env)
        today = datetime.now(timezone.utc).date().isoformat()
        results["drift report"] = run_measured(["drift", "backfill", "--from", today, "--to", today], env)
        results["status"] = run_measured(["status", "--json"], env)
        results["embed-server (compiled)"] = embed_server_peak(env, Path(tmp) / "home")
    print(f"\ncode location load: {results['load']['seconds']} s (heavy imports: {heavy or 'none'})\n")
    print(f"{'run kind':<22}{'seconds':>9}{'peak RSS MB':>13}")
    for name, r in results.items():
        if name != "load":
            print(f"{name:<22}{r['seconds']:>9}{r['peak_rss_mb']:>13}")
    figures = {"bench": "footprint", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "machine": platform.machine(), "records": n, "results": results}
    common.save(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
