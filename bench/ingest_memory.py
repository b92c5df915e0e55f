"""Peak memory of ingesting one large JSON Lines file, against its size.

For each size, a file of synthetic records (~540 bytes a line, 1 % invalid) is written to a
temp folder, then registered and ingested (``ingest.scan`` + ``ingest.process_file``, what a
``raw_records`` run does with a large file) in a fresh process on a fresh data root. The child
reports its peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss``), its RSS right after the imports
(pandas, DuckDB: the floor), the records ingested and the records/s of ``process_file``.

Variants, each on every size:
    now          this checkout, as deployed (chunk commits, DuckDB capped at
                 STREAM_SENTINEL_INGEST_DB_MEMORY, default 128MB)
    now-uncapped this checkout with STREAM_SENTINEL_INGEST_DB_MEMORY=off (DuckDB's own default,
                 80 % of RAM): what the cap is worth
    before       with ``--before REV``: the package as of that git revision (e.g. HEAD before the
                 fix: one transaction per file), on sizes up to ``--before-max-mb``

    python bench/ingest_memory.py [--quick] [--sizes 50,200,1000] [--before REV] [--before-max-mb 200]

Prints a table, ends with one JSON line, writes bench/results/ingest_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from stream_sentinel.config import DEFAULT_DB_MEMORY  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
from stream_sentinel import ingest
from stream_sentinel.config import Paths
from stream_sentinel.store import Store
floor = rss_mb()
paths = Paths.from_env().ensure()
store = Store(paths.db)
scan = ingest.scan(paths, store, debounce_s=0)
batches = ingest.plan_batches(store)
started = time.perf_counter()
outs = [ingest.process_file(paths, store, sha) for b in batches for sha in b.files]
seconds = time.perf_counter() - started
print(json.dumps({"module": ingest.__file__, "floor_mb": round(floor), "peak_mb": round(rss_mb()),
                  "seconds": round(seconds, 1), "records": sum(o.ingested for o in outs),
                  "rejected": sum(o.rejected for o in outs), "status": [o.status for o in outs]}))
"""

WORDS = ("the quick brown fox jumps over a lazy dog while spam and ham arrive by mail from a linux "
         "server with a free offer of money and an update for the list").split()


def write_jsonl(path: Path, mb: int, seed: int = 7) -> int:
    """About ``mb`` MB of records; every 100th is invalid (empty text). Returns the line count."""
    rnd = random.Random(seed)
    texts = [" ".join(rnd.choice(WORDS) for _ in range(rnd.randint(20, 120))) for _ in range(997)]
    target, size, n = mb * 1_000_000, 0, 0
    with open(path, "w") as fh:
        buf = []
        while size < target:
            text = "" if n % 100 == 99 else texts[n % len(texts)]
            line = json.dumps({"id": f"{path.stem}-{n}", "text": text, "event_time": "2024-05-01T12:00:00Z",
                               "features": {"len": len(text), "n": n % 7, "kind": "a"},
                               "label": "spam" if n % 3 else "ham", "source": "bench"}) + "\n"
            buf.append(line)
            size += len(line)
            n += 1
            if len(buf) >= 10_000:
                fh.write("".join(buf))
                buf.clear()
        fh.write("".join(buf))
    return n


def run_child(src: Path, home: Path, data: Path, env_extra: dict) -> dict:
    (home / "raw").mkdir(parents=True)
    os.link(data, home / "raw" / data.name)  # same bytes, no copy
    past = time.time() - 60
    os.utime(home / "raw" / data.name, (past, past))
    env = {**os.environ, "STREAM_SENTINEL_HOME": str(home), "PYTHONPATH": str(src), **env_extra}
    out = subprocess.run([sys.executable, "-c", CHILD], cwd=src, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"ingest child failed: {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="20 and 100 MB")
    ap.add_argument("--sizes", default=None, help="file sizes in MB, comma-separated (default 50,200,1000)")
    ap.add_argument("--before", default=None, help="also measure the package as of this git revision")
    ap.add_argument("--before-max-mb", type=int, default=200, help="largest size measured for --before")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder")
    args = ap.parse_args()
    sizes = [int(s) for s in (args.sizes or ("20,100" if args.quick else "50,200,1000")).split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="ingest-memory-"))
    variants: list[tuple[str, Path, dict, int]] = [
        ("now", ROOT, {}, max(sizes)),
        ("now-uncapped", ROOT, {"STREAM_SENTINEL_INGEST_DB_MEMORY": "off"}, max(sizes)),
    ]
    if args.before:
        before_src = tmp / "before"
        before_src.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.before, "stream_sentinel"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(before_src)], input=archive, check=True)
        variants.append((f"before ({args.before})", before_src, {}, args.before_max_mb))
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    rows = []
    try:
        for mb in sizes:
            data = tmp / f"records-{mb}mb.jsonl"
            t = time.perf_counter()
            lines = write_jsonl(data, mb)
            print(f"wrote {data.name}: {data.stat().st_size / 1e6:.0f} MB, {lines:,} lines "
                  f"({time.perf_counter() - t:.0f} s)", flush=True)
            for name, src, env_extra, max_mb in variants:
                if mb > max_mb:
                    continue
                home = tmp / f"home-{name.split()[0]}-{mb}"
                r = run_child(src, home, data, env_extra)
                shutil.rmtree(home, ignore_errors=True)
                row = {"variant": name, "file_mb": round(data.stat().st_size / 1e6), "records": r["records"],
                       "rejected": r["rejected"], "seconds": r["seconds"],
                       "records_per_s": round(r["records"] / r["seconds"]) if r["seconds"] else None,
                       "floor_mb": r["floor_mb"], "peak_rss_mb": r["peak_mb"],
                       "rss_mb_per_file_mb": round((r["peak_mb"] - r["floor_mb"]) / (data.stat().st_size / 1e6), 2)}
                rows.append(row)
                print(f"  {name:<16} {row['file_mb']:>5} MB  {row['records']:>9,} records  {row['seconds']:>6} s  "
                      f"{row['records_per_s']:>7,} rec/s  peak RSS {row['peak_rss_mb']:>5} MB "
                      f"(floor {row['floor_mb']} MB, +{row['rss_mb_per_file_mb']} MB per file MB)", flush=True)
            data.unlink()
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"\ncpu: {cpu} ({os.cpu_count()} cores)")
    print(f"{'variant':<18}{'file MB':>8}{'records':>11}{'rec/s':>9}{'peak RSS MB':>13}{'MB/MB':>7}")
    for r in rows:
        print(f"{r['variant']:<18}{r['file_mb']:>8}{r['records']:>11,}{r['records_per_s']:>9,}"
              f"{r['peak_rss_mb']:>13}{r['rss_mb_per_file_mb']:>7}")
    now = [r for r in rows if r["variant"] == "now"]
    figures = {"bench": "ingest_memory", "cpu": cpu, "cores": os.cpu_count(), "quick": args.quick,
               "db_memory": os.environ.get("STREAM_SENTINEL_INGEST_DB_MEMORY") or f"{DEFAULT_DB_MEMORY} (default)",
               "peak_rss_mb_largest": now[-1]["peak_rss_mb"] if now else None,
               "largest_file_mb": now[-1]["file_mb"] if now else None, "runs": rows}
    common.save(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
