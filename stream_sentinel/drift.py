"""Drift between what the champion learned from and what arrives now (Evidently 0.7).

Reference is the champion's training window, found through its training-set data version
(exact lineage, never "the last N days"). Current is a window of records: one arrival-day
partition, or any ad-hoc range by event time or arrival. A report covers:

* the records' numeric and categorical features, each with a per-column test (PSI, KS,
  chi-square, ... - any Evidently stat test, configurable);
* the text embeddings, with one of Evidently's embedding drift methods (classifier-based by
  default, or MMD, distance, ratio) on a sample;
* the champion's predictions (probability and label), and, as their own columns
  (``served_prediction``, ``served_label``), the answers the HTTP API served in the window
  (``served_predictions``, loaded from its prediction log): real traffic, including texts
  that were never ingested as records;
* the label distribution where feedback exists (concept drift);
* the champion's accuracy on the window's labelled records, against its validation accuracy.

It is fast because of two choices. Both sides are capped samples, and the reference sample
is cached on disk under its data version. Evidently's own ``EmbeddingsDrift`` metric also draws a
t-SNE plot for the HTML, which takes 10-30 s on two cores whatever the sample. So we call the
same drift-method objects directly, and the report shows the embedding as its first
principal components instead.
"""

from __future__ import annotations

import hashlib
import html
import io
import json
import re
import time
import typing
from dataclasses import asdict, dataclass, field, replace
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from .atomic import write_bytes_atomic
from .config import check_settings, env_values, setting
from .store import Store, vectors_from_arrow

PCA_COMPONENTS = 3  # embedding components shown (and tested) as columns in the HTML report


_D = "STREAM_SENTINEL_DRIFT_"


@dataclass(frozen=True)
class DriftConfig:
    """How drift reports judge a window; each field has its variable (``setting``)."""

    # None: Evidently's default choice by column type and sample size (KS / chi-square up to 1,000
    # rows, normed Wasserstein / Jensen-Shannon above). PSI is biased upwards on small samples:
    # on a 100-row day of the same period it passed its 0.1 bar on half the columns.
    num_method: str | None = setting(None, _D + "NUM_METHOD", "Evidently stat test for numeric columns (psi, "
                                     "ks, wasserstein, ...); empty: Evidently's choice by size", "drift")
    cat_method: str | None = setting(None, _D + "CAT_METHOD", "stat test for categorical columns (chisquare, "
                                     "jensenshannon, psi, ...)", "drift")
    num_threshold: float | None = setting(None, _D + "NUM_THRESHOLD", "empty: the method's default", "drift")
    cat_threshold: float | None = setting(None, _D + "CAT_THRESHOLD", "empty: the method's default", "drift")
    # distance: Evidently's distance between the mean embeddings, judged by a permutation test
    # (p < embedding_alpha). On the demo data it flagged the collection-period shift in 40 of
    # 40 samples of 100-1000 rows. It raised about as many false alarms on random halves of one
    # period as alpha allows. Evidently's bootstrap bar missed the shift at 200 rows, and its
    # classifier method was unstable at that size.
    embedding_method: typing.Literal["distance", "model", "mmd", "ratio"] = setting(
        "distance", _D + "EMBEDDING_METHOD", "how embedding drift is judged", "drift")
    embedding_threshold: float | None = setting(None, _D + "EMBEDDING_THRESHOLD", "a fixed score bar instead "
                                                "of the test's", "drift")
    # a daily report at 0.05 would cry wolf about every 20 days
    embedding_alpha: float = setting(0.01, _D + "EMBEDDING_ALPHA", "permutation test level", "drift",
                                     low=0, high=1)
    sample_cap: int = setting(5000, _D + "SAMPLE_CAP", "rows per side for the column tests", "drift", low=1)
    embedding_sample: int = setting(1000, _D + "EMBEDDING_SAMPLE", "rows per side for the embedding test",
                                    "drift", low=1)
    min_rows: int = setting(30, _D + "MIN_ROWS", "fewer current rows: insufficient data", "drift", low=1)
    min_labelled: int = setting(30, _D + "MIN_LABELLED", "fewer labelled rows: no label drift, no accuracy",
                                "drift", low=1)
    drift_share: float = setting(0.3, _D + "SHARE", "share of drifted feature columns that counts as drift",
                                 "drift", low=0, high=1)
    accuracy_drop: float = setting(0.05, _D + "ACCURACY_DROP", "accuracy this far under the champion's "
                                   "validation accuracy (negative: any accuracy counts, to try the check)",
                                   "drift", low=-1, high=1)
    cooldown_s: float = setting(86400.0, _D + "COOLDOWN_SECONDS", "one drift-triggered full retrain per "
                                "episode, at most one per cooldown", "drift", low=0)
    recent_records: int = setting(1000, _D + "RECENT_RECORDS", "the rolling report: the latest this many "
                                  "records (at most half of all)", "drift", low=1)
    recent_every: int = setting(500, _D + "RECENT_EVERY", "... made again once this many more records "
                                "arrived", "drift", low=1)
    seed: int = 0

    def __post_init__(self) -> None:
        check_settings(self)

    @classmethod
    def from_env(cls, environ=None) -> "DriftConfig":
        return cls(**env_values(cls, environ))

    def validate(self) -> None:
        """The stat test names, which only Evidently knows: checked where a report is made
        (importing Evidently when the code location loads would slow every load)."""
        for name in (self.num_method, self.cat_method):
            if name is not None and not _known_stattest(name):
                raise ValueError(f"unknown Evidently stat test {name!r} (e.g. psi, ks, wasserstein, chisquare, "
                                 f"jensenshannon)")


def _known_stattest(name: str) -> bool:
    import evidently.legacy.calculations.stattests  # noqa: F401  (registers the built-in tests)
    from evidently.legacy.calculations.stattests.registry import _registered_stat_tests

    return name in _registered_stat_tests


