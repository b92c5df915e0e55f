"""LightGBM models that keep learning: features, training set, training, evaluation.

Features (computed the same way at training and scoring time, stored with each version):

* nearest-labelled-neighbour features from a FAISS inner-product index over the labelled
  training embeddings: similarity-weighted positive share of the k nearest labelled
  records, their mean similarity, and the best similarity to a positive and to a
  negative record (leave-one-out while training);
* the embedding compressed by PCA (fitted at a full retrain, frozen for continued
  training so the trees of the parent stay meaningful);
* the records' numeric features.

Raw 384-d embeddings make LightGBM slow and weak on small streams; these ~40 columns
carry the same signal in a form trees split well.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..store import LEARNING_ORDER, Store, vectors_from_arrow


@dataclass
class TrainingSet:
    data_version: str
    frame: pd.DataFrame  # record_id, label, y, event_time, split, features (dict), vector (np)
    positive_label: str
    negative_label: str = ""  # "" while the labels hold one class only
    left_out: dict[str, int] = field(default_factory=dict)  # labels outside the pair: count

    def split(self, name: str) -> pd.DataFrame:
        return self.frame[self.frame["split"] == name]


def labelled_frame(table, positive_label: str) -> pd.DataFrame:
    """Arrow rows (record_id, label, [split], event_time, features, vector) as the training frame."""
    df = pd.DataFrame({
        "record_id": table.column("record_id").to_pylist(),
        "label": table.column("label").to_pylist(),
        "event_time": table.column("event_time").to_pandas(),
        "features": [json.loads(f) if f else {} for f in table.column("features").to_pylist()],
    })
    if "split" in table.column_names:
        df["split"] = table.column("split").to_pylist()
    df["vector"] = list(vectors_from_arrow(table.column("vector"), len(df)))
    df["y"] = (df["label"] == positive_label).astype(int)
    return df


def negative_of(labels: pd.Series, positive_label: str, negative_label: str = "") -> str:
    """The configured negative label, or (any label accepted) the most frequent other one."""
    if negative_label:
        return negative_label
    others = labels[labels != positive_label].value_counts()
    return str(others.index[0]) if len(others) else ""


def _golden(record_id: str, share: float) -> bool:
    """A fixed slice: membership depends only on the id, so it never drifts as data grows."""
    h = int(hashlib.sha256(record_id.encode()).hexdigest()[:8], 16)
    return h < share * 0xFFFFFFFF


def split_rows(df: pd.DataFrame, valid_share: float = 0.2, golden_share: float = 0.1,
               valid_max: int = 200) -> pd.Series:
    """train / valid / golden for rows in learning order (``store.LEARNING_ORDER``: the
    order their labels became known), so "latest" is what the stream delivered last.

    golden: a fixed slice by id hash. valid: the latest ``valid_share`` of the rest (capped:
    on a long stream an uncapped 20 % would keep the newest thousands of labels out of
    training, and the model would learn ever further behind). A stream often runs one class
    for a while; when the latest rows hold one class only, the latest rows of the other class
    join the validation slice too (its share of them, always leaving most in training), so
    the gate judges on something defined (ROC-AUC needs both classes) instead of refusing
    every candidate until the stream happens to mix again.
    """
    golden = df["record_id"].map(lambda r: _golden(r, golden_share))
    rest = df.index[~golden]
    n_valid = min(int(round(len(rest) * valid_share)), valid_max)
    split = pd.Series("train", index=df.index)
    split[golden] = "golden"
    if n_valid:
        latest = rest[-n_valid:]
        split[latest] = "valid"
        y = df.loc[rest, "y"]
        for cls in (0, 1):
            if (df.loc[latest, "y"] == cls).any():
                continue
            of_cls = y.index[y == cls]
            # its share of that class, at least one, never the last one (training needs it)
            k = min(max(1, int(round(len(of_cls) * valid_share))), len(of_cls) - 1, max(1, n_valid // 2))
            if k > 0:
                split[of_cls[-k:]] = "valid"
    return split


def load_training_set(store: Store, model_id: str, positive_label: str, valid_share: float = 0.2,
                      golden_share: float = 0.1, valid_max: int = 200, negative_label: str = "") -> TrainingSet:
    """Resolved (non-conflicting) labels joined with records and their current embeddings.
    Labels other than the positive and the negative one (possible only when any label is
    accepted) are left out and counted in ``left_out``."""
    with store.connect() as con:
        table = con.sql(
            """SELECT l.record_id, l.label, r.event_time, r.features, e.vector
               FROM labels l JOIN records_w r ON r.id = l.record_id
               JOIN embeddings e ON e.record_id = l.record_id AND e.model_id = ?
               WHERE l.status = 'resolved' ORDER BY """ + LEARNING_ORDER, params=[model_id]).to_arrow_table()
    df = labelled_frame(table, positive_label)
    negative = negative_of(df["label"], positive_label, negative_label)
    keep = df["label"].isin([positive_label, negative])
    left_out = {str(k): int(v) for k, v in df.loc[~keep, "label"].value_counts().items()}
    df = df[keep].reset_index(drop=True)
    df["split"] = split_rows(df, valid_share, golden_share, valid_max)
    rows = "\n".join(f"{r}\t{lab}" for r, lab in sorted(zip(df["record_id"], df["label"])))
    digest = hashlib.sha256(f"{positive_label}/{negative}\n{rows}".encode()).hexdigest()[:16]
    return TrainingSet(digest, df, positive_label, negative, left_out)


# ------------------------------------------------------------------------------ features


@dataclass
class FeatureSpec:
    numeric: list[str]
    knn_k: int
    pca_mean: np.ndarray = field(repr=False)
    pca_components: np.ndarray = field(repr=False)
    linear: bool = False  # the live linear score column (versions made before it have none)
    linear_half_life: float = 0.0  # labels this many places older weigh half in it (0: all alike)

    @property
    def names(self) -> list[str]:
        return (["knn_pos_share", "knn_mean_sim", "knn_max_sim_pos", "knn_max_sim_neg"]
                + (["linear_score"] if self.linear else [])
                + [f"pca_{i}" for i in range(len(self.pca_components))] + [f"num_{n}" for n in self.numeric])

    def save(self, folder: Path) -> None:
        np.savez(folder / "features.npz", pca_mean=self.pca_mean, pca_components=self.pca_components)
        (folder / "features.json").write_text(json.dumps({"numeric": self.numeric, "knn_k": self.knn_k,
                                                          "linear": self.linear,
                                                          "linear_half_life": self.linear_half_life}))

    @classmethod
    def load(cls, folder: Path) -> "FeatureSpec":
        meta = json.loads((folder / "features.json").read_text())
        arrays = np.load(folder / "features.npz", allow_pickle=False)
        return cls(meta["numeric"], meta["knn_k"], arrays["pca_mean"], arrays["pca_components"],
                   bool(meta.get("linear", False)), float(meta.get("linear_half_life", 0.0)))


def fit_feature_spec(frame: pd.DataFrame, n_components: int = 16, knn_k: int = 10, seed: int = 0,
                     linear: bool = True, linear_half_life: float = 0.0) -> FeatureSpec:
    vecs = np.stack(frame["vector"].to_numpy())
    numeric = sorted({k for f in frame["features"] for k, v in f.items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool)})
    mean = vecs.mean(axis=0)
    k = min(n_components, max(1, min(vecs.shape) - 1))
    # PCA by SVD of a (seeded) sample: deterministic and cheap
    rng = np.random.default_rng(seed)
    sample = (vecs[rng.choice(len(vecs), size=min(len(vecs), 5000), replace=False)] - mean).astype(np.float64)
    # the top eigenvectors of the d x d scatter matrix: the same subspace as an SVD of the
    # sample, at a tenth of the cost (d is small next to the rows); signs fixed so a refit on
    # the same rows gives the same columns
    with _one_blas_thread():
        _, vecs_ = np.linalg.eigh(sample.T @ sample)
    top = vecs_[:, ::-1][:, :k].T
    top *= np.where(top[np.arange(len(top)), np.abs(top).argmax(axis=1)] < 0, -1.0, 1.0)[:, None]
    return FeatureSpec(numeric, knn_k, mean.astype(np.float32), top.astype(np.float32), linear,
                       linear_half_life)


class _OneBlasThread:
    """One BLAS thread while any thread of the process is inside (nested or concurrent uses
    set the limit once and restore it once: two overlapping limiters could otherwise restore
    in the wrong order and leave the process on one thread for good)."""

    def __init__(self) -> None:
        self._controller = None  # threadpoolctl's view of the loaded libraries, listed once
        self._lock = threading.Lock()
        self._depth = 0
        self._limiter = None

    def __enter__(self):
        with self._lock:
            if self._controller is None:
                import scipy.linalg  # noqa: F401 -- loads scipy's own BLAS before the libraries are listed
                from threadpoolctl import ThreadpoolController

                self._controller = ThreadpoolController()
            if self._depth == 0:
                self._limiter = self._controller.limit(limits=1, user_api="blas")
            self._depth += 1
        return self

    def __exit__(self, *exc) -> None:
        with self._lock:
            self._depth -= 1
            if self._depth == 0:
                self._limiter.restore_original_limits()
                self._limiter = None


_BLAS = _OneBlasThread()


def _one_blas_thread():
    """Small dense algebra on one BLAS thread. FAISS and LightGBM bring their own OpenMP
    runtimes whose idle threads spin for a while after each call; on a 2-core machine a
    multi-threaded 385 x 385 solve right after a kNN search took 20 ms instead of 2 (measured),
    and these products are too small to gain from threads anyway.

    The libraries are listed once: ``threadpool_limits`` lists them on every call by reading
    /proc/self/maps, which cost 6 ms of a 10 ms prediction for one record (measured)."""
    return _BLAS


@dataclass
class Reference:
    """The labelled neighbours that kNN features look up."""

    vectors: np.ndarray
    y: np.ndarray
    ids: list[str]
    # where the linear column keeps its state between processes (LinearState); None: memory only
    cache_file: Path | None = None
    # what is derived from the rows once and looked up on every scoring call (the kNN index, the
    # row of each id, the linear state): the rows are never changed in place (``without`` makes
    # a new reference), so a server scoring one request after another pays for them once
    _memo: dict = field(default_factory=dict, repr=False, compare=False)

    def knn_index(self):
        import faiss

        if "knn" not in self._memo:
            index = faiss.IndexFlatIP(self.vectors.shape[1])
            index.add(np.ascontiguousarray(self.vectors, dtype=np.float32))
            self._memo["knn"] = index
        return self._memo["knn"]

    def row_of(self) -> dict[str, int]:
        if "rows" not in self._memo:
            self._memo["rows"] = {rid: j for j, rid in enumerate(self.ids)}
        return self._memo["rows"]

    def without(self, ids: set[str]) -> "Reference":
        keep = np.array([r not in ids for r in self.ids], dtype=bool)
        return Reference(np.ascontiguousarray(self.vectors[keep]), self.y[keep],
                         [r for r, k in zip(self.ids, keep) if k])

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> "Reference":
        vecs = np.stack(frame["vector"].to_numpy()) if len(frame) else np.zeros((0, 1), np.float32)
        return cls(np.ascontiguousarray(vecs, dtype=np.float32), frame["y"].to_numpy(), list(frame["record_id"]))


LINEAR_FOLDS = 5
LINEAR_RIDGE = 10.0


def _rows_digest(ids: list[str], y: np.ndarray) -> str:
    """Ids and labels of rows in order (one C-level join, not a format per row: this runs on
    every scoring call, over every label)."""
    h = hashlib.sha256()
    h.update("\n".join(ids).encode())
    h.update(np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)).tobytes())  # "a\nb" is not "a", "b"
    h.update(np.asarray(y, dtype=np.int8).tobytes())
    return h.hexdigest()


class LinearState:
    """The sufficient statistics of the linear score column for one reference: per fold and
    class, the recency-weighted gram, right-hand side and row count.

    A fit on any set of folds is a sum of parts, so out-of-fold scores cost K small solves,
    not K passes over the labels. And the parts *extend*: when a reference is an earlier one
    plus rows appended in stream order (the usual case: new labels arrive after old ones),
    the old parts decay by ``0.5 ** (m / half_life)`` and only the ``m`` new rows are
    multiplied in. Every scoring call then costs O(new labels), not O(all labels), which is
    what keeps the column cheap at a million labels. A reference that is not such an
    extension (a label changed, a late label inserted mid-stream, another embedding model)
    is recomputed from scratch; ``matches`` checks ids, labels and a vector checksum."""

    def __init__(self, d: int, half_life: float):
        self.d, self.half_life, self.n = d, float(half_life), 0
        self.gram = np.zeros((LINEAR_FOLDS, 2, d + 1, d + 1))
        self.rhs = np.zeros((LINEAR_FOLDS, 2, d + 1))
        self.count = np.zeros((LINEAR_FOLDS, 2), dtype=np.int64)
        self.digest = _rows_digest([], np.zeros(0))
        self.vsum = 0.0
        self.saved_n = 0  # rows of the cache file this state was read from or written to
        self._coefs: dict = {}

    @staticmethod
    def _vsum(vectors: np.ndarray) -> float:
        return float(np.sum(vectors, dtype=np.float64))

    def matches(self, ref: "Reference") -> bool:
        """True when ``ref``'s first ``n`` rows are exactly the rows this state holds."""
        return (len(ref.ids) >= self.n and ref.vectors.shape[1] == self.d
                and _rows_digest(ref.ids[:self.n], ref.y[:self.n]) == self.digest
                and self._vsum(ref.vectors[:self.n]) == self.vsum)

    def extend(self, ref: "Reference") -> "LinearState":
        """Add ``ref``'s rows past the first ``n`` (``matches(ref)`` must hold)."""
        n0, n = self.n, len(ref.ids)
        if n == n0:
            return self
        m = n - n0
        if self.half_life > 0 and n0:
            decay = 0.5 ** (m / self.half_life)
            self.gram *= decay
            self.rhs *= decay
        X = np.hstack([ref.vectors[n0:].astype(np.float32, copy=False), np.ones((m, 1), np.float32)])
        y = ref.y[n0:]
        t = np.where(y == 1, 1.0, -1.0).astype(np.float32)
        pos = np.arange(n0, n)
        r = (0.5 ** ((n - 1 - pos) / self.half_life) if self.half_life > 0 else np.ones(m)).astype(np.float32)
        fold = pos % LINEAR_FOLDS
        # float32 products (half the memory traffic of float64; unit vectors keep the sums well
        # within its precision), float64 accumulation and solves
        for f in range(LINEAR_FOLDS):
            for c in (0, 1):
                sel = (fold == f) & (y == c)
                if sel.any():
                    Xm = X[sel] * r[sel][:, None]
                    self.gram[f, c] += Xm.T @ X[sel]
                    self.rhs[f, c] += Xm.T @ t[sel]
                    self.count[f, c] += int(sel.sum())
        self.n = n
        self.digest = _rows_digest(ref.ids, ref.y)
        self.vsum = self._vsum(ref.vectors)
        self._coefs = {}
        return self

    def coef(self, skip: int | None) -> np.ndarray | None:
        """Ridge coefficients on every fold but ``skip``; None while a class is missing there.
        Each class weighs half of the fit (the stream's mix swings; the column should not)."""
        from scipy.linalg import cho_factor, cho_solve

        if skip not in self._coefs:
            if "total" not in self._coefs:  # per class, over all folds: a fold's complement is a difference
                self._coefs["total"] = (self.gram.sum(axis=0), self.rhs.sum(axis=0), self.count.sum(axis=0))
            gram_c, rhs_c, counts = self._coefs["total"]
            if skip is not None:
                gram_c, rhs_c, counts = gram_c - self.gram[skip], rhs_c - self.rhs[skip], counts - self.count[skip]
            if counts.min() == 0:
                self._coefs[skip] = None
            else:
                scale = 0.5 / (counts / counts.sum())
                gram = scale[0] * gram_c[0] + scale[1] * gram_c[1]
                gram[np.diag_indices(self.d)] += LINEAR_RIDGE  # the intercept (last) is not shrunk
                rhs = scale[0] * rhs_c[0] + scale[1] * rhs_c[1]
                try:  # symmetric positive definite (the ridge): Cholesky, ~2x faster than LU here
                    self._coefs[skip] = cho_solve(cho_factor(gram, check_finite=False), rhs, check_finite=False)
                except np.linalg.LinAlgError:
                    self._coefs[skip] = np.linalg.lstsq(gram, rhs, rcond=None)[0]
        return self._coefs[skip]

    def copy(self) -> "LinearState":
        other = LinearState(self.d, self.half_life)
        other.gram, other.rhs, other.count = self.gram.copy(), self.rhs.copy(), self.count.copy()
        other.n, other.digest, other.vsum, other.saved_n = self.n, self.digest, self.vsum, self.saved_n
        return other

    def to_bytes(self) -> bytes:
        import io

        buf = io.BytesIO()
        np.savez(buf, gram=self.gram, rhs=self.rhs, count=self.count,
                 meta=np.array([self.d, self.half_life, self.n, self.vsum]), digest=np.array(self.digest))
        return buf.getvalue()

    @classmethod
    def from_file(cls, path: Path) -> "LinearState | None":
        """A saved state, or None when it is missing or unreadable (it is only a cache)."""
        try:
            with np.load(path, allow_pickle=False) as z:
                d, half_life, n, vsum = z["meta"].tolist()
                state = cls(int(d), half_life)
                state.gram, state.rhs, state.count = z["gram"], z["rhs"], z["count"]
                state.n, state.vsum, state.digest = int(n), float(vsum), str(z["digest"])
                state.saved_n = state.n
            return state
        except (OSError, ValueError, KeyError):
            return None


