"""Prequential quality of the continuously learning model on the SpamAssassin stream.

The protocol (issue 12): the demo stream in the anchor order — period 1 (easy-ham-1,
spam-1, hard-ham-1) sorted by event time, then period 2 (easy-ham-2, spam-2) sorted by
event time — in micro-batches of 100. Every batch is scored *before* its labels are
revealed, then the labels arrive and each method learns from them. The first 500 labels
are warm-up; figures cover records 501-6046, period 2 (3251-6046), the period-2 spam burst
(3251-4250), and ROC-AUC. Methods, all on the same records and embeddings:

* no-change baseline   predicts the majority label of the previous batch
* frozen first model   the product's first model (trained once both classes have been seen,
                       from the 5th batch on), never updated
* continuous (product) exactly the product's loop: records and feedback through DuckDB, consensus
                       labels, window features (the demo's declared windows, as `demo-data replay`
                       declares them; --no-windows: none), training_set -> candidate continued from
                       the champion -> gated promotion (candidate_beats_champion) -> the champion
                       scores the next batch (--compare-windows: also without windows, same run)
* full retrain each batch the same loop, but every candidate trained from scratch on all labels
                       (the compute that continued training is meant to save)
* periodic full retrain a full retrain every 10 batches and no training in between
* river                online StandardScaler | LogisticRegression on embeddings + numeric features

Two compute figures per method: ``update_s`` is model compute only (training the candidate,
the promotion check, scoring), ``loop_s`` adds the shared work of every micro-batch (records
into DuckDB, feedback and label consensus, the training-set snapshot).

    python bench/stream_quality.py [--quick] [--batch 100] [--all] [--order anchor|time] [--compare-windows]

Needs the bench extra (river): pip install -c constraints.txt -e '.[bench]'.
Prints a table, ends with one JSON line, writes bench/results/stream_quality.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sklearn.metrics import accuracy_score, f1_score, roc_auc_score  # noqa: E402

import common  # noqa: E402
from stream_sentinel import ingest, pipeline  # noqa: E402
from stream_sentinel.learning import loop as learning  # noqa: E402
from stream_sentinel import feedback as fb  # noqa: E402
from stream_sentinel.config import Paths, Settings  # noqa: E402
from stream_sentinel.embedding.embedder import Embedder  # noqa: E402
from stream_sentinel.learning.models import TrainParams, load_training_set  # noqa: E402
from stream_sentinel.learning.registry import ModelRegistry  # noqa: E402
from stream_sentinel.devtools import demo  # noqa: E402
from stream_sentinel.store import Store  # noqa: E402
from stream_sentinel.windows import spec as window_spec  # noqa: E402
from stream_sentinel.windows import state as window_state  # noqa: E402

POS = "spam"


class ProductLoop:
    """The product's learning loop on its own data root."""

    def __init__(self, root: Path, embedder, full_every: int | None, frozen_after: int | None = None,
                 train_between: bool = True, params: TrainParams | None = None, retrain_growth: float | None = None,
                 windows=None):
        self.paths = Paths.at(root).ensure()
        self.windows = windows  # a WindowSet: window features computed per batch, as window_features does
        self.store = Store(self.paths.db).init()
        self.registry = ModelRegistry(self.paths.models, self.store)
        self.embedder = embedder
        self.full_every = full_every
        self.frozen_after = frozen_after
        self.train_between = train_between
        self.params = params or TrainParams()
        self.valid_max = 200
        # the product's retrain policy (retrain_sensor); None: train after every batch
        self.retrain_growth = retrain_growth
        self.trainings = 0
        self.batches = 0
        self.train_seconds = 0.0  # train_candidate alone (features of the batch, the trees)
        self.seconds = 0.0
        self.update_seconds = 0.0

    def add_records(self, recs: list[dict], vectors: np.ndarray) -> None:
        """Records in through the file path; vectors precomputed once for all methods."""
        name = f"b{self.batches:05d}.jsonl"
        (self.paths.raw / name).write_text("".join(json.dumps(r) + "\n" for r in recs))
        ingest.scan(self.paths, self.store, debounce_s=0)
        for b in ingest.plan_batches(self.store):
            for sha in b.files:
                ingest.process_file(self.paths, self.store, sha)
        by_text = {r["text"]: v for r, v in zip(recs, vectors)}
        pipeline.embed_partition(self.store, _Precomputed(self.embedder, by_text), None)
        if self.windows:
            started = time.perf_counter()
            window_state.update(self.store, self.windows)
            self.seconds += time.perf_counter() - started

    def predict(self, ids: list[str]) -> np.ndarray:
        started = time.perf_counter()
        learning.score_new_records(self.registry, self.store, self.embedder.model_id)
        champion = self.registry.champion_version()
        self.seconds += time.perf_counter() - started
        self.update_seconds += time.perf_counter() - started
        if champion is None:
            return np.full(len(ids), np.nan), np.full(len(ids), np.nan)
        with self.store.connect() as con:
            rows = {r: (p, lab == POS) for r, p, lab in con.execute(
                "SELECT record_id, probability, label FROM predictions WHERE model_version = ?",
                [champion]).fetchall()}
        # the product's own answer (its decision threshold) for accuracy and F1; probabilities for AUC
        return (np.array([rows[i][0] if i in rows else np.nan for i in ids]),
                np.array([float(rows[i][1]) if i in rows else np.nan for i in ids]))

    def learn(self, recs: list[dict], labels: dict[str, str]) -> None:
        self.batches += 1
        started = time.perf_counter()
        now = datetime.now(timezone.utc)
        events = [fb.Event(fb.Position("bench", 0, self.batches * 100_000 + i), r["id"], labels[r["id"]], "oracle",
                           1.0, now) for i, r in enumerate(recs)]
        fb.write(self.store, events, [], "kafka")
        fb.resolve_labels(self.store, fb.ConsensusConfig())
        # the frozen model trains until it has a first champion (the stream opens almost all spam),
        # from the frozen_after-th batch on, and then never again
        frozen = self.frozen_after is not None and (self.batches < self.frozen_after
                                                    or self.registry.champion_version() is not None)
        full = self.full_every is not None and self.batches % self.full_every == 0
        if not self.train_between and not full and self.registry.champion_version() is not None:
            frozen = True
        if not frozen and self.retrain_growth is not None and self.registry.champion_version() is not None:
            # labels arrive faster than the sensor's wait bound here, so only the counts decide
            s = Settings()
            frozen = not learning.retrain_due(learning.label_backlog(self.store), s.retrain_min_labels,
                                              self.retrain_growth, float("inf"))[0]
        if not frozen:
            self.trainings += 1
            ts = load_training_set(self.store, self.embedder.model_id, POS, valid_max=self.valid_max)
            learning.persist_training_set(self.store, ts, self.embedder.model_id)
            ts = learning.training_set_for_version(self.store, ts.data_version, self.embedder.model_id)
            update_started = time.perf_counter()
            res = learning.train_candidate(self.registry, self.store, ts, self.embedder.model_id, self.params,
                                           full=full)
            self.train_seconds += time.perf_counter() - update_started
            if res.version is not None:
                verdict = learning.judge(self.registry, self.store, res.version.version, ts=ts)
                if verdict.passed:
                    self.registry.promote(res.version.version, verdict.candidate_score, "bench")
                else:
                    self.registry.reject(res.version.version, verdict.reason)
            self.update_seconds += time.perf_counter() - update_started
        self.seconds += time.perf_counter() - started