# ------------------------------------------------------------------------------ windows


@dataclass
class Window:
    """Rows of one side of a comparison (a capped sample) and counts over all of its rows."""

    frame: pd.DataFrame  # record_id, features (dict), prediction, predicted_label, label, held_out
    vectors: np.ndarray  # embedding sample, rows aligned with ``frame`` up to len(vectors)
    n_rows: int
    n_labelled: int = 0
    accuracy: float | None = None  # prequential: served answers before their labels, over all labelled rows
    n_accuracy: int = 0  # the rows ``accuracy`` counts
    served: pd.DataFrame | None = None  # probability, label of the API's served answers (a sample)
    n_served: int = 0  # all of them

    def without(self, ids: set[str]) -> tuple["Window", int]:
        """This window minus the rows whose record is in ``ids`` (and how many there were)."""
        keep = ~self.frame["record_id"].isin(ids).to_numpy()
        dropped = int((~keep).sum())
        if not dropped:
            return self, 0
        vec_keep = keep[:len(self.vectors)]
        frame = self.frame[keep].reset_index(drop=True)
        # counts over all rows shrink by what the sample lost, scaled (the sample may be capped)
        scale = dropped / max(1, len(self.frame))
        return Window(frame, self.vectors[vec_keep], max(0, self.n_rows - round(self.n_rows * scale)),
                      max(0, self.n_labelled - round(self.n_labelled * scale)), self.accuracy,
                      self.n_accuracy, self.served, self.n_served), dropped


def _stable_sample_sql(seed: int) -> str:
    return f"hash(r.id || '{int(seed)}')"


def load_window(store: Store, embedding_model_id: str, champion: str | None, where: str, params: list,
                cfg: DriftConfig) -> Window:
    """Records matching ``where`` (on alias r) with embeddings, champion predictions and labels."""
    base = f"""FROM records_w r JOIN embeddings e ON e.record_id = r.id AND e.model_id = ?
               LEFT JOIN predictions p ON p.record_id = r.id AND p.model_version = ?
               LEFT JOIN labels l ON l.record_id = r.id AND l.status = 'resolved'
               WHERE {where}"""
    args = [embedding_model_id, champion or ""] + list(params)
    with store.connect() as con:
        n, n_lab = con.execute(f"SELECT count(*), count(l.label) {base}", args).fetchall()[0]
        # prequential: the answer served before the record's first label arrived (the answer a
        # user acted on: the loop's or the API's), not the champion's answer after it learned that label
        n_acc, acc = con.execute(
            f"""WITH arrived AS (SELECT record_id, min(ingested_at) AS at FROM feedback_events GROUP BY 1),
                     answers AS (SELECT record_id, label, scored_at AS at FROM predictions WHERE served
                                 UNION ALL SELECT record_id, label, served_at FROM served_predictions WHERE served),
                     served AS (SELECT q.record_id, (array_agg(q.label ORDER BY q.at DESC))[1] AS label FROM answers q
                                JOIN arrived a ON a.record_id = q.record_id
                                WHERE q.at < a.at GROUP BY 1)
                SELECT count(*), avg(CASE WHEN s.label = l.label THEN 1.0 ELSE 0.0 END)
                FROM records r JOIN embeddings e ON e.record_id = r.id AND e.model_id = ?
                JOIN labels l ON l.record_id = r.id AND l.status = 'resolved'
                JOIN served s ON s.record_id = r.id
                WHERE {where}""", [embedding_model_id] + list(params)).fetchall()[0]
        table = con.sql(
            f"""SELECT r.id AS record_id, r.features, e.vector, p.probability, p.label AS predicted_label,
                       l.label AS label {base} ORDER BY {_stable_sample_sql(cfg.seed)} LIMIT {int(cfg.sample_cap)}""",
            params=args).to_arrow_table()
    out = _window(table, cfg, int(n), int(n_lab), None if acc is None else float(acc))
    out.n_accuracy = int(n_acc)
    return out


def load_served(store: Store, champion: str, start: datetime, end: datetime, cfg: DriftConfig
                ) -> tuple[pd.DataFrame, int]:
    """The champion's answers the API served from ``start`` to ``end`` (a capped, stable sample
    of probability and label) and how many there were. Shadow answers are not traffic."""
    where = "served AND model_version = ? AND served_at >= ? AND served_at < ?"
    args = [champion, start, end]
    with store.connect() as con:
        n = con.execute(f"SELECT count(*) FROM served_predictions WHERE {where}", args).fetchone()[0]
        frame = con.execute(
            f"""SELECT probability, label FROM served_predictions WHERE {where}
                ORDER BY hash(request_id || ':' || i || '{int(cfg.seed)}') LIMIT {int(cfg.sample_cap)}""",
            args).df()
    return frame, int(n)


def load_reference(store: Store, embedding_model_id: str, champion: str, training_set_version: str,
                   cfg: DriftConfig) -> Window:
    """The champion's training window: exactly the rows of its training-set version. Predictions
    count only on its held-out rows (validation and golden): on rows it was trained on the
    model is over-confident, which would look like prediction drift on any new data."""
    base = """FROM training_set_rows t JOIN records_w r ON r.id = t.record_id
              JOIN embeddings e ON e.record_id = r.id AND e.model_id = ?
              LEFT JOIN predictions p ON p.record_id = r.id AND p.model_version = ?
              WHERE t.data_version = ?"""
    args = [embedding_model_id, champion, training_set_version]
    with store.connect() as con:
        n = con.execute(f"SELECT count(*) {base}", args).fetchall()[0][0]
        table = con.sql(
            f"""SELECT r.id AS record_id, r.features, e.vector, p.probability, p.label AS predicted_label,
                       t.label AS label, t.split <> 'train' AS held_out
                {base} ORDER BY {_stable_sample_sql(cfg.seed)} LIMIT {int(cfg.sample_cap)}""",
            params=args).to_arrow_table()
    return _window(table, cfg, int(n), table.num_rows)


