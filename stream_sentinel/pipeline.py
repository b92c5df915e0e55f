"""The glue between DuckDB and the models: embed new records, grow or rebuild the index.

Both steps are resumable: embeddings are committed chunk by chunk (a killed run keeps
what it finished and the next run embeds only the rest), and the index moves from one
complete version to the next.
"""

from __future__ import annotations

import hashlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import pandas as pd

from .index import IndexMeta, IndexStore, new_index, plan_mode, set_nprobe
from .store import Store, vectors_from_arrow

log = logging.getLogger(__name__)

EMBED_CHUNK = 512


class TextEmbedder(Protocol):
    model_id: str
    dim: int

    def embed(self, texts: list[str]) -> np.ndarray: ...


@dataclass
class EmbedResult:
    model_id: str
    embedded: int
    already: int
    seconds: float
    # of the records the step found without a vector, those that still have none afterwards (records
    # another run ingests meanwhile into the same partition are that run's to embed and check)
    missing: int = 0

    @property
    def texts_per_s(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0


def _partition_filter(partition_key: str | None) -> tuple[str, list]:
    if partition_key is None:
        return "TRUE", []
    return "r.arrival_date = CAST(? AS DATE)", [partition_key]


def unembedded_count(store: Store, model_id: str, partition_key: str | None = None) -> int:
    where, params = _partition_filter(partition_key)
    with store.connect() as con:
        return int(con.execute(
            f"""SELECT count(*) FROM records r
                WHERE {where} AND NOT EXISTS (
                    SELECT 1 FROM embeddings e WHERE e.record_id = r.id AND e.model_id = ?)""",
            params + [model_id]).fetchone()[0])


def embed_partition(store: Store, embedder: TextEmbedder, partition_key: str | None,
                    progress: Callable[[int, int], None] | None = None) -> EmbedResult:
    """Embed the records of a partition (None = all) that have no vector for this model."""
    started = time.perf_counter()
    model_id = embedder.model_id
    dim = embedder.dim
    where, params = _partition_filter(partition_key)
    with store.connect() as con:
        todo = con.execute(
            f"""SELECT r.id, r.vec_id FROM records r
                WHERE {where} AND NOT EXISTS (
                    SELECT 1 FROM embeddings e WHERE e.record_id = r.id AND e.model_id = ?)
                ORDER BY r.vec_id""", params + [model_id]).fetchall()
        total = int(con.execute(f"SELECT count(*) FROM records r WHERE {where}", params).fetchone()[0])
    # The model runs in a worker thread (torch and the server socket release the GIL) while
    # this thread stores the previous chunk: the DuckDB writes hide behind the embedding.
    # DuckDB is used from this thread only (registering frames from two threads races).
    done = 0
    chunks = [todo[i:i + EMBED_CHUNK] for i in range(0, len(todo), EMBED_CHUNK)]

    def texts_of(chunk) -> list[str]:
        ids = [r[0] for r in chunk]
        with store.connect() as con:
            con.register("want", pd.DataFrame({"id": ids}))
            texts = dict(con.execute("SELECT r.id, r.text FROM records r JOIN want USING (id)").fetchall())
            con.unregister("want")
        return [texts[i] for i in ids]

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed") as pool:
        pending = pool.submit(embedder.embed, texts_of(chunks[0])) if chunks else None
        for k, chunk in enumerate(chunks):
            vecs = pending.result()  # no database lock is held while the model runs
            pending = pool.submit(embedder.embed, texts_of(chunks[k + 1])) if k + 1 < len(chunks) else None
            ids = [r[0] for r in chunk]
            if vecs.shape != (len(ids), dim):
                raise ValueError(f"model returned vectors of shape {vecs.shape}, expected ({len(ids)}, {dim})")
            df = pd.DataFrame({
                "record_id": ids,
                "model_id": model_id,
                "vec_id": np.array([r[1] for r in chunk], dtype=np.int64),
                "dim": dim,
                "vector": list(vecs),
                "created_at": pd.Timestamp.now(tz="UTC"),
            })
            with store.transaction(scope="vectors") as con:
                con.register("chunk_vecs", df)
                con.execute("""INSERT INTO embeddings
                               SELECT record_id, model_id, vec_id, dim, CAST(vector AS FLOAT[]), created_at
                               FROM chunk_vecs ON CONFLICT DO NOTHING""")
                con.unregister("chunk_vecs")
            done += len(chunk)
            if progress:
                progress(done, len(todo))
    missing = 0
    if todo:
        with store.connect() as con:
            con.register("todo_ids", pd.DataFrame({"id": [r[0] for r in todo]}))
            missing = int(con.execute(
                """SELECT count(*) FROM todo_ids t JOIN records r ON r.id = t.id WHERE NOT EXISTS (
                       SELECT 1 FROM embeddings e WHERE e.record_id = t.id AND e.model_id = ?)""",
                [model_id]).fetchall()[0][0])  # all rows read: DuckDB refuses unregister mid-result
            con.unregister("todo_ids")
    return EmbedResult(model_id, done, total - len(todo), time.perf_counter() - started, missing)


def embeddings_data_version(store: Store, model_id: str, partition_key: str | None) -> str:
    where, params = _partition_filter(partition_key)
    with store.connect() as con:
        n, s = con.execute(
            f"""SELECT count(*), coalesce(sum(hash(e.vec_id)), 0) FROM embeddings e
                JOIN records r ON r.id = e.record_id WHERE e.model_id = ? AND {where}""",
            [model_id] + params).fetchone()
    return hashlib.sha256(f"{model_id}:{n}:{s}".encode()).hexdigest()[:16]


def _fetch_vectors(store: Store, model_id: str, dim: int, only: np.ndarray | None = None
                   ) -> tuple[np.ndarray, list[str], np.ndarray]:
    with store.connect() as con:
        if only is None:
            rel = con.sql(
                "SELECT vec_id, record_id, vector FROM embeddings WHERE model_id = ? ORDER BY vec_id",
                params=[model_id])
        else:
            con.register("want", pd.DataFrame({"vec_id": only.astype(np.int64)}))
            rel = con.sql(
                """SELECT e.vec_id, e.record_id, e.vector FROM embeddings e JOIN want USING (vec_id)
                   WHERE e.model_id = ? ORDER BY e.vec_id""", params=[model_id])
        table = rel.to_arrow_table()
    vec_ids = table.column("vec_id").to_numpy().astype(np.int64)
    record_ids = table.column("record_id").to_pylist()
    vectors = vectors_from_arrow(table.column("vector"), len(vec_ids))
    return vec_ids, record_ids, vectors.reshape(len(vec_ids), dim)


def embedded_vec_ids(store: Store, model_id: str) -> np.ndarray:
    with store.connect() as con:
        table = con.sql("SELECT vec_id FROM embeddings WHERE model_id = ?", params=[model_id]).to_arrow_table()
    return table.column("vec_id").to_numpy().astype(np.int64)


@dataclass
class IndexUpdate:
    meta: IndexMeta | None
    mode: str  # rebuild | incremental | unchanged
    n_new: int
    n_removed: int
    seconds: float


def update_index(store: Store, index_store: IndexStore, model_id: str, dim: int,
                 rebuild_ratio: float = 0.2, ivf_threshold: int = 100_000, nprobe: int = 8) -> IndexUpdate:
    """Bring the index up to date with every embedding of ``model_id``. A rebuild picks the
    index type by size: exact below ``ivf_threshold`` vectors, IVF (``nprobe`` lists) above."""
    started = time.perf_counter()
    with index_store.writer_lock():
        wanted = embedded_vec_ids(store, model_id)
        current = index_store.read_meta()
        loaded = index_store.load() if current is not None and current.model_id == model_id else None
        indexed = loaded.vec_ids if loaded is not None else np.zeros(0, dtype=np.int64)
        new = np.setdiff1d(wanted, indexed, assume_unique=True)
        removed = np.setdiff1d(indexed, wanted, assume_unique=True)
        if loaded is not None and new.size == 0 and removed.size == 0:
            return IndexUpdate(current, "unchanged", 0, 0, time.perf_counter() - started)
        if current is None and wanted.size == 0:
            return IndexUpdate(None, "unchanged", 0, 0, time.perf_counter() - started)
        mode = plan_mode(current, model_id, dim, int(new.size), int(removed.size), rebuild_ratio)
        if mode == "incremental":
            vec_ids, record_ids, vectors = _fetch_vectors(store, model_id, dim, new)
            index = loaded.index
            index.add_with_ids(vectors, vec_ids)
            nprobe = current.nprobe
            all_ids = np.concatenate([loaded.vec_ids, vec_ids])
            all_records = loaded.record_ids + record_ids
            n_added = len(vec_ids)
        else:
            all_ids, all_records, vectors = _fetch_vectors(store, model_id, dim)
            index = new_index(dim, vectors, ivf_threshold)
            if len(all_ids):
                index.add_with_ids(vectors, all_ids)
            nprobe = nprobe if len(all_ids) >= ivf_threshold else 0
            set_nprobe(index, nprobe)
            n_added = len(all_ids)
        meta = index_store.publish(index, all_ids, all_records, model_id=model_id, mode=mode, n_added=n_added,
                                   parent_version=current.version if current else None, started=started,
                                   nprobe=nprobe)
    with store.transaction() as con:
        con.execute("INSERT INTO index_versions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                    [meta.version, meta.parent_version, meta.model_id, meta.mode, meta.index_type, meta.dim,
                     meta.ntotal, meta.n_added, meta.data_version, meta.duration_ms, meta.built_at])
    return IndexUpdate(meta, mode, int(new.size), int(removed.size), time.perf_counter() - started)


def partitions_with_unembedded(store: Store, model_id: str) -> list[str]:
    """Arrival days holding records without a vector for ``model_id`` (failed or pre-model-change runs)."""
    with store.connect() as con:
        return [r[0] for r in con.execute(
            """SELECT DISTINCT CAST(r.arrival_date AS VARCHAR) AS d FROM records r
               WHERE NOT EXISTS (SELECT 1 FROM embeddings e WHERE e.record_id = r.id AND e.model_id = ?)
               ORDER BY d""", [model_id]).fetchall()]
