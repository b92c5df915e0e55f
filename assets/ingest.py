"""records -> embeddings -> vector_index: the ingest half of the asset graph."""


import time

import dagster as dg
from pydantic import Field

from stream_sentinel import ingest, pipeline
from stream_sentinel.resources import EmbedderResource, StreamSentinelResource

from .partitions import declared_daily_arrivals as daily_arrivals
from .pools import POOL_INDEX


# Files are written in groups of 20, each one held DuckDB session and one transaction
# (``ingest.process_files``): per-file opens and commits were most of the step's time. A
# group holds the file for well under a second, so a sensor tick never waits long.
FILES_PER_SESSION = 20


class RawRecordsConfig(dg.Config):
    files: list[str] = Field(
        default_factory=list,
        description="sha256 of the files to ingest (the sensor fills this in); "
        "empty = every file that arrived on the partition's day (what a backfill does)",
    )


@dg.asset(
    partitions_def=daily_arrivals,
    group_name="ingest",
    kinds={"duckdb"},
    description="Validated records from the JSON/JSONL files in raw/, by arrival day (UTC). "
    "Bad files are quarantined in failed/ with an .error.json; invalid records go to `rejects`.",
)
def raw_records(
    context: dg.AssetExecutionContext, config: RawRecordsConfig, sentinel: StreamSentinelResource
) -> dg.MaterializeResult:
    started = time.perf_counter()
    part = context.partition_key
    store, s = sentinel.store(), sentinel.settings
    shas = list(config.files) or ingest.files_for_partition(store, part)
    wrong = ingest.files_outside_partition(store, shas, part)
    if wrong:
        raise dg.Failure(f"files {wrong} did not arrive on {part}; run them in their own partition")
    totals = {"processed": 0, "quarantined": 0, "missing": 0, "waiting": 0, "superseded": 0}
    ingested = skipped = rejected = 0
    problems = []
    for start in range(0, len(shas), FILES_PER_SESSION):
        for out in ingest.process_files(sentinel.paths, store, shas[start:start + FILES_PER_SESSION],
                                        s.settle_s, s.ingest_db_memory):
            totals[out.status] += 1
            ingested, skipped, rejected = ingested + out.ingested, skipped + out.skipped, rejected + out.rejected
            if out.status != "processed":
                context.log.warning(f"{out.path}: {out.status}: {out.error}")
                problems.append(f"| `{out.path}` | {out.status} | {out.error} |")
        n = min(start + FILES_PER_SESSION, len(shas))
        context.log.info(f"files {n}/{len(shas)}: {ingested} records ingested, {rejected} rejected")
    meta = {
        "files": len(shas),
        "files_processed": totals["processed"],
        "files_quarantined": totals["quarantined"],
        "files_missing": totals["missing"],
        # unfinished-looking files inside the settle window (re-planned later), and files that
        # changed after they were registered (their new content is a new file)
        "files_waiting": totals["waiting"],
        "files_superseded": totals["superseded"],
        "records_ingested": ingested,
        "records_skipped_identical": skipped,
        "records_rejected": rejected,
        "partition_records": (rows := ingest.partition_record_count(store, part)),
        "dagster/row_count": rows,  # the partition's rows of `records`
        "duration_s": round(time.perf_counter() - started, 3),
    }
    if problems:
        meta["problem_files"] = dg.MetadataValue.md("| file | status | error |\n|---|---|---|\n" + "\n".join(problems))
    return dg.MaterializeResult(
        metadata=meta, data_version=dg.DataVersion(ingest.partition_data_version(store, part)))


