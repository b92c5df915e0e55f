"""What one promotion costs as records pile up: rescoring everything vs new records plus a window.

Before issue 12, every promoted version rescored every record (predictions grew as records x
versions). Now a new champion scores new records and rescores only the latest
``STREAM_SENTINEL_RESCORE_WINDOW`` (10,000); ``current_predictions`` still has one served
answer per record. This builds a data root with N records (random unit vectors in 384
dimensions, as the embedder makes; 5,000 of them labelled by a hidden direction), trains
and promotes a first champion (which scores every record once, as ingest runs would have
over time), then a second one, and times the second promotion's scoring both ways in the
same run: the whole table (the old behaviour) and the bounded window (the product's).

    python bench/promotion_cost.py                 # 100k and 1M records
    python bench/promotion_cost.py --sizes 20000   # a quick look

Ends with one JSON line, like every bench script.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from common import save  # noqa: E402  (puts the repo on sys.path)

from stream_sentinel.learning import loop as learning  # noqa: E402
from stream_sentinel.learning.models import TrainParams, load_training_set  # noqa: E402
from stream_sentinel.learning.registry import ModelRegistry  # noqa: E402
from stream_sentinel.store import Store  # noqa: E402

DIM = 384
MODEL_ID = "bench-random-384"
LABELLED = 5000
CHUNK = 100_000


def build(root: Path, n: int, seed: int = 0) -> tuple[Store, ModelRegistry]:
    store = Store(root / "metrics.duckdb").init()
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=DIM).astype(np.float32)
    labelled = set(rng.choice(n, size=min(LABELLED, n), replace=False).tolist())
    now = pd.Timestamp.now(tz="UTC")
    for start in range(0, n, CHUNK):
        k = min(CHUNK, n - start)
        vecs = rng.normal(size=(k, DIM)).astype(np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        ids = [f"r{start + i:08d}" for i in range(k)]
        recs = pd.DataFrame({"id": ids, "vec_id": np.arange(start + 1, start + k + 1), "text": "",
                             "event_time": now - pd.to_timedelta(n - start - np.arange(k), unit="s"),
                             "features": "{}", "label": None, "extra": None, "content_hash": ids,
                             "file_sha256": "bench", "position": None, "arrival_date": now.date(),
                             "ingested_at": now})
        emb = pd.DataFrame({"record_id": ids, "model_id": MODEL_ID, "vec_id": recs["vec_id"], "dim": DIM,
                            "vector": list(vecs), "created_at": now})
        mine = [i for i in range(k) if start + i in labelled]
        lab = pd.DataFrame({"record_id": [ids[i] for i in mine],
                            "label": ["spam" if vecs[i] @ direction > 0 else "ham" for i in mine],
                            "weight": 1.0, "margin": 1.0, "n_votes": 1, "n_reviewers": 1, "conflict": False,
                            "status": "resolved", "resolved_at": now, "last_vote_at": now})
        with store.transaction() as con:
            con.register("recs", recs)
            con.execute("INSERT INTO records SELECT * FROM recs")
            con.register("emb", emb)
            con.execute("INSERT INTO embeddings SELECT record_id, model_id, vec_id, dim, CAST(vector AS FLOAT[]), "
                        "created_at FROM emb")
            con.register("lab", lab)
            con.execute("INSERT INTO labels SELECT * FROM lab")
    return store, ModelRegistry(root / "models", store)


def promote_new(store: Store, registry: ModelRegistry, full: bool) -> str:
    ts = load_training_set(store, MODEL_ID, "spam")
    learning.persist_training_set(store, ts, MODEL_ID)
    res = learning.train_candidate(registry, store, ts, MODEL_ID, TrainParams(), full=full)
    registry.promote(res.version.version, None, "bench")
    return res.version.version


def timed_scoring(store: Store, registry: ModelRegistry, window: int) -> tuple[float, int]:
    started = time.perf_counter()
    n = learning.score_new_records(registry, store, MODEL_ID, rescore_window=window)
    return time.perf_counter() - started, n


def one_size(n: int) -> dict:
    root = Path(tempfile.mkdtemp(prefix="promotion-"))
    try:
        t = time.perf_counter()
        store, registry = build(root, n)
        build_s = time.perf_counter() - t
        promote_new(store, registry, full=True)
        first_s, first_n = timed_scoring(store, registry, 10_000)  # every record is new: scored once
        second = promote_new(store, registry, full=True)
        window_s, window_n = timed_scoring(store, registry, 10_000)
        with store.transaction() as con:  # the same promotion again, the old way: rescore everything
            con.execute("DELETE FROM predictions WHERE model_version = ?", [second])
        all_s, all_n = timed_scoring(store, registry, n)
        with store.connect() as con:
            rows = con.execute("SELECT count(*) FROM predictions").fetchone()[0]
        return {"records": n, "build_s": round(build_s, 1), "first_champion_scoring_s": round(first_s, 2),
                "first_champion_rows": first_n, "promotion_window_s": round(window_s, 2),
                "promotion_window_rows": window_n, "promotion_rescore_all_s": round(all_s, 2),
                "promotion_rescore_all_rows": all_n,
                "speedup": round(all_s / window_s, 1) if window_s else None, "prediction_rows_after": rows}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=None, help="default 100000 1000000 (--quick: 20000)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    args.sizes = args.sizes or ([20_000] if args.quick else [100_000, 1_000_000])
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    results = []
    for n in args.sizes:
        r = one_size(n)
        print(f"{n:>9,} records: promotion scores {r['promotion_window_rows']:,} rows in "
              f"{r['promotion_window_s']:.1f} s (window); rescoring all {r['promotion_rescore_all_rows']:,} rows "
              f"took {r['promotion_rescore_all_s']:.1f} s ({r['speedup']}x)", flush=True)
        results.append(r)
    save({"bench": "promotion_cost", "cpu": cpu, "cores": os.cpu_count(), "labelled": LABELLED,
          "rescore_window": 10_000, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