def _window(table, cfg: DriftConfig, n_rows: int, n_labelled: int, accuracy: float | None = None) -> Window:
    """Arrow rows (record_id, features, vector, probability, predicted_label, label[, held_out])
    as a Window; vectors only for the first ``embedding_sample`` rows of the sample."""
    frame = pd.DataFrame({
        "record_id": table.column("record_id").to_pylist(),
        "features": [json.loads(f) if f else {} for f in table.column("features").to_pylist()],
        "prediction": table.column("probability").to_pandas(),
        "predicted_label": table.column("predicted_label").to_pylist(),
        "label": table.column("label").to_pylist(),
        "held_out": (table.column("held_out").to_pylist() if "held_out" in table.column_names
                     else [True] * table.num_rows),
    })
    k = min(len(frame), cfg.embedding_sample)
    vecs = vectors_from_arrow(table.column("vector").slice(0, k), k) if k else np.zeros((0, 1), np.float32)
    return Window(frame, np.asarray(vecs, dtype=np.float32), n_rows, n_labelled, accuracy)


def _reference_cache_key(champion: str, training_set_version: str, embedding_model_id: str,
                         cfg: DriftConfig) -> str:
    raw = f"{champion}|{training_set_version}|{embedding_model_id}|{cfg.sample_cap}|{cfg.embedding_sample}|{cfg.seed}"
    return hashlib.sha256(raw.encode()).hexdigest()[:20]


def cached_reference(store: Store, cache_dir: Path, embedding_model_id: str, champion: str,
                     training_set_version: str, cfg: DriftConfig) -> Window:
    """The reference sample, read once per (champion, data version, sample size) and kept under
    reports/reference/: every partition of a backfill compares against the same rows. The
    champion's predictions are part of the key, so a new champion means a new reference."""
    path = cache_dir / f"{_reference_cache_key(champion, training_set_version, embedding_model_id, cfg)}.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                frame = pd.DataFrame({
                    "record_id": z["record_id"].tolist(),
                    "features": [json.loads(f) for f in z["features"].tolist()],
                    "prediction": z["prediction"],
                    "predicted_label": [None if x == "" else x for x in z["predicted_label"].tolist()],
                    "label": [None if x == "" else x for x in z["label"].tolist()],
                    "held_out": z["held_out"],
                })
                return Window(frame, z["vectors"], meta["n_rows"], meta["n_labelled"])
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache is rebuilt below
    ref = load_reference(store, embedding_model_id, champion, training_set_version, cfg)
    buf = io.BytesIO()
    f = ref.frame
    np.savez(buf, record_id=np.array(f["record_id"], dtype=str),
             features=np.array([json.dumps(x) for x in f["features"]], dtype=str),
             prediction=f["prediction"].to_numpy(dtype=float),
             predicted_label=np.array([x or "" for x in f["predicted_label"]], dtype=str),
             label=np.array([x or "" for x in f["label"]], dtype=str),
             held_out=f["held_out"].to_numpy(dtype=bool), vectors=ref.vectors,
             meta=np.array(json.dumps({"n_rows": ref.n_rows, "n_labelled": ref.n_labelled})))
    write_bytes_atomic(path, buf.getvalue())
    return ref


# ------------------------------------------------------------------------------ comparison


@dataclass
class ColumnDrift:
    column: str
    group: str  # feature | embedding | prediction | label | accuracy
    method: str
    score: float | None
    threshold: float | None
    drifted: bool
    detail: str = ""


@dataclass
class DriftResult:
    window_key: str
    kind: str  # partition | adhoc
    time_field: str  # arrival | event_time
    start: str
    end: str
    status: str  # ok | insufficient_data | no_champion
    message: str
    n_current: int = 0
    n_reference: int = 0
    n_labelled: int = 0
    columns: list[ColumnDrift] = field(default_factory=list)
    share_drifted: float | None = None
    n_drifted: int = 0
    n_features: int = 0
    embedding_drift: float | None = None
    embedding_threshold: float | None = None
    embedding_drifted: bool = False
    prediction_drifted: bool = False
    label_drifted: bool = False
    accuracy: float | None = None
    reference_accuracy: float | None = None
    accuracy_dropped: bool = False
    drifted: bool = False  # the inputs rule (see rule()): text embeddings or the feature share
    n_accuracy: int = 0  # labelled rows with a served prediction made before their label arrived
    reference_excluded: int = 0  # reference rows left out because they are also current rows
    report_path: str = ""
    reference_data_version: str = ""
    model_version: str = ""
    seconds: float = 0.0

    def verdict(self) -> str:
        """The headline's first words: never a bare "no drift" while an output moved."""
        if self.drifted:
            return "DRIFT"
        if self.prediction_drifted or self.label_drifted or self.accuracy_dropped:
            return "no input drift, but outputs moved"
        return "no drift"

    def summary(self, cfg: "DriftConfig") -> str:
        """One line that follows the rule, and says what else moved (never 'no drift' beside a
        flagged column without saying which)."""
        moved = [what for what, on in (
            ("text embeddings", self.embedding_drifted),
            (f"{self.n_drifted}/{self.n_features} feature columns",
             self.share_drifted is not None and self.share_drifted > cfg.drift_share)) if on]
        inputs = f"inputs DRIFTED ({', '.join(moved)})" if self.drifted else "inputs stable"
        also = [name for name, on in (("predictions", self.prediction_drifted), ("labels", self.label_drifted),
                                      ("accuracy", self.accuracy_dropped)) if on]
        acc = ("accuracy n/a" if self.accuracy is None else
               f"prequential accuracy {self.accuracy:.4f} on {self.n_accuracy} labelled records")
        return (f"{inputs}; {'also drifted: ' + ', '.join(also) if also else 'predictions, labels and accuracy stable'}"
                f"; {acc}")

    def headline(self) -> dict:
        d = asdict(self)
        d.pop("columns")
        d["columns_drifted"] = [c.column for c in self.columns if c.drifted]
        return d