# states of the references scored lately in this process (a run scores the same reference
# several times: training rows, validation, golden slice, the gate)
_LINEAR_MEMO: list[LinearState] = []
_LINEAR_MEMO_SIZE = 4
LINEAR_SAVE_ROWS = 300
LINEAR_SAVE_SHARE = 0.05


def linear_state(ref: "Reference", half_life: float) -> LinearState:
    """The state for ``ref``: an extension of one held in memory or in ``ref.cache_file``
    when one matches, else built from scratch. Saved back to ``ref.cache_file`` once it grew
    by ``LINEAR_SAVE_ROWS`` rows (or ``LINEAR_SAVE_SHARE`` of them) past what the file holds:
    the file is ~12 MB at 384 dimensions, and writing it (fsync) on every scoring call cost
    more than the next process extending a slightly older state by the rows it lacks."""
    d, half_life = ref.vectors.shape[1], float(half_life)
    held = ref._memo.get(("linear", half_life))
    if held is not None:
        return held
    fits = [s for s in _LINEAR_MEMO if s.d == d and s.half_life == half_life and s.matches(ref)]
    best = max(fits, key=lambda s: s.n, default=None)
    if best is None and ref.cache_file is not None and ref.cache_file.exists():
        disk = LinearState.from_file(ref.cache_file)
        if disk is not None and disk.d == d and disk.half_life == half_life and disk.matches(ref):
            best = disk
    grew = best is None or best.n < len(ref.ids)
    # extend a copy: the shorter state stays valid for another reference built on it
    state = (best.copy() if best is not None else LinearState(d, half_life)).extend(ref) if grew else best
    if state in _LINEAR_MEMO:
        _LINEAR_MEMO.remove(state)
    _LINEAR_MEMO.insert(0, state)
    del _LINEAR_MEMO[_LINEAR_MEMO_SIZE:]
    if grew and ref.cache_file is not None and (
            state.saved_n == 0 or state.n - state.saved_n >= max(LINEAR_SAVE_ROWS, LINEAR_SAVE_SHARE * state.n)):
        from ..atomic import write_bytes_atomic

        try:
            write_bytes_atomic(ref.cache_file, state.to_bytes())
            state.saved_n = state.n
        except OSError:
            pass  # only a cache: a full disk or a read-only root must not fail the scoring
    ref._memo[("linear", half_life)] = state
    return state


