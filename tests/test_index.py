"""FAISS index versions: incremental vs rebuild, atomic switch, backups, crash safety."""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pandas as pd
import pytest

from stream_sentinel.index import IndexStore
from stream_sentinel.pipeline import update_index

from .conftest import kill_when_paused

DIM = 16
MODEL = "test-model@sha256:0000"


def add_vectors(store, start: int, n: int, model_id: str = MODEL, seed: int | None = None) -> np.ndarray:
    rng = np.random.default_rng(seed if seed is not None else start)
    vecs = rng.normal(size=(n, DIM)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    return insert_vectors(store, start, vecs, model_id)


def insert_vectors(store, start: int, vecs: np.ndarray, model_id: str = MODEL) -> np.ndarray:
    """Rows in `embeddings` for vec_ids start, start+1, ... (record ids rec-<vec_id>)."""
    ids = np.arange(start, start + len(vecs), dtype=np.int64)
    df = pd.DataFrame({"record_id": [f"rec-{i}" for i in ids], "model_id": model_id, "vec_id": ids,
                       "dim": DIM, "vector": list(vecs), "created_at": pd.Timestamp.now(tz="UTC")})
    with store.transaction() as con:
        con.register("v", df)
        con.execute("INSERT INTO embeddings SELECT record_id, model_id, vec_id, dim, "
                    "CAST(vector AS FLOAT[]), created_at FROM v")
    return vecs


def test_first_build_then_incremental_under_ratio_then_rebuild(paths, store):
    ist = IndexStore(paths.index)
    add_vectors(store, 1, 100)
    first = update_index(store, ist, MODEL, DIM)
    assert (first.mode, first.meta.ntotal, first.meta.version) == ("rebuild", 100, "v000001")

    add_vectors(store, 101, 19)  # 19 < 20 % of 100
    inc = update_index(store, ist, MODEL, DIM)
    assert (inc.mode, inc.n_new, inc.meta.ntotal, inc.meta.parent_version) == ("incremental", 19, 119, "v000001")

    add_vectors(store, 120, 30)  # 30 >= 20 % of 119
    reb = update_index(store, ist, MODEL, DIM)
    assert (reb.mode, reb.meta.ntotal) == ("rebuild", 149)

    same = update_index(store, ist, MODEL, DIM)
    assert same.mode == "unchanged" and same.meta.version == reb.meta.version

    loaded = ist.load()
    assert sorted(loaded.vec_ids.tolist()) == list(range(1, 150))
    assert len(set(loaded.record_ids)) == 149
    with store.connect() as con:
        assert con.execute("SELECT list(mode ORDER BY version) FROM index_versions").fetchone()[0] == [
            "rebuild", "incremental", "rebuild"]


def test_search_finds_each_vector_itself(paths, store):
    vecs = add_vectors(store, 1, 50)
    ist = IndexStore(paths.index)
    update_index(store, ist, MODEL, DIM)
    add_vectors(store, 51, 5, seed=7)
    update_index(store, ist, MODEL, DIM)  # incremental: ids must still map right
    hits = ist.load().search(vecs[[0, 10, 49]], k=3)
    assert [h[0][0] for h in hits] == ["rec-1", "rec-11", "rec-50"]
    assert all(abs(h[0][1] - 1.0) < 1e-5 for h in hits)


def test_model_change_rebuilds_from_that_models_vectors_only(paths, store):
    ist = IndexStore(paths.index)
    add_vectors(store, 1, 40)
    update_index(store, ist, MODEL, DIM)
    add_vectors(store, 1, 40, model_id="other@sha256:1111", seed=99)
    upd = update_index(store, ist, "other@sha256:1111", DIM)
    assert upd.mode == "rebuild" and upd.meta.model_id == "other@sha256:1111" and upd.meta.ntotal == 40


def test_keeps_current_plus_three_backups(paths, store):
    ist = IndexStore(paths.index, keep_backups=3)
    for k in range(6):
        add_vectors(store, 1 + 100 * k, 100)
        update_index(store, ist, MODEL, DIM)
    assert ist.versions() == ["v000003", "v000004", "v000005", "v000006"]
    assert ist.current_version() == "v000006"
    assert ist.rollback() == "v000005"
    assert ist.load().meta.ntotal == 500


PAUSED_WRITER = textwrap.dedent("""
    import sys
    from stream_sentinel.index import IndexStore
    from stream_sentinel.pipeline import update_index
    from stream_sentinel.store import Store
    update_index(Store(sys.argv[1]), IndexStore(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
""")


@pytest.mark.parametrize("pause_at", ["index_files_written", "index_before_pointer_swap"])
def test_writer_killed_mid_write_leaves_previous_version_intact(paths, store, tmp_path, pause_at):
    ist = IndexStore(paths.index)
    add_vectors(store, 1, 100)
    before = update_index(store, ist, MODEL, DIM).meta
    add_vectors(store, 101, 10)
    kill_when_paused([sys.executable, "-c", PAUSED_WRITER, str(paths.db), str(paths.index), MODEL, str(DIM)],
                     pause_at, tmp_path / "paused", timeout_s=60)
    # readers still get the complete previous version
    assert ist.current_version() == before.version
    loaded = ist.load()
    assert loaded.meta.ntotal == loaded.index.ntotal == len(loaded.vec_ids) == 100
    # the next writer finishes the job and clears the debris
    after = update_index(store, ist, MODEL, DIM)
    assert after.meta.ntotal == 110 and ist.load().index.ntotal == 110
    assert not list(paths.index.glob(".tmp-*"))
    assert ist.current_version() == after.meta.version
    assert ist.versions() == [before.version, after.meta.version]  # no never-current orphan kept


def test_index_type_by_size_exact_then_ivf_with_recall_and_in_place_adds(paths, store):
    """Past the threshold a rebuild makes an IVF index; it grows in place under the 20 % rule,
    keeps ids mapped, and finds each stored vector's neighbours almost as exact search does."""
    import faiss

    ist = IndexStore(paths.index)
    # clustered data, like text embeddings: IVF recall on pure noise would say nothing
    rng = np.random.default_rng(3)
    centers = rng.normal(size=(40, DIM)).astype(np.float32)

    def clustered(start, n):
        vecs = centers[rng.integers(0, 40, n)] + 0.3 * rng.normal(size=(n, DIM)).astype(np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        return insert_vectors(store, start, vecs)

    small = clustered(1, 500)
    flat = update_index(store, ist, MODEL, DIM, ivf_threshold=2000, nprobe=8)
    assert flat.meta.index_type == "Flat,IP" and flat.meta.nprobe == 0

    big = np.vstack([small, clustered(501, 2500)])
    ivf = update_index(store, ist, MODEL, DIM, ivf_threshold=2000, nprobe=8)
    assert ivf.mode == "rebuild" and ivf.meta.index_type.startswith("IVF") and ivf.meta.nprobe == 8
    loaded = ist.load()
    assert faiss.extract_index_ivf(loaded.index).nprobe == 8  # restored from meta on load

    more = clustered(3001, 100)  # under 20 %: added in place, still IVF
    inc = update_index(store, ist, MODEL, DIM, ivf_threshold=2000, nprobe=8)
    assert inc.mode == "incremental" and inc.meta.index_type == ivf.meta.index_type and inc.meta.ntotal == 3100
    loaded = ist.load()
    allv = np.vstack([big, more])
    exact = faiss.IndexFlatIP(DIM)
    exact.add(allv)
    queries = allv[rng.choice(len(allv), 200, replace=False)]
    _, truth = exact.search(queries, 10)
    got = loaded.search(queries, 10)
    recall = np.mean([len({f"rec-{i + 1}" for i in t} & {r for r, _ in g}) / 10 for t, g in zip(truth, got)])
    assert recall >= 0.9, recall
    assert got[0][0][0] == f"rec-{int(np.argmax(allv @ queries[0])) + 1}"