def rule(cfg: "DriftConfig") -> str:
    """The rule `drifted` follows, as printed in every report and documented in the README."""
    return (f"DRIFT (the `drifted` flag, which drift_retrain_sensor acts on) when the inputs moved: the text "
            f"embeddings drifted, or more than {cfg.drift_share:.0%} of the feature columns did. Drift of the "
            f"champion's predictions, of the labels, and an accuracy drop of more than {cfg.accuracy_drop:.2f} under "
            f"the champion's validation accuracy are reported beside it (they follow a change of class mix too, "
            f"which a retrain does not fix). Accuracy is prequential: each labelled record counts with the answer "
            f"that was served before its label arrived.")


def _feature_columns(ref: pd.DataFrame) -> tuple[list[str], list[str]]:
    """Numeric and categorical feature names as the reference has them: strings are
    categorical, and so are numbers with at most two distinct values (flags such as has_html)."""
    values: dict[str, list] = {}
    for feats in ref["features"]:
        for k, v in feats.items():
            values.setdefault(k, []).append(v)
    numeric, categorical = [], []
    for k, vs in sorted(values.items()):
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vs if v is not None):
            (categorical if len(set(vs)) <= 2 else numeric).append(k)
        elif all(isinstance(v, str) for v in vs if v is not None):
            categorical.append(k)
    return numeric, categorical


# A categorical value seen fewer times than this in the reference is tested as "(other)": a
# chi-square test needs about 5 expected per cell, and a high-cardinality column (a sender
# domain, a user id) otherwise flags drift between two random halves of the same data.
MIN_CATEGORY_COUNT = 5
OTHER = "(other)"


def _category_levels(ref: pd.DataFrame, categorical: list[str]) -> dict[str, set]:
    """Per categorical feature, the reference's values frequent enough to be tested alone."""
    out = {}
    for k in categorical:
        counts = pd.Series([x.get(k) for x in ref["features"] if x.get(k) is not None]).astype(str).value_counts()
        out[k] = set(counts[counts >= MIN_CATEGORY_COUNT].index)
    return out


def _frame_for_evidently(w: Window, numeric: list[str], categorical: list[str], pca: tuple | None,
                         include_label: bool, served: pd.DataFrame | None = None,
                         levels: dict[str, set] | None = None) -> pd.DataFrame:
    """One side as Evidently's columns. ``served``: the API's answers (probability, label) as
    ``served_prediction``/``served_label`` columns; they are not rows of ``w``, so the shorter
    part is padded with missing values, which Evidently leaves out of each column's test."""
    f = w.frame
    out = pd.DataFrame(index=range(max(len(f), 0 if served is None else len(served))))
    for k in numeric:
        out[f"feature.{k}"] = _padded(pd.to_numeric(pd.Series([x.get(k) for x in f["features"]], dtype=object),
                                                    errors="coerce").to_numpy(dtype=float), len(out))
    for k in categorical:
        keep = (levels or {}).get(k)
        vals = [None if x.get(k) is None else str(x.get(k)) for x in f["features"]]
        if keep is not None:
            vals = [v if v is None or v in keep else OTHER for v in vals]
        out[f"feature.{k}"] = _padded(vals, len(out))
    held = f["held_out"].to_numpy(dtype=bool)
    out["prediction"] = _padded(np.where(held, f["prediction"].to_numpy(dtype=float), np.nan), len(out))
    out["predicted_label"] = _padded([p if h else None for p, h in zip(f["predicted_label"], held)], len(out))
    if include_label:
        out["label"] = _padded(list(f["label"]), len(out))
    if served is not None:
        out["served_prediction"] = _padded(served["probability"].to_numpy(dtype=float), len(out))
        out["served_label"] = _padded(list(served["label"]), len(out))
    if pca is not None:
        mean, comps = pca
        proj = (w.vectors - mean) @ comps.T
        for i in range(comps.shape[0]):
            out[f"embedding.pc{i + 1}"] = _padded(proj[:, i], len(out))
    return out


def _padded(values, n: int) -> pd.Series:
    """``values`` as a column of ``n`` rows, missing beyond them (floats: NaN, else None)."""
    if isinstance(values, np.ndarray):
        col = np.full(n, np.nan)
        col[:len(values)] = values
        return pd.Series(col)
    return pd.Series(list(values) + [None] * (n - len(values)), dtype=object)


def _embedding_method(cfg: DriftConfig, n_ref: int, n_cur: int):
    from evidently.metrics.embeddings import DistanceDriftMethod, MMDDriftMethod, ModelDriftMethod, RatioDriftMethod

    kwargs = {} if cfg.embedding_threshold is None else {"threshold": cfg.embedding_threshold}
    if cfg.embedding_method == "model":
        bootstrap = cfg.embedding_threshold is None and min(n_ref, n_cur) < 1000  # Evidently's own rule
        return ModelDriftMethod(bootstrap=bootstrap, **kwargs)
    if cfg.embedding_method == "distance":
        return DistanceDriftMethod(bootstrap=False, **kwargs)
    if cfg.embedding_method == "mmd":
        return MMDDriftMethod(**kwargs)
    return RatioDriftMethod(**kwargs)