def linear_scores(ref: Reference, vectors: np.ndarray, ids: list[str] | None = None,
                  half_life: float = 0.0) -> np.ndarray:
    """A class-balanced ridge classifier on the embeddings of every labelled record, as one
    feature column: a linear view of all labels, kept by the labels (``LinearState``), not
    by model versions.

    Like the kNN columns it is computed from the labels known at scoring time, so a new label
    moves it at once; unlike them it sees a direction in the whole embedding, which is what an
    online linear model learns and trees on a few PCA components miss after a shift. Closed
    form (d x d normal equations), so it costs milliseconds at thousands of labels. Rows that
    are themselves in the reference (training) get out-of-fold scores: a record never scores
    with its own label, as with the kNN leave-one-out."""
    out = np.zeros(len(vectors), dtype=np.float32)
    if len(ref.vectors) < 2 or not len(vectors) or len(set(ref.y.tolist())) < 2:
        return out
    rows = inside = None
    if ids is not None:  # rows that are in the reference score out of fold
        pos_of = ref.row_of()
        rows = np.array([pos_of.get(x, -1) for x in ids])
        inside = np.flatnonzero(rows >= 0)
    folds = sorted(set((rows[inside] % LINEAR_FOLDS).tolist())) if inside is not None else []
    with _one_blas_thread():  # the d x d work: small, and slowed by threads beside OpenMP pools
        state = linear_state(ref, half_life)
        coefs = {k: state.coef(k) for k in [None, *folds]}
    # the products with the scored rows: float32, no copy of the rows (a million rows in
    # float64 with an intercept column would be a 3 GB copy), BLAS threads allowed
    X = np.ascontiguousarray(vectors, dtype=np.float32)

    def apply(c: np.ndarray, sel=slice(None)) -> np.ndarray:
        return X[sel] @ c[:-1].astype(np.float32) + np.float32(c[-1])

    out[:] = apply(coefs[None])
    for k in folds:
        sel = inside[rows[inside] % LINEAR_FOLDS == k]
        out[sel] = 0.0 if coefs[k] is None else apply(coefs[k], sel)
    return out