class _Precomputed:
    """The embedder interface over vectors computed once for every method (same inputs for all)."""

    def __init__(self, embedder, by_text: dict):
        self.model_id, self.dim, self.by_text = embedder.model_id, embedder.dim, by_text

    def embed(self, texts):
        return np.stack([self.by_text[t] for t in texts])


def river_model():
    from river import compose, linear_model, optim, preprocessing

    return compose.Pipeline(preprocessing.StandardScaler(),
                            linear_model.LogisticRegression(optimizer=optim.SGD(0.05)))


def river_x(rec: dict, vec: np.ndarray) -> dict:
    x = {f"e{i}": float(v) for i, v in enumerate(vec)}
    for k in ("length", "link_count", "uppercase_ratio"):
        x[k] = float(rec["features"].get(k, 0.0))
    return x


def scores(y: np.ndarray, p: np.ndarray, hard: np.ndarray | None = None) -> dict:
    pred = (p >= 0.5).astype(int) if hard is None else hard.astype(int)
    return {"n": int(len(y)), "accuracy": round(float(accuracy_score(y, pred)), 4),
            "accuracy_p05": round(float(accuracy_score(y, (p >= 0.5).astype(int))), 4),
            "macro_f1": round(float(f1_score(y, pred, average="macro")), 4),
            "roc_auc": round(float(roc_auc_score(y, p)), 4) if len(set(y.tolist())) == 2 else None}