def permutation_p_value(ref: np.ndarray, cur: np.ndarray, n_perm: int = 500, seed: int = 0) -> float:
    """P-value of the distance between mean embeddings under "both samples come from one
    distribution": the share of random re-splits of the pooled rows at least as far apart."""
    pooled = np.vstack([ref, cur]).astype(np.float64)
    n_ref = len(ref)
    observed = np.linalg.norm(ref.mean(axis=0) - cur.mean(axis=0))
    total = pooled.sum(axis=0)
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(n_perm):
        pick = rng.choice(len(pooled), n_ref, replace=False)
        s_ref = pooled[pick].sum(axis=0)
        d = np.linalg.norm(s_ref / n_ref - (total - s_ref) / (len(pooled) - n_ref))
        hits += d >= observed
    return float((hits + 1) / (n_perm + 1))


def compare(ref: Window, cur: Window, cfg: DriftConfig, *, reference_accuracy: float | None = None,
            title: str = "drift", model_version: str = "", reference_data_version: str = "",
            reference_excluded: int = 0
            ) -> tuple[DriftResult, str]:
    """Evidently on the two samples: the result (no identity fields) and the HTML report."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    started = time.perf_counter()
    res = DriftResult("", "", "", "", "", "ok", "", n_current=cur.n_rows, n_reference=ref.n_rows,
                      n_labelled=cur.n_labelled, accuracy=cur.accuracy, n_accuracy=cur.n_accuracy,
                      reference_accuracy=reference_accuracy,
                      model_version=model_version, reference_data_version=reference_data_version,
                      reference_excluded=reference_excluded)
    numeric, categorical = _feature_columns(ref.frame)
    include_label = (cur.n_labelled >= cfg.min_labelled and int(cur.frame["label"].notna().sum()) >= 5
                     and ref.frame["label"].nunique() > 0)
    pca = None
    if len(ref.vectors) > PCA_COMPONENTS and ref.vectors.shape[1] > PCA_COMPONENTS:
        mean = ref.vectors.mean(axis=0)
        _, _, vt = np.linalg.svd(ref.vectors - mean, full_matrices=False)
        pca = (mean, vt[:PCA_COMPONENTS])
    served = cur.served if cur.served is not None and len(cur.served) >= 5 else None
    # the API's answers against the same reference as the loop's: the held-out predictions
    ref_served = None if served is None else pd.DataFrame({
        "probability": ref.frame["prediction"][ref.frame["held_out"]].to_numpy(dtype=float),
        "label": ref.frame["predicted_label"][ref.frame["held_out"]].tolist()})
    levels = _category_levels(ref.frame, categorical)
    rdf = _frame_for_evidently(ref, numeric, categorical, pca, include_label, ref_served, levels)
    cdf = _frame_for_evidently(cur, numeric, categorical, pca, include_label, served, levels)
    # a column needs values on both sides (e.g. no predictions before a first champion)
    usable = [c for c in rdf.columns if rdf[c].notna().sum() >= 5 and cdf[c].notna().sum() >= 5]
    num_cols = [c for c in usable if c.startswith("feature.") and c[8:] in numeric
                or c in ("prediction", "served_prediction") or c.startswith("embedding.")]
    cat_cols = [c for c in usable if c not in num_cols]
    definition = DataDefinition(numerical_columns=num_cols, categorical_columns=cat_cols)
    preset = DataDriftPreset(columns=usable, num_method=cfg.num_method, cat_method=cfg.cat_method,
                             num_threshold=cfg.num_threshold, cat_threshold=cfg.cat_threshold,
                             drift_share=cfg.drift_share)
    snapshot = Report([preset], include_tests=True).run(
        Dataset.from_pandas(cdf[usable], data_definition=definition),
        Dataset.from_pandas(rdf[usable], data_definition=definition))
    d = snapshot.dict()
    scores = {}
    for m in d["metrics"]:
        cfg_m = m.get("config", {})
        if cfg_m.get("type", "").endswith("ValueDrift"):
            scores[cfg_m["column"]] = (float(m["value"]), cfg_m.get("method"), cfg_m.get("threshold"))
    failed = {t["metric_config"]["params"]["column"]: t["status"] == "FAIL"
              for t in d.get("tests", []) if t["metric_config"]["params"].get("type", "").endswith("ValueDrift")}
    for col in usable:
        score, method, threshold = scores.get(col, (None, None, None))
        group = col.split(".")[0] if "." in col else ("label" if col == "label" else "prediction")
        detail = f"{cur.n_served} answers served by the API in the window" if col.startswith("served_") else ""
        res.columns.append(ColumnDrift(col.removeprefix("feature."), group, method or "", score, threshold,
                                       bool(failed.get(col, False)), detail))
    feats = [c for c in res.columns if c.group == "feature"]
    res.n_features = len(feats)
    res.n_drifted = sum(c.drifted for c in feats)
    res.share_drifted = res.n_drifted / len(feats) if feats else 0.0
    res.prediction_drifted = any(c.drifted for c in res.columns if c.group == "prediction")
    res.label_drifted = any(c.drifted for c in res.columns if c.group == "label")

    n_emb = min(len(ref.vectors), len(cur.vectors))
    if n_emb >= 5:
        method = _embedding_method(cfg, len(ref.vectors), len(cur.vectors))
        names = [f"e{i}" for i in range(ref.vectors.shape[1])]
        score, drifted, name = method(pd.DataFrame(cur.vectors, columns=names),
                                      pd.DataFrame(ref.vectors, columns=names))
        detail = f"{len(ref.vectors)} reference x {len(cur.vectors)} current vectors"
        res.embedding_threshold = float(method.threshold) if hasattr(method, "threshold") else None
        if name == "distance" and cfg.embedding_threshold is None:
            p = permutation_p_value(ref.vectors, cur.vectors, seed=cfg.seed)
            drifted, res.embedding_threshold = p < cfg.embedding_alpha, None
            name, detail = f"distance, permutation p<{cfg.embedding_alpha}", f"{detail}; p={p:.4f}"
        elif getattr(method, "bootstrap", False):
            res.embedding_threshold = None
            name += ", bootstrap"
        res.embedding_drift = float(score)
        res.embedding_drifted = bool(drifted)
        res.columns.append(ColumnDrift("text_embedding", "embedding", f"embeddings:{name}", float(score),
                                       res.embedding_threshold, bool(drifted), detail))
    if cur.accuracy is not None and cur.n_accuracy >= cfg.min_labelled:
        drop = (reference_accuracy - cur.accuracy) if reference_accuracy is not None else None
        res.accuracy_dropped = bool(drop is not None and drop > cfg.accuracy_drop)
        res.columns.append(ColumnDrift("accuracy", "accuracy", "validation accuracy - window accuracy",
                                       drop, cfg.accuracy_drop, res.accuracy_dropped,
                                       f"prequential {cur.accuracy:.4f} on {cur.n_accuracy} labelled records"))
    res.drifted = bool(res.embedding_drifted or res.share_drifted > cfg.drift_share)
    res.seconds = round(time.perf_counter() - started, 3)
    return res, _with_summary(snapshot.get_html_str(as_iframe=False), res, title, cfg)


def _with_summary(report_html: str, res: DriftResult, title: str, cfg: DriftConfig) -> str:
    """Evidently's report with our headline (embedding drift, accuracy, lineage) on top."""
    rows = "".join(
        f"<tr><td>{html.escape(c.column)}</td><td>{c.group}</td><td>{html.escape(c.method)}</td>"
        f"<td>{'' if c.score is None else f'{c.score:.4f}'}</td>"
        f"<td>{'' if c.threshold is None else f'{c.threshold:.4f}'}</td>"
        f"<td style='color:{'#b00' if c.drifted else '#070'}'>{'drift' if c.drifted else 'ok'}</td></tr>"
        for c in res.columns)
    banner = (
        f"<div style='font-family:sans-serif;padding:12px;border-bottom:1px solid #ccc'>"
        f"<h2>Stream Sentinel - {html.escape(title)}</h2>"
        f"<p><b>{res.verdict()}</b>: {html.escape(res.summary(cfg))} "
        f"(embedding drift score {res.embedding_drift if res.embedding_drift is not None else 'n/a'}; champion "
        f"validation accuracy {'n/a' if res.reference_accuracy is None else f'{res.reference_accuracy:.4f}'}).</p>"
        f"<p><i>Rule:</i> {html.escape(rule(cfg))}</p>"
        f"<p>reference: training set {html.escape(res.reference_data_version)} of {html.escape(res.model_version)} "
        f"({res.n_reference} rows"
        f"{f', {res.reference_excluded} left out because they are also current rows' if res.reference_excluded else ''}"
        f"); current: {res.n_current} rows.</p>"
        f"<table border=1 cellpadding=4 style='border-collapse:collapse'><tr><th>column</th><th>group</th>"
        f"<th>method</th><th>score</th><th>threshold</th><th></th></tr>{rows}</table></div>")
    # the real <body> tag is the last one: Evidently inlines its JS bundle, which mentions "<body" too
    at = report_html.rfind("<body")
    end = report_html.find(">", at) + 1 if at >= 0 else 0
    return report_html[:end] + banner + report_html[end:]


