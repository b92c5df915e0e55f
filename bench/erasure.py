"""Erasing one record from a 100k-record data root, with and without the retrain it causes.

The root: the demo corpus repeated to N records (new ids, vectors perturbed), ingested from
100 raw JSONL files through the product's ingest, one embedding per record, labels for a
share of them (feedback events), a trained champion, an exact FAISS index with two backups.
Then, timed in one run:

    not in training   erase a record no model was trained on (no model is withdrawn)
    in training       erase a record of the champion's training set: the champion is
                      withdrawn; then the full retrain without it (train_candidate, full)
    compaction        of the two erasure times, the DuckDB rewrite alone (measured again)

Prints a table, ends with one JSON line, writes bench/results/erasure.json.

    python bench/erasure.py [--quick] [--records 100000] [--labelled 5000]
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

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

MODEL_ID = "bench-synthetic"


def build(home: Path, n: int, labelled: int) -> dict:
    import pyarrow as pa

    from stream_sentinel import feedback as fb
    from stream_sentinel import ingest, pipeline
    from stream_sentinel.config import Paths
    from stream_sentinel.embedding.embedder import Embedder
    from stream_sentinel.index import IndexStore
    from stream_sentinel.learning import loop as learning
    from stream_sentinel.learning.models import TrainParams, load_training_set
    from stream_sentinel.learning.registry import ModelRegistry
    from stream_sentinel.store import Store

    recs, labels, _ = common.corpus()
    vecs, _ = common.demo_vectors(Embedder.load(), recs)
    paths = Paths.at(home).ensure()
    store = Store(paths.db)
    rng = np.random.default_rng(0)
    rows, per_file = [], max(1, n // 100)
    for i in range(n):
        r = recs[i % len(recs)]
        rows.append({"id": f"{r['id']}#{i}", "text": r["text"], "event_time": r["event_time"],
                     "features": r.get("features") or {}})
    for f in range(0, n, per_file):
        (paths.raw / f"part-{f // per_file:03d}.jsonl").write_text(
            "".join(json.dumps(x) + "\n" for x in rows[f:f + per_file]))
    t0 = time.perf_counter()
    ingest.scan(paths, store, debounce_s=0)
    for b in ingest.plan_batches(store, max_records=20_000):
        ingest.process_files(paths, store, list(b.files))
    ingest_s = time.perf_counter() - t0
    with store.connect() as con:
        ids = con.execute("SELECT id, vec_id FROM records ORDER BY vec_id").fetchall()
    base = np.asarray(vecs, dtype=np.float32)
    v = base[[int(rid.rsplit("#", 1)[1]) % len(recs) for rid, _ in ids]]
    v = v + rng.normal(0, 0.02, v.shape).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    dim = v.shape[1]
    table = pa.table({"record_id": [r for r, _ in ids], "model_id": [MODEL_ID] * len(ids),
                      "vec_id": pa.array([x for _, x in ids], pa.int64()), "dim": pa.array([dim] * len(ids), pa.int32()),
                      "vector": pa.array(list(v), pa.list_(pa.float32())),
                      "created_at": pa.array([datetime.now(timezone.utc)] * len(ids), pa.timestamp("us", "UTC"))})
    with store.transaction() as con:
        con.register("_emb", table)
        con.execute("INSERT INTO embeddings SELECT * FROM _emb")
        con.unregister("_emb")
    chosen = rng.choice(len(ids), size=min(labelled, len(ids)), replace=False)
    events = [fb.Event(fb.Position("bench", 0, int(j)), ids[j][0], labels[ids[j][0].rsplit("#", 1)[0]], "oracle",
                       1.0, datetime(2024, 1, 1, tzinfo=timezone.utc)) for j in chosen]
    fb.write(store, events, [], "file")
    fb.resolve_labels(store, fb.ConsensusConfig())
    index = IndexStore(paths.index)
    for _ in range(3):  # a current version and backups, as a live root has
        pipeline.update_index(store, index, MODEL_ID, dim, rebuild_ratio=0.0)
        with store.transaction() as con:  # a new record per version, so each is a new version
            con.execute("DELETE FROM embeddings WHERE vec_id = (SELECT max(vec_id) FROM embeddings)")
    pipeline.update_index(store, index, MODEL_ID, dim)
    registry = ModelRegistry(paths.models, store)
    ts = load_training_set(store, MODEL_ID, "spam")
    learning.persist_training_set(store, ts, MODEL_ID)
    ts = learning.training_set_for_version(store, ts.data_version, MODEL_ID)
    first = learning.train_candidate(registry, store, ts, MODEL_ID, TrainParams(), full=True).version
    registry.promote(first.version, None, "bench")
    with store.connect() as con:
        trained = con.execute("SELECT record_id FROM training_set_rows WHERE data_version = ? AND split = 'train' "
                              "LIMIT 1", [first.training_set_version]).fetchone()[0]
        untrained = con.execute("""SELECT r.id FROM records r JOIN embeddings e ON e.record_id = r.id
                                   WHERE r.id NOT IN (SELECT record_id FROM training_set_rows) LIMIT 1""").fetchone()[0]
    return {"paths": paths, "store": store, "registry": registry, "trained": trained, "untrained": untrained,
            "ingest_s": ingest_s, "champion": first.version, "versions": len(index.versions())}


def main() -> int:
    from stream_sentinel.erasure import operation
    from stream_sentinel.erasure.compact import compact
    from stream_sentinel.erasure.requests import Request
    from stream_sentinel.learning import loop as learning
    from stream_sentinel.learning.models import TrainParams, load_training_set

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="10k records")
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--labelled", type=int, default=5_000)
    args = ap.parse_args()
    n = 10_000 if args.quick else args.records
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        root = build(Path(tmp) / "home", n, args.labelled)
        paths, store = root["paths"], root["store"]
        db_mb = paths.db.stat().st_size / 1e6
        print(f"data root: {n:,} records in 100 files, {args.labelled:,} labelled, {root['versions']} index versions, "
              f"DuckDB {db_mb:.0f} MB; built in {time.perf_counter() - t0:.0f} s")
        now = datetime.now(timezone.utc)
        plain = operation.erase(paths, store, [Request(root["untrained"], "bench", now)])
        print(f"erase, not in training: {plain.seconds:.2f} s (withdrawn: {plain.outcomes[0].withdrawn})")
        trained = operation.erase(paths, store, [Request(root["trained"], "bench", now)])
        o = trained.outcomes[0]
        print(f"erase, in the champion's training set: {trained.seconds:.2f} s (withdrawn: {o.withdrawn}, "
              f"retrain needed: {o.retrain_needed})")
        t0 = time.perf_counter()
        ts = load_training_set(store, MODEL_ID, "spam")
        learning.persist_training_set(store, ts, MODEL_ID)
        ts = learning.training_set_for_version(store, ts.data_version, MODEL_ID)
        learning.train_candidate(root["registry"], store, ts, MODEL_ID, TrainParams(), full=True, cause="erasure")
        retrain_s = time.perf_counter() - t0
        print(f"full retrain without it: {retrain_s:.2f} s -> erasure with the retrain {trained.seconds + retrain_s:.2f} s")
        t0 = time.perf_counter()
        compact(store)
        compact_s = time.perf_counter() - t0
        print(f"of which the DuckDB rewrite alone: {compact_s:.2f} s ({paths.db.stat().st_size / 1e6:.0f} MB)")
    common.save({
        "bench": "erasure", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.machine(), "cpu": common.cpu_name(), "records": n, "labelled": args.labelled,
        "db_mb": round(db_mb), "erase_untrained_s": round(plain.seconds, 2),
        "erase_trained_s": round(trained.seconds, 2), "retrain_s": round(retrain_s, 2),
        "erase_with_retrain_s": round(trained.seconds + retrain_s, 2), "compact_s": round(compact_s, 2),
        "champion_withdrawn": o.withdrawn is not None,
    })
    return 0 if o.withdrawn is not None and plain.outcomes[0].withdrawn is None else 1


if __name__ == "__main__":
    sys.exit(main())