def build_features(spec: FeatureSpec, vectors: np.ndarray, features: list[dict], ref: Reference,
                   ids: list[str] | None = None) -> np.ndarray:
    """Feature matrix; rows whose id is in the reference skip themselves (leave-one-out)."""
    n = len(vectors)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    knn = np.zeros((n, 4), dtype=np.float32)
    if len(ref.vectors) and n:
        k = min(spec.knn_k + 1, len(ref.vectors))
        sims, idx = ref.knn_index().search(vectors, k)
        sims, idx = sims[:, :k], idx[:, :k]
        valid = idx >= 0
        if ids is not None:  # leave-one-out: a record is not its own neighbour
            pos_of = ref.row_of()
            own = np.array([pos_of.get(r, -2) for r in ids])
            valid &= idx != own[:, None]
        # keep the first knn_k valid neighbours of each row
        valid &= np.cumsum(valid, axis=1) <= spec.knn_k
        safe = np.where(valid, idx, 0)
        yy = ref.y[safe].astype(np.float32)
        pos_share = float(np.clip(ref.y.mean(), 1e-3, 1 - 1e-3))
        # class-balanced: each neighbour weighs similarity / its class's share of the reference,
        # so a stream that opens with 99 % spam does not make every neighbourhood look like spam
        w = np.clip(sims, 1e-3, None) * np.where(yy == 1, 0.5 / pos_share, 0.5 / (1 - pos_share)) * valid
        has = valid.any(axis=1)
        wsum = np.where(has, w.sum(axis=1), 1.0)
        cnt = np.where(has, valid.sum(axis=1), 1)
        is_pos, is_neg = valid & (yy == 1), valid & (yy == 0)
        knn[:, 0] = (w * yy).sum(axis=1) / wsum
        knn[:, 1] = (sims * valid).sum(axis=1) / cnt
        knn[:, 2] = np.where(is_pos.any(axis=1), np.where(is_pos, sims, -np.inf).max(axis=1), -1.0)
        knn[:, 3] = np.where(is_neg.any(axis=1), np.where(is_neg, sims, -np.inf).max(axis=1), -1.0)
        knn[~has] = 0.0
    pca = (vectors - spec.pca_mean) @ spec.pca_components.T if n else np.zeros((0, len(spec.pca_components)))
    num = np.array([[float(f.get(name)) if isinstance(f.get(name), (int, float)) else np.nan
                     for name in spec.numeric] for f in features], dtype=np.float32).reshape(n, len(spec.numeric))
    lin = [linear_scores(ref, vectors, ids, spec.linear_half_life)[:, None]] if spec.linear else []
    return np.hstack([knn, *lin, pca.astype(np.float32), num])