def _plain_page(title: str, message: str) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
            f"<body style='font-family:sans-serif'><h2>Stream Sentinel - {html.escape(title)}</h2>"
            f"<p>{html.escape(message)}</p></body></html>")


# ------------------------------------------------------------------------------ runs


def parse_time(value: str, end: bool = False) -> datetime:
    """ISO-8601 date or timestamp (UTC when no offset). A date as the end of a range means the
    whole day: ``--to 2024-03-31`` includes March 31st."""
    ts = pd.Timestamp(value)
    if ts.tzinfo is None:
        ts = ts.tz_localize("UTC")
    is_date = re.fullmatch(r"\d{4}-\d{2}-\d{2}", value.strip()) is not None
    if end and is_date:
        ts = ts + pd.Timedelta(days=1)
    return ts.to_pydatetime()


def _safe(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z._-]+", "_", name)


def run_window(store: Store, registry, reports_dir: Path, embedding_model_id: str, *, where: str, params: list,
               window_key: str, kind: str, time_field: str, start: str, end: str, report_name: str,
               cfg: DriftConfig) -> DriftResult:
    """Build, save and record one report. Re-running the same window replaces its rows. A
    window by arrival also compares what the API served from ``start`` to ``end`` (an
    event-time window has no serving time to match)."""
    started = time.perf_counter()
    champion = registry.reconcile()
    report_path = reports_dir / f"{report_name}.html"
    res = DriftResult(window_key, kind, time_field, start, end, "ok", "", report_path=str(report_path))
    title = f"drift {window_key}"
    if champion is None:
        res.status, res.message = "no_champion", "no champion yet: nothing to compare against"
        write_bytes_atomic(report_path, _plain_page(title, res.message).encode())
        record(store, res)
        return res
    v = registry.get(champion)
    res.model_version, res.reference_data_version = champion, v.training_set_version
    with store.session():
        cur = load_window(store, embedding_model_id, champion, where, params, cfg)
        if time_field == "arrival" and start and end:
            cur.served, cur.n_served = load_served(store, champion, parse_time(start), parse_time(end), cfg)
        res.n_current = cur.n_rows
        if cur.n_rows < cfg.min_rows:
            res.status = "insufficient_data"
            res.message = (f"insufficient data: {cur.n_rows} embedded records in {window_key}, "
                           f"at least {cfg.min_rows} needed")
            write_bytes_atomic(report_path, _plain_page(title, res.message).encode())
            record(store, res)
            return res
        ref = cached_reference(store, reports_dir / "reference", embedding_model_id, champion,
                               v.training_set_version, cfg)
        # a window is never compared with itself: its own records leave the reference
        with store.connect() as con:
            current_ids = {r[0] for r in con.execute(f"SELECT r.id FROM records r WHERE {where}", params).fetchall()}
        ref, excluded = ref.without(current_ids)
        if len(ref.frame) < cfg.min_rows:
            res.status, res.reference_excluded = "insufficient_data", excluded
            res.message = (f"insufficient reference: {len(ref.frame)} rows of the champion's training set are not "
                           f"in {window_key} ({excluded} are), at least {cfg.min_rows} needed")
            write_bytes_atomic(report_path, _plain_page(title, res.message).encode())
            record(store, res)
            return res
    out, page = compare(ref, cur, cfg, reference_accuracy=v.metrics.get("valid", {}).get("accuracy"), title=title,
                        reference_excluded=excluded,
                        model_version=champion, reference_data_version=v.training_set_version)
    out = replace(out, window_key=window_key, kind=kind, time_field=time_field, start=start, end=end,
                  report_path=str(report_path), model_version=champion, reference_data_version=v.training_set_version)
    out.message = out.summary(cfg)
    write_bytes_atomic(report_path, page.encode())
    out.seconds = round(time.perf_counter() - started, 3)
    record(store, out)
    return out