PERIOD_1 = ("easy-ham-1", "spam-1", "hard-ham-1")
PERIOD_2 = ("easy-ham-2", "spam-2")


def anchor_order(recs: list[dict], groups: dict[str, str]) -> list[dict]:
    """Period 1 sorted by event time, then period 2 sorted by event time (the issue's order)."""
    key = lambda r: (r["event_time"], r["id"])  # noqa: E731
    return (sorted([r for r in recs if groups[r["id"]] in PERIOD_1], key=key)
            + sorted([r for r in recs if groups[r["id"]] in PERIOD_2], key=key))


WARMUP = 500
SEGMENTS = {"501-6046": (500, None), "period 2 (3251-6046)": (3250, None), "3251-4250 (spam burst)": (3250, 4250)}


def _cpu() -> str:
    return next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")), platform.processor())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the first 1,500 records only")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--all", action="store_true", help="also the periodic, frozen and no-change baselines")
    ap.add_argument("--order", choices=["anchor", "time"], default="anchor")
    ap.add_argument("--no-linear", action="store_true", help="the product without its linear score column")
    ap.add_argument("--no-balance", action="store_true", help="LightGBM without is_unbalance")
    ap.add_argument("--half-life", type=float, default=TrainParams().linear_half_life)
    ap.add_argument("--valid-max", type=int, default=200)
    ap.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                    help="any other TrainParams field, e.g. --param incremental_rounds=10")
    ap.add_argument("--retrain-growth", type=float, default=Settings().retrain_growth,
                    help="the product's retrain policy: new labels >= this share of those trained on")
    ap.add_argument("--threshold-z", type=float, default=TrainParams().threshold_z)
    ap.add_argument("--tag", default="", help="a suffix for the results file (variants side by side)")
    ap.add_argument("--no-full", action="store_true", help="skip the full-retrain-each-batch loop (no compute ratio)")
    ap.add_argument("--no-windows", action="store_true",
                    help="the product without the demo's stream windows (demo.DEMO_WINDOWS, which `demo-data replay` "
                         "declares by default)")
    ap.add_argument("--compare-windows", action="store_true",
                    help="also the continuous product without windows, in the same run")
    args = ap.parse_args()
    recs, labels, groups = common.corpus()
    embedder = Embedder.load()
    vectors, embed_s = common.demo_vectors(embedder, recs)  # cached in the corpus's own order
    by_id = {r["id"]: v for r, v in zip(recs, vectors)}
    if args.order == "anchor":
        recs = anchor_order(recs, groups)
    if args.quick:
        recs = recs[:1500]
    vectors = np.stack([by_id[r["id"]] for r in recs])
    print(f"embedded {len(recs)} records in {embed_s:.1f}s (0: cached)", file=sys.stderr)
    y_all = np.array([labels[r["id"]] == POS for r in recs], dtype=int)

    params = TrainParams(linear=not args.no_linear, balanced=not args.no_balance, threshold_z=args.threshold_z,
                         linear_half_life=args.half_life)
    for item in args.param:
        name, value = item.split("=", 1)
        params = dataclasses.replace(params, **{name: type(getattr(params, name))(value)})
    # the product as the demo runs it: with the demo's declared windows (sender-domain activity)
    windows = None if args.no_windows else window_spec.parse_text(demo.DEMO_WINDOWS, "demo windows")
    with tempfile.TemporaryDirectory() as tmp:
        loops = {"continuous (product)": ProductLoop(Path(tmp) / "cont", embedder, None, params=params,
                                                     retrain_growth=args.retrain_growth, windows=windows),
                 "full retrain each batch": ProductLoop(Path(tmp) / "each", embedder, 1, params=params,
                                                        windows=windows)}
        if args.compare_windows and windows:
            loops["continuous, no windows"] = ProductLoop(Path(tmp) / "nowin", embedder, None, params=params,
                                                          retrain_growth=args.retrain_growth)
        for loop in loops.values():
            loop.valid_max = args.valid_max
        if args.no_full:
            del loops["full retrain each batch"]
        if args.all:
            loops["periodic full retrain"] = ProductLoop(Path(tmp) / "full", embedder, 10, train_between=False,
                                                             windows=windows)
            loops["frozen first model"] = ProductLoop(Path(tmp) / "frozen", embedder, None, frozen_after=5,
                                                          windows=windows)
        probs = {name: [] for name in [*loops, "no-change baseline", "river"]}
        labels_hat: dict[str, list] = {name: [] for name in loops}
        rv, rv_s = river_model(), 0.0
        prev_majority = 0.5
        batches = [(i, recs[i:i + args.batch]) for i in range(0, len(recs), args.batch)]
        for n, (start, batch) in enumerate(batches):
            ids = [r["id"] for r in batch]
            vecs = vectors[start:start + len(batch)]
            for name, loop in loops.items():
                loop.add_records(batch, vecs)
                p, hard = loop.predict(ids)
                # no model yet (the stream opens with one class): fall back to the baseline's guess
                probs[name].append(np.where(np.isnan(p), prev_majority, p))
                labels_hat[name].append(np.where(np.isnan(hard), prev_majority, hard))
            probs["no-change baseline"].append(np.full(len(batch), prev_majority))
            t = time.perf_counter()
            xs = [river_x(r, v) for r, v in zip(batch, vecs)]
            probs["river"].append(np.array([rv.predict_proba_one(x).get(True, prev_majority) for x in xs]))
            for x, r in zip(xs, batch):
                rv.learn_one(x, labels[r["id"]] == POS)
            rv_s += time.perf_counter() - t
            for loop in loops.values():
                loop.learn(batch, labels)
            prev_majority = float(np.mean([labels[i] == POS for i in ids]) >= 0.5)
            if n % 10 == 0:
                print(f"batch {n + 1}/{len(batches)}", file=sys.stderr)
        results = {}
        for name, parts in probs.items():
            p_all = np.concatenate(parts)
            hard_all = np.concatenate(labels_hat[name]) if name in labels_hat else None
            results[name] = {}
            for seg, (a, b) in SEGMENTS.items():
                b = len(y_all) if b is None else min(b, len(y_all))
                if a < b:
                    results[name][seg] = scores(y_all[a:b], p_all[a:b], None if hard_all is None else hard_all[a:b])
            results[name].update(results[name].get("501-6046", {}))
            results[name]["update_s"] = round(loops[name].update_seconds if name in loops else
                                              (rv_s if name == "river" else 0.0), 2)
            results[name]["train_s"] = round(loops[name].train_seconds if name in loops else
                                             (rv_s if name == "river" else 0.0), 2)
            results[name]["loop_s"] = round(loops[name].seconds if name in loops else
                                            (rv_s if name == "river" else 0.0), 2)
        versions = {name: len(loop.registry.list()) for name, loop in loops.items()}
        trainings = {name: loop.trainings for name, loop in loops.items()}
    single_class = sum(len({labels[r["id"]] for r in b}) == 1 for _, b in batches)
    print(f"\n{len(recs)} records, {len(batches)} batches of {args.batch} ({single_class} single-class), "
          f"scored before their labels were revealed:\n")
    segs = [s_ for s_ in SEGMENTS if s_ in results["river"]]
    print(f"{'method':<26}" + "".join(f"{s_[:22]:>24}" for s_ in segs) + f"{'ROC-AUC':>9}{'update s':>10}{'loop s':>9}")
    for name, r in results.items():
        cells = "".join(f"{r[s_]['accuracy']:>15.4f} ({r[s_]['accuracy_p05']:.3f})" for s_ in segs)
        print(f"{name:<26}{cells}{(r['roc_auc'] or float('nan')):>9.4f}{r['update_s']:>10.2f}{r['loop_s']:>9.2f}")
    print("accuracy of each method's own answers (in brackets: cut at p >= 0.5); ROC-AUC on 501-6046")
    each = results.get("full retrain each batch", {}).get("update_s")
    ratio = round(each / results["continuous (product)"]["update_s"], 2) if each else None
    each_train = results.get("full retrain each batch", {}).get("train_s")
    train_ratio = round(each_train / results["continuous (product)"]["train_s"], 2) if each_train else None
    print(f"\ncontinuous model compute is 1/{ratio} of retraining from scratch each batch "
          f"(training alone: 1/{train_ratio}; scoring and the gate cost both the same)")
    figures = {"bench": "stream_quality" + (f"-{args.tag}" if args.tag else ""),
               "params": {**dataclasses.asdict(params), "valid_max": args.valid_max,
                          "retrain_growth": args.retrain_growth,
                          "windows": windows.describe() if windows else None},
               "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "machine": platform.machine(), "cpu": _cpu(), "order": args.order, "warmup": WARMUP,
               "records": len(recs), "batch": args.batch,
               "single_class_batches": single_class, "embed_s": round(embed_s, 1), "results": results,
               "full_each_over_continuous_update": ratio, "full_each_over_continuous_train": train_ratio,
               "model_versions": versions, "trainings": trainings}
    common.save(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