def frame_features(spec: FeatureSpec, frame: pd.DataFrame, ref: Reference, leave_one_out: bool) -> np.ndarray:
    vecs = np.stack(frame["vector"].to_numpy()) if len(frame) else np.zeros((0, len(spec.pca_mean)), np.float32)
    return build_features(spec, vecs, list(frame["features"]), ref,
                          list(frame["record_id"]) if leave_one_out else None)


# ------------------------------------------------------------------------------ training


@dataclass
class TrainParams:
    seed: int = 7
    full_rounds: int = 150
    incremental_rounds: int = 25
    learning_rate: float = 0.05
    num_leaves: int = 15
    min_data_in_leaf: int = 10
    replay: int = 500  # older labelled rows mixed into each continued-training batch (against forgetting)
    refit_growth: float = 1.2  # full retrain once the training split grew this much since the last full version
    linear: bool = True  # a full retrain adds the live linear score column (linear_scores)
    linear_half_life: float = 2000.0  # labels this many places older weigh half in that column
    balanced: bool = True  # LightGBM's is_unbalance (reweights the rarer class)
    threshold_z: float = 3.3  # evidence a decision cut away from 0.5 needs (decision_threshold)

    def lgb_params(self) -> dict:
        return {"objective": "binary", "learning_rate": self.learning_rate, "num_leaves": self.num_leaves,
                "min_data_in_leaf": self.min_data_in_leaf, "feature_fraction": 0.9, "bagging_fraction": 0.9,
                "bagging_freq": 1, "is_unbalance": self.balanced, "seed": self.seed, "deterministic": True,
                "force_row_wise": True,
                "num_threads": 2, "verbose": -1}