def run_partition(store: Store, registry, reports_dir: Path, embedding_model_id: str, partition: str,
                  cfg: DriftConfig) -> DriftResult:
    day = date.fromisoformat(partition)
    return run_window(store, registry, reports_dir, embedding_model_id, where="r.arrival_date = CAST(? AS DATE)",
                      params=[partition], window_key=partition, kind="partition", time_field="arrival",
                      start=day.isoformat(), end=(day + timedelta(days=1)).isoformat(), report_name=partition, cfg=cfg)


def run_range(store: Store, registry, reports_dir: Path, embedding_model_id: str, start: str, end: str,
              time_field: str, cfg: DriftConfig) -> DriftResult:
    """Any window an analyst asks for, by event time or by arrival (ingestion time)."""
    if time_field not in ("event_time", "arrival"):
        raise ValueError(f"time field must be event_time or arrival, not {time_field!r}")
    t0, t1 = parse_time(start), parse_time(end, end=True)
    if t1 <= t0:
        raise ValueError(f"empty window: {start} .. {end}")
    col = "r.event_time" if time_field == "event_time" else "r.ingested_at"
    key = f"{time_field}:{t0.isoformat()}..{t1.isoformat()}"
    name = "adhoc/" + _safe(f"{time_field}_{t0:%Y%m%dT%H%M%S}_{t1:%Y%m%dT%H%M%S}")
    return run_window(store, registry, reports_dir, embedding_model_id, where=f"{col} >= ? AND {col} < ?",
                      params=[t0, t1], window_key=key, kind="adhoc", time_field=time_field, start=t0.isoformat(),
                      end=t1.isoformat(), report_name=name, cfg=cfg)


def recent_due(store: Store, cfg: DriftConfig, every: int | None = None) -> int | None:
    """The newest record (vec_id) a rolling report should end at, or None when none is due:
    a first one as soon as there are records for both sides, then one per ``recent_every``
    new records. Daily partitions report a finished day; this one shows the latest stretch
    of the stream minutes after `up`, not after the next midnight. ``every`` replaces
    ``recent_every`` (0: a report is due whenever there is a record it has not seen)."""
    every = cfg.recent_every if every is None else every
    with store.connect() as con:
        hi, total = con.execute("SELECT coalesce(max(vec_id), 0), count(*) FROM records").fetchone()
        last = con.execute("""SELECT max(CAST(regexp_extract(window_key, '[.][.]([0-9]+)$', 1) AS BIGINT))
                              FROM drift_reports WHERE kind = 'recent'""").fetchone()[0]
        if last is None:
            return hi if total >= 2 * cfg.min_rows else None
        newer = con.execute("SELECT count(*) FROM records WHERE vec_id > ?", [last]).fetchone()[0]
    return hi if newer >= every else None


