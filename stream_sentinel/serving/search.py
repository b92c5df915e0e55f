"""Search over the records: the dense FAISS index beside BM25, fused by reciprocal rank.

Why both: an embedding of a whole e-mail is about its topic, so a query with a record's exact
subject line finds *similar* mail first about as often as the record itself; BM25 ranks the
rare words of that subject, which is what a person pasting a subject or phrase means. The
ranks are fused (RRF, k = 60): no score scales to calibrate, and a record first in either
list is near the top of the fused one (bench/serving_search.py measures recall@1 on
exact-subject queries, dense alone vs hybrid).

The lexical side lives in the API process only: it grows from the ``records`` table by
``vec_id`` (the order records are written in), so each refresh tokenizes only the new texts
(bm25s, its own tokenizer with an incremental vocabulary) and rebuilds the sparse score
matrix in the background, paced (see :class:`Lexical`). A cold start over 100k records
(tokenizing every text, then one rebuild) took 72 s on a 2-core AMD EPYC
(bench/serving_search.py); the dense side serves meanwhile. A text is cut to its first
``MAX_TOKENS`` tokens: subject and opening, where the distinctive words are.

Phrases: a record that holds the query's words side by side, in order (stopwords aside), is
ranked above those that do not, earliest occurrence first (a subject line at position 0
before a reply that quotes it), then by the fused rank.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout

import numpy as np

from ..openmp import faiss_one_thread

log = logging.getLogger(__name__)

MAX_TOKENS = 256  # per record, for BM25 and phrases: the subject and opening, where the telling words are
MIN_REBUILD_S = 2.0  # the BM25 matrix is rebuilt at most this often (and at most a quarter of the time)
SNIPPET_CHARS = 200
RRF_K = 60  # reciprocal rank fusion: 1 / (RRF_K + rank)
MODES = ("hybrid", "dense", "lexical")


def snippet(text: str) -> str:
    return " ".join(text[: SNIPPET_CHARS * 4].split())[:SNIPPET_CHARS]


class Lexical:
    """BM25 over record texts, grown by appending (records in ``vec_id`` order).

    New texts are tokenized as they come (:meth:`add`, the refresh thread); the score matrix
    is rebuilt from every document by :meth:`rebuild`, paced so that rebuilding takes at most
    a quarter of the time (at 100k records one rebuild takes seconds); the previous matrix
    serves meanwhile, and new records are found by the dense side until they are in."""

    def __init__(self, tokenizer=None) -> None:
        from bm25s.tokenization import Tokenizer

        self.high_water = 0  # the largest vec_id taken
        self.hidden: frozenset[str] = frozenset()  # erased records: never answered while a new side is built
        self._tokenizer = tokenizer or Tokenizer(stopwords="en")
        self._stop = frozenset(self._tokenizer.stopwords or ())
        self._ids: list[str] = []
        self._row: dict[str, int] = {}
        self._snippets: list[str] = []
        self._docs: list[np.ndarray] = []  # token ids per record (stopwords left out), at most MAX_TOKENS
        self._retriever = None
        self._indexed = 0  # records in the current score matrix
        self._next_rebuild = 0.0
        self._lock = threading.Lock()  # guards the tokenizer's vocabulary and the swaps

    def __len__(self) -> int:
        return self._indexed

    @property
    def pending(self) -> int:
        return len(self._docs) - self._indexed

    def add(self, ids: list[str], texts: list[str], high_water: int) -> None:
        """Tokenize new records (one writer: the refresh thread)."""
        with self._lock:
            docs = self._tokenizer.tokenize(texts, update_vocab=True, return_as="ids", show_progress=False)
        base = len(self._ids)
        self._docs.extend(np.asarray(d[:MAX_TOKENS], dtype=np.int32) for d in docs)
        self._snippets.extend(snippet(t) for t in texts)
        self._row.update((rid, base + i) for i, rid in enumerate(ids))
        self._ids.extend(ids)
        self.high_water = max(self.high_water, high_water)

    def rebuild(self, force: bool = False) -> bool:
        """A new score matrix over every record, when some are pending and it is time."""
        import bm25s
        from bm25s.tokenization import Tokenized

        if not self.pending or (not force and time.monotonic() < self._next_rebuild):
            return False
        started = time.monotonic()
        n = len(self._docs)
        with self._lock:
            vocab = dict(self._tokenizer.get_vocab_dict())
        retriever = bm25s.BM25()
        retriever.index(Tokenized(ids=self._docs[:n], vocab=vocab), show_progress=False)
        self._retriever, self._indexed = retriever, n  # one reference each: a search sees old or new
        took = time.monotonic() - started
        self._next_rebuild = time.monotonic() + max(MIN_REBUILD_S, 3 * took)
        log.info("search: BM25 over %d records in %.2f s", n, took)
        return True

    def without(self, gone: set[str]) -> "Lexical":
        """A new lexical side without the records ``gone`` (an erasure), its matrix built from the
        tokens already held (the vocabulary is shared: nothing is tokenized again), so the
        other records stay findable throughout; this one hides ``gone`` until it is replaced."""
        self.hidden = frozenset(gone)
        new = Lexical(self._tokenizer)
        keep = [i for i, rid in enumerate(self._ids) if rid not in gone]
        new._ids = [self._ids[i] for i in keep]
        new._row = {rid: j for j, rid in enumerate(new._ids)}
        new._snippets = [self._snippets[i] for i in keep]
        new._docs = [self._docs[i] for i in keep]
        new.high_water = self.high_water
        new.rebuild(force=True)
        return new

    def snippet(self, record_id: str) -> str | None:
        if record_id in self.hidden:
            return None
        row = self._row.get(record_id)
        return None if row is None else self._snippets[row]

    def query_ids(self, query: str) -> tuple[list[int], bool]:
        """The query's known token ids, and whether every word of it is known (a phrase can match)."""
        vocab = self._tokenizer.word_to_id
        words = [w for w in self._tokenizer.splitter(query.lower()) if w not in self._stop]
        ids = [vocab.get(w) for w in words]
        known = [i for i in ids if i is not None]
        return known, bool(ids) and len(known) == len(ids)

    def phrase_at(self, record_id: str, qids: list[int]) -> int | None:
        """Where the query's words first occur in a record's text in order and side by side
        (stopwords aside); None when they do not."""
        row = self._row.get(record_id)
        if row is None or not qids:
            return None
        return phrase_in(self._docs[row], qids)

    def search(self, qids: list[int], k: int) -> list[tuple[str, float]]:
        retriever, n = self._retriever, self._indexed
        if retriever is None or not n or not qids:
            return []
        known = len(retriever.scores["indptr"]) - 1
        empty = retriever.vocab_dict.get("")
        qids = [q for q in qids if q < known and q != empty]
        if not qids:
            return []
        scores = retriever.get_scores_from_ids(qids)[:n]
        hidden = self.hidden
        top = top_k(scores, k + len(hidden))
        return [(self._ids[i], float(scores[i])) for i in top if self._ids[i] not in hidden][:k]


