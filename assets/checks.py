"""Standalone asset checks: the vector index (blocking: a failed check fails the run and CI) and
parked units (ERROR, not blocking)."""


import dagster as dg
import numpy as np

from stream_sentinel.resources import EmbedderResource, StreamSentinelResource

from .feedback import feedback
from .ingest import raw_records, vector_index


def _embedded_count(sentinel: StreamSentinelResource, model_id: str) -> int:
    with sentinel.store().connect() as con:
        return int(con.execute("SELECT count(*) FROM embeddings WHERE model_id = ?", [model_id]).fetchone()[0])


# With runs overlapping (the PostgreSQL store), another run may embed records between this index
# version's build and its check: those are the next version's, not missing. Vectors embedded more
# than this long before the build must be in it. One run at a time (DuckDB): all of them.
CONCURRENT_GRACE_S = 60


@dg.asset_check(asset=vector_index, blocking=True,
                description="the index holds every record embedded with the current model and nothing else "
                "(with overlapping runs: every one embedded before this version was built)")
def index_matches_embeddings(sentinel: StreamSentinelResource, embedder: EmbedderResource) -> dg.AssetCheckResult:
    import pandas as pd

    expected = _embedded_count(sentinel, embedder.model_id)
    meta = sentinel.index_store().read_meta()
    ntotal = meta.ntotal if meta and meta.model_id == embedder.model_id else 0
    store = sentinel.store()
    if store.backend == "duckdb" or meta is None or meta.model_id != embedder.model_id:
        passed, late, stale = ntotal == expected, 0, 0
    else:
        loaded = sentinel.index_store().load()
        built = pd.Timestamp(meta.built_at) - pd.Timedelta(seconds=CONCURRENT_GRACE_S)
        with store.connect() as con:
            con.register("indexed", pd.DataFrame({"vec_id": np.asarray(loaded.vec_ids, dtype=np.int64)}))
            late = int(con.execute(
                """SELECT count(*) FROM embeddings e WHERE e.model_id = ? AND e.created_at < ?
                   AND NOT EXISTS (SELECT 1 FROM indexed i WHERE i.vec_id = e.vec_id)""",
                [embedder.model_id, built.to_pydatetime()]).fetchall()[0][0])
            stale = int(con.execute(
                """SELECT count(*) FROM indexed i WHERE NOT EXISTS (
                       SELECT 1 FROM embeddings e WHERE e.vec_id = i.vec_id AND e.model_id = ?)""",
                [embedder.model_id]).fetchall()[0][0])
            con.unregister("indexed")
        passed = late == 0 and stale == 0
    return dg.AssetCheckResult(
        passed=passed,
        metadata={"index_ntotal": ntotal, "embedded_records": expected,
                  "index_version": meta.version if meta else "", "missing_older": late, "not_embedded": stale},
        description=None if passed else
        f"index holds {ntotal} vectors of {embedder.model_id} but {expected} records are embedded"
        + (f" ({late} embedded before this version was built are missing, {stale} indexed are not embedded)"
           if store.backend != "duckdb" else ""),
    )


@dg.asset_check(asset=vector_index, blocking=True,
                description="no vector id or record id appears twice in the index")
def index_ids_unique(sentinel: StreamSentinelResource) -> dg.AssetCheckResult:
    loaded = sentinel.index_store().load()
    if loaded is None:
        return dg.AssetCheckResult(passed=True, description="no index yet")
    dup_vec = int(len(loaded.vec_ids) - len(np.unique(loaded.vec_ids)))
    dup_rec = int(len(loaded.record_ids) - len(set(loaded.record_ids)))
    size_ok = loaded.index.ntotal == len(loaded.vec_ids)
    return dg.AssetCheckResult(
        passed=dup_vec == 0 and dup_rec == 0 and size_ok,
        metadata={"duplicate_vec_ids": dup_vec, "duplicate_record_ids": dup_rec,
                  "id_map_size": len(loaded.vec_ids), "ntotal": int(loaded.index.ntotal)},
    )


@dg.asset_check(asset=vector_index, blocking=True,
                description="the index dimension matches the embedding model's output dimension")
def index_dimension_matches_model(sentinel: StreamSentinelResource, embedder: EmbedderResource) -> dg.AssetCheckResult:
    loaded = sentinel.index_store().load()
    if loaded is None:
        return dg.AssetCheckResult(passed=True, description="no index yet")
    dim = embedder.dim
    return dg.AssetCheckResult(
        passed=int(loaded.index.d) == dim == loaded.meta.dim,
        metadata={"index_dim": int(loaded.index.d), "meta_dim": loaded.meta.dim, "model_dim": dim,
                  "model_id": embedder.model_id},
    )


@dg.multi_asset_check(
    specs=[dg.AssetCheckSpec("no_parked_units", asset=raw_records,
                             description="no raw-file micro-batch is parked after repeated failed runs"),
           dg.AssetCheckSpec("no_parked_units", asset=feedback,
                             description="no Kafka range or feedback file is parked after repeated failed runs")],
    can_subset=True,
)
def no_parked_units(context: dg.AssetCheckExecutionContext, sentinel: StreamSentinelResource):
    """ERROR (not blocking): parked work is still retried, slowly, but a person should look."""
    from stream_sentinel import retry

    parked = retry.parked(sentinel.store())
    kinds = {"raw_records": ("raw_batch",), "feedback": ("kafka_range", "feedback_file")}
    for key in context.selected_asset_check_keys:
        mine = [p for p in parked if p["kind"] in kinds[key.asset_key.path[-1]]]
        yield dg.AssetCheckResult(
            asset_key=key.asset_key, check_name=key.name, passed=not mine, severity=dg.AssetCheckSeverity.ERROR,
            metadata={"parked": len(mine), "units": dg.MetadataValue.json(
                [{k: str(v) for k, v in p.items()} for p in mine[:20]])},
            description=None if not mine else f"{len(mine)} unit(s) parked; first: {mine[0]['unit_key']}: "
            f"{mine[0]['last_error'][:200]}")


index_checks = [index_matches_embeddings, index_ids_unique, index_dimension_matches_model]

# What CI and `stream-sentinel check` run: every standalone check, without materializing.
checks_job = dg.define_asset_job(
    "index_checks_job",
    selection=dg.AssetSelection.checks(*index_checks, no_parked_units),
    description="Runs the standalone asset checks (the vector index, parked units) against the current state "
    "(CI, `stream-sentinel check`).",
)