@dg.asset(
    partitions_def=daily_arrivals,
    deps=[raw_records],
    group_name="ingest",
    kinds={"duckdb", "pytorch"},
    description="Sentence-transformers vectors (L2-normalized) of the partition's records that have "
    "none for the current model id; a new model id re-embeds on backfill.",
    check_specs=[dg.AssetCheckSpec("no_unembedded_records", asset="embeddings", blocking=True,
                                   description="every record the partition held when the step began has a vector "
                                   "for the current model (records another run adds meanwhile are its own)")],
)
def embeddings(
    context: dg.AssetExecutionContext, sentinel: StreamSentinelResource, embedder: EmbedderResource
):
    part = context.partition_key
    store = sentinel.store()
    last = [0.0]

    def progress(done: int, total: int) -> None:
        if time.monotonic() - last[0] > 5 or done == total:
            last[0] = time.monotonic()
            context.log.info(f"embedded {done}/{total}")

    result = pipeline.embed_partition(store, embedder.text_embedder, part, progress)
    # the partition now (another run may be adding records to it): for the row count only
    left = pipeline.unembedded_count(store, result.model_id, part)
    yield dg.MaterializeResult(
        metadata={
            "model_id": result.model_id,
            "model_path": str(embedder.embedder.path),
            "device": embedder.embedder.device,
            "embedded_by": embedder.embedded_by,
            "records_embedded": result.embedded,
            "records_already_embedded": result.already,
            "duration_s": round(result.seconds, 3),
            "texts_per_s": round(result.texts_per_s, 1),
            # the partition's rows of `embeddings` for the current model
            "dagster/row_count": ingest.partition_record_count(store, part) - left,
        },
        data_version=dg.DataVersion(pipeline.embeddings_data_version(store, result.model_id, part)),
    )
    yield dg.AssetCheckResult(
        check_name="no_unembedded_records",
        passed=result.missing == 0,
        metadata={"unembedded": result.missing, "model_id": result.model_id},
        description=None if result.missing == 0
        else f"{result.missing} records of {part} have no vector for {result.model_id}",
    )


@dg.asset(
    deps=[embeddings],
    group_name="ingest",
    kinds={"faiss"},
    pool=POOL_INDEX,
    automation_condition=dg.AutomationCondition.eager().without(~dg.AutomationCondition.any_deps_missing()),
    description="FAISS index (cosine via inner product) over every embedding of the current model. "
    "Grown in place while new vectors are under the rebuild ratio of the index, rebuilt past it; "
    "each version is a complete folder switched atomically, the last 3 kept as backups.",
)
def vector_index(
    context: dg.AssetExecutionContext, sentinel: StreamSentinelResource, embedder: EmbedderResource
) -> dg.MaterializeResult:
    store = sentinel.store()
    upd = pipeline.update_index(store, sentinel.index_store(), embedder.model_id, embedder.dim,
                                sentinel.settings.rebuild_ratio, sentinel.settings.ivf_threshold,
                                sentinel.settings.nprobe)
    if upd.meta is None:
        return dg.MaterializeResult(metadata={"mode": "empty", "ntotal": 0, "model_id": embedder.model_id},
                                    data_version=dg.DataVersion("empty"))
    m = upd.meta
    context.log.info(f"index {m.version}: {upd.mode}, {upd.n_new} new vectors, ntotal {m.ntotal}")
    return dg.MaterializeResult(
        metadata={
            "mode": upd.mode,
            "version": m.version,
            "parent_version": m.parent_version or "",
            "ntotal": m.ntotal,
            "n_new": upd.n_new,
            "n_removed": upd.n_removed,
            "model_id": m.model_id,
            "dim": m.dim,
            "index_type": m.index_type,
            "built_at": m.built_at,
            "source_data_version": m.data_version,
            "rebuild_ratio": sentinel.settings.rebuild_ratio,
            "nprobe": m.nprobe,
            "duration_s": round(upd.seconds, 3),
            "path": dg.MetadataValue.path(str(sentinel.paths.index / m.version)),
        },
        data_version=dg.DataVersion(m.data_version),
    )


ingest_job = dg.define_asset_job(
    "ingest_job",
    # labels rides along so that feedback waiting for these records resolves in the same run
    selection=dg.AssetSelection.assets(raw_records, embeddings, vector_index)
    | dg.AssetSelection.assets("window_features", "labels", "predictions"),
    description="One micro-batch: new files -> records -> window features, embeddings -> index; pending labels "
    "resolved and "
    "the new records scored by the champion (launched by raw_files_sensor).",
)