def phrase_in(doc: np.ndarray, qids: list[int]) -> int | None:
    """Where ``qids`` first occur side by side in ``doc`` (int32 token ids); None when they do not.

    A byte search (``bytes.find``) is three times faster than comparing arrays at every
    occurrence of the first word (0.13 against 0.4 ms for a query's 50 candidates); a hit
    counts only where it starts on a token boundary."""
    text, q = np.ascontiguousarray(doc, dtype=np.int32).tobytes(), np.asarray(qids, dtype=np.int32).tobytes()
    at = text.find(q)
    while at > 0 and at % 4:
        at = text.find(q, at + 1)
    return None if at < 0 else at // 4


def top_k(scores: np.ndarray, k: int, stride: int = 16) -> np.ndarray:
    """The rows of the ``k`` largest positive scores, best first (ties: lower row first).

    Exact, and ten times faster than ``argpartition`` over every row at 100k records (1 ms
    there: most of a lexical query): a threshold is taken from every ``stride``-th score,
    loose enough that about ``2 * k`` rows pass it, and only those are ranked. The rows at
    or above a threshold hold the ``k`` best whenever there are at least ``k`` of them; else
    the positive rows at or above the ``k``-th best positive score are."""
    k = min(k, len(scores))
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    sample = scores[::stride]
    take = min(len(sample), -(-2 * k // stride) + 1)
    threshold = np.partition(sample, len(sample) - take)[len(sample) - take]
    rows = np.flatnonzero(scores >= threshold) if threshold > 0 else np.zeros(0, dtype=np.int64)
    if len(rows) < k:
        rows = np.flatnonzero(scores > 0)
        if len(rows) > k:  # only the k-th best score and above (ties included) are sorted
            kth = np.partition(scores[rows], len(rows) - k)[len(rows) - k]
            rows = rows[scores[rows] >= kth]
    return rows[np.lexsort((rows, -scores[rows]))[:k]]


def fuse(rankings: list[list[str]], k: int) -> list[tuple[str, float]]:
    """Reciprocal rank fusion of several rankings (best first): sum of 1 / (RRF_K + rank)."""
    score: dict[str, float] = {}
    for ranking in rankings:
        for rank, rid in enumerate(ranking, 1):
            score[rid] = score.get(rid, 0.0) + 1.0 / (RRF_K + rank)
    return sorted(score.items(), key=lambda kv: (-kv[1], kv[0]))[:k]


class SearchService:
    """The current vector index, the lexical side and a query embedder, for one API process.

    :meth:`refresh` (the API's background thread, every ``REFRESH_S``) swaps in a new index
    version as soon as ``CURRENT`` names one, and then adds the new records' texts to BM25
    (from DuckDB; while a run holds the database that waits for the next refresh, and hits
    without a snippet get theirs from a short read). A search takes the references it needs
    once, so a swap never changes an index under a running query.

    The query is embedded by the embedding server when one runs with the index's model
    (`up` starts it), else by a model loaded in this process on the first search."""

    def __init__(self, paths, settings, batcher):
        self.paths, self.settings = paths, settings
        self.index = None  # index.LoadedIndex
        self.lexical = Lexical()
        self.batcher = batcher  # embedding.Batcher: queries share batches with predictions

    # ------------------------------------------------------------------ keeping current
    def refresh(self) -> None:
        from ..index import IndexStore
        from ..store import Store, StoreBusy

        store = IndexStore(self.paths.index)
        version = store.current_version()
        if version is not None and (self.index is None or self.index.meta.version != version):
            loaded = store.load(version)
            loaded.lookup()  # built once here, not by the first query
            old = self.index
            removed = np.setdiff1d(old.vec_ids, loaded.vec_ids, assume_unique=True) if old is not None else ()
            self.index = loaded
            if old is not None and old.meta.model_id != loaded.meta.model_id:
                # another embedding model: its first versions hold only what is embedded so far,
                # and the rest comes back with lower vec_ids than this side has read: read it all again
                self.lexical = Lexical()
            elif len(removed):
                # records left the index (an erasure): their texts leave the lexical side too,
                # hidden at once and gone from the new side built from the tokens held
                lookup = old.lookup()
                self.lexical = self.lexical.without({lookup[int(v)] for v in removed})
            log.info("search: index %s (%d vectors)", version, loaded.meta.ntotal)
        index = self.index
        if index is None or not len(index.vec_ids):
            return
        top = int(index.vec_ids.max())
        if self.lexical.high_water >= top:
            self.lexical.rebuild()
            return
        try:
            with Store.of(self.paths, lock_timeout_s=0.2).connect() as con:
                rows = con.execute("""SELECT vec_id, id, text FROM records WHERE vec_id > ? AND vec_id <= ?
                                      ORDER BY vec_id LIMIT 50000""", [self.lexical.high_water, top]).fetchall()
        except StoreBusy:
            return  # a run holds the database: next time
        if rows:
            self.lexical.add([r[1] for r in rows], [r[2] for r in rows], int(rows[-1][0]))
        else:
            self.lexical.high_water = top
        self.lexical.rebuild()

    # ------------------------------------------------------------------ searching
    def search(self, query: str, k: int, mode: str = "hybrid") -> dict:
        faiss_one_thread()  # one query: no OpenMP team of FAISS's in this request thread (openmp.py)
        index = self.index
        depth = max(k, 50)  # each ranking's depth before fusion and the phrase check
        dense: list[tuple[str, float]] = []
        lexical: list[tuple[str, float]] = []
        pending = None
        if index is not None and mode in ("hybrid", "dense"):
            # the embedder works in the batcher's thread while BM25 scores here: on two
            # cores the lexical side then costs no wall time
            pending = self.batcher.submit([query], index.meta.model_id, index.meta.dim)
        lex = self.lexical  # one snapshot per request: an erasure swaps in a new one (its own vocabulary)
        qids, whole = lex.query_ids(query)
        if mode in ("hybrid", "lexical"):
            lexical = lex.search(qids, depth)
        if pending is not None:
            timeout = self.settings.api_timeout_s
            try:
                vector = pending.result(timeout)
            except FutureTimeout:
                pending.cancel()  # still queued: never embedded
                from .predict import TimedOut

                raise TimedOut(f"the query was not embedded within {timeout:g} s "
                               "(STREAM_SENTINEL_API_TIMEOUT_SECONDS): the embedder is busy or not answering") from None
            dense = index.search(vector, depth if mode == "hybrid" else k)[0]
        if mode == "dense":
            ranked = dense[:k]
        else:
            ranked = fuse([[r for r, _ in dense], [r for r, _ in lexical]], depth) if mode == "hybrid" else lexical
            if whole and len(qids) > 1:  # a phrase of known words: records holding it first
                at = {rid: lex.phrase_at(rid, qids) for rid, _ in ranked}
                ranked = sorted(ranked, key=lambda rs: (at[rs[0]] is None, at[rs[0]] or 0))  # stable: then by rank
            ranked = ranked[:k]
        snippets = {rid: lex.snippet(rid) for rid, _ in ranked}
        missing = [rid for rid, text in snippets.items() if text is None]
        if missing:  # newer than the lexical side (a run held the database at the last refresh)
            snippets.update(self._read_snippets(missing))
        dense_rank = {r: i for i, (r, _) in enumerate(dense, 1)}
        lexical_rank = {r: i for i, (r, _) in enumerate(lexical, 1)}
        return {"index_version": None if index is None else index.meta.version,
                "results": [{"id": rid, "score": round(score, 6), "snippet": snippets.get(rid),
                             "dense_rank": dense_rank.get(rid), "lexical_rank": lexical_rank.get(rid)}
                            for rid, score in ranked]}


    def _read_snippets(self, ids: list[str]) -> dict[str, str]:
        from ..store import Store, StoreBusy

        try:
            with Store.of(self.paths, lock_timeout_s=0.2).connect() as con:
                rows = con.execute("SELECT id, text FROM records WHERE id IN (SELECT unnest(?))", [ids]).fetchall()
        except StoreBusy:
            return {}
        return {rid: snippet(text) for rid, text in rows}

    def describe(self) -> dict:
        index = self.index
        return {"index_version": None if index is None else index.meta.version,
                "lexical_records": len(self.lexical), "query_embedder": self.batcher.embedding.describe()}
