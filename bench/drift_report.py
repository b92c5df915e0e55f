"""Drift report speed and memory: a 50k-row day with 384-d embeddings and 20 features.

Setup (not timed) goes through the product's own path on a fresh data root. Period-1
demo records are ingested and labelled, and a champion is trained and promoted. Its
training set is the reference. Then one arrival day gets 50,000 records resampled from
period 2, with their embeddings (the real MiniLM vectors plus a little noise) and the
champion's predictions.

Then, each in a fresh process (time and peak RSS, imports included), the same run measures:

* product, cold    drift.run_partition with an empty reference cache
* product, warm    the same day again: the reference sample comes from the cache
* plain Evidently  one Report over all rows: DataDriftPreset on every feature column
                   and the prediction, plus EmbeddingsDrift on the 384 embedding columns
                   (Evidently's defaults, t-SNE plot included)

    python bench/drift_report.py [--quick] [--rows 50000] [--skip-plain]

Prints a table, ends with one JSON line, writes bench/results/drift_report.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

DAY0, DAY1 = "2024-06-01", "2024-06-02"
EXTRA_NUM, EXTRA_CAT = 12, 4  # + the 4 demo features = 20 feature columns


def _features(rec: dict, rng: np.random.Generator, shift: float) -> dict:
    # the 4 numeric demo features (not the string sender_domain: the columns stay the 20 this
    # bench has always measured)
    f = {k: v for k, v in rec["features"].items() if k != "sender_domain"}
    base = np.log1p(f["length"])
    for i in range(EXTRA_NUM):
        f[f"num_{i}"] = round(float(base * (i % 3 + 1) + rng.normal(shift * (i % 2), 1.0)), 4)
    for i in range(EXTRA_CAT):
        f[f"cat_{i}"] = "abcde"[int(rng.integers(0, 5 if i % 2 else 3))]
    return f


def setup(root: Path, rows: int) -> None:
    from stream_sentinel import feedback as fb
    from stream_sentinel import ingest, pipeline
    from stream_sentinel.learning import loop as learning
    from stream_sentinel.config import Paths
    from stream_sentinel.embedding.embedder import Embedder
    from stream_sentinel.learning.models import TrainParams, load_training_set
    from stream_sentinel.learning.registry import ModelRegistry
    from stream_sentinel.store import Store

    recs, labels, groups = common.corpus()
    embedder = Embedder.load()
    vecs, _ = common.demo_vectors(embedder, recs)
    rng = np.random.default_rng(0)
    p1 = [i for i, r in enumerate(recs) if groups[r["id"]].endswith("-1")]
    p2 = [i for i, r in enumerate(recs) if groups[r["id"]].endswith("-2")]
    ref_idx = sorted(rng.choice(p1, 3000, replace=False))
    ref = [dict(recs[i], features=_features(recs[i], rng, 0.0)) for i in ref_idx]
    cur_src = rng.choice(p2, rows)
    cur = [{"id": f"day1/{n}", "text": f"{recs[i]['text']}\n[{n}]", "event_time": recs[i]["event_time"],
            "features": _features(recs[i], rng, 0.3)} for n, i in enumerate(cur_src)]
    noise = rng.normal(0, 0.01, (rows, vecs.shape[1])).astype(np.float32)
    cur_vecs = vecs[cur_src] + noise
    cur_vecs /= np.linalg.norm(cur_vecs, axis=1, keepdims=True)
    by_text = {r["text"]: vecs[i] for r, i in zip(ref, ref_idx)}
    by_text.update({r["text"]: v for r, v in zip(cur, cur_vecs)})

    class Precomputed:
        model_id, dim = embedder.model_id, embedder.dim

        def embed(self, texts):
            return np.stack([by_text[t] for t in texts])

    paths = Paths.at(root).ensure()
    store = Store(paths.db).init()
    registry = ModelRegistry(paths.models, store)
    for day, batch in ((DAY0, ref), (DAY1, cur)):
        for k in range(0, len(batch), 5000):
            (paths.raw / f"{day}-{k:06d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in batch[k:k + 5000]))
        ingest.scan(paths, store, debounce_s=0, now=datetime.fromisoformat(day).replace(hour=12, tzinfo=timezone.utc))
        for b in ingest.plan_batches(store, 100, 10_000_000):
            for sha in b.files:
                ingest.process_file(paths, store, sha)
        pipeline.embed_partition(store, Precomputed(), day)
        if day == DAY0:
            now = datetime.now(timezone.utc)
            events = [fb.Event(fb.Position("bench", 0, i), r["id"], labels[r["id"]], "oracle", 1.0, now)
                      for i, r in enumerate(ref)]
            fb.write(store, events, [], "file")
            fb.resolve_labels(store, fb.ConsensusConfig())
            ts = load_training_set(store, embedder.model_id, "spam")
            learning.persist_training_set(store, ts, embedder.model_id)
            res = learning.train_candidate(registry, store, ts, embedder.model_id, TrainParams())
            registry.promote(res.version.version, None, "bench")
    learning.score_new_records(registry, store, embedder.model_id)


def peak_rss_mb() -> int:
    """This process's own peak (VmHWM; ru_maxrss would carry the parent's peak across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def _product(root: str, out) -> None:
    from stream_sentinel import drift
    from stream_sentinel.config import Paths
    from stream_sentinel.embedding.embedder import model_id
    from stream_sentinel.learning.registry import ModelRegistry
    from stream_sentinel.store import Store

    started = time.perf_counter()
    paths = Paths.at(root)
    store = Store(paths.db)
    res = drift.run_partition(store, ModelRegistry(paths.models, store), paths.reports, model_id(None), DAY1,
                              drift.DriftConfig())
    out.put({"seconds": round(time.perf_counter() - started, 2), "compute_s": res.seconds,
             "rss_mb": peak_rss_mb(), "drifted": res.drifted,
             "share_drifted": res.share_drifted, "embedding_drifted": res.embedding_drifted,
             "n_current": res.n_current, "n_reference": res.n_reference})