def run_recent(store: Store, registry, reports_dir: Path, embedding_model_id: str, upto_vec_id: int,
               cfg: DriftConfig) -> DriftResult:
    """The latest ``recent_records`` records up to ``upto_vec_id`` (at most half of them, so the
    champion's training set keeps rows of its own to compare with) against that training set."""
    with store.connect() as con:
        total = con.execute("SELECT count(*) FROM records WHERE vec_id <= ?", [upto_vec_id]).fetchone()[0]
        n = max(1, min(cfg.recent_records, total // 2))
        rows = con.execute("""SELECT min(vec_id), min(ingested_at), max(ingested_at) FROM (
                                SELECT vec_id, ingested_at FROM records WHERE vec_id <= ?
                                ORDER BY vec_id DESC LIMIT ?)""", [upto_vec_id, n]).fetchone()
    lo, t0, t1 = rows
    lo = lo if lo is not None else upto_vec_id + 1
    key = f"recent:{lo}..{upto_vec_id}"  # record (vec_id) range
    return run_window(store, registry, reports_dir, embedding_model_id, where="r.vec_id >= ? AND r.vec_id <= ?",
                      params=[lo, upto_vec_id], window_key=key, kind="recent", time_field="arrival",
                      start=t0.isoformat() if t0 else "", end=t1.isoformat() if t1 else "",
                      report_name=f"recent/{lo}-{upto_vec_id}", cfg=cfg)


# ------------------------------------------------------------------------------ DuckDB


def record(store: Store, res: DriftResult) -> None:
    """One row in drift_reports and one per column in drift_metrics, replacing a re-run."""
    now = datetime.now(timezone.utc)
    with store.transaction() as con:
        con.execute("DELETE FROM drift_metrics WHERE window_key = ?", [res.window_key])
        con.execute("DELETE FROM drift_reports WHERE window_key = ?", [res.window_key])
        con.execute(
            """INSERT INTO drift_reports (window_key, kind, time_field, start, "end", status, message, n_current,
                 n_reference, n_labelled, share_drifted, n_drifted, n_features, embedding_drift, embedding_drifted,
                 prediction_drifted, label_drifted, accuracy, reference_accuracy, accuracy_dropped, drifted,
                 report_path, reference_data_version, model_version, created_at, n_accuracy, reference_excluded)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            [res.window_key, res.kind, res.time_field, res.start, res.end, res.status, res.message, res.n_current,
             res.n_reference, res.n_labelled, res.share_drifted, res.n_drifted, res.n_features, res.embedding_drift,
             res.embedding_drifted, res.prediction_drifted, res.label_drifted, res.accuracy, res.reference_accuracy,
             res.accuracy_dropped, res.drifted, res.report_path, res.reference_data_version, res.model_version, now,
             res.n_accuracy, res.reference_excluded])
        for c in res.columns:
            con.execute("INSERT INTO drift_metrics VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        [res.window_key, c.column, c.group, c.method, c.score, c.threshold, c.drifted,
                         res.reference_data_version, res.model_version, now])


def latest(store: Store, window_key: str | None = None, kind: str | None = None) -> dict | None:
    """The headline of one report (a partition or window key), or the newest one."""
    where, params = [], []
    if window_key:
        where.append("window_key = ?")
        params.append(window_key)
    if kind:
        where.append("kind = ?")
        params.append(kind)
    with store.connect() as con:
        cur = con.execute(f"""SELECT * FROM drift_reports {'WHERE ' + ' AND '.join(where) if where else ''}
                              ORDER BY created_at DESC LIMIT 1""", params)
        cols = [d[0] for d in cur.description]
        rows = cur.fetchall()
        if not rows:
            return None
        out = dict(zip(cols, rows[0]))
        out["columns"] = [dict(zip(["column", "group", "method", "score", "threshold", "drifted"], r))
                          for r in con.execute("""SELECT column_name, column_group, method, score, threshold,
                                                  drifted FROM drift_metrics WHERE window_key = ?
                                                  ORDER BY column_group, column_name""", [out["window_key"]]).fetchall()]
    out["created_at"] = out["created_at"].isoformat() if out.get("created_at") else None
    return out


# ------------------------------------------------------------------------------ retrain trigger


@dataclass
class RetrainTrigger:
    window_key: str
    start: str
    report_created_at: str
    share_drifted: float | None
    embedding_drift: float | None
    requested_at: str = ""  # when the sensor asked for the retrain (ISO-8601)

    @property
    def run_key(self) -> str:
        return f"drift-retrain:{self.window_key}:{self.report_created_at}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "RetrainTrigger":
        return cls(**json.loads(text))


def retrain_due(store: Store, cooldown_s: float, now: datetime | None = None,
                requested: RetrainTrigger | None = None) -> RetrainTrigger | None:
    """A full retrain is due when the newest daily report shows drift and opens a new episode.

    Only the newest day counts, so re-running old partitions in a backfill retrains nothing.
    An episode runs from a drifted day until a day without drift, and it gets one full
    retrain. If it is still drifting after ``cooldown_s``, that retrain did not fix it, and
    one more is due.

    The bookmark is the last retrain recorded by a run (``learning_events``) or, newer, the
    last one the sensor requested (``requested``, from its cursor, which Dagster stores
    with the run request), so a request whose run has not started yet is not made twice."""
    now = now or datetime.now(timezone.utc)
    with store.connect() as con:
        newest = con.execute("""SELECT window_key, start, created_at, share_drifted, embedding_drift, drifted
                                FROM drift_reports WHERE kind = 'partition' AND status = 'ok'
                                ORDER BY start DESC, created_at DESC LIMIT 1""").fetchall()
        if not newest or not newest[0][5]:
            return None
        key, start, created, share, emb, _ = newest[0]
        last = con.execute("""SELECT created_at, json_extract_string(detail, '$.start') FROM learning_events
                              WHERE event_type = 'drift_retrain' ORDER BY created_at DESC LIMIT 1""").fetchall()
        if requested is not None:
            asked = (datetime.fromisoformat(requested.requested_at or requested.report_created_at), requested.start)
            last = [max([*last, asked], key=lambda x: x[0])]
        if last:
            last_at, last_start = last[0]
            if created <= last_at:
                return None  # this report was already acted on
            calm = con.execute("""SELECT count(*) FROM drift_reports WHERE kind = 'partition' AND status = 'ok'
                                  AND NOT drifted AND start > ? AND start <= ?""", [last_start, start]).fetchall()[0][0]
            if not calm and (now - last_at).total_seconds() < cooldown_s:
                return None  # the same episode, already retrained
    return RetrainTrigger(key, start, created.isoformat(), share, emb)


def record_retrain(registry, trigger: RetrainTrigger) -> None:
    """The drift retrain in learning_events: the episode's bookmark and the audit trail.
    Written by the retrain run itself, once (a retried run does not record it twice)."""
    with registry.store.connect() as con:
        if con.execute("""SELECT count(*) FROM learning_events WHERE event_type = 'drift_retrain'
                          AND json_extract_string(detail, '$.run_key') = ?""", [trigger.run_key]).fetchone()[0]:
            return
    registry.event("drift_retrain", registry.champion_version(), window_key=trigger.window_key,
                   start=trigger.start, share_drifted=trigger.share_drifted, embedding_drift=trigger.embedding_drift,
                   run_key=trigger.run_key)