def train_full(X: np.ndarray, y: np.ndarray, names: list[str], params: TrainParams):
    import lightgbm as lgb

    ds = lgb.Dataset(X, y, feature_name=names, free_raw_data=False)
    return lgb.train(params.lgb_params(), ds, num_boost_round=params.full_rounds)


def train_continued(parent, X: np.ndarray, y: np.ndarray, names: list[str], params: TrainParams):
    """More trees on top of the parent. A fresh Dataset per increment; LightGBM derives the
    init scores from ``init_model`` itself (no explicit init_score, which would count the
    parent twice)."""
    import lightgbm as lgb

    ds = lgb.Dataset(X, y, feature_name=names, free_raw_data=False)
    return lgb.train(params.lgb_params(), ds, num_boost_round=params.incremental_rounds, init_model=parent,
                     keep_training_booster=True)


def _roc_auc(y: np.ndarray, p: np.ndarray) -> float:
    """Mann-Whitney form with average ranks for ties (equals sklearn's roc_auc_score)."""
    from scipy.stats import rankdata

    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(p)
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """Accuracy, F1 (positive class), log loss and ROC-AUC in plain numpy: the promotion check
    bootstraps these hundreds of times per candidate, where sklearn's input validation alone
    cost seconds."""
    y = np.asarray(y).astype(int)
    p = np.asarray(p, dtype=float)
    out = {"n": int(len(y))}
    if len(y) == 0:
        return out
    pred = (p >= 0.5).astype(int)
    tp = int(((pred == 1) & (y == 1)).sum())
    fp = int(((pred == 1) & (y == 0)).sum())
    fn = int(((pred == 0) & (y == 1)).sum())
    out["accuracy"] = float((pred == y).mean())
    out["f1"] = float(2 * tp / (2 * tp + fp + fn)) if tp else 0.0
    pc = np.clip(p, 1e-7, 1 - 1e-7)
    out["log_loss"] = float(-np.mean(y * np.log(pc) + (1 - y) * np.log(1 - pc)))
    out["roc_auc"] = _roc_auc(y, p)
    return out


HIGHER_IS_BETTER = {"roc_auc": True, "f1": True, "accuracy": True, "log_loss": False}


def paired_bootstrap(y: np.ndarray, p_new: np.ndarray, p_old: np.ndarray, metric: str, n: int = 200,
                     seed: int = 0) -> tuple[float, float, float]:
    """Difference new - old in ``metric`` (sign flipped for losses so + is better): point, 5 %, 95 %."""
    sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0
    point = sign * (metrics(y, p_new)[metric] - metrics(y, p_old)[metric])
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n):
        i = rng.integers(0, len(y), len(y))
        if metric == "roc_auc" and len(set(y[i].tolist())) < 2:
            continue
        diffs.append(sign * (metrics(y[i], p_new[i])[metric] - metrics(y[i], p_old[i])[metric]))
    lo, hi = (np.percentile(diffs, [5, 95]) if diffs else (point, point))
    return float(point), float(lo), float(hi)


def file_sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def params_dict(params: TrainParams) -> dict:
    return asdict(params)