def _plain(root: str, out) -> None:
    """Evidently with its defaults over every row, as one would write it without the product."""
    import json as _json

    import pandas as pd

    started = time.perf_counter()
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import EmbeddingsDrift
    from evidently.presets import DataDriftPreset

    from stream_sentinel.config import Paths
    from stream_sentinel.store import Store, vectors_from_arrow

    store = Store(Paths.at(root).db)
    frames = []
    with store.connect() as con:
        for day in (DAY0, DAY1):
            t = con.sql("""SELECT r.features, e.vector, p.probability FROM records r
                           JOIN embeddings e ON e.record_id = r.id
                           LEFT JOIN predictions p ON p.record_id = r.id
                           WHERE r.arrival_date = CAST(? AS DATE)""", params=[day]).to_arrow_table()
            feats = pd.DataFrame([_json.loads(x) for x in t.column("features").to_pylist()])
            vec = vectors_from_arrow(t.column("vector"), t.num_rows)
            emb = pd.DataFrame(vec, columns=[f"e{i}" for i in range(vec.shape[1])])
            frames.append(pd.concat([feats, emb], axis=1).assign(prediction=t.column("probability").to_pandas()))
    ref, cur = frames
    cats = [c for c in ref.columns if c.startswith("cat_")]
    nums = [c for c in ref.columns if c not in cats and not c.startswith("e")]
    emb_cols = [c for c in ref.columns if c.startswith("e") and c[1:].isdigit()]
    definition = DataDefinition(numerical_columns=nums, categorical_columns=cats, embeddings={"text": emb_cols})
    snap = Report([DataDriftPreset(columns=nums + cats), EmbeddingsDrift(embeddings_name="text")]).run(
        Dataset.from_pandas(cur, data_definition=definition), Dataset.from_pandas(ref, data_definition=definition))
    snap.save_html(str(Path(root) / "reports" / "plain.html"))
    out.put({"seconds": round(time.perf_counter() - started, 2),
             "rss_mb": peak_rss_mb(), "n_current": len(cur),
             "n_reference": len(ref)})


def measure(fn, root: str) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=fn, args=(root, q))
    p.start()
    res = q.get()
    p.join()
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="5,000 rows, no plain-Evidently baseline")
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--skip-plain", action="store_true")
    args = ap.parse_args()
    rows = 5000 if args.quick else args.rows
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        setup(Path(tmp), rows)
        print(f"setup: {rows} current rows in {time.perf_counter() - t:.0f}s", file=sys.stderr)
        results = {"product, cold": measure(_product, tmp), "product, warm": measure(_product, tmp)}
        if not (args.quick or args.skip_plain):
            results["plain Evidently"] = measure(_plain, tmp)
    print(f"\ndrift report of one day: {rows} rows x (384-d embedding + 20 features) vs a 3,000-row reference\n")
    print(f"{'method':<18}{'seconds':>9}{'peak RSS MB':>13}")
    for name, r in results.items():
        print(f"{name:<18}{r['seconds']:>9.2f}{r['rss_mb']:>13}")
    figures = {"bench": "drift_report", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "machine": platform.machine(), "rows": rows, "results": results}
    if "plain Evidently" in results:
        figures["speedup_warm_vs_plain"] = round(results["plain Evidently"]["seconds"]
                                                 / results["product, warm"]["seconds"], 1)
    common.save(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
