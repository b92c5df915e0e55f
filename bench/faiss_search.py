"""FAISS search at 1M vectors, k = 10: latency per query and recall@10 against exact search.

The vectors are built from the real MiniLM embeddings of the demo corpus: mixtures of two
demo vectors plus a little noise, normalized, so that the data has the manifold structure
of text embeddings (uniform noise would make every index look bad, copies make it look good).
Index types, in the same run:

* Flat,IP             exact search, what the product uses below STREAM_SENTINEL_INDEX_IVF_THRESHOLD
* IVF<n>,Flat,IP      what a rebuild makes above it (the product's own new_index), at several
                      nprobe; and the same with a quarter of the lists
* HNSW32,Flat         for comparison only (no remove_ids); --hnsw-size limits it (default: all)

Queries are single (one vector per search call, as a user's search is), 1,000 of them,
held out from the index. Prints a table, ends with one JSON line, writes
bench/results/faiss_search.json.

    python bench/faiss_search.py [--quick] [--size 1000000]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def synthetic(base: np.ndarray, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n, base.shape[1]), dtype=np.float32)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        i, j = rng.integers(0, len(base), m), rng.integers(0, len(base), m)
        w = rng.random((m, 1), dtype=np.float32)
        v = w * base[i] + (1 - w) * base[j] + rng.normal(0, 0.01, (m, base.shape[1])).astype(np.float32)
        out[s:s + m] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return out


def timed_queries(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    lat, found = [], []
    for q in queries:
        t = time.perf_counter()
        _, ids = index.search(q[None, :], k)
        lat.append((time.perf_counter() - t) * 1000)
        found.append(ids[0])
    return np.array(lat), np.array(found)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def main() -> int:
    import faiss

    from stream_sentinel.embedding.embedder import Embedder
    from stream_sentinel.index import ivf_lists, new_index, set_nprobe

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="100k vectors, HNSW at 50k")
    ap.add_argument("--size", type=int, default=1_000_000)
    ap.add_argument("--hnsw-size", type=int, default=0, help="vectors in the HNSW index (0: --size)")
    ap.add_argument("--threads", type=int, default=2, help="OpenMP threads for search")
    ap.add_argument("--queries", type=int, default=1000)
    args = ap.parse_args()
    size = 100_000 if args.quick else args.size
    hnsw_size = min(size, args.hnsw_size or size)
    faiss.omp_set_num_threads(args.threads)
    recs, _, _ = common.corpus()
    base, _ = common.demo_vectors(Embedder.load(), recs)
    data = synthetic(base, size + args.queries, seed=1)
    xb, xq = data[:size], data[size:]
    k = 10
    ids = np.arange(size, dtype=np.int64)
    results = {}

    t = time.perf_counter()
    flat = faiss.IndexIDMap2(faiss.IndexFlatIP(xb.shape[1]))
    flat.add_with_ids(xb, ids)
    build = time.perf_counter() - t
    _, truth = flat.search(xq, k)  # batched: the ground truth
    lat, found = timed_queries(flat, xq[:200], k)  # exact single queries are slow; 200 suffice
    results["Flat,IP"] = {"build_s": round(build, 1), "p50_ms": round(float(np.percentile(lat, 50)), 3),
                          "p99_ms": round(float(np.percentile(lat, 99)), 3), "recall@10": recall(found, truth[:200])}
    print(f"flat: p50 {results['Flat,IP']['p50_ms']} ms", file=sys.stderr)

    # the product's list count (4 sqrt n), and a quarter of it (cheaper training, longer lists)
    for nlist in (ivf_lists(size), ivf_lists(size) // 4):
        t = time.perf_counter()
        ivf = new_index(xb.shape[1], xb, ivf_threshold=0, nlist=nlist)
        ivf.add_with_ids(xb, ids)
        build = time.perf_counter() - t
        name = f"IVF{nlist},Flat,IP"
        for nprobe in (4, 8, 16, 32):
            set_nprobe(ivf, nprobe)
            lat, found = timed_queries(ivf, xq, k)
            results[f"{name} nprobe={nprobe}"] = {
                "build_s": round(build, 1), "p50_ms": round(float(np.percentile(lat, 50)), 3),
                "p99_ms": round(float(np.percentile(lat, 99)), 3), "recall@10": round(recall(found, truth), 4)}
            print(f"{name} nprobe {nprobe}: {results[f'{name} nprobe={nprobe}']}", file=sys.stderr)
        del ivf

    hb = xb[:hnsw_size]
    hflat = faiss.IndexFlatIP(hb.shape[1])
    hflat.add(hb)
    _, htruth = hflat.search(xq, k)
    del hflat
    t = time.perf_counter()
    hnsw = faiss.IndexHNSWFlat(hb.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = 80
    hnsw.add(hb)
    build = time.perf_counter() - t
    for ef in (32, 64, 128):
        hnsw.hnsw.efSearch = ef
        lat, found = timed_queries(hnsw, xq, k)
        results[f"HNSW32 efSearch={ef} (at {hnsw_size:,})"] = {
            "build_s": round(build, 1), "p50_ms": round(float(np.percentile(lat, 50)), 3),
            "p99_ms": round(float(np.percentile(lat, 99)), 3), "recall@10": round(recall(found, htruth), 4)}

    print(f"\n{size:,} vectors x {xb.shape[1]}, k={k}, {len(xq)} single queries, {args.threads} thread(s)\n")
    print(f"{'index':<38}{'build s':>9}{'p50 ms':>9}{'p99 ms':>9}{'recall@10':>11}")
    for name, r in results.items():
        print(f"{name:<38}{r['build_s']:>9}{r['p50_ms']:>9}{r['p99_ms']:>9}{r['recall@10']:>11.4f}")
    figures = {"bench": "faiss_search", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "machine": platform.machine(), "threads": args.threads, "size": size, "dim": int(xb.shape[1]), "k": k, "results": results}
    common.save(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
