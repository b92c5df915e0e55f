"""Incremental model update vs full retrain on 100k labelled rows: time ratio and accuracy gap.

Rows are built from the demo corpus's real MiniLM vectors and labels. Each row mixes two
demo records plus noise, with weight w > 0.5 on the first, whose label and numeric features
it takes, so the classes keep the shape they have in real data. Test rows are built from
demo records that no training row uses, so near-copies cannot make the task trivial.
The product's model code runs on them: FeatureSpec (kNN over every labelled row, PCA,
numeric), train_full, and train_continued from the full model on a new batch + replay.

    full        fit the feature spec + 150 rounds on all N training rows
    incremental 25 rounds continued from the full model on 1,000 new rows + 500 replayed rows
                (the next micro-batch after the full model), same features

Both are scored on the same 5,000 held-out rows. Prints a table, ends with one JSON line,
writes bench/results/model_update.json.

    python bench/model_update.py [--quick] [--rows 100000]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def rows(recs, labels, vecs, n: int, seed: int, pool: np.ndarray) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    i, j = rng.choice(pool, n), rng.choice(pool, n)
    w = rng.uniform(0.55, 1.0, (n, 1)).astype(np.float32)
    v = w * vecs[i] + (1 - w) * vecs[j] + rng.normal(0, 0.03, (n, vecs.shape[1])).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    y = np.array([labels[recs[a]["id"]] == "spam" for a in i], dtype=int)
    return pd.DataFrame({"record_id": [f"s{seed}-{k}" for k in range(n)], "y": y, "vector": list(v),
                         "features": [recs[a]["features"] for a in i]})


def main() -> int:
    from stream_sentinel.embedding.embedder import Embedder
    from stream_sentinel.learning.models import (Reference, TrainParams, fit_feature_spec, frame_features, metrics,
                                        train_continued, train_full)

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="10k rows")
    ap.add_argument("--rows", type=int, default=100_000)
    args = ap.parse_args()
    n = 10_000 if args.quick else args.rows
    recs, labels, _ = common.corpus()
    vecs, _ = common.demo_vectors(Embedder.load(), recs)
    order = np.random.default_rng(0).permutation(len(recs))
    seen, unseen = order[: int(0.8 * len(recs))], order[int(0.8 * len(recs)):]
    train, batch = rows(recs, labels, vecs, n, 1, seen), rows(recs, labels, vecs, 1000, 2, seen)
    test = rows(recs, labels, vecs, 5000, 3, unseen)
    params = TrainParams()

    t = time.perf_counter()
    spec = fit_feature_spec(train, seed=params.seed)
    ref = Reference.from_frame(train)
    X = frame_features(spec, train, ref, leave_one_out=True)
    full = train_full(X, train["y"].to_numpy(), spec.names, params)
    full_s = time.perf_counter() - t

    t = time.perf_counter()
    ref2 = Reference.from_frame(pd.concat([train, batch]))
    replay = train.sample(n=params.replay, random_state=params.seed)
    step = pd.concat([batch, replay])
    Xs = frame_features(spec, step, ref2, leave_one_out=True)
    inc = train_continued(full, Xs, step["y"].to_numpy(), spec.names, params)
    inc_s = time.perf_counter() - t

    # the full alternative for the same data: retrain from scratch on train + batch
    t = time.perf_counter()
    both = pd.concat([train, batch])
    spec2 = fit_feature_spec(both, seed=params.seed)
    X2 = frame_features(spec2, both, ref2, leave_one_out=True)
    refit = train_full(X2, both["y"].to_numpy(), spec2.names, params)
    refit_s = time.perf_counter() - t

    y = test["y"].to_numpy()
    acc_inc = metrics(y, inc.predict(frame_features(spec, test, ref2, leave_one_out=False)))["accuracy"]
    acc_full = metrics(y, refit.predict(frame_features(spec2, test, ref2, leave_one_out=False)))["accuracy"]
    results = {"full retrain": {"seconds": round(refit_s, 2), "accuracy": round(acc_full, 4), "rows": len(both)},
               "incremental update": {"seconds": round(inc_s, 2), "accuracy": round(acc_inc, 4), "rows": len(step)},
               "first full model (setup)": {"seconds": round(full_s, 2)}}
    ratio = round(refit_s / inc_s, 1)
    gap = round((acc_full - acc_inc) * 100, 2)
    print(f"\n{n:,} labelled rows + a batch of 1,000; 5,000 held-out rows\n")
    print(f"{'method':<26}{'seconds':>9}{'accuracy':>10}")
    for name in ("full retrain", "incremental update"):
        r = results[name]
        print(f"{name:<26}{r['seconds']:>9.2f}{r['accuracy']:>10.4f}")
    print(f"\nincremental is {ratio}x faster; accuracy gap {gap} points")
    figures = {"bench": "model_update", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "machine": platform.machine(), "rows": n, "results": results, "speedup": ratio, "gap_points": gap}
    common.save(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
